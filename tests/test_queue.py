"""DVC's experiment queue: queued runs log into the project's MLflow store, read its data, and one
``seed`` makes a repetition; the sweep is a layer over the queue that resumes when interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from pipeline.config import DERIVED_SEEDS, ConfigError, load_section
from pipeline.core.layout import project_root
from pipeline.core.tracking import tracking_uri
from pipeline.experiments.sweep import experiment_states
from support.dvc_stages import expanded, templates
from support.helpers import ROOT, dvc, kgi, make_shrunk_project, project_env

STAGES = set(expanded())  # every stage logs one run


# --- one seed for a whole run -------------------------------------------------------------------


def _params(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_the_top_level_seed_sets_the_four_derived_seeds_unless_one_is_set_on_its_own(tmp_path: Path) -> None:
    path = _params(tmp_path, "seed: 3\ntrain_guided: {seed: 5}\nprepare: {seed: 1}\n")
    assert load_section("prepare", path).subset_seed == 3
    assert load_section("prepare", path).seed == 1  # the folds never follow the run's seed
    assert load_section("train_baseline", path).seed == 3
    assert load_section("train_guided", path).seed == 5
    assert load_section("pseudo_labels", path).seed == 3
    assert load_section("prepare", _params(tmp_path, "seed: 3\n")).seed == 0


def test_the_projects_params_derive_todays_seeds_zero() -> None:
    params = ROOT / "params.yaml"
    seeds = [
        load_section("prepare", params).subset_seed,
        load_section("prepare", params).seed,
        *(load_section(name, params).seed for name in ("train_baseline", "train_guided", "pseudo_labels")),
    ]
    assert seeds == [0] * 5
    assert yaml.safe_load(params.read_text())["seed"] == 0


@pytest.mark.parametrize("value", ["yes", "-1", "1.5", "null"])
def test_a_bad_top_level_seed_is_refused_naming_the_key(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"params.yaml: seed: expected a whole number"):
        load_section("train_baseline", _params(tmp_path, f"seed: {value}\n"))


def test_every_stage_using_a_derived_seed_declares_the_seed_param() -> None:
    stages = templates()
    declaring = {name for name, stage in stages.items() if "seed" in stage["params"]}
    # A stage reading a section whose seed derives from the run's (release trains both models).
    seeded = {
        name
        for name, stage in stages.items()
        if any(str(param).split(".")[0] in DERIVED_SEEDS for param in stage["params"])
    }
    assert declaring == seeded and {"prepare", "train_baseline", "pseudo_labels", "train_guided"} <= seeded


# --- the project root from inside a queued experiment's copy -------------------------------------


def test_a_queued_copy_finds_the_project_root_its_store_and_its_relative_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "project"
    copy = root / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    copy.mkdir(parents=True)
    (copy / "params.yaml").write_text("prepare: {dataset: folder, path: ../shared/images}\n")
    monkeypatch.chdir(copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(root))
    assert project_root() == root.resolve()
    assert tracking_uri() == f"sqlite:///{root.resolve() / 'mlflow.db'}?timeout=60"
    assert load_section("prepare").path == str(tmp_path.resolve() / "shared" / "images")
    monkeypatch.delenv("DVC_ROOT")  # the layout alone
    assert project_root() == root.resolve()
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "elsewhere"))  # a stale value that holds no cwd
    (tmp_path / "elsewhere" / ".dvc").mkdir(parents=True)
    assert project_root() == root.resolve()


def test_in_the_workspace_relative_paths_stay_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "params.yaml").write_text("prepare: {dataset: folder, path: ../shared/images}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert load_section("prepare").path == "../shared/images"


# --- many writers, one SQLite store ---------------------------------------------------------------

WRITER = """
import sys
from mlflow.tracking import MlflowClient
from pipeline.core.tracking import stage_run, tracking_uri
for k in range(int(sys.argv[2])):
    with stage_run(f"stage{k}", {"writer": {"id": sys.argv[1], "k": k}}) as run:
        for step in range(5):
            run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        client = MlflowClient(tracking_uri())
        try:
            client.create_registered_model("shared")
        except Exception:  # another writer registered it first
            pass
        client.create_model_version("shared", f"runs:/{run.run_id}/model", run.run_id)
