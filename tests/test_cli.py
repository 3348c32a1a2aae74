"""The one command line: every ``kgi`` command the README and the docs show exists, and its
``--help`` runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "results").glob("*/README.md"))]
# `kgi sweep run ...`: the command and, where it has actions, the action
SHOWN = re.compile(r"\bkgi ([a-z-]+)(?: ([a-z]+)\b)?")
ACTIONS = {"presets": {"list", "show", "apply"}, "sweep": {"run", "summarize"}}


def shown_commands() -> set[tuple[str, ...]]:
    found = set()
    for document in DOCUMENTS:
        for command, action in SHOWN.findall(document.read_text()):
            found.add((command, action) if action in ACTIONS.get(command, ()) else (command,))
    return found


def test_the_documents_show_only_commands_that_exist() -> None:
    shown = shown_commands()
    assert shown, "the README and docs show no kgi command"
    assert {command[0] for command in shown} <= set(COMMANDS)


@pytest.mark.parametrize("command", sorted(shown_commands() | {(name,) for name in COMMANDS}))
def test_the_help_of_each_command_runs(command: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert f"kgi {command[0]}" in capsys.readouterr().out


def test_kgi_lists_its_commands_and_refuses_an_unknown_one() -> None:
    listed = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True)
    assert listed.returncode == 0 and all(name in listed.stdout for name in COMMANDS)
    unknown = subprocess.run([sys.executable, "-m", "pipeline.cli", "predicts"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown command 'predicts'" in unknown.stderr
