"""Sidebar retraining: a form that queues a training job, and the live job queue.

The dashboard only writes a row to the SQLite job store (``runs/jobs.sqlite``) and starts a
worker process (``python -m train worker``) when none is alive; the worker trains and writes the
run folder. The queue is redrawn by a fragment every few seconds, so the page never blocks.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import sqlite3
from dataclasses import asdict
from datetime import UTC, datetime

import pandas as pd
import streamlit as st

from core.configs import ContrastiveConfig, FusionConfig, UGEConfig
from core.dataroot import DataRoot
from core.jobs import DB_FILE, Job, JobStore, QueueFull, start_worker, worker_alive
from core.runs import BACKBONE_FILE
from core.sources.catalog import source_names
from core.sources.lbm import SCORE_COLUMNS
from dashboard import common, data

POLL_SECONDS = 2.0
SEEN_KEY = "jobs_seen_done"
MINE_KEY = "jobs_queued_here"
MODALITIES = {
    "aerial + ground": (True, True),
    "aerial only": (True, False),
    "ground only": (False, True),
}
FLICKR_FILTERS = {"all": "all photos", "outdoor": "outdoor scenes", "building": "building scenes"}
KINDS = {
    "fusion": "housing quality (fusion)",
    "contrastive": "street-view encoder (contrastive)",
    "uge": "VLM embeddings (UGE)",
    "predict": "predict a year (monitoring)",
}
OBJECTIVES = {
    "temporal": "temporal: same place, years apart",
    "spatial": "spatial: places within 100 m",
    "global": "global: two augmentations",
    "unified": "unified: all three, weighted",
}


def open_store(root: str, write: bool) -> tuple[JobStore | None, str | None]:
    """The data root's job store and a note when it cannot be used.

    Browsing (``write`` false) opens it read-only, or not at all when there is none yet, so a
    read-only ``runs/`` or a broken file never stops a page. Nothing is created in a folder that
    is not a data root.
    """
    path = DataRoot(root).runs / DB_FILE
    if not data.is_data_root(root):
        return None, f"`{root}` is not a data root (no grid.parquet): no job store is kept here."
    if not write and not path.exists():
        return None, None
    try:
        return JobStore(path, readonly=not write), None
    except (ValueError, OSError, sqlite3.Error) as exc:
        reason = str(exc).removeprefix(f"{path}: ")
        return None, f"job store unreadable: {path}: {reason}"


def server_address() -> str:
    """The address the server listens on ('' means every interface)."""
    return str(st.get_option("server.address") or "")


def is_loopback(address: str) -> bool:
    """Whether ``address`` is reachable from this machine only."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def access() -> tuple[bool, bool, str | None]:
    """Whether this session may queue jobs, whether it may cancel anyone's, and a refusal note.

    On a loopback address anyone may train; otherwise the secret in ``STADSBEELD_RETRAIN_SECRET``
    must be typed into the sidebar. The secret also lets a session cancel jobs it did not queue
    (on loopback without a secret configured, anyone may).
    """
    secret = os.environ.get(data.SECRET_ENV, "")
    local = is_loopback(server_address())
    typed = ""
    if secret:
        typed = st.text_input("Retraining secret", type="password", key="retrain_secret")
    authorised = bool(secret) and hmac.compare_digest(typed.encode(), secret.encode())
    if local:
        return True, authorised or not secret, None
    where = server_address() or "every interface"
    if not secret:
        refusal = (
            f"Retraining refused: the dashboard listens on {where}, not only on this machine, and "
            f"no `{data.SECRET_ENV}` is set. Set it (and type it here) or serve on 127.0.0.1."
        )
        return False, False, refusal
    if not authorised:
        refusal = (
            f"Retraining refused: the dashboard listens on {where}; type the secret from "
            f"`{data.SECRET_ENV}` above to train."
        )
        return False, False, refusal
    return True, True, None


def queued_here() -> set[int]:
    """The ids of the jobs this session queued."""
    return st.session_state.setdefault(MINE_KEY, set())


def encoder_weights(root: str) -> dict[str, str | None]:
    """Ground encoders to choose from: label -> weights file (None = random initialisation)."""
    runs = data.load_runs(root)
    choices: dict[str, str | None] = {}
    for run in runs.itertuples():
        weights = DataRoot(root).runs / run.run_id / BACKBONE_FILE
        if weights.is_file():
            choices[f"{run.kind} encoder ({run.run_id})"] = str(weights)
    choices["random initialisation"] = None
    return choices


