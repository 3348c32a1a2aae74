"""Atomic outputs: no temporary name leaks into a saved file, a failed block keeps the previous file
and folder, and leftovers of a killed run are removed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.core.artifacts import atomic_path, load_torch, output_dir, save_torch
from support.helpers import leftovers


def test_no_temporary_name_leaks_into_a_saved_file(tmp_path: Path) -> None:
    path = tmp_path / "fold0.pt"
    save_torch(path, {"weights": torch.ones(3)})
    content = path.read_bytes()
    assert b".tmp-" not in content and b"fold0" not in content
    # torch names the records of its zip archive; the names must not depend on where it was written.
    save_torch(tmp_path / "elsewhere.pt", {"weights": torch.ones(3)})
    assert (tmp_path / "elsewhere.pt").read_bytes() == content
    assert leftovers(tmp_path) == []


# --- atomic outputs -----------------------------------------------------------------------------


def test_failed_block_keeps_the_previous_file_and_folder_and_no_temporary(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    (tmp_path / "metrics.json").write_text("old")
    with pytest.raises(RuntimeError), output_dir(tmp_path / "out") as out:
        (out / "new.txt").write_text("half")
        raise RuntimeError("failed midway")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "metrics.json") as temporary:
        temporary.write_text("half")
        raise RuntimeError("failed midway")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]
    assert (tmp_path / "metrics.json").read_text() == "old"
    assert leftovers(tmp_path) == []


def test_output_folder_is_swapped_in_whole_and_leftovers_of_a_killed_run_removed(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    (tmp_path / ".out.tmp-killed").mkdir()  # what a kill -9 while building leaves
    with output_dir(tmp_path / "out") as out:
        (out / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]
    assert leftovers(tmp_path) == []
    save_torch(tmp_path / "model.pt", {"w": torch.ones(2)})
    assert torch.equal(load_torch(tmp_path / "model.pt")["w"], torch.ones(2)) and leftovers(tmp_path) == []
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "file").write_text("x")
    # Readable by others as plainly written files are, not private like tempfile's.
    assert (tmp_path / "out").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    assert (tmp_path / "model.pt").stat().st_mode & 0o777 == (plain / "file").stat().st_mode & 0o777
