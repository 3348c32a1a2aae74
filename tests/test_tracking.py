"""MLflow tracking: flattened params, the pipeline run id, stage runs, and an unusable store
reported clearly."""

from __future__ import annotations

import os
import time
from pathlib import Path

import mlflow
import pytest

from pipeline.config import TrainParams
from pipeline.core.tracking import (
    FAST_CHECK,
    TrackingError,
    connect,
    environment_defaults,
    flatten,
    pipeline_run_id,
    stage_run,
)


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PIPELINE_RUN_ID", "run-42")
    yield tmp_path
    mlflow.end_run()


def test_flatten_expands_sections_and_nested_models():
    flat = flatten({"train": TrainParams(epochs=3), "x": {"y": {"z": 1}}})
    assert flat["train.epochs"] == 3 and flat["train.lr"] == 0.01 and flat["x.y.z"] == 1


def test_pipeline_run_id_comes_from_the_environment_when_set(monkeypatch):
    monkeypatch.setenv("PIPELINE_RUN_ID", "abc")
    assert pipeline_run_id() == "abc"


def test_lineage_links_a_downstream_run_to_the_run_that_made_its_input(store):
    with stage_run("producer", {"p": {"a": 1}}, dataset="toy") as producer:
        producer.write_lineage(store / "out")
        producer.log_metrics({"score": 0.5, "not_a_number": "text", "nan": float("nan")})
    with stage_run("consumer", {}) as consumer:
        links = consumer.link_upstream(store / "out", store / "missing")
    assert links == {"upstream.producer": producer.run_id, "upstream.producer.pipeline_run": "run-42"}
    run = mlflow.get_run(consumer.run_id)
    assert run.data.tags["upstream.producer"] == producer.run_id
    assert run.data.tags["stage"] == "consumer" and run.data.tags["pipeline_run"] == "run-42"
    produced = mlflow.get_run(producer.run_id)
    assert produced.data.params["p.a"] == "1" and produced.data.tags["dataset"] == "toy"
    assert produced.data.metrics == {"score": 0.5}


def test_a_failing_stage_marks_its_run_failed(store):
    with pytest.raises(RuntimeError), stage_run("broken", {}) as run:
        raise RuntimeError("boom")
    assert mlflow.get_run(run.run_id).info.status == "FAILED"


# --- MLflow tracking store ----------------------------------------------------------------------


def test_unreachable_tracking_server_is_reported_within_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on port 9
    started = time.perf_counter()
    with pytest.raises(TrackingError, match="'http://127.0.0.1:9' is unreachable or misconfigured"):
        connect()
    assert time.perf_counter() - started < 30  # MLflow's own retries would take about 4 minutes
    assert not set(FAST_CHECK) & set(os.environ)  # the fast-fail settings do not outlive the check


@pytest.mark.parametrize("uri", ["sqlite:///{tmp}/missing/mlflow.db", "nosuchscheme://host/path"])
def test_misconfigured_tracking_uri_is_reported(uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(tmp=tmp_path))
    with pytest.raises(TrackingError, match="MLFLOW_TRACKING_URI"):
        connect()
    assert not (tmp_path / "missing").exists()


def test_fast_check_settings_leave_the_users_own_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in FAST_CHECK:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    with environment_defaults(FAST_CHECK):
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == FAST_CHECK["MLFLOW_HTTP_REQUEST_TIMEOUT"]
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ
