"""A stage refused under `dvc repro` prints commands that bring back the outputs DVC deleted before
running it (pipeline/core/restore.py), and exactly those commands restore every one byte for byte."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.core.restore import restore_commands
from support.helpers import dvc, git_env, make_shrunk_project, project_env

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
STAGE = "train_baseline"


def stage_outputs(project: Path) -> list[Path]:
    """Every path dvc.yaml declares as an output of the stage (folders, plots, metrics)."""
    declared = yaml.safe_load((project / "dvc.yaml").read_text())["stages"][STAGE]
    entries = [entry for key in ("outs", "metrics", "plots") for entry in declared.get(key, [])]
    return [project / (next(iter(entry)) if isinstance(entry, dict) else entry) for entry in entries]


def snapshot(paths: list[Path]) -> dict[Path, bytes]:
    """Every file under the paths, with its bytes."""
    files = [file for path in paths for file in ([path] if path.is_file() else sorted(path.rglob("*")))]
    return {file: file.read_bytes() for file in files if file.is_file()}


def refused_repro(project: Path) -> tuple[str, list[str]]:
    """Run `dvc repro`, which the stage must refuse; its stderr and the restore commands it prints."""
    result = subprocess.run(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=project,
        env=project_env(project, **ONE_THREAD),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    intro = f"[{STAGE}] to restore them as dvc.lock records them, run in {project.resolve()}:"
    assert intro in lines, result.stderr
    commands = []
    for line in lines[lines.index(intro) + 1 :]:
        if not line.startswith("  "):
            break
        commands.append(line.strip())
    return result.stderr, commands


def git(project: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=project, check=True, env=git_env(), capture_output=True)


def run_printed(project: Path, commands: list[str]) -> None:
    for command in commands:
        done = subprocess.run(
            command, shell=True, cwd=project, env=project_env(project), capture_output=True, text=True
        )
        assert done.returncode == 0, f"{command}:\n{done.stdout}\n{done.stderr}"


@pytest.mark.slow
def test_refused_stage_prints_the_commands_that_restore_its_deleted_outputs_byte_for_byte(tmp_path: Path) -> None:
    project = make_shrunk_project(tmp_path / "project")
    dvc(project, "repro", STAGE, **ONE_THREAD)
    outputs = stage_outputs(project)
    before = snapshot(outputs)
    assert {path for path in outputs if path.exists()} == set(outputs) and len(before) > 3
    good_params = (project / "params.yaml").read_text()
    params = yaml.safe_load(good_params)
    params[STAGE]["eopchs"] = 2
    (project / "params.yaml").write_text(yaml.safe_dump(params))

    # The metrics, uncommitted, come back from the copy DVC's run cache keeps.
    stderr, commands = refused_repro(project)
    assert f"unknown key '{STAGE}.eopchs'" in stderr
    assert not any(path.exists() for path in outputs)  # DVC deleted them before running the stage
    metrics = f"data/metrics/{STAGE}.json"
    assert commands[0] == f"dvc checkout {STAGE}"
    assert commands[1].startswith("cp .dvc/cache/files/md5/") and commands[1].endswith(f" {metrics}")
    assert len(commands) == 2
    run_printed(project, commands)
    assert snapshot(outputs) == before

    # Run by hand, with its outputs in place, the stage prints the refusal alone.
    by_hand = subprocess.run(
        [sys.executable, "-m", f"stages.{STAGE}"],
        cwd=project,
        env=project_env(project, **ONE_THREAD),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert by_hand.returncode == 1 and by_hand.stderr.strip().count("\n") == 0, by_hand.stderr
    assert snapshot(outputs) == before

    # Refused again, then the last run's params restored: DVC's run cache brings all back unrun.
    refused_repro(project)
    (project / "params.yaml").write_text(good_params)
    assert "skipping run, checking out outputs" in dvc(project, "repro", STAGE, **ONE_THREAD)
    assert snapshot(outputs) == before

    # Committed and absent from the cache (a fresh clone's), they come back from git.
    git(project, "add", "-A")
    git(project, "commit", "-qm", "a run")
    cached_copy = project / commands[1].split()[1]
    cached_copy.unlink()
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    stderr, commands = refused_repro(project)
    assert commands == [f"dvc checkout {STAGE}", f"git checkout HEAD -- {metrics}"]
    run_printed(project, commands)
    assert snapshot(outputs) == before

    # What came back is what dvc.lock records: with the params of that run, nothing is to be rerun.
    (project / "params.yaml").write_text(good_params)
    assert "Data and pipelines are up to date." in dvc(project, "status", STAGE)


def tiny_project(root: Path) -> Path:
    """A DVC project of one stage, `make`, that writes a cached folder and an uncached metrics file."""
    root.mkdir()
    (root / "make.py").write_text(
        "from pathlib import Path\n"
        "Path('out').mkdir()\n"
        "Path('out/a.txt').write_text('a')\n"
        "Path('metrics.json').write_text('{\"x\": 1}')\n"
    )
    stage = {"cmd": f"{sys.executable} make.py", "deps": ["make.py"], "outs": ["out"]}
    stage["metrics"] = [{"metrics.json": {"cache": False}}]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": stage}}))
    git(root, "init", "-q")
    dvc(root, "init", "-q")
    dvc(root, "repro")
    return root


def test_restore_commands_come_from_the_cache_else_git_else_say_what_is_lost(tmp_path: Path) -> None:
    project = tiny_project(tmp_path / "project")
    assert restore_commands("make", project).missing == []  # all in place
    assert restore_commands("other", project).missing == []  # no such stage
    (project / "metrics.json").unlink()
    (project / "out/a.txt").unlink()
    (project / "out").rmdir()

    restore = restore_commands("make", project)
    assert restore.missing == ["out", "metrics.json"] and restore.lost == []
    assert restore.commands[0] == "dvc checkout make"
    cached_copy = restore.commands[1].split()[1]
    assert restore.commands[1] == f"cp {cached_copy} metrics.json" and cached_copy.startswith(".dvc/cache/files/md5/")

    (project / cached_copy).unlink()  # not in the cache, nor in git: lost, and said so
    restore = restore_commands("make", project)
    assert restore.commands == ["dvc checkout make"] and restore.lost == ["metrics.json"]

    run_printed(project, ["dvc checkout make"])
    (project / "metrics.json").write_text('{"x": 1}')
    git(project, "add", "-A")
    git(project, "commit", "-qm", "a run")
    (project / "metrics.json").unlink()
    assert restore_commands("make", project).commands == ["git checkout HEAD -- metrics.json"]
    (project / "metrics.json").write_text('{"x": 2}')
    git(project, "commit", "-qam", "another file than dvc.lock records")
    (project / "metrics.json").unlink()
    assert restore_commands("make", project).lost == ["metrics.json"]

    # A cached output the local cache lacks is pulled from the remote (then checked out).
    for path in (project / ".dvc/cache/files/md5").rglob("*"):
        if path.is_file() and not path.name.endswith(".dir"):
            path.chmod(0o644)
            path.unlink()
    (project / "out/a.txt").unlink()
    (project / "out").rmdir()
    assert restore_commands("make", project).commands == ["dvc pull make"]
