"""Sweeps: one parameter over several values and seeds, each point a ``dvc exp run``.

    python -m pipeline.sweep run prepare.defective_images 5,10,20,all --seeds 0,1,2 \\
        --preset cpu-kolektorsdd --out results/kolektorsdd/defective_images
    python -m pipeline.sweep summarize prepare.defective_images results/kolektorsdd/defective_images

Each finished point keeps its params and metrics in ``<out>/runs/<name>/`` (a few small files),
so an interrupted sweep goes on where it stopped and the summary never needs the experiments'
models. A seed sets every seed that varies between repetitions: both trainings', which defective
images are kept and which get true masks; the folds stay the same. The summary is a table
(``summary.md``), DVC plot data (``summary.csv``) and a plot (``ap_vs_<count>.png``) of AP
against the swept count, logged to MLflow as a run of stage ``sweep``.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from pipeline.artifacts import output_dir, read_json, write_csv
from pipeline.config import PARAMS_FILE, parse_section
from pipeline.errors import MissingInputError
from pipeline.evaluation import MODELS
from pipeline.presets import exp_run_command
from pipeline.progress import bars_paused, log_line, progress
from pipeline.visualisation import plot_metric_vs_count, results_table_markdown

SEED_KEYS = ("train_baseline.seed", "train_guided.seed", "prepare.subset_seed", "pseudo_labels.seed")
POINT_FILES = ("params.yaml", "data/evaluation/scores.csv", "data/evaluation/results.md")
# Swept counts whose "all" is resolved to the number each fold actually used, read from the metrics.
COUNTS = {
    "prepare.defective_images": ("defective_images", lambda m: _fold_mean(m["prepare"]["defective_training_images"])),
    "pseudo_labels.true_masks": ("true_masks", lambda m: _fold_mean(m["pseudo_labels"]["per_fold"], "true_masks")),
}


def _fold_mean(per_fold: dict, key: str | None = None) -> float:
    # Metrics written before mixed supervision existed have no true_masks: there were none.
    return float(np.mean([value.get(key, 0) if key else value for value in per_fold.values()]))


def point_name(param: str, value: str, seed: int) -> str:
    return f"{param.split('.')[-1].replace('_', '-')}-{value}-seed{seed}"


def point_overrides(param: str, value: str, seed: int, fixed: list[str]) -> list[str]:
    return [*fixed, f"{param}={value}", *(f"{key}={seed}" for key in SEED_KEYS)]


def run(param: str, values: list[str], seeds: list[int], out: Path, preset: str | None, fixed: list[str]) -> None:
    """Run every (value, seed) point not yet saved under ``out/runs``, then summarize."""
    preset_sets = shlex.split(exp_run_command(preset))[5:] if preset else []  # after "dvc exp run -n NAME"
    # `dvc exp run` leaves its params in the workspace; every point starts from the sweep's own.
    base_params = PARAMS_FILE.read_text()
    points = [(value, seed) for value in values for seed in seeds]
    for value, seed in progress(points, "sweep", "point"):
        name = point_name(param, value, seed)
        saved = out / "runs" / name
        if (saved / "evaluate.json").is_file():
            log_line(f"[sweep] {name}: done before, kept")
            continue
        sets = [arg for item in point_overrides(param, value, seed, fixed) for arg in ("-S", item)]
        command = ["dvc", "exp", "run", "-n", name, *preset_sets, *sets]
        log_line(f"[sweep] {name}: {shlex.join(command)}")
        PARAMS_FILE.write_text(base_params)
        with bars_paused():  # the experiment's own log and bars own the terminal meanwhile
            failed = subprocess.run(command).returncode != 0
        if failed:
            sys.exit(f"[sweep] {name} failed; fix the cause and rerun: finished points are kept")
        save_point(saved)
    summarize(param, out)


def save_point(dest: Path) -> None:
    """Copy the workspace's params, metrics and scores of the experiment just run into ``dest``."""
    with output_dir(dest) as building:
        for path in [*POINT_FILES, *sorted(Path("data/metrics").glob("*.json"))]:
            shutil.copy2(path, building / Path(path).name)


