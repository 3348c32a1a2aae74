"""The committed dvc.lock is true to the code: each stage's recorded hash of every source file it
depends on is the file's, so a fresh clone's ``dvc status`` reports nothing changed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from support.dvc_stages import expanded

ROOT = Path(__file__).resolve().parents[1]

LOCK = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
STAGES = expanded()  # the stages of params.yaml's knowledge rounds too, as the lock names them


def _code(deps: list) -> set[str]:
    paths = {dep["path"] if isinstance(dep, dict) else dep for dep in deps}
    return {path for path in paths if path.endswith(".py")}


@pytest.mark.parametrize("stage", list(STAGES))
def test_the_lock_records_every_code_dependency_of_the_stage(stage: str) -> None:
    assert stage in LOCK, f"dvc.lock has no entry for {stage}: run `dvc repro {stage}` and commit dvc.lock"
    assert _code(LOCK[stage]["deps"]) == _code(STAGES[stage]["deps"]), (
        f"dvc.lock's deps of {stage} differ from dvc.yaml's: run `dvc repro {stage}` and commit dvc.lock"
    )


@pytest.mark.parametrize("stage", list(STAGES))
def test_the_lock_hash_of_each_code_dependency_is_the_file_s(stage: str) -> None:
    stale = [
        dep["path"]
        for dep in LOCK[stage]["deps"]
        if dep["path"].endswith(".py") and hashlib.md5((ROOT / dep["path"]).read_bytes()).hexdigest() != dep["md5"]
    ]
    assert stale == [], f"dvc.lock is stale for {stale} in stage {stage}: run `dvc repro` and commit dvc.lock"
