"""The prepared data set that every stage after ``prepare`` reads.

``data/prepared`` holds ``images/<id>.png`` (8-bit gray, resized), ``masks/<id>.png`` (true masks
where the data set has them, only for evaluation), ``index.csv`` and ``report.json``.
``index.csv`` has one row per image: id, label (1 = defective), group (physical item), fold and
has_mask. ``fold`` is the cross-validation fold in which the image is a test image; -1 marks an
image that is only ever used for training (a fixed train/test split has test images in fold 0).
A model "for fold k" is trained on every image whose fold is not k and tested on fold k.
``training_subsets.json`` lists, per fold, the defective images its models may train on
(``prepare.defective_images``): the data-efficiency experiments train on a few of them only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import cv2
import numpy as np
import pandas as pd
import torch

from pipeline.core.artifacts import read_image, read_json, read_map, write_image
from pipeline.core.errors import InputError, MissingInputError

INDEX_COLUMNS = ("id", "label", "group", "fold", "has_mask")
SUBSETS_FILE = "training_subsets.json"
# Each kind of choice draws from its own stream, so the images given true masks do not depend on
# how the kept defective images were drawn beyond which ones they are.
_CHOICE_STREAMS = {"defective_images": 1, "true_masks": 2}


class SubsetError(InputError):
    """A requested number of images is more than a training set has."""


def reproducible_choice(candidates: np.ndarray, count: int | str, seed: int, fold: int, purpose: str) -> np.ndarray:
    """``count`` of the ``candidates`` (all for "all"), sorted; the same ones for the same seed.

    A smaller count takes a prefix of the same random order as a larger one, so the training sets
    of a sweep over counts are nested: N = 5 keeps 5 of the images that N = 10 keeps.
    """
    candidates = np.sort(np.asarray(candidates))
    if count == "all":
        return candidates
    if cast(int, count) > len(candidates):  # any count but "all" is an int (the params' validation)
        raise SubsetError(f"asked for {count} but only {len(candidates)} are available")
    order = np.random.default_rng([seed, fold, _CHOICE_STREAMS[purpose]]).permutation(candidates)
    return np.sort(order[:count])


def defective_subsets(index: pd.DataFrame, count: int | str, seed: int) -> dict[int, list[str]]:
    """Per test fold, the ids of the defective images its models train on (``prepare.defective_images``)."""
    labels, folds, ids = index["label"].to_numpy(), index["fold"].to_numpy(), index["id"].to_numpy()
    subsets = {}
    for fold in sorted(int(f) for f in set(folds) if f >= 0):
        candidates = np.flatnonzero((folds != fold) & (labels == 1))
        try:
            subsets[fold] = [
                str(i) for i in ids[reproducible_choice(candidates, count, seed, fold, "defective_images")]
            ]
        except SubsetError:
            raise SubsetError(
                f"prepare.defective_images is {count}, but the training set of fold {fold} has only "
                f"{len(candidates)} defective images: use at most {len(candidates)}, or 'all'"
            ) from None
    return subsets


@dataclass
class PreparedData:
    """All prepared images in memory: small enough for the sizes this pipeline trains at."""

    root: Path
    index: pd.DataFrame
    images: torch.Tensor  # uint8 (N, H, W)
    defective_kept: dict[int, list[str]] | None = None  # per fold; None = every defective image

    @classmethod
    def load(cls, root: str | Path) -> PreparedData:
        root = Path(root)
        index_path = root / "index.csv"
        if not index_path.is_file():
            raise MissingInputError(f"{index_path} not found: run the prepare stage first (dvc repro prepare)")
        index = pd.read_csv(index_path, dtype={"id": str, "group": str})
        missing = [c for c in INDEX_COLUMNS if c not in index.columns]
        if missing:
            raise InputError(f"{index_path} lacks columns {missing}; rerun the prepare stage")
        images = np.stack([read_image(root / "images" / f"{i}.png") for i in index["id"]])
        subsets = None
        if (root / SUBSETS_FILE).is_file():
            subsets = {int(fold): ids for fold, ids in read_json(root / SUBSETS_FILE)["kept"].items()}
        return cls(root, index, torch.from_numpy(images), subsets)

    @property
    def folds(self) -> list[int]:
        """The folds that have test images: one model is trained per fold."""
        return sorted(int(f) for f in self.index["fold"].unique() if f >= 0)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor(self.index["label"].to_numpy(), dtype=torch.float32)

    def split(self, fold: int) -> tuple[np.ndarray, np.ndarray]:
        """Row positions of the training and test images for the model of ``fold``."""
        is_test = self.index["fold"].to_numpy() == fold
        train = np.flatnonzero(~is_test)
        if self.defective_kept is not None:
            is_defective = self.index["label"].to_numpy()[train] == 1
            is_kept = np.isin(self.index["id"].to_numpy()[train], self.defective_kept[fold])
            train = train[~is_defective | is_kept]
        return train, np.flatnonzero(is_test)

    def all_training(self) -> PreparedData:
        """Every labelled image as a training image of one model tested on none: the release's
        "one fold holding everything". ``split`` of any fold then gives every row for training
        and no test row, and no data-efficiency subset applies (a release trains on all it has)."""
        return replace(self, index=self.index.assign(fold=-1), defective_kept=None)

    def true_mask_rows(self, fold: int, count: int | str, seed: int) -> np.ndarray:
        """Row positions of the ``count`` defective training images of ``fold`` whose true masks
        supervise the segmentation head (``pseudo_labels.true_masks``; mixed supervision)."""
        if count == 0:
            return np.array([], dtype=int)
        train, _ = self.split(fold)
        has_true_mask = (self.index["label"].to_numpy()[train] == 1) & self.index["has_mask"].to_numpy(bool)[train]
        candidates = train[has_true_mask]
        try:
            return reproducible_choice(candidates, count, seed, fold, "true_masks")
        except SubsetError:
            raise SubsetError(
                f"pseudo_labels.true_masks is {count}, but the training set of fold {fold} has only "
                f"{len(candidates)} defective images with a true mask: use at most {len(candidates)}, "
                "or 'all'"
            ) from None

    def true_mask(self, position: int) -> np.ndarray | None:
        row = self.index.iloc[position]
        if not row["has_mask"]:
            return None
        return read_image(self.root / "masks" / f"{row['id']}.png") > 0

    def load_maps(self, folder: str | Path, positions: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Stack the 16-bit maps ``folder/<id>.png`` of the given rows as float (N, H, W)."""
        folder = Path(folder)
        ids = self.index["id"].to_numpy()[np.asarray(positions, dtype=int)]
        return torch.from_numpy(np.stack([read_map(folder / f"{i}.png") for i in ids]))

    def load_masks(self, folder: str | Path, positions: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Stack the 8-bit masks ``folder/<id>.png`` of the given rows as float 0/1 (N, H, W)."""
        folder = Path(folder)
        ids = self.index["id"].to_numpy()[np.asarray(positions, dtype=int)]
        return torch.from_numpy(np.stack([read_image(folder / f"{i}.png") > 0 for i in ids])).float()


@dataclass(frozen=True)
class RawImage:
    """One image as a source gives it, before resizing."""

    id: str
    label: int
    group: str
    fold: int
    image: np.ndarray  # uint8 (H, W), any size
    mask: np.ndarray | None  # bool (H, W) of the image's size, or None


def write_prepared(out: Path, raw_images: Iterator[RawImage], width: int, height: int) -> tuple[pd.DataFrame, dict]:
    """Resize and write every image (and true mask) under ``out``; return the index and size stats."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    rows, sizes = [], []
    for raw in raw_images:
        sizes.append(raw.image.shape)
        image = cv2.resize(raw.image, (width, height), interpolation=cv2.INTER_AREA)
        write_image(out / "images" / f"{raw.id}.png", image)
        if raw.mask is not None:
            # Area interpolation keeps a one-pixel scratch visible after shrinking; any coverage counts.
            small = cv2.resize(raw.mask.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA)
            write_image(out / "masks" / f"{raw.id}.png", (small > 0).astype(np.uint8) * 255)
        rows.append(
            {"id": raw.id, "label": raw.label, "group": raw.group, "fold": raw.fold, "has_mask": raw.mask is not None}
        )
    index = pd.DataFrame(rows, columns=list(INDEX_COLUMNS))
    heights, widths = np.array(sizes).T
    stats = {
        "source_height": {"min": int(heights.min()), "max": int(heights.max()), "mean": float(heights.mean())},
        "source_width": {"min": int(widths.min()), "max": int(widths.max()), "mean": float(widths.mean())},
        "prepared_size": {"width": width, "height": height},
    }
    return index, stats


def count_table(index: pd.DataFrame) -> dict:
    """Images and defective images per fold, as the data report shows them."""
    per_fold = index.groupby("fold")["label"].agg(images="size", defective="sum")
    return {
        "images": len(index),
        "defective": int(index["label"].sum()),
        "defect_free": int((index["label"] == 0).sum()),
        "groups": int(index["group"].nunique()),
        "per_fold": {str(f): {k: int(v) for k, v in row.items()} for f, row in per_fold.iterrows()},
    }


def group_table(index: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Per group (physical item): its images, defective images and fold, as the data report lists them."""
    table = index.groupby("group").agg(images=("label", "size"), defective=("label", "sum"), fold=("fold", "first"))
    return {str(group): {k: int(v) for k, v in row.items()} for group, row in table.iterrows()}
