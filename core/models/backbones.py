"""Image backbones: a name -> factory registry (timm style) and weights from local files only.

Every backbone maps an ImageNet-normalised float batch (B, 3, H, W) to pooled features (B, D)
and carries ``num_features`` (D) and ``backbone_name``. Nothing here downloads: weights come
from files on disk, in one of two kinds:

- ImageNet-style state dicts (timm or torchvision layout; .safetensors, .pth, .pt or .bin) go
  through timm's own loader (``pretrained=True, pretrained_cfg_overlay=dict(file=...)``), which
  drops the classifier and reads torch files with ``weights_only=True``;
- our own checkpoints, written by :func:`save_backbone`: safetensors with a ``backbone``
  metadata entry, loaded strictly by :func:`load_backbone_weights` (a run that saved one names
  it and its backbone for :func:`encoder_of_run`).

Both are checked against the model first, so a wrong file is an error naming the file and the
offending keys or shapes, never a silently half-loaded model.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors
import safetensors.torch
import timm
import torch
from timm.models import clean_state_dict
from torch import nn

from core.io import write_atomic
from core.runs import BACKBONE_FILE

if TYPE_CHECKING:
    from core.runs import Run

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BackboneFactory = Callable[..., nn.Module]
BACKBONES: dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator that registers ``factory(weights: Path | None, **kwargs) -> nn.Module``.

    The factory gets an ImageNet-style weights file (or None) and loads it its own way;
    :func:`create_backbone` handles our own checkpoints itself.
    """

    def register(factory: BackboneFactory) -> BackboneFactory:
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered")
        BACKBONES[name] = factory
        return factory

    return register


def create_backbone(
    name: str, weights: str | Path | None = None, *, seed: int = 0, **kwargs: object
) -> nn.Module:
    """Create a registered backbone, optionally with weights from a local file.

    Args:
        name: a registered name (see ``BACKBONES``).
        weights: None for random weights, our own checkpoint (:func:`save_backbone`), or an
            ImageNet-style state dict in timm/torchvision layout.
        seed: seed of the random initialisation, so that "random weights" are the same
            weights every time (:func:`backbone_fingerprint` relies on it).
        **kwargs: passed to the factory (e.g. ``width`` for ``convnet_small``).

    Returns:
        The module, in training mode, with ``num_features`` and ``backbone_name`` set.

    Raises:
        ValueError: unknown name, unreadable file, or weights that do not fit the model.
        FileNotFoundError: if ``weights`` does not exist.
    """
    factory = _factory(name)
    path = _weights_file(weights) if weights is not None else None
    saved = _checkpoint_backbone(path) if path is not None else None
    if saved is not None and saved != name:
        raise ValueError(f"{path}: checkpoint of backbone {saved!r}, not {name!r}")
    ours = saved is not None
    # fork_rng: seeding must not disturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory(None if ours else path, **kwargs)
    if ours:
        load_backbone_weights(model, path)
    model.backbone_name = name
    return model


@register_backbone("resnet50")
def resnet50(weights: Path | None = None, **kwargs: object) -> nn.Module:
    """ResNet-50, the fusion paper's backbone; 2048-d."""
    return _timm_backbone("resnet50", weights, **kwargs)


@register_backbone("resnet18")
def resnet18(weights: Path | None = None, **kwargs: object) -> nn.Module:
    """ResNet-18; 512-d."""
    return _timm_backbone("resnet18", weights, **kwargs)


@register_backbone("vit_base")
def vit_base(weights: Path | None = None, **kwargs: object) -> nn.Module:
    """ViT-B/16 (timm ``vit_base_patch16_224``), 768-d: UrbanSTCL's backbone for real runs."""
    return _timm_backbone("vit_base_patch16_224", weights, **{"dynamic_img_size": True, **kwargs})


@register_backbone("vit_small")
def vit_small(weights: Path | None = None, **kwargs: object) -> nn.Module:
    """ViT-S/16 (224 px position grid, resampled for other input sizes); 384-d."""
    return _timm_backbone("vit_small_patch16_224", weights, **{"dynamic_img_size": True, **kwargs})


@register_backbone("vit_tiny")
def vit_tiny(weights: Path | None = None, **kwargs: object) -> nn.Module:
    """ViT-Ti/16 (224 px position grid, resampled for other input sizes); 192-d."""
    return _timm_backbone("vit_tiny_patch16_224", weights, **{"dynamic_img_size": True, **kwargs})


