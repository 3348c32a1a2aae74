"""Stages and `dvc repro` as subprocesses in shrunk copies of the project (one thread each: much
faster on a shared CPU): a killed training resumes, an unreachable tracking server is reported
before training, a stage failing midway keeps its previous outputs."""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.config import ModelParams, TrainParams
from pipeline.core.artifacts import load_torch, read_json
from support.helpers import SHRUNK, dvc, leftovers, make_shrunk_project, merge, project_env, same_weights, stages_run

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
MODEL = ModelParams(device="cpu")
PARAMS = TrainParams(epochs=3, batch_size=4, seed=0)

# --- stages and dvc repro, as subprocesses ------------------------------------------------------


@pytest.fixture(scope="module")
def prepared_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shrunk project (3 baseline epochs) where `dvc repro prepare` has run; tests use copies."""
    # Every epoch scored: the resumed run must log the test AP of each, as the uninterrupted one.
    overrides = merge(copy.deepcopy(SHRUNK), {"train_baseline": {"epochs": 3, "monitor_every": 1}})
    project = make_shrunk_project(tmp_path_factory.mktemp("prepared"), overrides)
    dvc(project, "repro", "prepare", **ONE_THREAD)
    return project


def run_script(project: Path, module: str, **env: str) -> subprocess.CompletedProcess:
    """``python -m module`` in ``project``, one thread, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", module],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=600,
        env=project_env(project, **ONE_THREAD, **env),
    )


def copy_project(project: Path, target: Path) -> Path:
    shutil.copytree(project, target, symlinks=True)
    return target


def start(project: Path, *command: str) -> tuple[subprocess.Popen, Path]:
    """Start a command in its own process group, its output going to a file (read it with .read_text())."""
    log = project / f"{command[-1]}.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            command,
            cwd=project,
            env=project_env(project, **ONE_THREAD),
            start_new_session=True,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    return process, log


@pytest.mark.slow
def test_training_killed_mid_epoch_resumes_under_dvc_repro_with_the_same_result(
    prepared_project: Path, tmp_path: Path
) -> None:
    killed = copy_project(prepared_project, tmp_path / "killed")
    uninterrupted = copy_project(prepared_project, tmp_path / "uninterrupted")
    dvc_repro = (sys.executable, "-m", "dvc", "repro", "train_baseline")
    reference, reference_log = start(uninterrupted, *dvc_repro)  # runs meanwhile, on the other core
    victim, victim_log = start(killed, *dvc_repro)
    checkpoint = killed / "data/checkpoints/train_baseline/fold0.pt"
    deadline = time.monotonic() + 240
    while not checkpoint.exists():  # written (atomically) right after epoch 1
        assert victim.poll() is None and time.monotonic() < deadline, victim_log.read_text()
        time.sleep(0.02)
    os.killpg(victim.pid, signal.SIGKILL)  # dvc and the stage, as a lost machine or the OOM killer would
    victim.wait()
    done = load_torch(checkpoint)["epoch"] + 1
    assert done < 3 and not (killed / "data/baseline").exists(), victim_log.read_text()

    output = dvc(killed, "repro", "train_baseline", **ONE_THREAD)  # no stale lock: DVC drops a dead pid's
    assert stages_run(output) == ["train_baseline"]
    assert f"resuming fold 0 from its checkpoint after epoch {done}" in output
    assert reference.wait(timeout=300) == 0, reference_log.read_text()

    for name in ("data/metrics/train_baseline.json", "data/plots/train_baseline.csv"):
        assert (killed / name).read_text() == (uninterrupted / name).read_text(), name
    assert same_weights(
        load_torch(killed / "data/baseline/fold0.pt")["state_dict"],
        load_torch(uninterrupted / "data/baseline/fold0.pt")["state_dict"],
    )
    assert not checkpoint.exists() and leftovers(killed / "data") == []

    # The resumed MLflow run holds every epoch, with the uninterrupted run's values, and the seed.
    def test_ap_history(project: Path) -> dict[int, float]:
        client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
        run_id = read_json(project / "data/baseline/run.json")["mlflow_run_id"]
        assert client.get_run(run_id).data.params["train_baseline.seed"] == "0"
        return {m.step: m.value for m in client.get_metric_history(run_id, "fold0/test_ap")}

    assert test_ap_history(killed) == test_ap_history(uninterrupted)
    assert sorted(test_ap_history(killed)) == [1, 2, 3]


@pytest.mark.slow
def test_stage_reports_an_unreachable_tracking_server_before_training(prepared_project: Path, tmp_path: Path) -> None:
    project = copy_project(prepared_project, tmp_path / "project")
    started = time.perf_counter()
    result = run_script(project, "stages.train_baseline", MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    assert result.returncode == 1
    assert time.perf_counter() - started < 60
    assert "[train_baseline] error: MLflow tracking store 'http://127.0.0.1:9' is unreachable" in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "epoch" not in result.stdout
    assert not (project / "data/baseline").exists() and not (project / "data/checkpoints").exists()


@pytest.mark.slow
def test_stage_failing_on_bad_input_midway_keeps_its_previous_outputs(prepared_project: Path, tmp_path: Path) -> None:
    project = copy_project(prepared_project, tmp_path / "project")
    source = tmp_path / "images"
    names = ["defect/a", "defect/b", "defect/c", "good/a", "good/b", "good/c", "good/d", "good/e", "good/f"]
    for value, name in enumerate(names):  # distinct bytes: copies would be merged into one group
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(source / f"{name}.png"), np.full((24, 24), value, np.uint8))
    cv2.imwrite(str(source / "defect/z.png"), np.zeros((200, 200), np.uint8))  # read after a, b, c: midway
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["prepare"].update(dataset="folder", path=str(source), max_image_pixels=10_000)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    before = {path: path.read_bytes() for path in (project / "data").rglob("*") if path.is_file()}

    result = run_script(project, "stages.prepare")
    assert result.returncode == 1
    assert f"{source / 'defect/z.png'} is 200x200 = 40,000 pixels, more than the limit of 10,000" in result.stderr
    assert {path: path.read_bytes() for path in (project / "data").rglob("*") if path.is_file()} == before
