import mlflow
import pytest

from pipeline.config import TrainParams
from pipeline.core.tracking import flatten, pipeline_run_id, stage_run


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
