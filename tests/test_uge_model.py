"""The UGE embedder on a tiny Qwen2-VL: offline reload, pooling, LoRA, adapters, InfoNCE."""

from __future__ import annotations

import json
import math
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from core.models.uge import (
    LoraSettings,
    UGEEmbedder,
    UGESettings,
    build_tiny_qwen2vl,
    info_nce,
    load_vlm,
    make_tiny_qwen2vl,
    stage1_loss,
)

TEXTS = ["a canal house", "a wide avenue with trees near the park", "Dam", "ferry at the IJ"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_qwen2vl(tmp_path_factory.mktemp("uge") / "tiny-qwen2vl")


@pytest.fixture()
def offline(monkeypatch):
    """No network: any socket connection raises, and the Hub client is told it is offline."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _images(n: int = 4, size: int = 56) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)
    ]


def _embedder(folder, **settings) -> UGEEmbedder:
    settings.setdefault("lora", LoraSettings(dropout=0.0))
    return UGEEmbedder.from_folder(folder, UGESettings(**settings), device="cpu")


def test_tiny_model_reloads_offline_with_identical_outputs(tmp_path, offline):
    model, processor = build_tiny_qwen2vl(seed=3)
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    loaded, loaded_processor = load_vlm(folder, dtype="auto", device="cpu")
    assert loaded.dtype == torch.float32
    assert loaded_processor.chat_template == processor.chat_template
    prompts = [
        f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{t}<|im_end|>\n"
        for t in TEXTS
    ]
    images = _images()
    batch = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    again = loaded_processor(text=prompts, images=images, padding=True, return_tensors="pt")
    assert batch.keys() == again.keys() and "mm_token_type_ids" in batch
    for key in batch:
        assert torch.equal(batch[key], again[key]), key
    with torch.no_grad():
        expected = model.model(**batch).last_hidden_state
        got = loaded.model(**again).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # the byte-level tokenizer keeps the special tokens whole and spells any text in bytes
    ids = loaded_processor.tokenizer("<|im_start|>é<|image_pad|>", add_special_tokens=False)
    assert ids["input_ids"] == [257, 195, 169, 261]


def test_missing_or_wrong_folder_gives_clear_error(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(FileNotFoundError, match="no-such-checkpoint"):
        load_vlm(missing, device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        UGEEmbedder.from_folder(empty, device="cpu")
    text_only = tmp_path / "bert"
    text_only.mkdir()
    (text_only / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"bert.*not a vision-language model"):
        load_vlm(text_only, device="cpu")


def test_embeddings_shape_norm_and_determinism(tiny_folder):
    embedder = _embedder(tiny_folder, dim=24)
    images = _images()
    with torch.no_grad():
        img = embedder.embed_images(images, "geolocation")
        img_text = embedder.embed_images(images, "grounding", texts=TEXTS)
        txt = embedder.embed_texts(TEXTS, "location")
        again = embedder.embed_images(images, "geolocation")
    for emb in (img, img_text, txt):
        assert emb.shape == (4, 24) and emb.dtype == torch.float32
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(again, img, rtol=0, atol=0)
    # the instruction is part of the input: another task gives other embeddings
    with torch.no_grad():
        other = embedder.embed_texts(TEXTS, "retrieval")
    assert not torch.allclose(other, txt, atol=1e-4)
    with pytest.raises(KeyError, match="unknown UGE task"):
        embedder.embed_texts(TEXTS, "nonsense")


def _manual(embedder: UGEEmbedder, batch: dict, pooling: str) -> torch.Tensor:
    """One sample without padding through the inner model, pooled by hand."""
    with torch.no_grad():
        hidden = embedder.base_model.model(**batch).last_hidden_state[0]
    pooled = hidden[-1] if pooling == "last" else hidden.mean(dim=0)
    return torch.nn.functional.normalize(pooled, dim=-1)


@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_pooling_ignores_padding(tiny_folder, side: str, pooling: str):
    embedder = _embedder(tiny_folder, padding_side=side, pooling=pooling)
    images = _images()
    with torch.no_grad():
        texts = embedder.embed_texts(TEXTS, "location")
        mixed = embedder.embed_images(images, "grounding", texts=TEXTS)
    batch = embedder.prepare_texts(TEXTS, "location")
    assert (batch["attention_mask"] == 0).any()  # the texts really are padded
    pad_column = 0 if side == "left" else -1
    assert (batch["attention_mask"][:, pad_column] == 0).any()
    for i, text in enumerate(TEXTS):
        one_text = _manual(embedder, embedder.prepare_texts([text], "location"), pooling)
        torch.testing.assert_close(texts[i], one_text, atol=1e-5, rtol=1e-4)
        one_mixed = embedder.prepare_images([images[i]], "grounding", texts=[text])
        torch.testing.assert_close(
            mixed[i], _manual(embedder, one_mixed, pooling), atol=1e-5, rtol=1e-4
        )


def test_lora_trains_only_adapters(tiny_folder, tmp_path):
    embedder = _embedder(tiny_folder, dim=24)
    trainable = embedder.adapter_parameters()
    lora = [n for n in trainable if "lora_" in n]
    assert set(trainable) == set(lora) | {"projection.weight"}
    # q/k/v/o of both decoder layers, A and B each; nothing in the vision tower
    assert len(lora) == 2 * 4 * 2 and not any("visual" in n for n in lora)
    frozen = {n: p.detach().clone() for n, p in embedder.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    images = _images()
    with torch.no_grad():
        start = embedder.embed_images(images, "geolocation")

    embedder.train()
    optimiser = torch.optim.SGD(list(trainable.values()), lr=0.5)
    for _ in range(2):  # LoRA B starts at zero, so A only moves from the second step
        optimiser.zero_grad()
        loss = stage1_loss(embedder, images, TEXTS, temperature=0.05)
        loss.backward()
        optimiser.step()
    embedder.eval()

    assert all(not torch.equal(p, before[n]) for n, p in trainable.items())
    for name, param in embedder.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    with torch.no_grad():
        trained = embedder.embed_images(images, "geolocation")
    assert not torch.allclose(trained, start, atol=1e-4)

    folder = embedder.save_adapters(tmp_path / "adapters")
    assert (folder / "adapter_model.safetensors").is_file()
    fresh = _embedder(tiny_folder, dim=24)
    with torch.no_grad():
        assert not torch.allclose(fresh.embed_images(images, "geolocation"), trained, atol=1e-4)
        fresh.load_adapters(folder)
        torch.testing.assert_close(fresh.embed_images(images, "geolocation"), trained)
        rebuilt = UGEEmbedder.from_adapters(folder, tiny_folder, device="cpu")
        torch.testing.assert_close(
            rebuilt.embed_texts(TEXTS, "location"), embedder.embed_texts(TEXTS, "location")
        )
    other_rank = _embedder(tiny_folder, dim=24, lora=LoraSettings(r=4))
    with pytest.raises(ValueError, match="do not fit"):
        other_rank.load_adapters(folder)


def test_info_nce_matches_direct_computation():
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(5, 8, generator=gen), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(5, 8, generator=gen), dim=-1)
    t = 0.07

    def direct(groups: list[int] | None) -> float:
        sim = [[float(a[i] @ b[j]) / t for j in range(5)] for i in range(5)]
        total = 0.0
        for i in range(5):
            keep = [j for j in range(5) if j == i or groups is None or groups[j] != groups[i]]
            row = math.log(sum(math.exp(sim[i][j]) for j in keep)) - sim[i][i]
            col = math.log(sum(math.exp(sim[j][i]) for j in keep)) - sim[i][i]
            total += row + col
        return total / (2 * 5)

    assert info_nce(a, b, t).item() == pytest.approx(direct(None), rel=1e-5)
    groups = [0, 1, 0, 2, 2]
    got = info_nce(a, b, t, groups=torch.tensor(groups)).item()
    assert got == pytest.approx(direct(groups), rel=1e-5)
    assert got != pytest.approx(direct(None), rel=1e-3)
    # the positive pair dominates: aligned embeddings give a near-zero loss at 0.01
    assert info_nce(a, a, 0.01).item() < 0.05


def test_gradient_checkpointing_gives_the_same_gradients(tiny_folder):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # LoRA A is initialised from the global RNG
        embedder = _embedder(tiny_folder)
        if checkpointing:
            embedder.enable_gradient_checkpointing()
        embedder.train()
        stage1_loss(embedder, _images(), TEXTS).backward()
        grads.append({n: p.grad for n, p in embedder.adapter_parameters().items()})
    assert grads[0].keys() == grads[1].keys()
    assert any(g.abs().sum() > 0 for g in grads[0].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-4)
