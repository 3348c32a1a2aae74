"""Wall time of the default pipeline: full `dvc repro` from scratch, a no-op rerun, and a rerun
after a guided-only param change, in a fresh copy of the project (git-tracked files only).

    python benchmarks/pipeline.py            # prints one JSON line per measurement

Goals (issue 2): full run ≤ 300 s on 2 cores, no-op ≤ 5 s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"full": 300.0, "noop": 5.0}


def copy_project(target: Path) -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in files.splitlines():
        if name.startswith("data/") and not name.endswith(".gitignore"):
            continue  # committed metrics of an earlier run would not change what runs
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target / name)
    (target / "dvc.lock").unlink(missing_ok=True)
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "bench@example.com",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "bench@example.com",
    }
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
        subprocess.run(command, cwd=target, check=True, env=env)


def timed_repro(project: Path) -> tuple[float, list[str]]:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
    }
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "dvc", "repro"], cwd=project, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"dvc repro failed:\n{result.stdout}\n{result.stderr}")
    ran = [line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage")]
    return seconds, ran


def report(name: str, seconds: float, ran: list[str]) -> None:
    line = {
        "measurement": name,
        "wall_seconds": round(seconds, 1),
        "stages_run": ran,
        "cores": len(os.sched_getaffinity(0)),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }
    if name in GOALS:
        line.update(
            goal_seconds=GOALS[name], ratio_to_goal=round(seconds / GOALS[name], 3), goal_met=seconds <= GOALS[name]
        )
    print(json.dumps(line), flush=True)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as folder:
        project = Path(folder)
        copy_project(project)
        report("full", *timed_repro(project))
        report("noop", *timed_repro(project))
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["train_guided"]["seg_weight"] = params["train_guided"]["seg_weight"] / 2
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        report("guided_param_change", *timed_repro(project))


if __name__ == "__main__":
    main()
