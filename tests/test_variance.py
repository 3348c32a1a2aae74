"""The paired ablation of averaged weights and test-time flips (python -m pipeline.experiments.variance)."""

from __future__ import annotations

import pandas as pd
import pytest
from sklearn.metrics import average_precision_score

from pipeline.config import ModelParams, TrainParams
from pipeline.experiments.variance import LAST, fold_scores, summary_table
from pipeline.models.inference import predict
from pipeline.training.loop import train
from support.helpers import noise_data

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = ModelParams(device="cpu")
PARAMS = TrainParams(epochs=3, batch_size=4, seed=0)


def test_one_training_gives_the_same_models_as_separate_trainings_with_and_without_averaging() -> None:
    data = noise_data()
    rows = pd.DataFrame(fold_scores(data, 0, MODEL, PARAMS, [0.5]))
    assert len(rows) == 4 and set(rows["weights"]) == {LAST, "EMA 0.5 epochs"}
    _train_rows, test_rows = data.split(0)
    labels = data.labels[test_rows].numpy()
    for ema_epochs, weights in ((0.0, LAST), (0.5, "EMA 0.5 epochs")):
        model, config, _ = train(data, 0, MODEL, PARAMS.model_copy(update={"ema_epochs": ema_epochs}))
        for flips in (False, True):
            scores = predict(model, {**config, "test_time_flips": flips}, data.images[test_rows])
            expected = average_precision_score(labels, scores)
            got = rows[(rows["weights"] == weights) & (rows["test_time_flips"] == flips)]["ap"].item()
            assert got == pytest.approx(expected, abs=1e-9)


def test_summary_gives_mean_and_spread_over_seeds_of_the_fold_means() -> None:
    rows = pd.DataFrame(
        [
            {"seed": s, "fold": f, "weights": LAST, "test_time_flips": False, "ap": ap}
            for s, f, ap in [(0, 0, 0.8), (0, 1, 1.0), (1, 0, 0.6), (1, 1, 0.8)]
        ]
    )
    assert "| last weights | no | 80.00 ± 14.14 | 90.0 / 70.0 |" in summary_table(rows)


def test_command_writes_the_table_after_every_fold_and_a_rerun_trains_only_the_missing_folds(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.experiments import variance

    calls = []

    def one_fold(data, fold, model_params, params, ema_epochs):
        calls.append((params.seed, fold))
        if len(calls) == 2:  # cut short in the second fold: the first is on disk
            assert "| last weights | no |" in (tmp_path / "out" / "ablation.md").read_text()
            raise KeyboardInterrupt
        return [
            {"seed": params.seed, "fold": fold, "weights": weights, "test_time_flips": False, "ap": 0.5}
            for weights in (LAST, "EMA 2 epochs")
        ]

    monkeypatch.setattr(variance, "fold_scores", one_fold)
    monkeypatch.setattr(variance.PreparedData, "load", staticmethod(lambda path: noise_data()))
    monkeypatch.setattr(variance.PreparedData, "folds", property(lambda self: [0, 1]))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("train_baseline: {epochs: 1}\n")
    command = ["data/prepared", "--seeds", "0", "--ema-epochs", "2", "--out", str(tmp_path / "out")]
    with pytest.raises(KeyboardInterrupt):
        variance.main(command)
    assert pd.read_csv(tmp_path / "out" / "ablation.csv")["fold"].tolist() == [0, 0]
    variance.main(command)
    assert calls == [(0, 0), (0, 1), (0, 1)]
    assert pd.read_csv(tmp_path / "out" / "ablation.csv")["fold"].tolist() == [0, 0, 1, 1]
    # Rows measured elsewhere and added to the file: a rerun with nothing to train still writes the table.
    (tmp_path / "out" / "ablation.md").unlink()
    variance.main(command)
    assert (
        calls == [(0, 0), (0, 1), (0, 1)] and "| EMA 2 epochs | no |" in (tmp_path / "out" / "ablation.md").read_text()
    )
    with pytest.raises(variance.InputError, match="EMA 3 epochs.*give the same --ema-epochs"):
        variance.main([*command[:4], "3", *command[5:]])


def test_overrides_train_the_set_keys_and_a_rerun_must_give_the_same_ones(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.experiments import variance

    trained = []

    def one_fold(data, fold, model_params, params, ema_epochs):
        trained.append(params)
        return [
            {
                "seed": params.seed,
                "fold": fold,
                "weights": weights,
                "test_time_flips": False,
                "ap": 0.5,
                "false_alarms": 3.0,
            }
            for weights in (LAST, "EMA 2 epochs")
        ]

    monkeypatch.setattr(variance, "fold_scores", one_fold)
    monkeypatch.setattr(variance.PreparedData, "load", staticmethod(lambda path: noise_data()))
    monkeypatch.setattr(variance.PreparedData, "folds", property(lambda self: [0]))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("train_baseline: {epochs: 4}\n")
    command = ["data/prepared", "--ema-epochs", "2", "--out", "out"]
    with pytest.raises(variance.InputError, match="warmup_epochs.*must be below epochs"):
        variance.main([*command[:3], "--set", "warmup_epochs=4", *command[3:]])
    with pytest.raises(variance.InputError, match="'warmup=1'.*train_baseline's keys"):
        variance.main([*command[:3], "--set", "warmup=1", *command[3:]])
    assert not trained
    variance.main(["data/prepared", "--ema-epochs", "2", "--set", "warmup_epochs=1.5", "--out", "out"])
    assert trained[0].warmup_epochs == 1.5 and trained[0].epochs == 4
    assert "| last weights | no | 50.00 | 50.0 | 3.0 |" in (tmp_path / "out" / "ablation.md").read_text()
    with pytest.raises(variance.InputError, match="trained with --set warmup_epochs=1.5, not \\(none\\)"):
        variance.main(["data/prepared", "--ema-epochs", "2", "--out", "out"])