def collect(param: str, out: Path) -> pd.DataFrame:
    """One row per saved point: the swept value, its seed and count, and each model's AP."""
    rows = []
    for folder in sorted((out / "runs").iterdir()):
        if not (folder / "evaluate.json").is_file():
            continue
        params = yaml.safe_load((folder / "params.yaml").read_text())
        section, key = param.split(".", 1)
        # Through the params' model, so a key the point's params.yaml lacks reads as its default.
        value = getattr(parse_section(section, params.get(section) or {}), key)
        seed = parse_section("train_guided", params.get("train_guided") or {}).seed
        metrics = {stage: read_json(folder / f"{stage}.json") for stage in ("prepare", "pseudo_labels", "evaluate")}
        row = {"value": str(value), "seed": seed, "point": folder.name}
        if param in COUNTS:
            count_name, count = COUNTS[param]
            row[count_name] = count(metrics)
        localization = metrics["evaluate"].get("localization", {})
        for model in MODELS:
            row[f"{model}_ap"] = metrics["evaluate"][model]["ap"]
            row[f"{model}_ap_fold_std"] = metrics["evaluate"][model]["ap_std"]
            row[f"{model}_false_alarms"] = metrics["evaluate"][model]["false_alarms_at_full_recall"]
            row[f"{model}_pointing_game"] = localization.get(f"{model}_saliency", {}).get("pointing_game", np.nan)
        rows.append(row)
    if not rows:
        raise MissingInputError(f"no finished sweep point under {out / 'runs'}: run the sweep first")
    return pd.DataFrame(rows)


def summary_table(points: pd.DataFrame, by: str) -> pd.DataFrame:
    """Per value of ``by`` and model: AP mean over seeds and its spread (over seeds, or over folds
    for one seed), and the means of false alarms at 100% recall and of the pointing game."""
    rows = []
    for value, group in points.groupby(by, sort=True):
        for model in MODELS:
            aps = group[f"{model}_ap"]
            spread = aps.std(ddof=0) if len(aps) > 1 else group[f"{model}_ap_fold_std"].iloc[0]
            rows.append({by: value, "model": model, "ap_mean": aps.mean(), "ap_std": spread, "seeds": len(aps),
                         "false_alarms_mean": group.get(f"{model}_false_alarms", pd.Series(np.nan)).mean(),
                         "pointing_game_mean": group.get(f"{model}_pointing_game", pd.Series(np.nan)).mean()})
    return pd.DataFrame(rows)


def summarize(param: str, out: Path) -> pd.DataFrame:
    from pipeline.tracking import stage_run  # MLflow only when there is something to log

    points = collect(param, out)
    by = COUNTS[param][0] if param in COUNTS else "value"
    table = summary_table(points, by)
    write_csv(out / "points.csv", points)
    write_csv(out / "summary.csv", table)
    if table["seeds"].min() > 1:
        spread = "std over seeds"
    elif table["seeds"].max() == 1:
        spread = "std over folds (one seed)"
    else:
        spread = "std over seeds; over folds where one seed"
    rows = [{by: row[by], "Model": row["model"], "Seeds": row["seeds"], "AP %": row["ap_mean"],
             "AP std %": row["ap_std"], "False alarms at 100% recall": row["false_alarms_mean"],
             "Pointing game %": row["pointing_game_mean"]} for _, row in table.iterrows()]
    (out / "summary.md").write_text(f"# AP against {param}\n\n" + results_table_markdown(rows, list(rows[0]))
                                    + f"\nAP: mean over folds, then over seeds; spread: {spread}. False alarms "
                                    "(defect-free images scored above the lowest-scored defect, per fold) and the "
                                    "pointing game of the model's own saliency: means over folds and seeds.\n")
    artifacts = [out / "summary.md", out / "summary.csv", out / "points.csv"]
    if by != "value":
        plot = out / f"ap_vs_{by}.png"
        plot_metric_vs_count(table, by, plot, f"AP against {by.replace('_', ' ')}\n(bars: {spread})")
        artifacts.append(plot)
    with stage_run("sweep", {"sweep": {"param": param, "points": len(points)}}) as tracked:
        for _, row in table.iterrows():
            tracked.log_metrics({f"{row['model']}.ap_mean": row["ap_mean"]}, step=int(round(float(row[by])))
                                if by != "value" else None)
        for path in artifacts:
            tracked.log_artifact(path)
    print((out / "summary.md").read_text())
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", required=True)
    run_parser = actions.add_parser("run", help="run the missing points, then summarize")
    run_parser.add_argument("param", help="the swept key, e.g. prepare.defective_images")
    run_parser.add_argument("values", help="comma-separated values, e.g. 5,10,20,all")
    run_parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    run_parser.add_argument("--preset", help="a preset (python -m pipeline.presets list) applied to every point")
    run_parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="a further override for every point (repeatable)")
    run_parser.add_argument("--out", type=Path, required=True, help="folder of the saved points and the summary")
    summary_parser = actions.add_parser("summarize", help="rebuild the summary from the saved points")
    summary_parser.add_argument("param")
    summary_parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.action == "run":
        seeds = [int(seed) for seed in args.seeds.split(",")]
        run(args.param, args.values.split(","), seeds, args.out, args.preset, args.set)
    else:
        summarize(args.param, args.out)


if __name__ == "__main__":
    main()
