"""The commands that bring back a stage's previous outputs after DVC deleted them for a failed run.

``dvc repro`` deletes a stage's outputs before it runs the stage's command (DVC has no hook that
could run first), so a stage that refuses its input leaves the workspace without them although
``dvc.lock`` still records them. The cached outputs come back with ``dvc checkout <stage>``. That
command skips the uncached ones (the ``cache: false`` metrics, kept in git), but DVC's run cache
stores a copy of them too, under the hash ``dvc.lock`` records: they come back by copying that
file, or from git where the committed file is the recorded one (a fresh clone, whose cache never
held them).
"""

from __future__ import annotations

import hashlib
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Restore:
    """The outputs ``dvc.lock`` records for a stage that are missing, and how to bring them back."""

    missing: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)  # in neither the DVC cache nor git's HEAD


def restore_commands(stage: str, root: Path) -> Restore:
    """How to restore the outputs of ``stage`` (a ``dvc.yaml`` stage of the project at ``root``)
    that ``dvc.lock`` records and the workspace lacks; shell commands run in ``root``.

    Nothing is missing where the project has no ``dvc.lock`` entry for the stage. Raises DVC's own
    ``DvcException`` where ``dvc.yaml`` or ``dvc.lock`` cannot be read.
    """
    if not (root / "dvc.yaml").is_file() or not (root / "dvc.lock").is_file():
        return Restore()
    from dvc.repo import Repo  # seconds to import: only when a stage has failed

    dvc_yaml = str(root / "dvc.yaml")  # DVC's default, dvc.yaml, would be the working directory's
    with Repo(str(root)) as repo:
        if stage not in {s.name for s in repo.stage.load_all(dvc_yaml)}:
            return Restore()
        outs = [out for out in repo.stage.load_one(dvc_yaml, stage).outs if out.hash_info and not out.exists]
        result = Restore(missing=[out.def_path for out in outs])
        cached = [out for out in outs if out.use_cache]
        if cached:
            # `dvc pull` fetches what the local cache lacks from the default remote, then checks out.
            fetch = "pull" if any(out.changed_cache() for out in cached) else "checkout"
            result.commands.append(f"dvc {fetch} {shlex.quote(stage)}")
        for out in outs:
            if not out.use_cache:
                _restore_uncached(out, root, result)
    return result


def _restore_uncached(out: Any, root: Path, result: Restore) -> None:
    """The command that restores an uncached output (a DVC ``Output``) byte for byte, or ``lost``."""
    path, digest = out.def_path, out.hash_info.value
    copy = Path(out.local_cache.oid_to_path(digest))
    if not out.hash_info.isdir and copy.is_file():
        source = copy.relative_to(root) if copy.is_relative_to(root) else copy
        result.commands.append(f"cp {shlex.quote(str(source))} {shlex.quote(path)}")
    elif not out.hash_info.isdir and _committed_md5(root, path) == digest:
        result.commands.append(f"git checkout HEAD -- {shlex.quote(path)}")
    else:
        result.lost.append(path)


def _committed_md5(root: Path, path: str) -> str | None:
    """The md5 of ``path`` as committed at git's HEAD; None where git has no such file."""
    try:
        shown = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=root, capture_output=True, check=False)
    except FileNotFoundError:  # no git installed: a DVC project without git (`dvc init --no-scm`)
        return None
    return hashlib.md5(shown.stdout).hexdigest() if shown.returncode == 0 else None
