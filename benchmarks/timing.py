"""Timing shared by the benchmark scripts: interleaved rounds, so that load on a shared machine
falls on every contender alike and ratios within one run stay meaningful; sizes and the CPU's name."""

from __future__ import annotations

import argparse
import platform
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch


def time_rounds(funcs: dict[str, Callable], rounds: int, device: str, clock: str = "wall") -> dict[str, list[float]]:
    """Seconds of each call per round, the contenders in a new random order every round.

    ``clock="cpu"`` times by this process's CPU time: for a single-threaded call on a machine
    loaded past its core count, wall time is mostly waiting for a core."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {key: [] for key in funcs}
    for fn in funcs.values():  # warm-up: lazy initialisation, allocator caches
        fn()
    rng = random.Random(0)
    for _ in range(rounds):
        keys = list(funcs)
        rng.shuffle(keys)
        for key in keys:
            sync(device)
            start = now()
            funcs[key]()
            sync(device)
            times[key].append(now() - start)
    return times


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def parse_size(text: str) -> tuple[int, int]:
    """'128x352' (width x height) -> (height, width)."""
    width, height = (int(v) for v in text.lower().split("x"))
    return height, width


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def add_machine_args(parser: argparse.ArgumentParser, device: bool = True) -> None:
    """``--device`` (CUDA where there is one) and ``--threads``, which every benchmark takes."""
    if device:
        parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def parse_machine_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The parsed arguments, with torch's CPU threads set from ``--threads``."""
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args
