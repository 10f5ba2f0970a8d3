"""``python -m bench gpu``: its code paths at tiny sizes on the CPU, the wall-time guard, the
probe of bf16 autocast and channels-last, and the result without a CUDA device."""

from __future__ import annotations

import json

import pytest
import torch

from bench.bench_gpu import PARTS, Probe, bench_gpu
from bench.common import main, run_one
from core.models.backbones import create_backbone

TRAINERS = {"fusion", "scene_filter", "perception", "contrastive"}


def test_the_cpu_smoke_run_measures_every_part(tiny_demo, tmp_path):
    payload = run_one("gpu", tmp_path, {"cpu_smoke": True, "data": str(tiny_demo)})
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["name"] == "gpu" and saved["parameters"]["cpu_smoke"] is True
    result = saved["results"]
    assert result["mode"] == "cpu-smoke" and result["device"] == "cpu"
    assert (result["errors"], result["skipped"], result["failed_checks"]) == ([], [], [])
    assert result["status"] == "ok" and not result["bf16_required"]
    assert tuple(result["parts"]) == PARTS
    for name, part in result["parts"].items():
        assert part["rates"] and part["checks"] and part["seconds"] > 0, name
        assert part["peak_memory_mib"] is None, name  # GPU memory only
        for label, rate in part["rates"].items():
            assert rate["images_per_s"] > 0 and rate["bare_images_per_s"] > 0, (name, label)
            assert rate["ratio"] == pytest.approx(
                rate["images_per_s"] / rate["bare_images_per_s"], rel=1e-3
            )
    parts = result["parts"]
    assert set(parts["trainers"]["rates"]) == TRAINERS
    for name in ("trainers", "fusion_paper", "moco_vit_b16", "feature_extraction", "ddp"):
        for label, checks in parts[name]["checks"].items():
            # every backbone forward was probed: channels-last, and autocast only on a GPU
            assert checks["forwards"] > 0 and checks["channels_last"] is True, (name, label)
            assert checks["bf16_autocast"] is False, (name, label)
    assert set(parts["fusion_paper"]["rates"]) == {"aerial_frozen", "aerial_trained"}
    ddp = parts["ddp"]
    assert (ddp["world"], ddp["backend"]) == (2, "gloo")
    assert (
        ddp["checks"]["fusion_step"]["ddp_wrapped"] and ddp["checks"]["fusion_step"]["all_reduce"]
    )
    extraction = parts["feature_extraction"]
    assert set(extraction["rates"]) == {"decode_on_device", "decode_on_cpu_workers"}
    assert extraction["features_cosine_min_device_vs_cpu_decoding"] > 0.999
    assert parts["uge_tiny_bf16"]["checks"]["embedder"]["dtype"] == "torch.float32"
    assert payload["results"]["parts"].keys() == result["parts"].keys()


def test_the_wall_time_guard_skips_what_would_not_fit():
    result = bench_gpu(cpu_smoke=True, budget_s=0.0, data=None, parts=PARTS)
    assert result["status"] == "incomplete" and result["skipped"] == list(PARTS)
    for part in result["parts"].values():
        assert part["skipped"].startswith("wall-time guard: 0 s left of the 0 s budget")
    with pytest.raises(ValueError, match="unknown parts"):
        bench_gpu(cpu_smoke=True, budget_s=1.0, data=None, parts=("warp_drive",))


def test_the_probe_sees_autocast_and_channels_last():
    model = create_backbone("convnet_small").to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 16, 16)
    probe = Probe()
    with probe.active(), torch.no_grad():
        model(x.contiguous(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x.contiguous(memory_format=torch.channels_last))
        model(x)  # NCHW input
        model.stages(x)  # not a backbone's own forward: not recorded
    model(x)  # after the block: not recorded
    assert [(f.bf16_autocast, f.channels_last) for f in probe.forwards] == [
        (False, True),
        (True, True),
        (False, False),
    ]
    assert probe.checks() == {"forwards": 3, "bf16_autocast": False, "channels_last": False}
    assert probe.checks(training=False)["forwards"] == 0  # the model is in training mode


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this is the 8-minute benchmark")
def test_without_cuda_the_command_writes_no_cuda_device(tmp_path, capsys):
    assert main(["gpu", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["results"]["status"] == "no CUDA device" and saved["results"]["parts"] == {}
    assert "status=no CUDA device" in capsys.readouterr().out
