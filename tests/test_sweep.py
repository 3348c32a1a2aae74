"""Sweeps: every point a `dvc exp run`, saved small, and summarized as AP against a count."""

import pandas as pd
import pytest

from pipeline.sweep import point_overrides, summary_table


def test_summary_averages_over_seeds_and_spreads_over_seeds_or_folds():
    points = pd.DataFrame({
        "true_masks": [5, 5, 10],
        "baseline_ap": [0.6, 0.8, 0.9], "baseline_ap_fold_std": [0.1, 0.1, 0.05],
        "guided_ap": [0.7, 0.9, 1.0], "guided_ap_fold_std": [0.2, 0.2, 0.03],
    })
    table = summary_table(points, "true_masks").set_index(["true_masks", "model"])
    assert table.loc[(5, "baseline"), "ap_mean"] == pytest.approx(0.7)
    assert table.loc[(5, "guided"), "ap_std"] == pytest.approx(0.1)  # over the two seeds, ddof 0
    assert table.loc[(5, "guided"), "seeds"] == 2
    assert table.loc[(10, "guided"), "ap_std"] == pytest.approx(0.03)  # one seed: over its folds


def test_a_seed_sets_every_seed_that_varies_and_fixed_overrides_come_first():
    overrides = point_overrides("prepare.defective_images", "5", 2, ["train_guided.variant=none"])
    assert overrides[0] == "train_guided.variant=none" and "prepare.defective_images=5" in overrides
    assert {"train_baseline.seed=2", "train_guided.seed=2", "prepare.subset_seed=2", "pseudo_labels.seed=2"} <= set(overrides)
    assert "prepare.seed=2" not in overrides  # the folds stay the same