class ConvNetSmall(nn.Module):
    """Four conv3x3-BN-ReLU stages, each halving the resolution, then global average pooling.

    Args:
        width: channels of the first stage; each stage doubles it (16-32-64-128 -> 128-d).
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        stages = []
        channels = 3
        for stage in range(4):
            out = width * 2**stage
            conv = nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False)
            # fan-in Kaiming keeps the activation scale through the ReLUs, so a frozen random
            # network (the floor baseline) still yields features that are not near zero.
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            stages.append(nn.Sequential(conv, nn.BatchNorm2d(out), nn.ReLU(inplace=True)))
            channels = out
        self.stages = nn.Sequential(*stages)
        self.num_features = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_features)."""
        return self.stages(x).mean((2, 3))


@register_backbone("convnet_small")
def convnet_small(weights: Path | None = None, width: int = 16) -> nn.Module:
    """Our small CNN for CPU demo runs at 32..64 px; ``8 * width``-d (128 by default)."""
    model = ConvNetSmall(width)
    if weights is not None:
        load_backbone_weights(model, weights)
    return model


def save_backbone(model: nn.Module, path: str | Path, **metadata: object) -> Path:
    """Write the backbone's weights as safetensors, atomically, with its name as metadata.

    Args:
        model: a module from :func:`create_backbone` (it needs ``backbone_name``).
        path: the target file.
        **metadata: extra entries (e.g. ``trained_on="scene labels"``), stored as strings.

    Returns:
        ``path`` as a Path.
    """
    if "backbone" in metadata:
        raise ValueError(
            "the 'backbone' metadata entry is the model's backbone_name; do not pass it"
        )
    entries = {key: str(value) for key, value in metadata.items()}
    entries["backbone"] = model.backbone_name
    # safetensors wants contiguous CPU tensors that share no storage.
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    return write_atomic(path, lambda tmp: safetensors.torch.save_file(state, str(tmp), entries))


def load_backbone_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state dict file into ``model`` strictly, after checking keys and shapes.

    Reads safetensors, or .pt/.pth/.bin through ``torch.load(weights_only=True)`` (never a
    full unpickle). Weights nested under ``state_dict``/``model`` and keys that all share a
    prefix (``backbone.``, ``module.``, ...) are accepted.

    Returns:
        ``model``, for chaining.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: unreadable file, missing/unexpected keys or shape mismatches, naming the file.
    """
    path = _weights_file(path)
    expected = model.state_dict()
    state = strip_common_prefix(read_state_dict(path), expected.keys())
    check_state_fits(state, expected, path)
    model.load_state_dict(state)
    return model


def encoder_of_run(run: Run) -> tuple[str, str]:
    """The backbone name and weights file of a run that saved ``backbone.safetensors`` (a
    contrastive, perception or scene run): ``create_backbone(*encoder_of_run(run))`` rebuilds
    its trained encoder.

    Raises:
        FileNotFoundError: if the run saved no encoder.
    """
    weights = run.path / BACKBONE_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: run {run.run_id} saved no encoder")
    return str(run.config["backbone"]), str(weights)


def backbone_fingerprint(
    name: str, weights: str | Path | None = None, *, seed: int = 0, **kwargs: object
) -> str:
    """A short stable hash of what :func:`create_backbone` would return for the same arguments.

    It covers the name, the kwargs, and the weights file's content (so a renamed file keeps its
    fingerprint and a rewritten one changes it) or, without weights, ``random-<seed>``. Feature
    caches key on it so features of different backbones or weights are never mixed.
    """
    _factory(name)
    digest = hashlib.sha256(json.dumps([name, kwargs], sort_keys=True, default=str).encode())
    if weights is None:
        digest.update(f"random-{seed}".encode())
    else:
        with _weights_file(weights).open("rb") as file:
            digest.update(hashlib.file_digest(file, "sha256").digest())
    return digest.hexdigest()[:16]


def normalise(batch: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, H, W, 3) or (B, 3, H, W) -> ImageNet-normalised float32 (B, 3, H, W).

    A channels-last input stays channels-last in memory (a permuted view), which is the layout
    the backbones run fastest in.
    """
    if batch.dtype != torch.uint8 or batch.ndim != 4 or 3 not in (batch.shape[1], batch.shape[3]):
        raise ValueError(
            f"expected uint8 images (B, H, W, 3) or (B, 3, H, W), got {batch.dtype} {tuple(batch.shape)}"
        )
    if batch.shape[1] != 3:
        batch = batch.permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device).view(1, 3, 1, 1) * 255
    scale = 1 / (torch.tensor(IMAGENET_STD, device=batch.device).view(1, 3, 1, 1) * 255)
    return (batch.float() - mean) * scale


