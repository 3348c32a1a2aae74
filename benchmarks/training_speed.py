"""Training speed of the compute paths of ``model.precision``, measured in one run.

One SGD step of the classifier (forward, BCE loss, backward, update; batch 16, one input channel)
as ``pipeline.training.loop`` takes it, on three paths:

* ``fp32``: contiguous fp32, what ``precision: fp32`` (and ``auto`` without bf16 units) runs;
* ``channels_last``: fp32 in channels_last, to see what the layout alone buys;
* ``fast``: bf16 autocast with channels_last (``devices.BF16``), what ``auto`` takes on a CPU
  with AMX or AVX-512 bf16 and on a CUDA GPU with bf16.

Prints one JSON line per (backbone, size): images/s of each path (median over rounds), the
ratios ``fast_over_fp32`` and ``channels_last_over_fp32`` (median over rounds of the ratio
within a round: the paths run in a new random order each round, so load that comes and goes on
a shared machine hits all alike), what ``auto`` picks here and whether this CPU has bf16 units.

    python benchmarks/training_speed.py --backbones resnet18 --sizes 128x352 256x704 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import add_machine_args, cpu_name, parse_machine_args, parse_size, time_rounds

from pipeline.core.devices import BF16, FP32, Precision, cpu_has_bf16_units, resolve_precision
from pipeline.models.networks import BACKBONES, Classifier

PATHS = {"fp32": FP32, "channels_last": Precision(None, channels_last=True), "fast": BF16}


def train_step(
    backbone: str, precision: Precision, batch: int, size: tuple[int, int], device: torch.device
) -> Callable[[], None]:
    """One training step of a fresh classifier on a fixed random batch, on ``precision``'s path."""
    torch.manual_seed(0)
    model = precision.model(Classifier(backbone, 1).to(device)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = precision.input(torch.randn(batch, 1, *size, device=device))
    y = (torch.arange(batch, device=device) % 2).float()

    def step() -> None:
        with precision.autocast(device):
            logits = model(x)
        loss = F.binary_cross_entropy_with_logits(logits.float().squeeze(-1), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def measure(backbone: str, size_text: str, args: argparse.Namespace) -> dict:
    size, device = parse_size(size_text), torch.device(args.device)
    steps = {name: train_step(backbone, path, args.batch, size, device) for name, path in PATHS.items()}
    times = time_rounds(steps, args.rounds, args.device)
    per_second = {name: args.batch / statistics.median(seconds) for name, seconds in times.items()}
    ratio = {name: statistics.median(base / other for base, other in zip(times["fp32"], times[name])) for name in PATHS}
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
        "fast_over_fp32": round(ratio["fast"], 3),
        "channels_last_over_fp32": round(ratio["channels_last"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["resnet18"], choices=BACKBONES)
    parser.add_argument("--sizes", nargs="+", default=["128x352", "256x704"], help="width x height")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    add_machine_args(parser)
    args = parse_machine_args(parser)
    for backbone in args.backbones:
        for size in args.sizes:
            print(json.dumps(measure(backbone, size, args)), flush=True)


if __name__ == "__main__":
    main()