def fusion_form(root: str) -> dict | None:
    """The fusion options; returns the job config when Train was pressed."""
    scene_runs = data.load_runs(root, "scene")
    with st.form("retrain_form"):
        modalities = st.selectbox("Imagery", list(MODALITIES), key="retrain_modalities")
        present = data.load_images(root)["source"].unique()
        ground = st.multiselect(
            "Ground sources (several: pooled together)",
            [s for s in source_names(pd.Series(present)) if s in present] or ["gsv"],
            default=["gsv"] if "gsv" in present else list(present[:1]),
            key="retrain_ground",
            format_func=common.source_title,
        )
        subset = st.selectbox(
            "Flickr filter",
            list(FLICKR_FILTERS),
            key="retrain_subset",
            format_func=FLICKR_FILTERS.get,
            help="Needs a scene filter run",
        )
        weights = encoder_weights(root)
        encoder = st.selectbox("Ground encoder", list(weights), key="retrain_encoder")
        target = st.selectbox(
            "Target",
            list(SCORE_COLUMNS),
            index=list(SCORE_COLUMNS).index("won"),
            key="retrain_target",
        )
        epochs = st.number_input("Epochs", 1, 200, 12, key="retrain_epochs")
        seed = st.number_input("Seed", 0, 10_000, 0, key="retrain_seed")
        block_size = st.number_input(
            "Split block size (m)",
            100,
            5000,
            1000,
            step=100,
            key="retrain_block_size",
            help="Side of the spatial blocks of the train/validation/test split; a small data "
            "root needs small blocks to have test cells",
        )
        submitted = st.form_submit_button("Train", type="primary", key="retrain_submit")
    if not submitted:
        return None
    aerial, uses_ground = MODALITIES[modalities]
    if uses_ground and not ground:
        st.error("Choose at least one ground source, or 'aerial only'.")
        return None
    config = {
        "aerial": aerial,
        "ground": ",".join(ground) if uses_ground else None,
        "target": target,
        "epochs": int(epochs),
        "seed": int(seed),
        "block_size": float(block_size),
        "ground_weights": weights[encoder],
    }
    if uses_ground and "flickr" in ground:
        config["flickr_subset"] = subset
        if subset != "all":
            if scene_runs.empty:
                st.error(
                    "The outdoor and building filters need a scene filter run: "
                    "`stadsbeeld scene-filter` first, or choose 'all photos'."
                )
                return None
            config["scene_run"] = str(scene_runs["run_id"].iloc[0])
    return config


def contrastive_form() -> dict | None:
    """The contrastive pretraining options; returns the job config when Train was pressed."""
    with st.form("contrastive_form"):
        objective = st.selectbox(
            "Positive pairs", list(OBJECTIVES), key="retrain_objective", format_func=OBJECTIVES.get
        )
        epochs = st.number_input("Epochs", 1, 200, 8, key="retrain_contrastive_epochs")
        steps = st.number_input("Steps per epoch", 1, 10_000, 40, key="retrain_steps")
        seed = st.number_input("Seed", 0, 10_000, 0, key="retrain_contrastive_seed")
        submitted = st.form_submit_button("Train", type="primary", key="retrain_contrastive_submit")
    if not submitted:
        return None
    return {
        "objective": objective,
        "epochs": int(epochs),
        "steps_per_epoch": int(steps),
        "seed": int(seed),
    }


def uge_form() -> dict | None:
    """The UGE options (the tiny VLM on the demo schedule); returns the job config when Train
    was pressed. The worker builds the root's UGData first if it has none."""
    with st.form("uge_form"):
        stage1 = st.number_input("Stage 1 steps (LoRA)", 1, 100_000, 600, key="retrain_stage1")
        stage2 = st.number_input("Stage 2 steps (graph)", 1, 100_000, 1000, key="retrain_stage2")
        seed = st.number_input("Seed", 0, 10_000, 0, key="retrain_uge_seed")
        submitted = st.form_submit_button("Train", type="primary", key="retrain_uge_submit")
    if not submitted:
        return None
    return {"stage1_steps": int(stage1), "stage2_steps": int(stage2), "seed": int(seed)}