def _factory(name: str) -> BackboneFactory:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; registered: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name]


def _weights_file(weights: str | Path) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    return path


def _checkpoint_backbone(path: Path) -> str | None:
    """The ``backbone`` metadata entry of one of our checkpoints; None for any other file."""
    if path.suffix != ".safetensors":
        return None
    try:
        with safetensors.safe_open(str(path), "pt") as file:
            return (file.metadata() or {}).get("backbone")
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise ValueError(f"{path}: not a readable weights file ({exc})") from exc


def _timm_backbone(arch: str, weights: Path | None, **kwargs: object) -> nn.Module:
    """A timm model without classifier; ImageNet-style ``weights`` go through timm's loader.

    The file override has priority over the registry's URL and Hub id in timm's source
    resolution, so nothing is downloaded; it also resets ``custom_load`` (set for the ViTs'
    original .npz weights), so a state dict file is read as one.
    """
    if weights is None:
        return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    # timm loads non-strictly once it has dropped the classifier, so check first: a file for
    # another architecture must be an error, not a partly random model. The meta device gives
    # the expected shapes without allocating or initialising anything.
    with torch.device("meta"):
        expected = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    # Same key cleaning as timm's reader; the classifier is dropped as timm does (num_classes=0).
    state = clean_state_dict(read_state_dict(weights))
    classifier = expected.pretrained_cfg.get("classifier") or ()
    for head in (classifier,) if isinstance(classifier, str) else classifier:
        state.pop(f"{head}.weight", None)
        state.pop(f"{head}.bias", None)
    check_state_fits(state, expected.state_dict(), weights)
    return timm.create_model(
        arch,
        pretrained=True,
        pretrained_cfg_overlay={"file": str(weights)},
        num_classes=0,
        **kwargs,
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (safetensors, or a weights-only torch pickle), never unpickling code."""
    try:
        if path.suffix == ".safetensors":
            state = safetensors.torch.load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # Keep torch's reason (e.g. "unsupported GLOBAL os.system"), not its advice to retry
        # with weights_only=False, which is exactly what must not be done with such a file.
        reason = [part.strip() for part in str(exc).split("\n\n") if "weights_only" not in part]
        raise ValueError(
            f"{path}: not a readable weights file (torch.load with weights_only=True refused it: "
            f"{next((r for r in reason if r), 'not a weights-only pickle')})"
        ) from exc
    except Exception as exc:  # torch and safetensors raise many types for a bad file
        raise ValueError(
            f"{path}: not a readable weights file ({type(exc).__name__}: {exc})"
        ) from exc
    # Training checkpoints nest the weights next to optimiser state, epoch, etc.
    if isinstance(state, dict):
        state = next(
            (state[key] for key in ("state_dict", "model") if isinstance(state.get(key), dict)),
            state,
        )
    if not (
        isinstance(state, dict)
        and state
        and all(isinstance(v, torch.Tensor) for v in state.values())
    ):
        raise ValueError(f"{path}: not a readable weights file (expected a state dict of tensors)")
    return state


def strip_common_prefix(
    state: dict[str, torch.Tensor], expected: Iterable[str]
) -> dict[str, torch.Tensor]:
    """Drop the shortest dotted prefix (``module.``, ...) that all keys share and that makes them match."""
    expected = set(expected)
    if expected & state.keys():
        return state
    parts = next(iter(state)).split(".")
    for depth in range(1, len(parts)):
        prefix = ".".join(parts[:depth]) + "."
        if not all(key.startswith(prefix) for key in state):
            break
        stripped = {key[len(prefix) :]: value for key, value in state.items()}
        if expected & stripped.keys():
            return stripped
    return state


def check_state_fits(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], path: Path
) -> None:
    """Raise a ValueError naming ``path`` and a few missing/unexpected keys and bad shapes."""

    def few(items: list[str]) -> str:
        return ", ".join(items[:5]) + (f" (and {len(items) - 5} more)" if len(items) > 5 else "")

    # BatchNorm fills in num_batches_tracked for checkpoints that predate it (PyTorch < 0.4.1,
    # e.g. torchvision's classic ResNet-50 file).
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(state[k].shape)}"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {few(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch {few(shapes)}")
    if problems:
        raise ValueError(f"{path}: weights do not fit the model: " + "; ".join(problems))
