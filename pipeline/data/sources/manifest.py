"""The manifest kind: a CSV file listing each image with its label, and optionally mask, group, split or fold.

Paths in the CSV are relative to its folder and must stay inside it. Folds come from a ``split`` or
``fold`` column; without either, groups (a ``group`` column or ``prepare.group_pattern``) are split
by grouped K-fold.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path, PurePath

from pipeline.core.errors import DataError
from pipeline.data.folds import grouped_folds, groups_from_names
from pipeline.data.images import find_duplicates
from pipeline.data.sources.base import SourceImage, SourceKind, SourceSet, id_from_path, validate

_MANIFEST_EXPECTED = "a CSV file with columns image,label and optionally mask,group and split or fold"
_LABELS = {"0": 0, "1": 1, "good": 0, "defect": 1}
_SPLITS = {"train": -1, "test": 0}


def _manifest_file(root: Path, value: str, where: str, column: str) -> tuple[str, str]:
    """(relative path, path to read) of a manifest cell, which must name a file inside ``root``."""
    if not value:
        raise DataError(f"{where}: the {column} cell is empty; give a path relative to {root}")
    # Lexical check: the row's text must stay inside the root; a symlink there is the user's choice.
    relative = os.path.normpath(value)
    if os.path.isabs(value) or relative == os.pardir or relative.startswith(os.pardir + os.sep):
        raise DataError(
            f"{where}: {column} {value!r} points outside the manifest's folder {root}; "
            "paths must be relative to that folder and stay inside it"
        )
    full = os.path.join(root, relative)
    if not os.path.isfile(full):
        raise DataError(
            f"{where}: {column} file {full} does not exist; fix the path (relative to {root}) or drop the row"
        )
    return PurePath(relative).as_posix(), full


def _manifest_fold(row: dict[str, str], where: str) -> int:
    """The fold a manifest row gives, from its split or fold cell."""
    if "split" in row:
        split = row["split"].lower()
        if split not in _SPLITS:
            raise DataError(f"{where}: split {row['split']!r} is neither train nor test")
        return _SPLITS[split]
    try:
        fold = int(row["fold"])
    except ValueError:
        fold = None
    if fold is None or fold < -1:
        raise DataError(f"{where}: fold {row['fold']!r} is not an integer >= -1 (-1 = training only)")
    return fold


def _manifest_rows(csv_path: Path) -> tuple[list[str], list[tuple[str, dict[str, str]]]]:
    """The manifest's lower-case column names and its non-empty rows, each with where it is."""
    if not csv_path.is_file():
        raise DataError(f"manifest {csv_path} does not exist; expected {_MANIFEST_EXPECTED}")
    rows: list[tuple[str, dict[str, str]]] = []
    try:
        # utf-8-sig: spreadsheet programs write a byte-order mark before the header.
        with open(csv_path, newline="", encoding="utf-8-sig") as file:
            reader = csv.DictReader(file)
            columns = [c.strip().lower() for c in reader.fieldnames or []]
            reader.fieldnames = columns
            for row in reader:
                cells = {k: (v or "").strip() for k, v in row.items() if k is not None}
                if any(cells.values()):
                    rows.append((f"{csv_path} line {reader.line_num}", cells))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot parse manifest {csv_path} ({exc}); expected {_MANIFEST_EXPECTED}") from exc
    return columns, rows


def _check_manifest_columns(csv_path: Path, columns: list[str], group_pattern: str | None) -> None:
    missing = [c for c in ("image", "label") if c not in columns]
    if missing:
        raise DataError(f"manifest {csv_path} lacks column(s) {', '.join(missing)}; expected {_MANIFEST_EXPECTED}")
    if "split" in columns and "fold" in columns:
        raise DataError(f"manifest {csv_path} has both a split and a fold column; keep one of them")
    given = [column for column in ("group", "split", "fold") if column in columns]
    if group_pattern and given:
        raise DataError(
            f"manifest {csv_path} has a {given[0]} column, so prepare.group_pattern cannot set its groups and "
            "folds; remove the column or prepare.group_pattern"
        )


def load_manifest(csv_path: str | Path, folds: int = 3, seed: int = 0, group_pattern: str | None = None) -> SourceSet:
    """A manifest CSV: one row per image, paths relative to the CSV's folder.

    Folds come from a ``split`` or ``fold`` column; without either, grouped K-fold assignment
    (byte-identical copies merged first) on a ``group`` column or else ``group_pattern``.
    """
    csv_path = Path(csv_path)
    root = csv_path.parent
    columns, rows = _manifest_rows(csv_path)
    _check_manifest_columns(csv_path, columns, group_pattern)
    fixed_folds = "split" in columns or "fold" in columns
    ids: list[str] = []
    labels: list[int] = []
    groups: list[str] = []
    fold_of: list[int] = []
    image_refs: list[str] = []
    mask_refs: list[str | None] = []
    for where, row in rows:
        relative, image_ref = _manifest_file(root, row["image"], where, "image")
        label = _LABELS.get(row["label"].lower())
        if label is None:
            raise DataError(f"{where}: label {row['label']!r} is not one of 0, 1, good, defect")
        ids.append(id_from_path(relative))
        labels.append(label)
        groups.append(row.get("group") or ids[-1])
        if fixed_folds:
            fold_of.append(_manifest_fold(row, where))
        image_refs.append(image_ref)
        mask_refs.append(_manifest_file(root, row["mask"], where, "mask")[1] if row.get("mask") else None)

    duplicates = find_duplicates(dict(zip(ids, image_refs, strict=True)))
    if group_pattern:
        groups = groups_from_names(group_pattern, image_refs)
    if not fixed_folds:
        groups, fold_of = grouped_folds(ids, groups, labels, duplicates, folds, seed)
    source = SourceSet(
        name=MANIFEST.name,
        images=[
            SourceImage(*fields) for fields in zip(ids, labels, groups, fold_of, image_refs, mask_refs, strict=True)
        ],
        duplicates=duplicates,
        root=str(csv_path),
    )
    validate(source)
    return source


MANIFEST = SourceKind(
    "manifest", lambda path, folds, seed, options: load_manifest(path, folds, seed, options.group_pattern)
)
