"""End to end: the release stage after evaluate on the shrunk config, its registered candidate,
the gate that promotes it, and predict with models:/<name>@champion at the carried threshold."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from support.helpers import ROOT, SHRUNK, dvc, make_shrunk_project, merge, project_env, stages_run

NAME = "synthetic-guided"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A gate no run fails (AP is in [0, 1]): the refusal is tested by changing it afterwards.
    overrides = merge(json.loads(json.dumps(SHRUNK)), {"release": {"gate": {"guided.ap": ">= 0"}}})
    project = make_shrunk_project(tmp_path_factory.mktemp("release"), overrides)
    output = dvc(project, "repro")
    assert stages_run(output)[-2:] == ["evaluate", "release"]
    return project


def client(project: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def python(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=project, env=project_env(project), capture_output=True, text=True, timeout=600
    )


def set_gate(project: Path, gate: dict[str, str]) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["release"]["gate"] = gate
    (project / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.mark.slow
def test_release_writes_its_models_and_the_operating_point_of_the_out_of_fold_scores(project: Path) -> None:
    from pipeline.metrics.operating_points import OperatingPoint, operating_threshold

    release = project / "data/release"
    assert {"baseline.pt", "guided.pt", "operating_point.json", "run.json"} <= {p.name for p in release.iterdir()}
    index = pd.read_csv(project / "data/prepared/index.csv")
    assert len(list((release / "saliency/fold0").glob("*.png"))) == len(index)  # every labelled image
    point = json.loads((release / "operating_point.json").read_text())
    scores = pd.read_csv(project / "data/evaluation/scores.csv")
    assert point["operating_point"] == "zero_misses" and point["model"] == "guided"
    assert point["threshold"] == operating_threshold(scores["label"], scores["guided"], OperatingPoint("zero_misses"))
    assert point["threshold"] == scores.loc[scores["label"] == 1, "guided"].min()
    assert point["miss_rate"] == 0.0 and point["miss_rate_std"] == 0.0
    assert 0.0 <= point["false_alarm_rate"] <= 1.0
    metrics = json.loads((project / "data/metrics/release.json").read_text())
    assert metrics["threshold"] == point["threshold"] and metrics["images"] == len(index)


@pytest.mark.slow
def test_release_is_its_own_version_tagged_with_its_threshold_and_alias_candidate(project: Path) -> None:
    point = json.loads((project / "data/release/operating_point.json").read_text())
    versions = client(project).search_model_versions(f"name = '{NAME}'")
    roles = sorted(v.tags.get("role") for v in versions)
    assert roles == ["fold", "release"]  # shrunk config: one fold model, then the release
    (release,) = [v for v in versions if v.tags["role"] == "release"]
    assert float(release.tags["threshold"]) == point["threshold"]
    assert release.tags["operating_point"] == "zero_misses"
    assert client(project).get_model_version_by_alias(NAME, "candidate").version == release.version
    baseline_roles = {v.tags.get("role") for v in client(project).search_model_versions("name = 'synthetic-baseline'")}
    assert baseline_roles == {"fold"}  # a guided release registers no baseline version


def walkthrough(name: str) -> str:
    """The commands of docs/deploy.md's block marked ``<!-- walkthrough: <name> -->``."""
    text = (ROOT / "docs/deploy.md").read_text()
    return text.split(f"<!-- walkthrough: {name} -->\n```bash\n", 1)[1].split("\n```", 1)[0]


