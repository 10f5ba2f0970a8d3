"""Backbones: registry, output shapes, local weights (ours and timm's overlay path), errors,
fingerprints and input normalisation. Every weights file is made by the test itself."""

from __future__ import annotations

import os
import re
import shutil
import socket

import pytest
import safetensors
import timm
import torch
from safetensors.torch import save_file

from core.models.backbones import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    backbone_fingerprint,
    create_backbone,
    load_backbone_weights,
    normalise,
    register_backbone,
    save_backbone,
)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach the network fails loudly instead of downloading."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def timm_state_dict(arch: str, seed: int = 123) -> dict[str, torch.Tensor]:
    """An ImageNet-style checkpoint: the full classifier model, 1000-class head included."""
    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False, num_classes=1000).state_dict()


def test_registry_lists_names_and_rejects_unknown():
    assert {"resnet50", "resnet18", "vit_base", "vit_small", "vit_tiny", "convnet_small"} <= set(
        BACKBONES
    )
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet99'.*convnet_small.*resnet18"):
        create_backbone("resnet99")
    with pytest.raises(ValueError, match="unknown backbone"):
        backbone_fingerprint("resnet99")
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("resnet18")(lambda weights=None: None)


@pytest.mark.parametrize(
    ("name", "px", "dim"),
    [
        ("convnet_small", 32, 128),
        ("resnet18", 32, 512),
        ("resnet50", 32, 2048),
        ("vit_tiny", 32, 192),
        ("vit_small", 48, 384),
        ("vit_base", 32, 768),
    ],
)
def test_backbone_maps_images_to_pooled_features(name, px, dim):
    model = create_backbone(name).eval()
    with torch.inference_mode():
        out = model(torch.randn(2, 3, px, px))
    assert out.shape == (2, dim)
    assert model.num_features == dim
    assert model.backbone_name == name


def test_convnet_small_width_and_channels_last():
    model = create_backbone("convnet_small", width=8).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        plain = model(x)
        fast = model.to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last)
        )
    assert model.num_features == 64 and plain.shape == (3, 64)
    torch.testing.assert_close(plain, fast)


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    def weights(seed: int) -> torch.Tensor:
        return create_backbone("convnet_small", seed=seed).stages[0][0].weight

    assert torch.equal(weights(1), weights(1))
    assert not torch.equal(weights(1), weights(2))
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    create_backbone("convnet_small", seed=9)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", ["convnet_small", "resnet18"])
def test_save_and_load_round_trip_gives_identical_outputs(tmp_path, name):
    model = create_backbone(name, seed=1)
    model(torch.randn(4, 3, 32, 32))  # a training-mode pass moves the BatchNorm statistics
    path = save_backbone(
        model.eval(), tmp_path / "encoder.safetensors", trained_on="scene labels", px=32
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "encoder.safetensors"
    ]  # no temp file left
    with safetensors.safe_open(str(path), "pt") as file:
        assert file.metadata() == {"backbone": name, "trained_on": "scene labels", "px": "32"}

    loaded = create_backbone(name, weights=path, seed=2).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))


def test_load_accepts_prefixed_and_nested_state_dicts(tmp_path):
    source = create_backbone("convnet_small", seed=1)
    state = source.state_dict()
    prefixed = tmp_path / "perception.safetensors"
    save_file({f"backbone.{k}": v.contiguous() for k, v in state.items()}, str(prefixed))
    nested = tmp_path / "trainer.pt"
    torch.save(
        {"epoch": 3, "state_dict": {f"module.encoder.{k}": v for k, v in state.items()}}, nested
    )
    for path in (prefixed, nested):
        target = load_backbone_weights(create_backbone("convnet_small", seed=2), path)
        for key, value in target.state_dict().items():
            assert torch.equal(value, state[key]), (path.name, key)


@pytest.mark.parametrize(
    ("name", "arch", "suffix"),
    [
        ("resnet18", "resnet18", ".safetensors"),
        ("resnet18", "resnet18", ".pth"),
        ("vit_tiny", "vit_tiny_patch16_224", ".safetensors"),
    ],
)
def test_imagenet_style_weights_load_offline_through_timm(tmp_path, no_network, name, arch, suffix):
    state = timm_state_dict(arch)
    path = tmp_path / f"{arch}_in1k{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)

    model = create_backbone(name, weights=path)
    loaded = model.state_dict()
    classifier = {"resnet18": "fc", "vit_tiny": "head"}[name]
    assert {k for k in state if k not in loaded} == {f"{classifier}.weight", f"{classifier}.bias"}
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key
    with torch.inference_mode():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, model.num_features)


def test_checkpoint_older_than_num_batches_tracked_loads(tmp_path, no_network):
    # Like torchvision's classic ResNet files, saved before BatchNorm counted its batches.
    state = {
        k: v
        for k, v in timm_state_dict("resnet18").items()
        if not k.endswith("num_batches_tracked")
    }
    path = tmp_path / "resnet18-classic.pth"
    torch.save(state, path)
    model = create_backbone("resnet18", weights=path)
    assert torch.equal(model.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])


