"""The fast path (``model.precision``): bf16 autocast with channels_last, chosen only where the
hardware runs it faster, deterministic, and saliency maps within a stated tolerance of fp32.

Tolerance of the maps (bf16 against fp32, a trained resnet18): the absolute difference averaged
over pixels and maps at most 0.02 on the [0, 1] scale, and on at least 80% of the defective
images the Otsu pseudo-masks of the two paths overlapping with IoU 0.9 or more. Measured on this
project's CPU machine at 48x48 (mean difference; share of images at IoU >= 0.9, lowest IoU):
one thread, Grad-CAM 0.005, 100%, 0.95; LayerCAM 0.007, 100%, 0.95. Two threads (another
trained model), Grad-CAM 0.012, 92%, 0.61 (its 2x2 layer4 map at this size turns on little);
LayerCAM 0.006, 100%, 0.97. FullGrad missed it (IoU down to 0.82 on most images: bf16 blurs its
input-gradient term), so FullGrad runs in fp32 on every path (``SaliencyMethod.bf16_forward``).
Scores are computed in fp32 on every path (the release's operating point is chosen on them), so
they need no tolerance.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_saliency import _synthetic_batch

from pipeline.config import ModelParams, TrainParams
from pipeline.core import devices
from pipeline.core.devices import BF16, FP32, resolve_precision
from pipeline.knowledge.pseudo_labels import otsu_mask
from pipeline.knowledge.saliency import METHODS, create_saliency
from pipeline.models.networks import Classifier
from pipeline.training.loop import train
from support.helpers import ROOT, noise_data

CPU = torch.device("cpu")
MEAN_DIFFERENCE, LEAST_MASK_IOU, LEAST_SHARE = 0.02, 0.9, 0.8


def test_auto_takes_the_fast_path_only_on_a_cpu_with_bf16_units(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "cpu_has_bf16_units", lambda: True)
    assert resolve_precision("auto", CPU) == BF16 and BF16.channels_last and BF16.dtype is torch.bfloat16
    assert resolve_precision("fp32", CPU) == FP32
    monkeypatch.setattr(devices, "cpu_has_bf16_units", lambda: False)
    assert resolve_precision("auto", CPU) == FP32 and not FP32.channels_last and FP32.dtype is None
    assert resolve_precision("bf16", CPU) == BF16  # asked for: taken, slow or not
    assert (BF16.name, FP32.name) == ("bf16", "fp32")


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads the CPU's flags from Linux's /proc/cpuinfo")
def test_the_detection_agrees_with_the_cpus_flags() -> None:
    flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)[1].split())
    assert devices.cpu_has_bf16_units() == bool(flags & {"amx_bf16", "amx_tile", "avx512_bf16"})


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def test_the_fast_path_trains_the_same_model_twice_and_saves_the_contiguous_layout() -> None:
    data = noise_data()
    params = TrainParams(epochs=2, batch_size=4, lr=1e-3, seed=0)
    bf16 = ModelParams(device="cpu", precision="bf16")
    first, _, first_history = train(data, 0, bf16, params)
    second, _, second_history = train(data, 0, bf16, params)
    assert [{**r, "seconds": 0} for r in first_history] == [{**r, "seconds": 0} for r in second_history]
    weights = _weights(first)
    assert all(torch.equal(value, second.state_dict()[key]) for key, value in weights.items())
    assert all(value.is_contiguous() for value in weights.values())  # saved as the fp32 path saves
    _fp32, _, fp32_history = train(data, 0, ModelParams(device="cpu", precision="fp32"), params)
    assert fp32_history[0]["loss"] != first_history[0]["loss"]  # the fast path was taken
    assert fp32_history[0]["loss"] == pytest.approx(first_history[0]["loss"], rel=0.05)


@pytest.fixture(scope="module")
def trained_resnet() -> tuple[torch.nn.Module, torch.Tensor, np.ndarray]:
    """resnet18 trained to tell bright blobs and dark lines on noise, and defective test images."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = Classifier("resnet18", 1)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(60):
        images, _, labels = _synthetic_batch(rng, 16, 48)
        loss = F.binary_cross_entropy_with_logits(model(torch.from_numpy(images)).squeeze(-1), torch.from_numpy(labels))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    images, _, labels = _synthetic_batch(rng, 24, 48)
    model.eval()
    with torch.no_grad():
        accuracy = ((model(torch.from_numpy(images)).squeeze(-1) > 0).numpy() == labels).mean()
    assert accuracy > 0.9, f"the model did not learn the task (accuracy {accuracy:.2f})"
    return model, torch.from_numpy(images[labels == 1]), labels


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(name for name, kind in METHODS.items() if kind.bf16_forward))
def test_fast_path_saliency_maps_agree_with_fp32_within_the_tolerance(trained_resnet, method: str) -> None:
    model, images, _ = trained_resnet
    reference = create_saliency(method, FP32.model(model))(images)
    fast = create_saliency(method, BF16.model(model), precision=BF16)(images)
    FP32.model(model)
    assert fast.maps.dtype == torch.float32 and torch.equal(fast.valid, reference.valid)
    difference = (fast.maps - reference.maps).abs().flatten(1).mean(1)
    print(f"{method}: mean |bf16 - fp32| per map {difference.mean():.4f} on average, up to {difference.max():.4f}")
    assert difference.mean() <= MEAN_DIFFERENCE, f"{method}: mean |bf16 - fp32| per map {difference.mean():.4f}"
    assert difference.max() > 0  # the fast path was taken
    ious = np.array([_iou(otsu_mask(a), otsu_mask(b)) for a, b in zip(reference.maps.numpy(), fast.maps.numpy())])
    print(
        f"{method}: Otsu mask IoU between the paths: {np.mean(ious >= LEAST_MASK_IOU):.0%} of images >= "
        f"{LEAST_MASK_IOU}, lowest {ious.min():.3f}"
    )
    assert np.mean(ious >= LEAST_MASK_IOU) >= LEAST_SHARE, f"{method}: Otsu mask IoUs between the paths {ious.round(3)}"


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.mark.slow
def test_a_method_outside_the_tolerance_runs_in_fp32_on_the_fast_path(trained_resnet) -> None:
    model, images, _ = trained_resnet
    assert not METHODS["fullgrad"].bf16_forward
    reference = create_saliency("fullgrad", FP32.model(model))(images)
    fast = create_saliency("fullgrad", BF16.model(model), precision=BF16)
    maps = fast(images).maps
    FP32.model(model)
    assert fast.precision == FP32
    torch.testing.assert_close(maps, reference.maps, atol=1e-4, rtol=0)  # the layout alone differs


def test_the_speed_benchmark_prints_each_paths_rate_and_the_ratios() -> None:
    command = [
        sys.executable,
        str(ROOT / "benchmarks/training_speed.py"),
        "--sizes",
        "32x32",
        "--rounds",
        "1",
        "--batch",
        "2",
        "--threads",
        "1",
        "--monitor-images",
        "4",
        "--device",
        "cpu",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert row["auto_picks"] == resolve_precision("auto", CPU).name and row["size"] == "32x32"
    assert all(row[f"images_per_second_{path}"] > 0 for path in ("fp32", "channels_last", "fast"))
    assert row["fast_over_fp32"] > 0 and row["channels_last_over_fp32"] > 0
    assert "compiled_over_fast" not in row and row["monitor_images"] == 4  # compiling (a minute) only on --compile
    assert row["monitor_seconds_fp32"] > 0 and row["monitor_seconds_fast"] > 0 and row["monitor_fast_over_fp32"] > 0
