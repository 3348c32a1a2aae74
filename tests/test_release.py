"""The release's pieces on hand-made input: operating points, the gate, its params, the candidate
checks, predict's threshold from a version's tag, and training on every image."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from pipeline.config import ConfigError, parse_section
from pipeline.core.errors import InputError
from pipeline.deployment.predict import LoadedModel, decision_threshold
from pipeline.deployment.release import FOLD, candidate_version, gate_figures
from pipeline.metrics.classification import MetricsError
from pipeline.metrics.operating_points import (
    OperatingPoint,
    UnreachableOperatingPoint,
    gate_failures,
    operating_point_summary,
    operating_threshold,
    rates_at,
)
from pipeline.models.files import ModelError
from support.helpers import tiny_data

# Defects at 0.4, 0.6, 0.9; defect-free images at 0.1, 0.2, 0.3, 0.5, 0.7.
LABELS = np.array([1, 1, 1, 0, 0, 0, 0, 0])
SCORES = np.array([0.9, 0.6, 0.4, 0.1, 0.2, 0.3, 0.5, 0.7])


@pytest.mark.parametrize(
    ("point", "threshold"),
    [
        (OperatingPoint("zero_misses"), 0.4),  # the lowest defect: 0.5 and 0.7 are false alarms there
        (OperatingPoint("max_false_alarm_rate", 0.2), 0.6),  # 0.4 flags 2 of 5 defect-free, 0.6 only 0.7
        (OperatingPoint("max_false_alarm_rate", 0.0), 0.9),
        (OperatingPoint("min_precision", 0.6), 0.4),  # 3 of 5 flagged are defects
        (OperatingPoint("min_precision", 0.75), 0.9),  # 0.6 reaches 2 of 3 only
    ],
)
def test_each_operating_point_on_hand_made_scores(point: OperatingPoint, threshold: float) -> None:
    assert operating_threshold(LABELS, SCORES, point) == threshold


def test_rates_at_a_threshold_count_ties_as_flagged() -> None:
    rates = rates_at(np.array([1, 0, 0]), np.array([0.5, 0.5, 0.2]), 0.5)
    assert rates == {"misses": 0.0, "miss_rate": 0.0, "false_alarms": 1.0, "false_alarm_rate": 0.5, "precision": 0.5}
    # A defect-free image tied with the lowest defect is a false alarm at zero_misses, as in metrics.py.
    assert operating_threshold(np.array([1, 0]), np.array([0.5, 0.5]), OperatingPoint("zero_misses")) == 0.5


@pytest.mark.parametrize(
    ("point", "closest"),
    [
        (OperatingPoint("max_false_alarm_rate", 0.0), "the closest is false_alarm_rate 0.1667 at threshold 0.9"),
        (OperatingPoint("min_precision", 0.9), "the closest is precision 0.5000 at threshold 0.4"),
    ],
)
def test_an_operating_point_no_threshold_meets_is_refused_naming_the_closest(
    point: OperatingPoint, closest: str
) -> None:
    scores = np.append(SCORES, 0.95)  # a defect-free image above every defect
    with pytest.raises(UnreachableOperatingPoint, match=closest):
        operating_threshold(np.append(LABELS, 0), scores, point)


def test_summary_gives_the_pooled_threshold_and_each_folds_rates_there() -> None:
    frame = pd.DataFrame(
        {"fold": [0, 0, 0, 1, 1, 1, 1], "label": [1, 0, 0, 1, 1, 0, 0], "score": [0.9, 0.5, 0.1, 0.4, 0.8, 0.3, 0.2]}
    )
    summary = operating_point_summary(frame, OperatingPoint("zero_misses"))
    assert summary["threshold"] == 0.4 and summary["operating_point"] == "zero_misses"
    assert summary["false_alarm_rate"] == 0.25 and summary["miss_rate"] == 0.0
    assert [f["false_alarm_rate"] for f in summary["per_fold"].values()] == [0.5, 0.0]
    assert summary["false_alarm_rate_std"] == 0.25 and summary["miss_rate_std"] == 0.0
    with pytest.raises(MetricsError, match="fold 1"):
        operating_point_summary(frame.assign(label=[1, 0, 0, 1, 1, 1, 1]), OperatingPoint("zero_misses"))


def test_release_params_validate_the_operating_point_and_the_gate() -> None:
    release = parse_section(
        "release",
        {
            "operating_point": {"max_false_alarm_rate": 0.1},
            "gate": {"guided.ap": ">= 0.9", "operating_point.miss_rate": "<0.01"},
        },
    )
    assert release.point == OperatingPoint("max_false_alarm_rate", 0.1) and release.model == "guided"
    assert parse_section("release", {}).point == OperatingPoint("zero_misses")
    for bad, message in [
        ({"operating_point": "few_misses"}, "unknown operating point 'few_misses'"),
        ({"operating_point": {"min_precision": 1.5}}, r"needs a value in \[0.0, 1.0\]"),
        ({"operating_point": {"zero_misses": 1}}, "takes no value"),
        ({"operating_point": {"min_precision": 0.9, "max_false_alarm_rate": 0.1}}, "one key"),
        ({"gate": {"guided.ap": "at least 0.9"}}, "gate 'guided.ap'.*e.g. '>= 0.9'"),
        ({"model": "teacher"}, "release.model"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_section("release", bad)


def test_gate_passes_refuses_with_the_reason_and_refuses_an_unknown_metric() -> None:
    evaluation = {"guided": {"ap": 0.93, "false_alarms_at_full_recall": 4.0}, "data": {"test_images": 40}}
    figures = gate_figures(
        evaluation,
        {"operating_point": "zero_misses", "false_alarm_rate": 0.1, "per_fold": {"fold0": {"false_alarm_rate": 0.1}}},
    )
    assert figures["guided.ap"] == 0.93 and figures["operating_point.false_alarm_rate"] == 0.1
    assert "operating_point.per_fold.fold0.false_alarm_rate" not in figures
    assert gate_failures(figures, {"guided.ap": ">= 0.9", "operating_point.false_alarm_rate": "<= 0.1"}, "x") == []
    assert gate_failures(figures, {"guided.ap": ">= 0.95", "guided.false_alarms_at_full_recall": "< 4"}, "x") == [
        "guided.ap = 0.93, needs >= 0.95",
        "guided.false_alarms_at_full_recall = 4, needs < 4",
    ]
    with pytest.raises(MetricsError, match=r"'guided.aps' \(closest: guided.ap"):
        gate_failures(figures, {"guided.aps": ">= 0.9"}, "evaluate.json")


class _Registry:
    """The one call of an MLflow client that ``candidate_version`` makes, answered from a dict."""

    def __init__(self, versions: dict) -> None:
        self.versions = versions

    def get_model_version_by_alias(self, name: str, alias: str):
        from mlflow.exceptions import MlflowException

        if (name, alias) not in self.versions:
            raise MlflowException(f"alias {alias} not found")
        return self.versions[name, alias]

    def search_registered_models(self) -> list:
        return [SimpleNamespace(name=name) for name, _ in self.versions]


def test_a_promote_needs_a_candidate_that_carries_a_threshold() -> None:
    tagged = SimpleNamespace(version="4", tags={"role": "release", "threshold": "0.31"})
    older = SimpleNamespace(version="2", tags={"fold": "0"})
    registry = _Registry({("a-guided", "candidate"): tagged, ("b-guided", "candidate"): older})
    assert candidate_version(registry, "a-guided") is tagged
    with pytest.raises(InputError, match="no version of 'c-guided' has the alias 'candidate'.*dvc repro release"):
        candidate_version(registry, "c-guided")
    with pytest.raises(InputError, match="version 2 .* has no 'threshold' tag.*dvc repro -f release"):
        candidate_version(registry, "b-guided")


def test_predict_reads_a_versions_threshold_tag_before_its_fallbacks() -> None:
    def loaded(tags: dict) -> LoadedModel:
        return LoadedModel(None, {"kind": "guided"}, "models:/x-guided/4", tags=tags)

    threshold, origin = decision_threshold(loaded({"threshold": "0.3125", "operating_point": "zero_misses"}))
    assert (
        threshold == 0.3125
        and origin.startswith("tag threshold of models:/")
        and origin.endswith("(operating point zero_misses)")
    )
    assert decision_threshold(loaded({"threshold": "0.3125"}), 0.7) == (0.7, "--threshold")
    threshold, origin = decision_threshold(loaded({"role": "fold"}))
    assert threshold == 0.5 and "no threshold tag" in origin
    with pytest.raises(ModelError, match="not a probability"):
        decision_threshold(loaded({"threshold": "high"}))


def test_all_training_trains_on_every_image_and_monitors_nothing(one_thread: None) -> None:
    from pipeline.config import ModelParams, TrainParams
    from pipeline.training.loop import train

    data = tiny_data(32, 8)
    everything = data.all_training()
    train_rows, test_rows = everything.split(FOLD)
    assert len(train_rows) == 8 and len(test_rows) == 0 and everything.folds == []
    _, _, history = train(everything, FOLD, ModelParams(device="cpu"), TrainParams(epochs=1, batch_size=8))
    assert math.isnan(history[0]["test_ap"]) and math.isfinite(history[0]["loss"])


def test_a_refused_promotion_names_the_figure_and_how_to_serve_the_candidate(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.deployment import release

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    candidate = SimpleNamespace(name="synthetic-guided", version="3", tags={"threshold": "0.02"}, run_id="r")
    monkeypatch.setattr(release, "candidate_version", lambda client, name: candidate)
    # The default run's figures: AP 0.80 and the zero-miss threshold flagging 97% of good parts.
    figures = {"guided.ap": 0.80, "operating_point.false_alarm_rate": 0.97}
    monkeypatch.setattr(release, "candidate_figures", lambda version, tracking: figures)
    gate = {"guided.ap": ">= 0.9", "operating_point.false_alarm_rate": "<= 0.2"}
    with pytest.raises(release.GateRefused) as refused:
        release.promote("synthetic-guided", gate)
    message = str(refused.value)
    assert "guided.ap = 0.8, needs >= 0.9" in message
    assert "operating_point.false_alarm_rate = 0.97, needs <= 0.2" in message
    assert message.endswith("To serve the candidate for a trial: kgi serve models:/synthetic-guided@candidate")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.search_registered_models() == []  # nothing was given an alias