@pytest.mark.slow
def test_the_serving_walkthrough_works_as_written_on_the_default_gate(project: Path) -> None:
    """docs/deploy.md's first-run walk-through, command by command, under the default params'
    gate: whether promote passes or refuses, the candidate is served and answers a request."""
    set_gate(project, yaml.safe_load((ROOT / "params.yaml").read_text())["release"]["gate"])
    with socket.socket() as probe:  # a free port on this machine only
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    *steps, serve = [line.split("#")[0].strip() for line in walkthrough("serve").splitlines()]
    assert steps[0] == "dvc repro" and steps[1] == "kgi promote" and serve.startswith("kgi serve ")
    assert stages_run(run_shell(project, steps[0]).stdout) == []  # the fixture's run: nothing left to do
    promoted = run_shell(project, steps[1])
    if promoted.returncode != 0:  # the default gate refused: it says why and how to serve the candidate
        assert "stays candidate" in promoted.stderr and ", needs " in promoted.stderr
        assert f"kgi serve models:/{NAME}@candidate" in promoted.stderr
    server = subprocess.Popen(
        ["bash", "-c", serve.replace("5001", port)], cwd=project, env=project_env(project), start_new_session=True
    )
    try:
        answered = None
        for _ in range(360):  # the server's start: seconds, a minute on a loaded machine
            answered = run_shell(project, walkthrough("request").replace("5001", port))
            if answered.returncode == 0 or server.poll() is not None:
                break
            time.sleep(0.5)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    assert answered is not None and answered.returncode == 0, answered and answered.stderr
    predictions = json.loads(answered.stdout)
    assert len(predictions) == 2 and all(p["error"] == "" and p["decision"] in ("ok", "defect") for p in predictions)
    assert {p["operating_point"] for p in predictions} == {"zero_misses"}


def run_shell(project: Path, script: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", script], cwd=project, env=project_env(project), capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_gate_refuses_with_its_reason_and_an_unknown_metric_then_promotes(project: Path) -> None:
    set_gate(project, {"guided.ap": ">= 1.5"})
    refused = python(project, "-m", "pipeline.cli", "promote")
    assert refused.returncode == 1
    assert "stays candidate" in refused.stderr and "guided.ap = " in refused.stderr and ">= 1.5" in refused.stderr
    assert f"To serve the candidate for a trial: kgi serve models:/{NAME}@candidate" in refused.stderr
    set_gate(project, {"guided.aq": ">= 0.5"})
    unknown = python(project, "-m", "pipeline.cli", "promote")
    assert unknown.returncode == 1 and "'guided.aq' (closest: guided.ap" in unknown.stderr
    missing = python(project, "-m", "pipeline.cli", "promote", "--name", "synthetic-baseline")
    assert missing.returncode == 1 and "no version of 'synthetic-baseline' has the alias 'candidate'" in missing.stderr
    set_gate(project, {"guided.ap": ">= 0", "operating_point.miss_rate": "<= 0"})
    promoted = python(project, "-m", "pipeline.cli", "promote")
    assert promoted.returncode == 0, promoted.stderr
    assert "promoted to champion" in promoted.stdout
    assert client(project).get_model_version_by_alias(NAME, "champion").tags["role"] == "release"
    # The gate is promote's, not the release's: changing it retrains nothing.
    assert stages_run(dvc(project, "repro")) == []


@pytest.fixture(scope="module")
def champion(project: Path) -> str:
    """The champion's URI; promoted here where the gate test has not run before (``-k``, one test)."""
    if client(project).get_registered_model(NAME).aliases.get("champion") is None:
        set_gate(project, {"guided.ap": ">= 0"})
        promoted = python(project, "-m", "pipeline.cli", "promote")
        assert promoted.returncode == 0, promoted.stderr
    return f"models:/{NAME}@champion"


@pytest.mark.slow
def test_predict_with_the_champion_uses_the_carried_threshold(project: Path, champion: str) -> None:
    point = json.loads((project / "data/release/operating_point.json").read_text())
    images = project / "data/prepared/images"
    result = python(project, "-m", "pipeline.cli", "predict", "--model", champion, str(images), "--out", "champion")
    assert result.returncode == 0, result.stderr
    assert (
        "(operating point zero_misses)" in result.stderr and "tag threshold of models:/" in result.stderr
    )  # where predict says which applied
    table = pd.read_csv(project / "champion/predictions.csv")
    assert (table["threshold"] == point["threshold"]).all()
    index = pd.read_csv(project / "data/prepared/index.csv")
    defective = {f"{i}.png" for i in index.loc[index["label"] == 1, "id"]}
    flagged = table.assign(name=table["path"].map(lambda p: Path(p).name)).set_index("name")["decision"]
    assert ((table["score"] >= point["threshold"]) == (table["decision"] == "defect")).all()
    assert set(flagged.index) >= defective  # every prepared image was scored