def test_missing_weights_file_is_named(tmp_path):
    path = tmp_path / "nope.safetensors"
    for call in (
        lambda: create_backbone("convnet_small", weights=path),
        lambda: create_backbone("resnet18", weights=tmp_path / "nope.pth"),
        lambda: load_backbone_weights(create_backbone("convnet_small"), path),
        lambda: backbone_fingerprint("convnet_small", path),
    ):
        with pytest.raises(
            FileNotFoundError, match=r"nope\.(safetensors|pth): weights file not found"
        ):
            call()


@pytest.mark.parametrize("filename", ["bad.safetensors", "bad.pth"])
@pytest.mark.parametrize("name", ["convnet_small", "resnet18"])
def test_corrupt_weights_file_is_named(tmp_path, filename, name):
    path = tmp_path / filename
    path.write_bytes(os.urandom(4000))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: not a readable weights file"):
        create_backbone(name, weights=path)


def test_file_without_a_state_dict_is_rejected(tmp_path):
    path = tmp_path / "stats.pt"
    torch.save({"epoch": 3, "loss": 0.5}, path)
    with pytest.raises(
        ValueError, match=r"stats\.pt: not a readable weights file \(expected a state dict"
    ):
        create_backbone("convnet_small", weights=path)


class _Exploit:
    """A pickle that creates a directory when unpickled."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return os.makedirs, (self.target,)


def test_weights_files_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"conv.weight": torch.zeros(1), "payload": _Exploit(str(marker))}, path)
    for name in ("convnet_small", "resnet18"):
        with pytest.raises(
            ValueError, match=r"evil\.pth: not a readable weights file .*weights_only=True"
        ):
            create_backbone(name, weights=path)
    assert not marker.exists()


def test_shape_mismatch_names_file_parameter_and_shapes(tmp_path):
    state = timm_state_dict("resnet18")
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "resnet18_small_stem.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError) as error:
        create_backbone("resnet18", weights=path)
    assert str(path) in str(error.value)
    assert "conv1.weight: expected (64, 3, 7, 7), found (64, 3, 3, 3)" in str(error.value)

    narrow = save_backbone(
        create_backbone("convnet_small", width=8), tmp_path / "narrow.safetensors"
    )
    with pytest.raises(
        ValueError,
        match=r"narrow\.safetensors: .*stages\.0\.0\.weight: expected \(16, 3, 3, 3\), found \(8, 3, 3, 3\)",
    ):
        create_backbone("convnet_small", weights=narrow)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state = timm_state_dict("resnet18")
    del state["layer4.1.conv2.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "resnet18_edited.pth"
    torch.save(state, path)
    with pytest.raises(
        ValueError,
        match=r"resnet18_edited\.pth: .*missing keys layer4\.1\.conv2\.weight; unexpected keys extra\.weight",
    ):
        create_backbone("resnet18", weights=path)
    # A full checkpoint of another architecture is rejected too, not half loaded.
    other = tmp_path / "resnet50.safetensors"
    save_file(timm_state_dict("resnet50"), str(other))
    with pytest.raises(
        ValueError, match=r"resnet50\.safetensors: weights do not fit the model: .*unexpected keys"
    ):
        create_backbone("resnet18", weights=other)


def test_our_checkpoint_of_another_backbone_is_rejected(tmp_path):
    path = save_backbone(create_backbone("convnet_small"), tmp_path / "scene.safetensors")
    with pytest.raises(
        ValueError,
        match=r"scene\.safetensors: checkpoint of backbone 'convnet_small', not 'resnet18'",
    ):
        create_backbone("resnet18", weights=path)


def test_save_backbone_keeps_the_backbone_entry_for_the_name(tmp_path):
    with pytest.raises(ValueError, match="backbone"):
        save_backbone(
            create_backbone("convnet_small"), tmp_path / "x.safetensors", backbone="resnet18"
        )


def test_fingerprint_follows_weights_content_name_kwargs_and_seed(tmp_path):
    path = save_backbone(create_backbone("convnet_small", seed=1), tmp_path / "a.safetensors")
    first = backbone_fingerprint("convnet_small", path)
    assert re.fullmatch(r"[0-9a-f]{16}", first)
    assert backbone_fingerprint("convnet_small", str(path)) == first
    copy = shutil.copy(path, tmp_path / "renamed.safetensors")
    assert backbone_fingerprint("convnet_small", copy) == first  # content, not file name
    assert backbone_fingerprint("resnet18", path) != first
    save_backbone(create_backbone("convnet_small", seed=2), path)
    assert backbone_fingerprint("convnet_small", path) != first

    random = backbone_fingerprint("convnet_small")
    assert random == backbone_fingerprint("convnet_small", seed=0)
    assert random != backbone_fingerprint("convnet_small", seed=1)
    assert random != backbone_fingerprint("convnet_small", width=8)


def test_normalise_accepts_both_layouts():
    images = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8)
    images[0, 0, 0] = torch.tensor([0, 255, 0], dtype=torch.uint8)
    out = normalise(images)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 5, 7)
    torch.testing.assert_close(normalise(images.permute(0, 3, 1, 2).contiguous()), out)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out[0, :, 0, 0], (torch.tensor([0.0, 1.0, 0.0]) - mean) / std)
    with pytest.raises(ValueError, match="expected uint8"):
        normalise(images.float())
    with pytest.raises(ValueError, match="expected uint8"):
        normalise(images[0])
