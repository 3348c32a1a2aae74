"""Team stores (docs/operations.md, "Team stores"): a DVC remote that a fresh checkout pulls the pipeline's
outputs from, and an MLflow tracking server the stages log to."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from support.helpers import SHRUNK, dvc, make_shrunk_project, merge, project_env, stages_run

STAGE_OUTPUTS = ("prepared", "baseline", "saliency", "pseudo_masks", "guided", "evaluation")
# The teacher variant: at this commit the evaluation's results.md needs the teacher's prior timing,
# which the default variant (consistency) does not have, so a default `dvc repro` stops there.
TEACHER = merge(merge({}, SHRUNK), {"train_guided": {"variant": "teacher"}})


@pytest.mark.slow
def test_outputs_pushed_to_a_dvc_remote_are_pulled_back_and_nothing_reruns(tmp_path: Path) -> None:
    project = make_shrunk_project(tmp_path / "project", TEACHER)
    dvc(project, "repro", OMP_NUM_THREADS="1")
    remote = tmp_path / "remote"
    dvc(project, "remote", "add", "-d", "team", str(remote))
    dvc(project, "push")
    assert any(path.is_file() for path in remote.rglob("*"))

    # What a teammate's fresh checkout has: the code, dvc.lock and the git-tracked metrics, no data.
    shutil.rmtree(project / ".dvc" / "cache")
    for name in STAGE_OUTPUTS:
        shutil.rmtree(project / "data" / name)
    dvc(project, "pull")
    assert (project / "data/baseline/fold0.pt").is_file() and (project / "data/evaluation/results.md").is_file()
    assert "Data and pipelines are up to date" in dvc(project, "status")
    assert stages_run(dvc(project, "repro", OMP_NUM_THREADS="1")) == []


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow server exited with {server.returncode}; see its log")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"mlflow server at {url} did not answer within {seconds} s")


@pytest.mark.slow
def test_a_stage_logs_to_an_mlflow_tracking_server(tmp_path: Path) -> None:
    project = make_shrunk_project(tmp_path / "project")
    url = f"http://127.0.0.1:{free_port()}"
    log = (tmp_path / "server.log").open("w")  # a file, not a pipe: a full pipe would block the server
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            url.rsplit(":", 1)[1],
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the server's workers stop with it
    )
    try:
        wait_until_up(url, server)
        result = subprocess.run(
            [sys.executable, "-m", "stages.prepare"],
            cwd=project,
            env=project_env(project, MLFLOW_TRACKING_URI=url, OMP_NUM_THREADS="1"),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        client = MlflowClient(url)
        experiment = client.get_experiment_by_name("knowledge-guided")
        runs = client.search_runs([experiment.experiment_id])
        assert [run.data.tags["stage"] for run in runs] == ["prepare"]
        assert runs[0].info.status == "FINISHED"
        assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} >= {"report.json", "index.csv"}
        assert not (project / "mlflow.db").exists()  # nothing went to the local default store
    finally:
        stop(server)
        log.close()


def stop(server: subprocess.Popen) -> None:
    """Stop the server and the workers it started (its process group)."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
