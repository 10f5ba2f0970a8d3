"""The configurations of every trainer: one dataclass per recipe, saved with every run.

These are the single source of the command line (``stadsbeeld <command> --help`` lists every
field as an option, its attribute docstring as the help text) and of the run folders'
``config.yaml``, which ``stadsbeeld <command> --config runs/<id>/config.yaml`` reads back to
repeat a run. The demo and paper schedules are YAML files of field values under
``assets/configs/`` (:func:`schedule_file`).

This module imports neither torch nor the geo stack, so ``--help`` and the dashboard's forms
stay fast; the valid backbone names are spelt out here and checked against the registry in
:mod:`core.models.backbones` by a test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Self

from core import ASSETS
from core.dataroot import DEFAULT_DATA, DataRoot
from core.pairs import PairConfig
from core.scenes import SUBSETS, SceneFilterConfig
from core.sources import SOURCE_NAME

#: Names in :func:`core.models.backbones.create_backbone`'s registry.
Backbone = Literal["convnet_small", "resnet18", "resnet50", "vit_tiny", "vit_small", "vit_base"]
#: Leefbaarometer score columns a fusion model can learn, and the 1..9 class.
Target = Literal["lbm", "afw", "fys", "onv", "soc", "vrz", "won", "lbm_class"]
FlickrSubset = Literal["all", "outdoor", "building"]
Objective = Literal["temporal", "spatial", "global", "unified"]
#: The street-level sources the demo city and the fetch clients write; ``--ground`` takes any
#: catalog source (:data:`core.sources.SOURCE_NAME`), or several.
GROUND_SOURCES = ("gsv", "flickr", "amsterdam_panorama", "mapillary")
RULES = ("temporal", "spatial", "global")
OBJECTIVES: tuple[str, ...] = Objective.__args__
#: Values a trainer records in a run's ``config.yaml`` beside the config's fields: derived from
#: the config and the data, never inputs (``--config runs/<id>/config.yaml`` skips them).
DERIVED_KEYS = (
    "label",
    "device_resolved",
    "processes",
    "target_mean",
    "target_std",
    "vlm_resolved",
    "ugdata_manifest",
    "target",
    "members",
    "train_data",
    "trained_year",
    "label_year",
    "aerial_raster",
    "captured_years",
    "uncertainty",
)


class Config:
    """What every trainer config shares: reading back from a run's ``config.yaml``."""

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Self:
        """A config from saved values; keys that are not fields (a run's derived values) are
        ignored."""
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in values.items() if k in names})


def schedule_file(command: str, name: str) -> Path:
    """The shipped schedule ``name`` of a command: ``assets/configs/<command>-<name>.yaml``.

    Raises:
        FileNotFoundError: if no such schedule ships, naming the ones that do.
    """
    folder = ASSETS / "configs"
    path = folder / f"{command}-{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob(f"{command}-*.yaml"))
        raise FileNotFoundError(f"{path}: no schedule {name!r}; the schedules are {known}")
    return path


@dataclass
class EncoderConfig(Config):
    """What every image-encoder recipe (scene filter, perception, ...) is configured by."""

    data: str = DEFAULT_DATA
    """Data root (default: ``STADSBEELD_DATA``, else data/demo)."""
    backbone: Backbone = "convnet_small"
    """Image encoder architecture."""
    px: int = 32
    """Images are resized to this square, in pixels."""
    epochs: int = 6
    """Passes over the training data."""
    batch_size: int = 256
    """Images per optimisation step."""
    lr: float = 3e-3
    """Peak learning rate of the one-cycle schedule (AdamW)."""
    seed: int = 0
    """Seed of the initialisation, shuffling and augmentation."""
    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu, cuda or cuda:N."""


@dataclass
class SceneTrainConfig(EncoderConfig):
    """Scene classifier: trained on the root's scene labels, or loaded from ``checkpoint``."""

    checkpoint: str | None = None
    """A trained classifier (e.g. Places365 ResNet-50) to score with, instead of training one."""
    scene_names: str | None = None
    """The checkpoint's class names, one per line (categories_places365.txt works)."""
    filter: SceneFilterConfig = field(default_factory=SceneFilterConfig)
    """Which scenes make the outdoor and building Flickr subsets."""

    def __post_init__(self) -> None:
        if isinstance(self.filter, dict):  # read back from a run's config.yaml
            self.filter = SceneFilterConfig(**self.filter)