"""


@pytest.mark.slow
def test_concurrent_writers_on_a_fresh_sqlite_store_lose_no_run_and_hit_no_lock(tmp_path: Path) -> None:
    # A fresh store is where MLflow races itself (tables, the experiment); then the writes contend.
    writers, runs = 3, 3
    env = {**project_env(tmp_path), "PYTHONPATH": str(ROOT), "PIPELINE_RUN_ID": "stress"}
    started = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(k), str(runs)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for k in range(writers)
    ]
    outputs = [process.communicate(timeout=600)[0] for process in started]
    assert [process.returncode for process in started] == [0] * writers, "\n".join(outputs)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("knowledge-guided").experiment_id])
    assert len(found) == writers * runs and {run.info.status for run in found} == {"FINISHED"}
    assert sorted((run.data.params["writer.id"], run.data.params["writer.k"]) for run in found) == sorted(
        (str(w), str(k)) for w in range(writers) for k in range(runs)
    )
    assert all(len(run.data.metrics) == 1 for run in found)
    versions = client.search_model_versions("name = 'shared'")
    assert sorted(int(v.version) for v in versions) == list(range(1, writers * runs + 1))


# --- the queue, end to end -------------------------------------------------------------------------


def exp_states(project: Path) -> dict[str, tuple[str, str]]:
    return experiment_states(json.loads(dvc(project, "exp", "show", "--json")))


def wait_for_queue(project: Path, names: list[str], timeout: float = 1200) -> dict[str, tuple[str, str]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = exp_states(project)
        if all(states.get(name, ("missing",))[0] not in ("queued", "running") for name in names):
            return states
        time.sleep(5)
    raise AssertionError(f"{names} still pending after {timeout} s: {states}")


def folder_data_set(folder: Path) -> None:
    """The shrunk synthetic set as good/ and defect/ images with masks: data outside the project."""
    from pipeline.core.artifacts import write_image
    from pipeline.data.synthetic import generate

    for image in generate(12, 4, 64, 64, 0.3, 1.0, seed=0):
        label = "defect" if image.label else "good"
        write_image(folder / label / f"{image.id}.png", image.image)
        if image.label:
            write_image(folder / label / f"{image.id}_mask.png", image.mask.astype(np.uint8) * 255)


@pytest.fixture(scope="module")
def queued(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two experiments queued and run on two workers: seed 1, and data named relative to the project."""
    base = tmp_path_factory.mktemp("queue")
    folder_data_set(base / "images")
    project = make_shrunk_project(base / "project")
    dvc(project, "exp", "run", "--queue", "-n", "seed-one", "-S", "seed=1")
    dvc(
        project,
        "exp",
        "run",
        "--queue",
        "-n",
        "folder-data",
        "-S",
        "prepare.dataset=folder",
        "-S",
        "prepare.path=../images",
    )
    dvc(project, "queue", "start", "-j", "2")
    states = wait_for_queue(project, ["seed-one", "folder-data"])
    assert {states[name][0] for name in ("seed-one", "folder-data")} == {"success"}, (
        states,
        dvc(project, "queue", "logs", "folder-data"),
        dvc(project, "queue", "logs", "seed-one"),
    )
    return project


def runs_by_experiment(project: Path) -> dict[str, list]:
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("knowledge-guided")
    found: dict[str, list] = {}
    for run in client.search_runs([experiment.experiment_id], max_results=1000):
        found.setdefault(run.data.tags.get("dvc_experiment", ""), []).append(run)
    return found


@pytest.mark.slow
def test_two_workers_run_both_queued_experiments_into_dvc_exp_show(queued: Path) -> None:
    shown = json.loads(dvc(queued, "exp", "show", "--json"))
    experiments = {e["name"]: e["revs"][0]["data"] for e in shown[1]["experiments"]}
    for name in ("seed-one", "folder-data"):
        metrics = experiments[name]["metrics"]["data/metrics/evaluate.json"]["data"]
        assert 0.0 < metrics["guided"]["ap"] <= 1.0, name
    assert experiments["seed-one"]["params"]["params.yaml"]["data"]["seed"] == 1


