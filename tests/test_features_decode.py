"""Feature extraction with JPEGs decoded on the device: bytes read in workers, batched decoding
(nvjpeg on a GPU; here the same code on the CPU), PIL for other formats and refused files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from core.dataroot import DataRoot
from core.datasets import street_images
from core.features import ImageBytes, ImageFiles, decode_images, extract_features

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[str]:
    """JPEGs of several sizes (one grey), and a PNG: smooth gradients with noise."""
    folder = tmp_path_factory.mktemp("decode")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(240, 320), (97, 131), (32, 32), (500, 375)]):
        yy, xx = np.mgrid[0:h, 0:w]
        pixels = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 3 % 256], -1)
        pixels = np.clip(pixels + rng.normal(0, 10, pixels.shape), 0, 255).astype(np.uint8)
        paths.append(str(folder / f"{i}.jpg"))
        Image.fromarray(pixels).save(paths[-1], quality=90)
    paths.append(str(folder / "grey.jpg"))
    Image.fromarray(pixels[..., 0]).save(paths[-1])
    paths.append(str(folder / "colour.png"))
    Image.fromarray(pixels).save(paths[-1])
    return paths


def _decoded(paths: list[str], px: int) -> torch.Tensor:
    dataset = ImageBytes(paths, px)
    return decode_images(*ImageBytes.collate([dataset[i] for i in range(len(paths))]), px, CPU)


@pytest.mark.parametrize("px", [32, 224])
def test_device_decoding_matches_the_pil_pipeline(files, px):
    got = _decoded(files, px)
    expected = torch.stack([ImageFiles(files, px)[i] for i in range(len(files))])
    assert got.shape == expected.shape == (len(files), 3, px, px) and got.dtype == torch.uint8
    difference = (got.int() - expected.int()).abs()
    # the same libjpeg on the CPU; torch's antialiased bilinear resize rounds within one level
    # of PIL's (nvjpeg on a GPU may differ by a few levels more)
    assert difference.max() <= 1
    assert difference.float().mean() < 0.5
    assert torch.equal(got[-1], expected[-1])  # the PNG was decoded by PIL in the worker


def test_only_jpegs_reach_the_device_decoder(files):
    dataset = ImageBytes(files, 48)
    path, data = dataset[0]
    with open(files[0], "rb") as file:
        assert path == files[0] and data == file.read()  # the file's bytes, undecoded
    path, pixels = dataset[len(files) - 1]  # the PNG
    assert path.endswith(".png") and pixels.shape == (3, 48, 48) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, ImageFiles(files, 48)[len(files) - 1].numpy())


def test_a_file_no_decoder_reads_is_named(files, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0" + b"not a jpeg at all" * 20)
    with pytest.raises(ValueError, match="broken.jpg: not a readable image"):
        _decoded([files[0], str(broken)], 32)  # the batch fails, then file by file, then PIL
    with pytest.raises(ValueError, match="missing.jpg: not a readable image"):
        ImageBytes([str(tmp_path / "missing.jpg")], 32)[0]


def test_extraction_decoding_on_the_device_fills_the_same_features(tiny_demo, tmp_path):
    images = street_images(DataRoot(tiny_demo), "gsv").iloc[:96].reset_index(drop=True)
    kwargs = {"px": 32, "batch_size": 32, "device": "cpu"}
    cpu = extract_features(images, "convnet_small", None, tmp_path / "cpu", workers=0, **kwargs)
    # one worker: the bytes are read and collated in another process
    device = extract_features(
        images, "convnet_small", None, tmp_path / "device", workers=1, decode_on="device", **kwargs
    )
    assert device.folder.name == cpu.folder.name  # one cache, whichever decoder filled it
    a, b = np.asarray(cpu.matrix), np.asarray(device.matrix)
    assert a.shape == b.shape == (96, 128) and np.abs(b).sum() > 0
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.999
    with pytest.raises(ValueError, match="decode_on"):
        extract_features(images, "convnet_small", None, tmp_path, decode_on="gpu")


def test_extraction_on_the_device_names_a_broken_file(tiny_demo, tmp_path):
    images = street_images(DataRoot(tiny_demo), "gsv").iloc[:4].reset_index(drop=True)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    images = pd.concat([images, pd.DataFrame({"id": ["x"], "path": [str(broken)]})])
    with pytest.raises(ValueError, match="broken.jpg"):
        extract_features(
            images,
            "convnet_small",
            None,
            tmp_path / "c",
            px=32,
            workers=0,
            device="cpu",
            decode_on="device",
        )
