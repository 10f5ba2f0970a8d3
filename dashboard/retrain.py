"""Sidebar retraining: a form that queues a training job, and the live job queue.

The dashboard only writes a row to the SQLite job store (``runs/jobs.sqlite``) and starts a
worker process (``python -m train worker``) when none is alive; the worker trains and writes the
run folder. The queue is redrawn by a fragment every few seconds, so the page never blocks.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pandas as pd
import streamlit as st

from core.dataroot import DataRoot
from core.jobs import Job, JobStore, start_worker, worker_alive
from core.runs import BACKBONE_FILE
from core.sources.lbm import SCORE_COLUMNS
from dashboard import data

POLL_SECONDS = 2.0
SEEN_KEY = "jobs_seen_done"
MODALITIES = {
    "aerial + ground": (True, True),
    "aerial only": (True, False),
    "ground only": (False, True),
}
FLICKR_FILTERS = {"all": "all photos", "outdoor": "outdoor scenes", "building": "building scenes"}
KINDS = {"fusion": "housing quality (fusion)", "contrastive": "street-view encoder (contrastive)"}
OBJECTIVES = {
    "temporal": "temporal: same place, years apart",
    "spatial": "spatial: places within 100 m",
    "global": "global: two augmentations",
    "unified": "unified: all three, weighted",
}


def job_store(root: str) -> JobStore:
    return JobStore.for_runs(DataRoot(root).runs)


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
        ground = st.selectbox(
            "Ground source",
            ["gsv", "flickr"],
            key="retrain_ground",
            format_func={"gsv": "Google Street View", "flickr": "Flickr"}.get,
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
        submitted = st.form_submit_button("Train", type="primary", key="retrain_submit")
    if not submitted:
        return None
    aerial, uses_ground = MODALITIES[modalities]
    config = {
        "aerial": aerial,
        "ground": ground if uses_ground else None,
        "target": target,
        "epochs": int(epochs),
        "seed": int(seed),
        "ground_weights": weights[encoder],
    }
    if uses_ground and ground == "flickr":
        config["flickr_subset"] = subset
        if subset != "all":
            if scene_runs.empty:
                st.error(
                    "The outdoor and building filters need a scene filter run: "
                    "`python -m train scene-filter` first, or choose 'all photos'."
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


def _age(timestamp: str | None) -> str:
    if not timestamp:
        return ""
    seconds = (datetime.now(UTC) - datetime.fromisoformat(timestamp)).total_seconds()
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def describe(job: Job) -> str:
    """One line per job: id, what it trains, its state."""
    config = job.config
    if job.kind == "contrastive":
        return f"#{job.id} contrastive {config.get('objective', '?')}, {config.get('epochs', '?')} epochs"
    what = "+".join(
        (["aerial"] if config.get("aerial", True) else [])
        + ([str(config["ground"])] if config.get("ground") else [])
    )
    return f"#{job.id} {job.kind} {what} → {config.get('target', '')}, {config.get('epochs', '?')} epochs"


def show_running(store: JobStore, job: Job, may_cancel: bool) -> None:
    progress = job.progress or {}
    epoch, epochs = (
        int(progress.get("epoch") or 0),
        int(progress.get("epochs") or job.config.get("epochs") or 1),
    )
    status = "cancelling" if job.cancel_requested else "running"
    st.markdown(f"**{describe(job)}**: {status}")
    st.progress(min(epoch / max(epochs, 1), 1.0), text=f"epoch {epoch}/{epochs}")
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


@st.fragment(run_every=POLL_SECONDS)
def queue(root: str, may_cancel: bool) -> None:
    """Running and queued jobs with live progress, and the last finished ones."""
    store = job_store(root)
    store.reap()
    jobs = store.jobs(limit=20)
    active = [j for j in jobs if j.status in ("running", "queued")]
    if not jobs:
        st.caption("No training jobs yet.")
        return
    for job in active:
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
            f"{root}`" + (" or press Train again." if may_cancel else ".")
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
        data.load_runs.clear()
        st.rerun(scope="app")


def panel(root: str) -> None:
    """The sidebar section: the form (when retraining is enabled) and the job queue."""
    st.subheader("Training jobs")
    try:
        enabled, decided_by = data.retraining_enabled(root)
    except ValueError as error:
        st.error(str(error))
        enabled, decided_by = False, "an unreadable settings file"
    if enabled:
        kind = st.selectbox("Model", list(KINDS), key="retrain_kind", format_func=KINDS.get)
        config = fusion_form(root) if kind == "fusion" else contrastive_form()
        if config is not None:
            store = job_store(root)
            job_id = store.enqueue(kind, config)
            if not worker_alive(store.runs_root) and data.start_worker_enabled(root):
                start_worker(root)
            st.toast(f"Job #{job_id} queued")
    else:
        st.info(
            "Retraining is off (" + decided_by + "). To train from here, start the dashboard "
            f"with `{data.RETRAIN_ENV}=1` (e.g. `make demo RETRAIN=1`) or put "
            f"`retraining: true` in `{DataRoot(root).root / data.SETTINGS_FILE}`."
        )
    queue(root, enabled)


def jobs_table(root: str) -> pd.DataFrame:
    """All jobs of the data root as a table (for the runs page)."""
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
            for j in job_store(root).jobs(limit=500)
        ]
    )
