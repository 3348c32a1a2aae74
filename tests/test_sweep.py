"""Sweeps: every point a queued `dvc exp run`, saved small, and summarized as AP against a count."""

import pandas as pd
import pytest

from pipeline.experiments.sweep import (
    Experiment,
    SweepError,
    check_seeds_follow,
    experiment_states,
    has_overrides,
    point_overrides,
    summary_table,
)


def test_summary_averages_over_seeds_and_spreads_over_seeds_or_folds():
    points = pd.DataFrame(
        {
            "true_masks": [5, 5, 10],
            "baseline_ap": [0.6, 0.8, 0.9],
            "baseline_ap_fold_std": [0.1, 0.1, 0.05],
            "guided_ap": [0.7, 0.9, 1.0],
            "guided_ap_fold_std": [0.2, 0.2, 0.03],
        }
    )
    table = summary_table(points, "true_masks").set_index(["true_masks", "model"])
    assert table.loc[(5, "baseline"), "ap_mean"] == pytest.approx(0.7)
    assert table.loc[(5, "guided"), "ap_std"] == pytest.approx(0.1)  # over the two seeds, ddof 0
    assert table.loc[(5, "guided"), "seeds"] == 2
    assert table.loc[(10, "guided"), "ap_std"] == pytest.approx(0.03)  # one seed: over its folds


def test_a_point_sets_the_whole_run_seed_and_fixed_overrides_come_first():
    overrides = point_overrides("prepare.defective_images", "5", 2, ["train_guided.variant=none"])
    assert overrides == ["train_guided.variant=none", "prepare.defective_images=5", "seed=2"]


def test_a_sweep_refuses_a_derived_seed_set_on_its_own_which_its_seeds_would_not_reach():
    check_seeds_follow({"seed": 0, "train_guided": {"seed": None}, "prepare": {"seed": 4}}, "params.yaml")
    with pytest.raises(SweepError, match=r"params.yaml sets train_baseline.seed on its own"):
        check_seeds_follow({"train_baseline": {"seed": 0}}, "params.yaml")


def test_experiment_states_come_from_the_current_commit_only():
    def experiment(name, state, rev):
        return {
            "name": name,
            "revs": [{"rev": rev, "data": {"params": {"params.yaml": {"data": {"seed": 1}}}}}],
            "executor": state and {"state": state},
        }

    shown = [
        {"rev": "workspace", "experiments": None},
        {
            "rev": "head",
            "experiments": [
                experiment("a", "success", "r1"),
                experiment("b", "queued", "s2"),
                experiment("c", None, "r3"),
                experiment("d", "failed", "s4"),
            ],
        },
        {"rev": "older", "experiments": [experiment("e", "success", "r5")]},
    ]
    states = experiment_states(shown)
    assert states == {
        "a": Experiment("success", "r1", {"seed": 1}),
        "b": Experiment("queued", "s2", {"seed": 1}),
        "c": Experiment("success", "r3", {"seed": 1}),
        "d": Experiment("failed", "s4", {"seed": 1}),
    }


def test_a_finished_point_counts_only_with_the_params_its_overrides_name():
    params = {"seed": 1, "evaluate": {"threshold": 0.3}, "prepare": {"defective_images": "all"}}
    assert has_overrides(params, ["evaluate.threshold=0.3", "seed=1", "prepare.defective_images=all"])
    assert not has_overrides(params, ["evaluate.threshold=0.3", "seed=2"])
    assert not has_overrides(params, ["train_guided.variant=none"])  # absent from its params
    assert has_overrides({"train_baseline": {"lr": 0.0001}}, ["train_baseline.lr=1e-4"])  # a number to DVC