@dataclass
class PerceptionConfig(EncoderConfig):
    """Perception training on pairwise votes; ``test_share`` of them measure pair accuracy."""

    test_share: float = 0.2
    """Share of the votes held out to measure pair accuracy."""


@dataclass
class FusionConfig(Config):
    """One fusion run (defaults: the CPU demo schedule; ``fusion-paper.yaml`` is the paper's)."""

    data: str = DEFAULT_DATA
    """Data root (default: ``STADSBEELD_DATA``, else data/demo)."""
    year: int | None = None
    """Label year (default: the latest)."""
    target: Target = "won"
    """Leefbaarometer score to learn, or lbm_class (the 1..9 class)."""
    aerial: bool = True
    """Use the aerial branch (false: ground only)."""
    aerial_backbone: Backbone = "convnet_small"
    """Aerial encoder architecture."""
    aerial_weights: str | None = None
    """Weights file or run id for the aerial backbone (default: random initialisation)."""
    aerial_px: int = 64
    """Aerial patches are resized to this square, in pixels."""
    patch_m: float = 256.0
    """Side of the aerial patch around each cell's centre, in metres."""
    ground: str | None = "gsv"
    """Street-level source of the ground branch (gsv, flickr, amsterdam_panorama, mapillary,
    other, any catalog source), or several joined by commas, whose images are pooled per cell
    together (none: aerial only)."""
    flickr_subset: FlickrSubset = "all"
    """Flickr photos kept by the scene filter: all, outdoor or building scenes."""
    scene_run: str | None = None
    """Scene filter run id (needed for the outdoor and building subsets)."""
    scene_threshold: float | None = None
    """Override the scene run's probability threshold."""
    ground_backbone: Backbone = "convnet_small"
    """Frozen ground encoder architecture."""
    ground_weights: str | None = None
    """Weights file or run id of the frozen ground encoder (default: random initialisation)."""
    ground_px: int = 32
    """Street images are resized to this square, in pixels."""
    window_years: int | None = None
    """Only street images captured within this many years of the label year (default: all);
    the aerial mosaic is always the label year's where the root has one."""
    epochs: int = 12
    """Training epochs; the epoch with the best validation tau is kept."""
    warmup_epochs: int = 0
    """Epochs with the aerial backbone frozen."""
    batch_size: int = 128
    """Cells per optimisation step."""
    lr: float = 3e-3
    """Peak learning rate of the one-cycle schedule (AdamW)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    seed: int = 0
    """Seed of the initialisation, shuffling and augmentation (and of the split, by default)."""
    split_seed: int | None = None
    """Seed of the spatial block split (default: seed)."""
    block_size: float = 1000.0
    """Side of the spatial split's blocks, in metres."""
    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu, cuda or cuda:N."""
    name: str = ""
    """A label for the run (default: the imagery, e.g. aerial+flickr(building))."""

    def __post_init__(self) -> None:
        if not self.aerial and self.ground is None:
            raise ValueError("a fusion run needs aerial imagery, ground imagery, or both")
        if self.window_years is not None and self.window_years < 0:
            raise ValueError(f"window_years must be 0 or more, got {self.window_years}")
        if self.ground is not None:
            self.ground = ",".join(ground_sources(self.ground))
        if self.flickr_subset not in SUBSETS:
            raise ValueError(f"flickr_subset must be one of {SUBSETS}, got {self.flickr_subset!r}")
        if "flickr" in self.sources and self.flickr_subset != "all" and not self.scene_run:
            raise ValueError(
                f"the {self.flickr_subset!r} Flickr subset needs --scene-run (a scene filter run)"
            )

    @property
    def sources(self) -> tuple[str, ...]:
        """The ground branch's sources, in the order given (empty: aerial only)."""
        return tuple(self.ground.split(",")) if self.ground else ()

    @property
    def label(self) -> str:
        """Short description, e.g. ``aerial+flickr(building)`` or
        ``aerial+amsterdam_panorama+mapillary``."""
        parts = (["aerial"] if self.aerial else []) + [
            s + (f"({self.flickr_subset})" if s == "flickr" else "") for s in self.sources
        ]
        return self.name or "+".join(parts)


