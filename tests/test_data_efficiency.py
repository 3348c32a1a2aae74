"""Data efficiency (N defective training images) and mixed supervision (Na true masks)."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline.config import ConfigError, parse_section
from pipeline.core.artifacts import read_image, read_json, write_json, write_map
from pipeline.core.layout import TRUE_MASKS
from pipeline.data.prepared import PreparedData, SubsetError, defective_subsets
from pipeline.knowledge.pseudo_labels import otsu_mask
from pipeline.training.objectives import consistency_targets
from stages import prepare, pseudo_labels, train_guided


def make_index(folds: int = 3, per_fold_defective: int = 8, per_fold_clean: int = 12) -> pd.DataFrame:
    rows = []
    for fold in range(folds):
        for k in range(per_fold_defective + per_fold_clean):
            defective = k < per_fold_defective
            rows.append(
                {
                    "id": f"f{fold}-{k}",
                    "label": int(defective),
                    "group": f"g{fold}-{k}",
                    "fold": fold,
                    "has_mask": defective and k % 4 != 3,
                }
            )  # a few defective images lack a true mask
    return pd.DataFrame(rows)


def prepared(index: pd.DataFrame, subsets: dict | None) -> PreparedData:
    return PreparedData(Path("."), index, np.zeros((len(index), 4, 4), np.uint8), subsets)


def test_n_keeps_exactly_n_defective_training_images_per_fold_and_never_a_test_image():
    index = make_index()
    subsets = defective_subsets(index, 5, seed=0)
    data = prepared(index, subsets)
    for fold in range(3):
        train, test = data.split(fold)
        labels = index["label"].to_numpy()
        assert (labels[train] == 1).sum() == 5
        assert set(subsets[fold]) <= set(index.loc[(index["fold"] != fold) & (index["label"] == 1), "id"])
        assert not set(subsets[fold]) & set(index["id"].to_numpy()[test])
        # Every defect-free training image is kept; the test set is untouched.
        assert (labels[train] == 0).sum() == ((index["fold"] != fold) & (index["label"] == 0)).sum()
        assert len(test) == (index["fold"] == fold).sum()


def test_n_is_reproducible_from_the_seed_nested_over_n_and_all_keeps_everything():
    index = make_index()
    assert defective_subsets(index, 5, seed=3) == defective_subsets(index, 5, seed=3)
    assert defective_subsets(index, 5, seed=3) != defective_subsets(index, 5, seed=4)
    five, ten = defective_subsets(index, 5, seed=1), defective_subsets(index, 10, seed=1)
    assert all(set(five[fold]) < set(ten[fold]) for fold in five)
    every = defective_subsets(index, "all", seed=0)
    assert all(len(ids) == 16 for ids in every.values())
    data = prepared(index, every)
    assert all(np.array_equal(data.split(f)[0], prepared(index, None).split(f)[0]) for f in range(3))


def test_n_larger_than_a_training_set_is_refused_naming_the_key():
    with pytest.raises(SubsetError, match=r"prepare.defective_images is 17.*only 16.*'all'"):
        defective_subsets(make_index(), 17, seed=0)


def test_na_selects_exactly_na_kept_defective_training_images_with_true_masks():
    index = make_index()
    data = prepared(index, defective_subsets(index, 10, seed=0))
    for fold in range(3):
        rows = data.true_mask_rows(fold, 4, seed=0)
        train, test = data.split(fold)
        assert len(rows) == 4 and set(rows) <= set(train) and not set(rows) & set(test)
        assert index["label"].to_numpy()[rows].all() and index["has_mask"].to_numpy()[rows].all()
        assert np.array_equal(rows, data.true_mask_rows(fold, 4, seed=0))
        assert len(data.true_mask_rows(fold, 0, seed=0)) == 0
        every = data.true_mask_rows(fold, "all", seed=0)
        kept_with_mask = train[(index["label"].to_numpy()[train] == 1) & index["has_mask"].to_numpy()[train]]
        assert np.array_equal(every, np.sort(kept_with_mask))
    with pytest.raises(SubsetError, match="pseudo_labels.true_masks is 11"):
        data.true_mask_rows(0, 11, seed=0)


def test_counts_are_validated_in_params():
    assert parse_section("prepare", {"defective_images": 5}).defective_images == 5
    assert parse_section("pseudo_labels", {"true_masks": "all"}).true_masks == "all"
    for section, values in (
        ("prepare", {"defective_images": 0}),
        ("prepare", {"defective_images": "some"}),
        ("pseudo_labels", {"true_masks": -1}),
    ):
        with pytest.raises(ConfigError, match=f"{section}.(defective_images|true_masks)"):
            parse_section(section, values)


def prepare_with_maps(folder: Path, size: int = 32, **prepare_params) -> PreparedData:
    """The prepare stage on a small synthetic set, and a random saliency map per image and fold."""
    params = {
        "prepare": {
            "width": size,
            "height": size,
            "split": "cv",
            "folds": 3,
            **prepare_params,
            "synthetic": {"items": 12, "images_per_item": 4, "defect_ratio": 0.4},
        }
    }
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    prepare.main()
    data = PreparedData.load("data/prepared")
    rng = np.random.default_rng(0)
    for fold in data.folds:
        for image_id in data.index["id"]:
            write_map(folder / "data/saliency" / f"fold{fold}" / f"{image_id}.png", rng.random((size, size)))
    return data


def run_pseudo_labels(folder: Path, **pseudo_params) -> None:
    params = yaml.safe_load((folder / "params.yaml").read_text())
    (folder / "params.yaml").write_text(yaml.safe_dump({**params, "pseudo_labels": pseudo_params}))
    # As under `pytest -q`: a stage's main() run in-process must not take its caller's arguments
    # for a knowledge round's name.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["pytest", "-q", "-p", "no:cacheprovider"])
        pseudo_labels.main()


def targets(data: PreparedData, fold: int) -> dict[int, np.ndarray]:
    return {
        row: read_image(Path("data/pseudo_masks") / f"fold{fold}" / f"{image_id}.png") > 0
        for row, image_id in enumerate(data.index["id"])
    }


def otsu_of(data: PreparedData, fold: int, row: int) -> np.ndarray:
    return otsu_mask(data.load_maps(Path("data/saliency") / f"fold{fold}", [row])[0].numpy())


def test_prepare_stage_writes_the_kept_subsets_and_training_uses_them(workdir):
    data = prepare_with_maps(workdir, defective_images=3, subset_seed=1)
    report = read_json(workdir / "data/prepared/report.json")
    assert report["defective_training_images"] == {"0": 3, "1": 3, "2": 3}
    assert read_json(workdir / "data/metrics/prepare.json")["defective_training_images"] == {"0": 3, "1": 3, "2": 3}
    labels = data.index["label"].to_numpy()
    assert all((labels[data.split(fold)[0]] == 1).sum() == 3 for fold in data.folds)


def test_na_zero_leaves_every_target_a_pseudo_mask(workdir):
    data = prepare_with_maps(workdir)
    run_pseudo_labels(workdir, true_masks=0)
    labels = data.index["label"].to_numpy()
    for fold in data.folds:
        for row, target in targets(data, fold).items():
            expected = otsu_of(data, fold, row) if labels[row] else np.zeros_like(target)
            assert np.array_equal(target, expected)
    assert read_json(workdir / "data/metrics/pseudo_labels.json")["true_masks"] == 0
    assert read_json(workdir / "data/pseudo_masks" / TRUE_MASKS) == {"fold0": [], "fold1": [], "fold2": []}


def test_na_all_gives_every_defective_training_image_its_true_mask(workdir):
    data = prepare_with_maps(workdir, defective_images=6)
    run_pseudo_labels(workdir, true_masks="all")
    labels = data.index["label"].to_numpy()
    for fold in data.folds:
        train, _test = data.split(fold)
        found = targets(data, fold)
        for row in np.flatnonzero(labels == 1):
            if row in train:
                assert np.array_equal(found[row], data.true_mask(row)), row
            else:  # test images and defective images left out by N keep their pseudo-masks
                assert np.array_equal(found[row], otsu_of(data, fold, row)), row
    per_fold = read_json(workdir / "data/metrics/pseudo_labels.json")["per_fold"]
    assert all(scores["true_masks"] == 6 for scores in per_fold.values())
    listed = read_json(workdir / "data/pseudo_masks" / TRUE_MASKS)
    for fold in data.folds:
        train, _ = data.split(fold)
        expected = data.index["id"].iloc[data.true_mask_rows(fold, "all", 0)].tolist()
        assert len(listed[f"fold{fold}"]) == 6 and listed[f"fold{fold}"] == expected
        assert set(listed[f"fold{fold}"]) <= set(data.index["id"].iloc[train])


def test_consistency_targets_swap_in_the_true_masks_of_their_rows_only():
    priors, masks = torch.rand(5, 4, 4), (torch.rand(5, 4, 4) > 0.5).float()
    mixed = consistency_targets(priors, masks, [1, 3])
    assert torch.equal(mixed[[1, 3]], masks[[1, 3]]) and torch.equal(mixed[[0, 2, 4]], priors[[0, 2, 4]])
    assert not torch.equal(priors[1], masks[1])  # the saliency maps themselves are left as they were
    assert consistency_targets(priors, masks, []) is priors


@pytest.mark.parametrize("variant", ["consistency", "no_injection"])
def test_true_masks_change_what_the_guided_model_learns(workdir, variant):
    """Na must reach the loss of every variant: the consistency loss reads the saliency maps, not
    the pseudo-masks, and once learnt exactly the same model whatever Na."""
    prepare_with_maps(workdir, size=96)  # the model's Grad-CAM is 3×3 cells: something to point at
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params.update(
        model={"backbone": "resnet18", "device": "cpu"},
        train_guided={"epochs": 1, "batch_size": 8, "variant": variant, "seed": 0},
    )
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    # The lineage record the saliency stage leaves (here the maps come from prepare_with_maps).
    write_json(workdir / "data/saliency/run.json", {"stage": "saliency", "mlflow_run_id": "-", "pipeline_run_id": "-"})
    losses = {}
    for true_masks in (0, "all"):
        run_pseudo_labels(workdir, true_masks=true_masks)
        train_guided.main()
        losses[true_masks] = read_json(workdir / "data/metrics/train_guided.json")["per_fold"]["fold0"]["loss"]
    assert losses[0] != losses["all"]
