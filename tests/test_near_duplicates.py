"""The near-duplicate check: copies that are not byte-identical, across groups and folds."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.data.near_duplicates import main, near_duplicate_pairs, perceptual_hashes
from pipeline.data.prepared import PreparedData
from support.helpers import real_dataset

KOLEKTORSDD, KOLEKTORSDD_PRESENT = real_dataset("KolektorSDD")


def _surfaces(n: int, seed: int = 0) -> np.ndarray:
    """``n`` distinct smooth surfaces (uint8, 96x96): perceptual hashes 26 to 34 bits apart."""
    rng = np.random.default_rng(seed)
    fields = [cv2.GaussianBlur(rng.random((96, 96)).astype(np.float32), (0, 0), 6) for _ in range(n)]
    return np.stack([(f - f.min()) / (f.max() - f.min()) * 200 + 20 for f in fields]).astype(np.uint8)


def _data(tmp_path: Path, groups: list[str], folds: list[int], images: np.ndarray) -> PreparedData:
    index = pd.DataFrame(
        {"id": [f"i{k}" for k in range(len(groups))], "label": 0, "group": groups, "fold": folds, "has_mask": False}
    )
    return PreparedData(tmp_path, index, torch.from_numpy(images))


def test_a_noisy_copy_in_another_group_and_fold_is_found_and_exact_groups_are_not(tmp_path: Path) -> None:
    images = _surfaces(5)
    noisy = np.clip(images[0] + np.random.default_rng(1).normal(0, 4, images[0].shape), 0, 255).astype(np.uint8)
    assert not np.array_equal(noisy, images[0])  # not byte-identical: prepare's duplicate merge misses it
    # i5: a near-copy of i0 in another group and fold; i6: a copy of i1 inside i1's own group.
    data = _data(
        tmp_path,
        ["a", "b", "c", "d", "e", "f", "b"],
        [0, 1, 2, 0, 1, 2, 1],
        np.concatenate([images, noisy[None], images[1][None]]),
    )
    pairs = near_duplicate_pairs(data.index, perceptual_hashes(data.images), max_distance=4)
    assert pairs[["id_a", "id_b", "group_a", "group_b", "crosses_folds"]].values.tolist() == [
        ["i0", "i5", "a", "f", True]
    ]
    assert pairs["distance"].iat[0] <= 4


def _write_prepared(folder: Path, data: PreparedData) -> None:
    (folder / "images").mkdir(parents=True)
    data.index.to_csv(folder / "index.csv", index=False)
    for image_id, image in zip(data.index["id"], data.images.numpy()):
        cv2.imwrite(str(folder / "images" / f"{image_id}.png"), image)


@pytest.mark.parametrize("copy_fold, status", [(1, 1), (-1, 1), (0, 0)])
def test_the_command_exits_1_where_a_pair_is_split_between_folds_and_writes_the_pairs(
    tmp_path: Path, capsys, copy_fold: int, status: int
) -> None:
    images = _surfaces(3)
    # d is a byte-identical copy of a in a group of its own: in another fold, training only, or a's fold.
    data = _data(tmp_path, ["a", "b", "c", "d"], [0, 1, 2, copy_fold], np.concatenate([images, images[:1]]))
    _write_prepared(tmp_path / "prepared", data)
    out = tmp_path / "pairs.json"
    assert main([str(tmp_path / "prepared"), "--out", str(out)]) == status
    written = json.loads(out.read_text())
    assert written["group_pairs"] == ["a+d"] and written["split_between_folds"] == status
    assert written["pairs"][0]["distance"] == 0 and written["images"] == 4
    assert "1 near-duplicate pair(s) across groups within 4 of 64 bits" in capsys.readouterr().out


@KOLEKTORSDD_PRESENT
@pytest.mark.realdata
def test_kolektorsdd_items_38_and_39_are_near_copies_of_each_other(tmp_path: Path) -> None:
    from pipeline.data.sources.kolektorsdd import load_kolektorsdd

    source = load_kolektorsdd(KOLEKTORSDD)
    chosen = [image for image in source.images if image.group.split("+")[0] in ("kos38", "kos39", "kos12")]
    images = np.stack([cv2.resize(cv2.imread(image.image, cv2.IMREAD_GRAYSCALE), (128, 352)) for image in chosen])
    index = pd.DataFrame(
        {
            "id": [i.id for i in chosen],
            "label": [i.label for i in chosen],
            "group": [i.group for i in chosen],
            "fold": [i.fold for i in chosen],
            "has_mask": True,
        }
    )
    pairs = near_duplicate_pairs(index, perceptual_hashes(torch.from_numpy(images)), max_distance=4)
    assert len(pairs) == 8 and set(pairs["group_a"] + "+" + pairs["group_b"]) == {"kos38+kos39"}
    assert not pairs["crosses_folds"].any()  # the default folds keep them together, by chance