def ground_sources(value: str | list[str] | tuple[str, ...], option: str = "ground") -> list[str]:
    """The source names of ``--ground``: ``"gsv"``, ``"amsterdam_panorama,mapillary"`` or a list;
    ``option`` names the option in errors.

    Raises:
        ValueError: for no name, a name that is not a catalog source name, or one given twice.
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(n).strip().lower() for n in items if str(n).strip()]
    if not names:
        raise ValueError(
            "ground: give a source (e.g. gsv, or amsterdam_panorama,mapillary) or none"
        )
    bad = [n for n in names if not re.fullmatch(SOURCE_NAME, n)]
    if bad:
        raise ValueError(
            f"{option}: {bad} are not source names (lower-case letters, digits and _, such as "
            f"{', '.join(GROUND_SOURCES)})"
        )
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{option}: {twice} given more than once")
    return names


@dataclass
class PredictConfig(Config):
    """Applying trained fusion runs to every cell of a data root for one year (``predict``)."""

    run: list[str] = field(default_factory=list)
    """Fusion runs: ids in DATA/runs, or run folders (a run of another root); several make an
    ensemble (e.g. the seeds of one configuration) whose spread is the uncertainty."""
    data: str = DEFAULT_DATA
    """Data root whose grid cells are predicted; the prediction folder goes to its runs/."""
    year: int | None = None
    """Year to predict: its aerial mosaic and street images captured around it (default: the
    label year the runs were trained on)."""
    window_years: int = 2
    """Street images captured within this many years of --year are used (the Leefbaarometer
    comes every two years)."""
    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu, cuda or cuda:N."""

    def __post_init__(self) -> None:
        if isinstance(self.run, str):
            self.run = [r for r in self.run.split(",") if r]
        if not self.run:
            raise ValueError("predict needs --run: one fusion run id or folder, or several")
        if self.window_years < 0:
            raise ValueError(f"window_years must be 0 or more, got {self.window_years}")