@pytest.mark.slow
def test_queued_experiments_log_every_stage_into_the_projects_mlflow_store(queued: Path) -> None:
    runs = runs_by_experiment(queued)
    for name in ("seed-one", "folder-data"):
        assert sorted(run.data.tags["stage"] for run in runs[name]) == sorted(STAGES), name
        assert {run.info.status for run in runs[name]} == {"FINISHED"}, name
        assert len({run.data.tags["pipeline_run"] for run in runs[name]}) == 1, name
    assert runs["seed-one"][0].data.tags["pipeline_run"] != runs["folder-data"][0].data.tags["pipeline_run"]
    params = {run.data.tags["stage"]: run.data.params for run in runs["seed-one"]}
    assert params["train_baseline"]["train_baseline.seed"] == "1" and params["train_guided"]["train_guided.seed"] == "1"
    assert params["prepare"]["prepare.subset_seed"] == "1" and params["prepare"]["prepare.seed"] == "0"
    assert params["pseudo_labels"]["pseudo_labels.seed"] == "1"
    prepared = next(run for run in runs["folder-data"] if run.data.tags["stage"] == "prepare")
    assert prepared.data.tags["dataset"] == "folder" and prepared.data.metrics["images"] == 48
    assert not list((queued / ".dvc" / "tmp").rglob("mlflow.db"))  # nothing left in, or lost with, a copy


@pytest.mark.slow
def test_a_seed_grid_queues_exactly_the_runs_it_names(tmp_path: Path) -> None:
    project = make_shrunk_project(tmp_path / "project")
    dvc(project, "exp", "run", "--queue", "-S", "seed=0,1,2")
    shown = json.loads(dvc(project, "exp", "show", "--json"))
    queued = [e["revs"][0]["data"]["params"]["params.yaml"]["data"] for e in shown[1]["experiments"]]
    dvc(project, "queue", "remove", "--queued")
    assert sorted(params["seed"] for params in queued) == [0, 1, 2]
    # Each queued run leaves the four derived seeds to follow its seed.
    for params in queued:
        assert [
            params[s].get(k)
            for s, k in (
                ("prepare", "subset_seed"),
                ("train_baseline", "seed"),
                ("train_guided", "seed"),
                ("pseudo_labels", "seed"),
            )
        ] == [None] * 4


def sweep(project: Path, values: str, **popen: object) -> subprocess.Popen:
    command = [*kgi("sweep", "run"), "evaluate.threshold", values, "--seeds", "1", "--out", "sweep", "-j", "2"]
    return subprocess.Popen(
        command,
        cwd=project,
        env=project_env(project),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_without_running_a_point_twice(queued: Path) -> None:
    # Points differ from seed-one in evaluate only: DVC's run cache restores the rest.
    first = sweep(queued, "0.3", start_new_session=True)
    for line in first.stdout:
        if "threshold-0.3-seed1: now " in line:  # queued, workers started: interrupt it here
            break
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert exp_states(queued)["threshold-0.3-seed1"][0] in ("queued", "running", "success")
    again = sweep(queued, "0.3,0.7")
    output = again.communicate(timeout=1200)[0]
    assert again.returncode == 0, output
    assert "threshold-0.3-seed1: queued\n" not in output and "threshold-0.7-seed1: queued\n" in output
    assert sorted(p.name for p in (queued / "sweep" / "runs").iterdir()) == [
        "threshold-0.3-seed1",
        "threshold-0.7-seed1",
    ]
    evaluations = {
        name: [r for r in runs if r.data.tags["stage"] == "evaluate"]
        for name, runs in runs_by_experiment(queued).items()
    }
    assert len(evaluations["threshold-0.3-seed1"]) == 1 and len(evaluations["threshold-0.7-seed1"]) == 1
    assert "train_baseline" not in {r.data.tags["stage"] for r in runs_by_experiment(queued)["threshold-0.7-seed1"]}
    third = sweep(queued, "0.3,0.7")
    output = third.communicate(timeout=600)[0]
    assert third.returncode == 0 and output.count("done before, kept") == 2, output
    assert "| 0.3 |" in (queued / "sweep" / "summary.md").read_text()