def predict_form(root: str) -> dict | None:
    """Predict a year with fusion runs (an ensemble: the seeds of one configuration); returns
    the job config when Predict was pressed. The Monitor page pairs the result with an
    earlier prediction of the same runs."""
    runs = data.load_runs(root, "fusion")
    years = list(DataRoot(root).aerial_years())
    if runs.empty or not years:
        st.info("Predicting needs a fusion run and an aerial mosaic of a known year.")
        return None
    labels = runs["config.label"].fillna("").to_numpy()
    newest = [i for i in range(len(runs)) if labels[i] == labels[0]]
    with st.form("predict_form"):
        chosen = st.multiselect(
            "Runs (several: an ensemble)",
            list(range(len(runs))),
            default=newest[:3],
            format_func=lambda i: common.run_title(runs.iloc[i]),
            key="retrain_predict_runs",
        )
        year = st.selectbox("Year", years, index=len(years) - 1, key="retrain_predict_year")
        window = st.number_input(
            "Street images within (years)", 0, 20, 1, key="retrain_predict_window"
        )
        submitted = st.form_submit_button("Predict", type="primary", key="retrain_predict_submit")
    if not submitted:
        return None
    if not chosen:
        st.error("Choose at least one fusion run.")
        return None
    return {
        "run": [str(runs["run_id"].iloc[i]) for i in chosen],
        "year": int(year),
        "window_years": int(window),
    }


def _age(timestamp: str | None) -> str:
    if not timestamp:
        return ""
    seconds = (datetime.now(UTC) - datetime.fromisoformat(timestamp)).total_seconds()
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


#: Each trainable job kind's configuration, whose defaults a job leaves out.
JOB_CONFIGS = {"fusion": FusionConfig, "contrastive": ContrastiveConfig, "uge": UGEConfig}


def describe(job: Job) -> str:
    """One line per job: id, what it trains, its state (a setting the job leaves out is its
    kind's default, as the worker runs it)."""
    config = job.config
    if job.kind in JOB_CONFIGS:
        config = asdict(JOB_CONFIGS[job.kind]()) | config
    if job.kind == "contrastive":
        return f"#{job.id} contrastive {config['objective']}, {config['epochs']} epochs"
    if job.kind == "predict":
        members = config.get("run", [])
        return f"#{job.id} predict {config.get('year', '?')} with {len(members)} run(s)"
    if job.kind == "uge":
        return f"#{job.id} uge, {config['stage1_steps']} + {config['stage2_steps']} steps"
    what = "+".join(
        (["aerial"] if config["aerial"] else [])
        + (str(config["ground"]).split(",") if config["ground"] else [])
    )
    return f"#{job.id} {job.kind} {what} → {config['target']}, {config['epochs']} epochs"


def show_running(store: JobStore, job: Job, may_cancel: bool) -> None:
    progress = job.progress or {}
    epoch, epochs = (
        int(progress.get("epoch") or 0),
        int(progress.get("epochs") or job.config.get("epochs") or 1),
    )
    status = "cancelling" if job.cancel_requested else "running"
    st.markdown(f"**{describe(job)}**: {status}")
    stage = progress.get("stage")
    if isinstance(stage, str):  # a stage before the epochs (building data, a pretraining)
        where = f"{stage}: {epoch}/{epochs}"
    elif stage is not None:  # UGE's two stages count steps
        where = f"stage {stage}: step {epoch}/{epochs}"
    else:
        where = f"epoch {epoch}/{epochs}"
    st.progress(min(epoch / max(epochs, 1), 1.0), text=where)
    facts = []
    if progress.get("loss") is not None:
        facts.append(f"loss {progress['loss']:.4f}")
    if progress.get("val_kendall_tau") is not None:
        facts.append(f"val tau {progress['val_kendall_tau']:.3f}")
    if job.heartbeat:
        facts.append(f"heartbeat {datetime.now(UTC).timestamp() - job.heartbeat:.0f} s ago")
    st.caption(" · ".join(facts) or "starting ...")
    if may_cancel and not job.cancel_requested and st.button("Cancel", key=f"cancel_{job.id}"):
        store.cancel(job.id)
        st.rerun(scope="fragment")


def jobs_active(root: str) -> bool:
    """Whether the data root's job store (read-only) holds a queued or running job."""
    store = open_store(root, write=False)[0]
    try:
        return store is not None and bool(store.jobs(["running", "queued"], limit=1))
    except (sqlite3.Error, OSError, ValueError):
        return False