@dataclass
class ChangeValidationConfig(Config):
    """The held-out-year validation of predicted change (``validate-change``)."""

    data: str = DEFAULT_DATA
    """Data root with at least two label years."""
    train_year: int | None = None
    """The release the runs learn (default: the one before --test-year)."""
    test_year: int | None = None
    """The release whose change is predicted (default: the root's last)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """One run per seed and configuration; together they are the ensemble."""
    split_seed: int = 0
    """Seed of the one spatial split every run shares (the test cells are common)."""
    window_years: int = 1
    """Street images captured within this many years of each year are used."""
    epochs: int = 12
    """Training epochs of each run."""
    change_threshold: float | None = None
    """A true change larger than this counts in the sign agreement (default: one standard
    deviation of the test cells' true change)."""
    fusion: dict[str, Any] = field(default_factory=dict)
    """Other fusion options every run takes (e.g. ``{target: lbm, block_size: 500}``)."""
    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu, cuda or cuda:N."""

    def __post_init__(self) -> None:
        if isinstance(self.seeds, str):
            self.seeds = [int(s) for s in self.seeds.split(",") if s]
        if len(self.seeds) < 2:
            raise ValueError(f"validate-change needs two seeds or more, got {self.seeds}")
        if self.window_years < 0:
            raise ValueError(f"window_years must be 0 or more, got {self.window_years}")


@dataclass
class ContrastiveConfig(EncoderConfig):
    """One pretraining run. Defaults are a CPU-sized demo schedule; real runs use ViT-B/16."""

    objective: Objective = "temporal"
    """Positive pairs: temporal, spatial, global, or unified (a weighted sum of the three)."""
    source: str = "gsv"
    """Catalog source whose images are trained on (gsv, amsterdam_panorama, mapillary, ...)."""
    loss_weights: dict[str, float] = field(default_factory=lambda: dict.fromkeys(RULES, 1.0))
    """Weight of each rule's loss in the unified objective (temporal, spatial, global)."""
    pairs: PairConfig = field(default_factory=PairConfig)
    """Thresholds of the pair rules."""
    epochs: int = 8
    """Training epochs (a checkpoint after each)."""
    steps_per_epoch: int = 40
    """Optimisation steps per epoch."""
    batch_size: int = 256
    """Pairs per optimisation step."""
    lr: float = 2e-3
    """Peak learning rate of the one-cycle schedule (AdamW)."""
    weight_decay: float = 0.05
    """AdamW weight decay."""
    dim: int = 128
    """Width of the projected embedding the loss compares."""
    mlp_dim: int = 512
    """Hidden width of the projector and predictor."""
    temperature: float = 0.2
    """InfoNCE temperature."""
    base_momentum: float = 0.99
    """Momentum of the key encoder at the start (cosine schedule to 1)."""
    crop_min_scale: float = 0.35
    """Smallest area share of the random resized crop."""
    holdout_share: float = 0.2
    """Share of spatial blocks held out for place recognition (never trained on)."""
    block_size: float = 1000.0
    """Side of the held-out blocks, in metres."""
    split_seed: int = 0
    """Seed of the held-out blocks (the same for every run to compare)."""
    resume: str | None = None
    """Continue this interrupted run from its last checkpoint."""

    def __post_init__(self) -> None:
        if isinstance(self.pairs, dict):  # read back from a run's config.yaml
            self.pairs = PairConfig(**self.pairs)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        (self.source,) = ground_sources([self.source], "source")  # one catalog source name
        unknown = sorted(set(self.loss_weights) - set(RULES))
        if unknown:
            raise ValueError(f"loss_weights: unknown rules {unknown}; the rules are {RULES}")

    @property
    def rules(self) -> dict[str, float]:
        """The pair rules this objective trains on, with their loss weights."""
        if self.objective != "unified":
            return {self.objective: 1.0}
        return {rule: float(w) for rule, w in self.loss_weights.items() if w > 0}


@dataclass
class UGEConfig(Config):
    """One UGE run. Defaults are a CPU schedule for the tiny model on the demo city.

    The tiny model is pretrained here on captions only (``tiny_pretrain_steps``), so it needs a
    softer temperature (0.05) and more image tokens (112 px: 16 tokens) than the paper's
    pretrained 2B model (``assets/configs/uge-paper.yaml``: ``temperature=0.01``, ``vlm`` a local
    Qwen2-VL folder, images of 448 px).
    """

    data: str = DEFAULT_DATA
    """Data root (default: ``STADSBEELD_DATA``, else data/demo)."""
    ugdata: str = ""
    """UGData folder (default: DATA/ugdata)."""
    vlm: str | None = None
    """Local Qwen2-VL / Qwen2.5-VL checkpoint folder (default: the tiny model)."""
    tiny_pretrain_steps: int = 2000
    """Captioning pretraining of the tiny model before stage 1, cached per step count (ignored
    with vlm; 0 = a randomly initialised backbone)."""
    stage1_steps: int = 600
    """Image-text contrastive steps (LoRA)."""
    stage2_steps: int = 1000
    """Graph encoder and fusion steps."""
    stage2_questions: int = 4000
    """Spatial-reasoning walks stage 2 trains on, beside the place captions."""
    batch_size: int = 16
    """Image-text pairs per step (the global batch: under torchrun each rank embeds its share)."""
    lr: float = 3e-3
    """LoRA learning rate."""
    graph_lr: float = 2e-3
    """Graph encoder learning rate."""
    temperature: float = 0.05
    """InfoNCE temperature (the paper: 0.01 with a pretrained VLM; 0.05 for the tiny model)."""
    lora_r: int = 8
    """LoRA rank."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA adapters' input in stage 1."""
    pooling: Literal["last", "mean"] = "last"
    """Token pooling of the embedding: the last token or the mean."""
    dim: int | None = None
    """Embedding width (default: the backbone's hidden size)."""
    image_px: int = 112
    """Images are resized to this square, in pixels."""
    graph_dim: int = 64
    """Width of the graph encoder."""
    place_dim: int = 16
    """Sinusoidal features of the graph nodes' absolute coordinates (0: relative only)."""
    seed: int = 0
    """Seed of the initialisation and sampling."""
    device: str = "auto"
    """auto (CUDA when present, else CPU), cpu, cuda or cuda:N."""

    @property
    def ugdata_folder(self) -> Path:
        """The UGData folder: ``ugdata``, else ``DATA/ugdata``."""
        return Path(self.ugdata) if self.ugdata else DataRoot(self.data).root / "ugdata"
