"""``kgi``: the project's one command line for everything outside ``dvc repro``.

Each subcommand is the ``main(argv)`` of one library module, imported only when it runs so that
``kgi --help`` stays fast. ``pip install -r requirements.txt`` installs the command (the project
itself is a line of that file). Bad input ends with a one-line message and exit status 1, as in
the stages; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass

PROG = "kgi"


@dataclass(frozen=True)
class Command:
    name: str
    module: str  # whose ``main(argv)`` runs it
    summary: str


COMMANDS = {
    command.name: command
    for command in (
        Command("predict", "pipeline.deployment.predict", "score images with a model file or a registered model"),
        Command(
            "export", "pipeline.deployment.export", "export a model to TorchScript and ONNX, checked against PyTorch"
        ),
        Command(
            "serve",
            "pipeline.deployment.serve",
            "check a registered version's files against their digests, then serve it over REST",
        ),
        Command(
            "promote", "pipeline.deployment.release", "make the release candidate champion if it passes release.gate"
        ),
        Command("presets", "pipeline.experiments.presets", "list, show or apply a configuration preset to params.yaml"),
        Command(
            "sweep",
            "pipeline.experiments.sweep",
            "run a parameter over values and seeds in DVC's queue, then summarize",
        ),
        Command("variance", "pipeline.experiments.variance", "baseline seeds x folds with averaged weights and flips"),
        Command(
            "seeds", "pipeline.evaluation.seeds", "combine the scores.csv of runs with different seeds: mean +- std"
        ),
        Command("rounds", "pipeline.evaluation.rounds", "per knowledge round: pointing game, pseudo-mask IoU and AP"),
        Command(
            "near-duplicates", "pipeline.data.near_duplicates", "near-identical images across groups of a prepared set"
        ),
    )
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        f"usage: {PROG} COMMAND [ARGS]   ({PROG} COMMAND --help for a command's arguments)",
        "",
        "Knowledge-guided defect detection: the tools beside the DVC pipeline (`dvc repro` runs the stages).",
        "",
        "commands:",
    ]
    lines += [f"  {command.name:<{width}}  {command.summary}" for command in COMMANDS.values()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    command = COMMANDS.get(args[0])
    if command is None:
        print(f"{PROG}: unknown command {args[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from pipeline.core.runner import run_command

    module = importlib.import_module(command.module)
    return run_command(f"{PROG} {command.name}", module.main, args[1:])


if __name__ == "__main__":
    sys.exit(main())
