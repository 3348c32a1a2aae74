"""Training speed of the compute paths of ``model.precision``, and of monitoring, in one run.

One SGD step of the classifier (forward, BCE loss, backward, update; batch 16, one input channel)
as ``pipeline.training.loop`` takes it, on four paths:

* ``fp32``: contiguous fp32, what ``precision: fp32`` (and ``auto`` without bf16 units) runs;
* ``channels_last``: fp32 in channels_last, to see what the layout alone buys;
* ``fast``: bf16 autocast with channels_last (``devices.BF16``), what ``auto`` takes on a CPU
  with AMX or AVX-512 bf16 and on a CUDA GPU with bf16;
* ``compiled`` (with ``--compile``): the fast path under ``torch.compile``, which the pipeline
  does not use: this measures whether it should; its one-off compile time is printed apart.

And one monitoring pass, what the loop scores the test fold with every ``monitor_every`` epochs:
``predict`` over ``--monitor-images`` images with the three test-time flips, in fp32 (every pass
before, and the last epoch's still) against the training's fast path (the passes before the last).

Prints one JSON line per (backbone, size): images/s of each path (median over rounds), the
ratios ``<path>_over_fp32``, ``compiled_over_fast`` and ``monitor_fast_over_fp32`` (median over
rounds of the ratio within a round: the contenders run in a new random order each round, so load
that comes and goes on a shared machine hits all alike), what ``auto`` picks here and whether
this CPU has bf16 units.

    python benchmarks/training_speed.py --backbones resnet18 --sizes 128x352 256x704 --threads 2 --compile
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import add_machine_args, cpu_name, parse_machine_args, parse_size, time_rounds

from pipeline.core.devices import BF16, FP32, Precision, cpu_has_bf16_units, resolve_precision
from pipeline.models.inference import predict
from pipeline.models.networks import BACKBONES, Classifier

PATHS = {"fp32": FP32, "channels_last": Precision(None, channels_last=True), "fast": BF16}


def train_step(
    backbone: str, precision: Precision, batch: int, size: tuple[int, int], device: torch.device, compiled: bool = False
) -> Callable[[], None]:
    """One training step of a fresh classifier on a fixed random batch, on ``precision``'s path."""
    torch.manual_seed(0)
    model = precision.model(Classifier(backbone, 1).to(device)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    net = torch.compile(model) if compiled else model
    x = precision.input(torch.randn(batch, 1, *size, device=device))
    y = (torch.arange(batch, device=device) % 2).float()

    def step() -> None:
        with precision.autocast(device):
            logits = net(x)
        loss = F.binary_cross_entropy_with_logits(logits.float().squeeze(-1), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def monitor_pass(
    backbone: str, precision: Precision, images: int, size: tuple[int, int], device: torch.device
) -> Callable[[], None]:
    """The loop's monitoring: ``predict`` with test-time flips over ``images`` uint8 images."""
    torch.manual_seed(0)
    model = precision.model(Classifier(backbone, 1).to(device))
    config = {"in_channels": 1, "mean": 0.5, "std": 0.25, "test_time_flips": True}
    fold = torch.randint(0, 256, (images, *size), dtype=torch.uint8)

    def score() -> None:
        predict(model, config, fold, batch_size=32, precision=precision)

    return score


def compile_seconds(step: Callable[[], None]) -> float:
    """The first call of a compiled step: tracing and code generation, paid once per model."""
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def median_ratio(times: dict[str, list[float]], slow: str, fast: str) -> float:
    return round(statistics.median(a / b for a, b in zip(times[slow], times[fast])), 3)


def measure(backbone: str, size_text: str, args: argparse.Namespace) -> dict:
    size, device = parse_size(size_text), torch.device(args.device)
    steps = {name: train_step(backbone, path, args.batch, size, device) for name, path in PATHS.items()}
    compiled = {}
    if args.compile:
        steps["compiled"] = train_step(backbone, BF16, args.batch, size, device, compiled=True)
        compiled["compile_seconds"] = round(compile_seconds(steps["compiled"]), 1)
    times = time_rounds(steps, args.rounds, args.device)
    if args.compile:
        compiled["compiled_over_fast"] = median_ratio(times, "fast", "compiled")
    per_second = {name: args.batch / statistics.median(seconds) for name, seconds in times.items()}
    monitors = {
        name: monitor_pass(backbone, PATHS[name], args.monitor_images, size, device) for name in ("fp32", "fast")
    }
    monitor_times = time_rounds(monitors, args.rounds, args.device)
    return {
        "backbone": backbone,
        "size": size_text,
        "batch": args.batch,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cpu_bf16_units": cpu_has_bf16_units(),
        "auto_picks": resolve_precision("auto", device).name,
        "torch": torch.__version__,
        "rounds": args.rounds,
        "load_avg_1min": round(os.getloadavg()[0], 2),
        **{f"images_per_second_{name}": round(value, 2) for name, value in per_second.items()},
        "fast_over_fp32": median_ratio(times, "fp32", "fast"),
        "channels_last_over_fp32": median_ratio(times, "fp32", "channels_last"),
        **compiled,
        "monitor_images": args.monitor_images,
        **{f"monitor_seconds_{name}": round(statistics.median(s), 2) for name, s in monitor_times.items()},
        "monitor_fast_over_fp32": median_ratio(monitor_times, "fp32", "fast"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["resnet18"], choices=BACKBONES)
    parser.add_argument("--sizes", nargs="+", default=["128x352", "256x704"], help="width x height")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--monitor-images", type=int, default=64, help="test images of a monitoring pass")
    parser.add_argument("--compile", action="store_true", help="also time the fast path under torch.compile")
    add_machine_args(parser)
    args = parse_machine_args(parser)
    for backbone in args.backbones:
        for size in args.sizes:
            print(json.dumps(measure(backbone, size, args)), flush=True)


if __name__ == "__main__":
    main()