def queue(root: str, write: bool, cancel_any: bool) -> None:
    """Running and queued jobs with live progress, and the last finished ones.

    With ``write`` false (browsing) the store is only read; otherwise dead workers' jobs are
    reaped, and jobs this session queued (any job with ``cancel_any``) may be cancelled.
    """
    store, note = open_store(root, write)
    if store is None:
        if note:
            st.warning(note)
        else:
            st.caption("No training jobs yet.")
        return
    try:
        if write:
            store.reap()
        jobs = store.jobs(limit=20)
    except (sqlite3.Error, OSError, ValueError) as exc:
        st.warning(f"job store unreadable: {store.path}: {exc}")
        return
    active = [j for j in jobs if j.status in ("running", "queued")]
    if not jobs:
        st.caption("No training jobs yet.")
        return
    mine = queued_here()
    for job in active:
        may_cancel = write and (cancel_any or job.id in mine)
        if job.status == "running":
            show_running(store, job, may_cancel)
        else:
            left, right = st.columns([3, 1])
            left.caption(f"{describe(job)}: queued {_age(job.created)}")
            if may_cancel and right.button("✕", key=f"cancel_{job.id}", help="Cancel this job"):
                store.cancel(job.id)
                st.rerun(scope="fragment")
    if active and not worker_alive(store.runs_root):
        st.warning(
            "No worker is running: start one with `python -m train worker --data "
            f"{root}`" + (" or press Train again." if write else ".")
        )
    finished = [j for j in jobs if j.status not in ("running", "queued")][:5]
    for job in finished:
        if job.status == "done":
            st.caption(f"✓ {describe(job)}: run `{job.run_id}`, {_age(job.finished)}")
        elif job.status == "cancelled":
            st.caption(f"⊘ {describe(job)}: cancelled {_age(job.finished)}")
        else:
            with st.expander(f"✗ {describe(job)}: failed"):
                st.code(job.error or "no error recorded", language=None)
    done = {j.id for j in jobs if j.status == "done"}
    seen = st.session_state.setdefault(SEEN_KEY, done)
    if done - seen:  # a job finished while this session watched: its run joins the selectors
        st.session_state[SEEN_KEY] = seen | done
        data.list_readable_runs.clear()
        st.rerun(scope="app")


def panel(root: str) -> None:
    """The sidebar section: the form (when retraining is enabled and allowed) and the job queue."""
    st.subheader("Training jobs")
    if not data.is_data_root(root):
        st.info(open_store(root, write=False)[1])
        return
    try:
        enabled, decided_by = data.retraining_enabled(root)
        caps = data.job_settings(root)
    except ValueError as error:
        st.error(str(error))
        enabled, decided_by, caps = False, "an unreadable settings file", data.JOB_SETTINGS
    cancel_any = False
    if enabled:
        allowed, cancel_any, refusal = access()
        store = None
        if not allowed:
            st.warning(refusal)
        else:
            store, note = open_store(root, write=True)
            if store is None:
                st.warning(note)  # the one note: the queue below cannot be read either
                return
            enqueue_from_form(root, store, caps)
        enabled = store is not None  # a refused session only reads
    else:
        st.info(
            "Retraining is off (" + decided_by + "). To train from here, start the dashboard "
            f"with `{data.RETRAIN_ENV}=1` (e.g. `make demo RETRAIN=1`) or put "
            f"`retraining: true` in `{DataRoot(root).root / data.SETTINGS_FILE}`."
        )
    # Redrawn every few seconds while jobs may change: always with the form, and while a
    # job is queued or running. A browsing session with nothing running does not poll: twenty
    # idle tabs would otherwise rerun it ten times a second between them.
    poll = enabled or jobs_active(root)
    st.fragment(run_every=POLL_SECONDS if poll else None)(queue)(root, enabled, cancel_any)


def enqueue_from_form(root: str, store: JobStore, caps: dict[str, int]) -> None:
    """The model choice and its form; queues the job within the caps and starts a worker."""
    kind = st.selectbox("Model", list(KINDS), key="retrain_kind", format_func=KINDS.get)
    forms = {
        "fusion": lambda: fusion_form(root),
        "contrastive": contrastive_form,
        "uge": uge_form,
        "predict": lambda: predict_form(root),
    }
    config = forms[kind]()
    if config is None:
        return
    mine = queued_here()
    try:
        job_id = store.enqueue(
            kind,
            config,
            max_active=caps["max_jobs_queued"],
            mine=mine,
            max_mine=caps["max_jobs_per_session"],
        )
    except QueueFull as full:
        st.warning(f"Job not queued: {full}. Wait for one to finish or cancel one.")
        return
    mine.add(job_id)
    if not worker_alive(store.runs_root) and data.start_worker_enabled(root):
        start_worker(root, processes=caps["worker_processes"])
    st.toast(f"Job #{job_id} queued")


def jobs_table(root: str) -> pd.DataFrame:
    """All jobs of the data root as a table (for the runs page), read-only; empty without a
    readable job store."""
    store = open_store(root, write=False)[0]
    try:
        jobs = [] if store is None else store.jobs(limit=500)
    except (sqlite3.Error, OSError, ValueError):
        jobs = []
    return pd.DataFrame(
        [
            {
                "job": j.id,
                "kind": j.kind,
                "what": describe(j),
                "status": j.status,
                "created": j.created,
                "finished": j.finished,
                "run_id": j.run_id,
                "error": (j.error or "").splitlines()[-1] if j.error else None,
            }
            for j in jobs
        ]
    )
