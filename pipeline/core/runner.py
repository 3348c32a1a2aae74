"""What every stage script shares: clean error reports for bad input, and CPU thread settings."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline.core.errors import PipelineError
from pipeline.core.layout import project_root, round_stage
from pipeline.core.restore import restore_commands


def run_stage(name: str, main: Callable[[], None]) -> None:
    """Run a stage's main function; exit 1 with a one-line message on bad input.

    Only the pipeline's own errors are bad input (their message says what to do); anything else
    is a bug and keeps its traceback. A refusal under ``dvc repro`` comes after DVC deleted the
    stage's previous outputs, so there the message goes on with the commands that restore them.
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
        if worker is None:
            _print_restore_commands(name)
        sys.exit(1)
    if worker is None:
        print(f"[{name}] done in {time.perf_counter() - started:.1f}s", flush=True)


def run_round_stage(stage: str, main: Callable[[str | None], None]) -> None:
    """``run_stage`` for a stage that knowledge rounds repeat: its one command-line argument is the
    round's name (dvc.yaml's foreach key), none for the pipeline's own stage, the first round.
    Read here, in the script's entry point only: ``main`` run in-process (a test under pytest)
    must not take its caller's arguments for a round."""
    name = sys.argv[1] if len(sys.argv) > 1 else None
    run_stage(round_stage(stage, name), lambda: main(name))


def _print_restore_commands(stage: str) -> None:
    """Say how to bring back the stage's outputs that dvc.lock records and the workspace lacks."""
    root = Path.cwd().resolve()
    if project_root() != root:
        return  # a queued experiment's temporary copy: the workspace kept its outputs
    from dvc.exceptions import DvcException

    try:
        restore = restore_commands(stage, root)
    except DvcException as error:  # the refusal above stays the message; this is only a hint
        print(f"[{stage}] could not read dvc.yaml or dvc.lock to list restore commands: {error}", file=sys.stderr)
        return
    if not restore.missing:
        return
    lines = [
        f"[{stage}] its previous outputs are missing (DVC deletes a stage's outputs before running it): "
        f"{', '.join(restore.missing)}; dvc.lock still records them."
    ]
    if restore.commands:
        lines.append(f"[{stage}] to restore them as dvc.lock records them, run in {root}:")
        lines += [f"  {command}" for command in restore.commands]
    if restore.lost:
        lines.append(f"[{stage}] in neither the DVC cache nor git, so only a rerun rebuilds: {', '.join(restore.lost)}")
    print("\n".join(lines), file=sys.stderr, flush=True)


def run_command(prog: str, main: Callable[[list[str]], Any], argv: Sequence[str]) -> int:
    """Run a command's ``main(argv)`` as ``prog`` (argparse's name for it); its exit status.

    As in a stage, only the pipeline's own errors end with a one-line message; a command's
    integer result is its exit status, anything else means success.
    """
    torch.set_num_threads(_threads())
    sys.argv[0] = prog  # argparse names the command by it in usage and errors
    try:
        result = main(list(argv))
    except PipelineError as error:
        print(f"[{prog}] error: {error}", file=sys.stderr, flush=True)
        return 1
    return result if isinstance(result, int) else 0


def _threads() -> int:
    """OMP_NUM_THREADS where set (on a shared machine fewer threads can be much faster), else all CPUs."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return max(1, len(os.sched_getaffinity(0)))
