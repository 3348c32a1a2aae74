"""What every stage script shares: clean error reports for bad input, and CPU thread settings."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import torch

from pipeline.core.errors import PipelineError


def run_stage(name: str, main: Callable[[], None]) -> None:
    """Run a stage's main function; exit 1 with a one-line message on bad input.

    Only the pipeline's own errors are bad input (their message says what to do); anything else
    is a bug and keeps its traceback.
    """
    torch.set_num_threads(_threads())
    started = time.perf_counter()
    # Under torchrun (model.nproc_per_node > 1) the launching process reports; its workers only
    # report errors, each naming its rank.
    worker = os.environ.get("RANK")
    if worker is None:
        print(f"[{name}] started", flush=True)
    try:
        main()
    except PipelineError as error:
        where = f"{name}, rank {worker}" if worker is not None else name
        print(f"[{where}] error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    if worker is None:
        print(f"[{name}] done in {time.perf_counter() - started:.1f}s", flush=True)


def _threads() -> int:
    """OMP_NUM_THREADS where set (on a shared machine fewer threads can be much faster), else all CPUs."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return max(1, len(os.sched_getaffinity(0)))
