"""One screened row: set params (key=value, YAML values), `dvc repro evaluate`, append the numbers.

    python results/synthetic/screen.py NAME [key=value ...]
    TARGET=pseudo_labels python results/synthetic/screen.py NAME ...   # saliency knobs only: no guided AP

Run in the project root with the virtual environment active and OMP_NUM_THREADS=1. The params are
set in params.yaml relative to those of git revision $BASE (default HEAD; the rows of screen.csv used
BASE=5a07135, the defaults before the screen), so rows do not inherit each other's settings. DVC
reruns only the stages they affect, so a row's `wall_s` is the time of the stages that ran
(`stages_run`); TARGET=pseudo_labels stops after the pseudo-labels (no guided AP; the baseline AP is
then train_baseline's last test AP, the same number without test-time flips). Each run's log goes to
/tmp/scr/NAME.log.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ruamel.yaml import YAML

ROWS = Path("results/synthetic/screen.csv")
FIELDS = [
    "name",
    "settings",
    "seed",
    "pointing_game",
    "iou_test",
    "baseline_ap",
    "guided_ap",
    "baseline_mass_inside",
    "foreground_share",
    "stages_run",
    "wall_s",
    "target",
]


def main() -> None:
    name, settings = sys.argv[1], sys.argv[2:]
    yaml = YAML()
    params = yaml.load(
        subprocess.run(
            ["git", "show", f"{os.environ.get('BASE', 'HEAD')}:params.yaml"], capture_output=True, text=True, check=True
        ).stdout
    )
    for setting in settings:
        key, value = setting.split("=", 1)
        *path, last = key.split(".")
        node = params
        for part in path:
            node = node[part]
        node[last] = YAML(typ="safe").load(value)
    out = io.StringIO()
    yaml.dump(params, out)
    Path("params.yaml").write_text(out.getvalue())
    start = time.perf_counter()
    run = subprocess.run(["dvc", "repro", os.environ.get("TARGET", "evaluate")], capture_output=True, text=True)
    wall = time.perf_counter() - start
    Path("/tmp/scr").mkdir(exist_ok=True)
    Path(f"/tmp/scr/{name}.log").write_text(run.stdout + run.stderr)
    if run.returncode:
        sys.exit(f"{name}: dvc repro failed, see /tmp/scr/{name}.log")
    ran = [line.split("'")[1] for line in run.stdout.splitlines() if line.startswith("Running stage")]
    sal = json.loads(Path("data/metrics/saliency.json").read_text())
    pse = json.loads(Path("data/metrics/pseudo_labels.json").read_text())
    full = "TARGET" not in os.environ
    ev = json.loads(Path("data/metrics/evaluate.json").read_text()) if full else None
    base = json.loads(Path("data/metrics/train_baseline.json").read_text())
    row = dict(
        name=name,
        settings=" ".join(settings) or "(committed defaults)",
        seed=params["seed"],
        pointing_game=round(sal["pointing_game"], 4),
        iou_test=round(pse["iou_test"], 4),
        baseline_ap=round(ev["baseline"]["ap"] if ev else base["test_ap_mean"], 4),
        guided_ap=round(ev["guided"]["ap"], 4) if ev else "",
        baseline_mass_inside=round(sal["mass_inside"], 4),
        foreground_share=round(pse["foreground_share"], 4),
        stages_run=" ".join(ran),
        wall_s=round(wall, 1),
        target=os.environ.get("TARGET", "evaluate"),
    )
    new = not ROWS.exists()
    with ROWS.open("a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)
    print(row)


if __name__ == "__main__":
    main()
