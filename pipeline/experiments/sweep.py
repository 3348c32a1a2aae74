"""Sweeps: one parameter over several values and seeds, run as DVC's experiment queue.

    kgi sweep run prepare.defective_images 5,10,20,all --seeds 0,1,2 \\
        --preset cpu-kolektorsdd --out results/kolektorsdd/defective_images -j 2
    kgi sweep summarize prepare.defective_images results/kolektorsdd/defective_images

``run`` queues every (value, seed) point not done yet as a named experiment
(``dvc exp run --queue -n <point> -S <param>=<value> -S seed=<seed> evaluate``: up to the
evaluation, not the release), starts ``-j`` queue workers (``dvc queue start``), waits for the
points, then saves each finished point's params, metrics and scores in ``<out>/runs/<name>/`` (a
few small files) and summarizes. The top-level
``seed`` sets every seed that varies between repetitions (pipeline/config.py: DERIVED_SEEDS);
the folds stay the same. Interrupted (the command killed, a point failed), it goes on where it
stopped: saved points are kept, experiments already finished on this commit are saved without
running again, queued and running ones are waited for, failed ones queued again. The summary is
a table (``summary.md``), DVC plot data (``summary.csv``) and a plot (``ap_vs_<count>.png``) of
AP against the swept count, logged to MLflow as a run of stage ``sweep``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple, cast

import numpy as np
import pandas as pd
import yaml

from pipeline.config import DERIVED_SEEDS, PARAMS_FILE, RUN_SEED, ConfigError, GuidedParams, load_yaml, parse_params
from pipeline.core import layout
from pipeline.core.artifacts import output_dir, read_json, write_csv
from pipeline.core.errors import MissingInputError
from pipeline.core.progress import log_line, progress
from pipeline.evaluation.results import MODELS
from pipeline.evaluation.seeds import seed_spread
from pipeline.experiments.presets import exp_run_command
from pipeline.metrics.figures import plot_metric_vs_count, results_table_markdown

# Files of a finished experiment kept per point; metrics (data/metrics/*.json) are added to them.
# A point runs up to the evaluation: the release would train both models once more on every image,
# which no summary reads (at 256x704 on a CPU, as long again as the folds).
LAST_STAGE = "evaluate"
# ...so a point's commit holds the release metrics of the commit it started from, not its own.
STALE_METRICS = layout.metrics_file("release").name
POINT_FILES = ("params.yaml", "data/evaluation/scores.csv", "data/evaluation/results.md")
# Executor states of `dvc exp show --json` in which a point needs no new queue entry.
PENDING = ("queued", "running")
# Swept counts whose "all" is resolved to the number each fold actually used, read from the metrics.
COUNTS = {
    "prepare.defective_images": ("defective_images", lambda m: _fold_mean(m["prepare"]["defective_training_images"])),
    "pseudo_labels.true_masks": ("true_masks", lambda m: _fold_mean(m["pseudo_labels"]["per_fold"], "true_masks")),
}


class SweepError(RuntimeError):
    """A DVC command of the sweep failed, or points of it failed."""


def _fold_mean(per_fold: dict, key: str | None = None) -> float:
    # Metrics written before mixed supervision existed have no true_masks: there were none.
    return float(np.mean([value.get(key, 0) if key else value for value in per_fold.values()]))


def point_name(param: str, value: str, seed: int) -> str:
    return f"{param.split('.')[-1].replace('_', '-')}-{value}-seed{seed}"


def point_overrides(param: str, value: str, seed: int, fixed: list[str]) -> list[str]:
    """The ``-S`` overrides of one point: the fixed ones first, then the swept value and the seed."""
    return [*fixed, f"{param}={value}", f"{RUN_SEED}={seed}"]


def check_seeds_follow(params: dict, source: str) -> None:
    """Refuse a sweep whose seed would not reach every derived seed (one set on its own)."""
    fixed = [
        f"{section}.{key}" for section, key in DERIVED_SEEDS.items() if (params.get(section) or {}).get(key) is not None
    ]
    if fixed:
        raise SweepError(
            f"{source} sets {', '.join(fixed)} on its own, so the sweep's seeds would not change "
            "it: leave it empty (it then follows the top-level seed) or drop it from the preset/--set"
        )


def _dvc(*args: str) -> str:
    """Run a DVC command of this project (this Python's DVC); its output, or SweepError."""
    result = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SweepError(f"`dvc {shlex.join(args)}` failed:\n{result.stdout}{result.stderr}")
    return result.stdout


class Experiment(NamedTuple):
    state: str  # the queue's: queued, running, success, failed; "missing" where there is none
    rev: str = ""  # its commit once it ran
    params: dict = {}  # its params.yaml  # noqa: RUF012 - never mutated


MISSING = Experiment("missing")


def experiment_states(shown: list[dict]) -> dict[str, Experiment]:
    """The experiments of the current commit by name, from ``dvc exp show --json``; one run
    outside the queue has no queue state and counts as a success."""
    states: dict[str, Experiment] = {}
    for baseline in shown:
        if baseline.get("rev") == "workspace":
            continue
        for experiment in baseline.get("experiments") or []:
            executor = experiment.get("executor") or {}
            rev = (experiment.get("revs") or [{}])[0]
            params = ((rev.get("data") or {}).get("params") or {}).get("params.yaml", {}).get("data") or {}
            states[experiment["name"]] = Experiment(executor.get("state") or "success", rev.get("rev", ""), params)
        break  # the first entry after the workspace is HEAD: only its experiments share our code
    return states


def _current_states() -> dict[str, Experiment]:
    return experiment_states(json.loads(_dvc("exp", "show", "--json")))


def has_overrides(params: dict, overrides: list[str]) -> bool:
    """Whether a params mapping holds every ``key=value`` override (values read as YAML)."""
    for item in overrides:
        key, _, value = item.partition("=")
        node: object = params
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if not _same(node, value):
            return False
    return True


def _same(found: object, written: str) -> bool:
    if found == yaml.safe_load(written):
        return True
    # DVC reads `-S` values its own way: 1e-4 is a number to it, text to PyYAML.
    try:
        return not isinstance(found, bool) and isinstance(found, (int, float)) and float(written) == found
    except ValueError:
        return False


def queue_points(points: dict[str, list[str]], states: dict[str, Experiment]) -> list[str]:
    """Queue the points that are neither finished, queued nor running; the names queued.

    A finished experiment of a point's name but other params (an earlier sweep with other
    overrides, on this commit) is removed and its point run again."""
    queued = []
    for name, overrides in points.items():
        found = states.get(name, MISSING)
        state = found.state
        if state == "success" and not has_overrides(found.params, overrides):
            print(f"[sweep] {name}: finished before with other params, removed to run again", flush=True)
            _dvc("exp", "remove", name)
            state = "missing"
        if state == "success" or state in PENDING:
            print(f"[sweep] {name}: {state} before, not queued again", flush=True)
            continue
        if state == "failed":
            _dvc("queue", "remove", name)  # frees the name for the new entry
        print(f"[sweep] {name}: queued", flush=True)
        _dvc("exp", "run", "--queue", "-n", name, *[arg for item in overrides for arg in ("-S", item)], LAST_STAGE)
        queued.append(name)
    return queued


def wait_for(names: list[str], jobs: int, poll: float = 10.0) -> dict[str, Experiment]:
    """Start ``jobs`` queue workers and wait until none of ``names`` is queued or running."""
    print(
        f"[sweep] running {len(names)} point(s) on {jobs} worker(s); watch with `dvc queue status` "
        "and `dvc queue logs -f <point>`",
        flush=True,
    )
    _dvc("queue", "start", "-j", str(jobs))
    last: dict[str, str] = {}
    bar = progress(None, "sweep", "point", total=len(names))
    while True:
        states = _current_states()
        for name in names:
            state = states.get(name, MISSING).state
            if last.get(name) != state:
                log_line(f"[sweep] {name}: now {state}")
                last[name] = state
        pending = [name for name in names if last[name] in PENDING]
        bar.update(len(names) - len(pending) - bar.n)
        if not pending:
            bar.close()
            return states
        if all(last[name] == "queued" for name in pending):
            _dvc("queue", "start", "-j", str(jobs))  # idle workers stop by themselves; start them again
        time.sleep(poll)


def save_point(dest: Path, rev: str) -> None:
    """Copy an experiment's params, metrics and scores (from its commit and the DVC cache) into ``dest``."""
    import dvc.api

    metrics = subprocess.run(
        ["git", "ls-tree", "--name-only", f"{rev}:data/metrics"], capture_output=True, text=True, check=True
    ).stdout.split()
    with output_dir(dest) as building:
        for path in [
            *POINT_FILES,
            *(f"data/metrics/{name}" for name in metrics if name.endswith(".json") and name != STALE_METRICS),
        ]:
            with dvc.api.open(path, repo=".", rev=rev, mode="rb") as source:
                (building / Path(path).name).write_bytes(source.read())


def run(
    param: str, values: list[str], seeds: list[int], out: Path, preset: str | None, fixed: list[str], jobs: int = 1
) -> None:
    """Run every (value, seed) point not yet saved under ``out/runs`` on the queue, then summarize."""
    preset_sets = shlex.split(exp_run_command(preset))[5:] if preset else []  # after "dvc exp run -n NAME"
    base = [item for flag, item in zip(preset_sets[::2], preset_sets[1::2]) if flag == "-S"] + list(fixed)
    check_seeds_follow(yaml.safe_load(PARAMS_FILE.read_text()) or {}, str(PARAMS_FILE))
    check_seeds_follow(_overrides_as_params(base), "the preset or --set")
    points = {
        point_name(param, value, seed): point_overrides(param, value, seed, base) for value in values for seed in seeds
    }
    todo = {}
    for name, overrides in points.items():
        if (out / "runs" / name / "evaluate.json").is_file():
            print(f"[sweep] {name}: done before, kept", flush=True)
        else:
            todo[name] = overrides
    states = _current_states()
    queued = queue_points(todo, states)
    waiting = [name for name in todo if name in queued or states.get(name, MISSING).state in PENDING]
    if waiting:
        states = wait_for(waiting, jobs)
    failed = []
    for name in todo:
        found = states.get(name, MISSING)
        if found.state == "success":
            save_point(out / "runs" / name, found.rev)
            print(f"[sweep] {name}: saved", flush=True)
        else:
            failed.append(name)
    if failed:
        raise SweepError(
            f"point(s) {', '.join(failed)} failed: see `dvc queue logs <point>`, fix the cause and "
            "rerun the same command (finished points are kept)"
        )
    summarize(param, out)


def _overrides_as_params(overrides: list[str]) -> dict:
    params: dict = {}
    for item in overrides:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if name:
            params.setdefault(section, {})[name] = yaml.safe_load(value)
    return params


def collect(param: str, out: Path) -> pd.DataFrame:
    """One row per saved point: the swept value, its seed and count, and each model's AP."""
    rows = []
    for folder in sorted((out / "runs").iterdir()):
        if not (folder / "evaluate.json").is_file():
            continue
        params = load_yaml((folder / "params.yaml").read_text()) or {}
        section, key = param.split(".", 1)
        # Through the params' models, so a key the point's params.yaml lacks reads as its default
        # and a derived seed as the top-level one (points saved before it existed set all four).
        sections = parse_params(params, source=str(folder / "params.yaml"))
        value = getattr(sections[section], key)
        seed = cast(GuidedParams, sections["train_guided"]).seed
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
    tables = []
    for model in MODELS:
        # Points saved before a figure existed lack its column: its mean is NaN.
        per_seed = pd.DataFrame(
            {
                by: points[by],
                "ap": points[f"{model}_ap"],
                **{name: points.get(f"{model}_{name}", np.nan) for name in ("false_alarms", "pointing_game")},
            }
        )
        spread = seed_spread(per_seed, [by], ["ap", "false_alarms", "pointing_game"], sort=True)
        # One seed has no spread over seeds: that of its folds stands in.
        fold_std = points.drop_duplicates(by).sort_values(by)[f"{model}_ap_fold_std"].to_numpy()
        tables.append(
            pd.DataFrame(
                {
                    by: spread[by],
                    "model": model,
                    "ap_mean": spread["ap"],
                    "ap_std": np.where(spread["seeds"] > 1, spread["ap_seed_std"], fold_std),
                    "seeds": spread["seeds"],
                    "false_alarms_mean": spread["false_alarms"],
                    "pointing_game_mean": spread["pointing_game"],
                }
            )
        )
    # Each value's rows together, the models in order.
    return pd.concat(tables).sort_values(by, kind="stable").reset_index(drop=True)


def summarize(param: str, out: Path) -> pd.DataFrame:
    from pipeline.core.tracking import stage_run  # MLflow only when there is something to log

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
    rows = [
        {
            by: row[by],
            "Model": row["model"],
            "Seeds": row["seeds"],
            "AP %": row["ap_mean"],
            "AP std %": row["ap_std"],
            "False alarms at 100% recall": row["false_alarms_mean"],
            "Pointing game %": row["pointing_game_mean"],
        }
        for _, row in table.iterrows()
    ]
    (out / "summary.md").write_text(
        f"# AP against {param}\n\n"
        + results_table_markdown(rows, list(rows[0]))
        + f"\nAP: mean over folds, then over seeds; spread: {spread}. False alarms "
        "(defect-free images scored above the lowest-scored defect, per fold) and the "
        "pointing game of the model's own saliency: means over folds and seeds.\n"
    )
    artifacts = [out / "summary.md", out / "summary.csv", out / "points.csv"]
    if by != "value":
        plot = out / f"ap_vs_{by}.png"
        plot_metric_vs_count(table, by, plot, f"AP against {by.replace('_', ' ')}\n(bars: {spread})")
        artifacts.append(plot)
    with stage_run("sweep", {"sweep": {"param": param, "points": len(points)}}) as tracked:
        for _, row in table.iterrows():
            tracked.log_metrics(
                {f"{row['model']}.ap_mean": row["ap_mean"]}, step=round(float(row[by])) if by != "value" else None
            )
        for path in artifacts:
            tracked.log_artifact(path)
    print((out / "summary.md").read_text())
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", required=True)
    run_parser = actions.add_parser("run", help="run the missing points, then summarize")
    run_parser.add_argument("param", help="the swept key, e.g. prepare.defective_images")
    run_parser.add_argument("values", help="comma-separated values, e.g. 5,10,20,all")
    run_parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    run_parser.add_argument("--preset", help="a preset (kgi presets list) applied to every point")
    run_parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override every point")
    run_parser.add_argument("--out", type=Path, required=True, help="folder of the saved points and the summary")
    run_parser.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=1,
        help="queue workers, experiments run at once (default 1; each uses OMP_NUM_THREADS threads)",
    )
    summary_parser = actions.add_parser("summarize", help="rebuild the summary from the saved points")
    summary_parser.add_argument("param")
    summary_parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.action == "run":
            seeds = [int(seed) for seed in args.seeds.split(",")]
            run(args.param, args.values.split(","), seeds, args.out, args.preset, args.set, args.jobs)
        else:
            summarize(args.param, args.out)
    except (SweepError, ConfigError, FileNotFoundError) as error:
        sys.exit(f"[sweep] error: {error}")
