"""Tables over training seeds: each figure's mean over folds per seed, then its mean and spread over seeds.

The core, ``seed_spread``, is shared by every table that repeats runs over seeds: the combined
evaluations of this module (``combine_runs``, ``kgi seeds``), the
sweep's summary (``pipeline.experiments.sweep``) and the variance ablation
(``pipeline.experiments.variance``). Each caller keeps its own columns and formatting.

``kgi seeds scores_seed0.csv scores_seed1.csv ...`` combines runs of
several seeds (see ``combine_runs``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.evaluation.results import MODELS, WITH_STD
from pipeline.metrics.classification import MetricsError, summarize_folds


def fold_means(rows: pd.DataFrame, groups: Sequence[str], figures: Sequence[str]) -> pd.DataFrame:
    """Each figure's mean over the folds of ``rows`` (one row per group, seed and fold): one row per
    group and seed, indexed by ``[*groups, "seed"]``, groups in the order they first appear."""
    return rows.groupby([*groups, "seed"], sort=False)[list(figures)].mean()


def seed_spread(
    per_seed: pd.DataFrame, groups: Sequence[str], figures: Sequence[str], ddof: int = 0, sort: bool = False
) -> pd.DataFrame:
    """Per group of ``per_seed`` (one row per group and seed, each figure a mean over folds): the
    figure's mean over seeds (``<figure>``), its std over seeds (``<figure>_seed_std``, NaN for one
    seed when ``ddof`` is 1) and the number of seeds (``seeds``), groups as columns.

    Each group's figures are reduced as a Series, as every table over seeds did before it was
    shared, so the numbers stay the same to the last digit.
    """
    rows = []
    for key, group in per_seed.groupby(list(groups), sort=sort):
        row: dict[str, Any] = dict(zip(groups, key, strict=True))
        for figure in figures:
            row[figure] = group[figure].mean()
            row[f"{figure}_seed_std"] = group[figure].std(ddof=ddof)
        row["seeds"] = len(group)
        rows.append(row)
    return pd.DataFrame(rows)


def _read_runs(score_csvs: Sequence[str | Path], ids: str | None) -> pd.DataFrame:
    """The runs' scores.csv as one frame with a ``seed`` column (runs numbered as given), checked
    to score the same test images (those whose id matches ``ids``, when given)."""
    if len(score_csvs) < 2:
        raise MetricsError("combine_runs needs the scores.csv of at least two runs")
    frames = []
    for seed, path in enumerate(score_csvs):
        frame = pd.read_csv(path, dtype={"id": str})
        missing = {"fold", "id", "label", *MODELS} - set(frame.columns)
        if missing:
            raise MetricsError(f"{path} lacks column(s) {sorted(missing)}: is it an evaluation's scores.csv?")
        if ids is not None:
            frame = frame[frame["id"].str.contains(ids, regex=True)]
            if not (frame["label"] == 1).any() or not (frame["label"] == 0).any():
                raise MetricsError(
                    f"{path}: the images whose id matches {ids!r} are not of both classes; "
                    "AP needs defective and defect-free images"
                )
        frames.append(frame.assign(seed=seed))
    images = set(zip(frames[0]["fold"], frames[0]["id"], strict=True))
    for path, frame in zip(score_csvs[1:], frames[1:], strict=True):
        if set(zip(frame["fold"], frame["id"], strict=True)) != images:
            raise MetricsError(
                f"{path} scores other test images than {score_csvs[0]}: combine runs on the same prepared data"
            )
    return pd.concat(frames, ignore_index=True)


def combine_runs(score_csvs: Sequence[str | Path], threshold: float = 0.5, ids: str | None = None) -> pd.DataFrame:
    """Mean and spread over runs of different seeds, from their ``scores.csv`` files.

    Each file is one run (one training seed, same prepared data); runs are numbered as given.
    One row per model: each metric's fold mean averaged over runs (``<key>``), its std over
    runs (``<key>_seed_std``) and over folds (``<key>_fold_std``), all ddof=0. ``ids``, a
    regular expression, keeps only the test images whose id it matches (``re.search``): one
    kind of image, one camera position.
    """
    scores = _read_runs(score_csvs, ids)
    rows = []
    for model in MODELS:
        summary = summarize_folds(scores.rename(columns={model: "score"}), threshold)
        per_seed = pd.DataFrame([{"seed": seed, **figures} for seed, figures in summary["per_seed"].items()])
        spread = seed_spread(per_seed.assign(model=model), ["model"], WITH_STD).iloc[0]
        row: dict[str, Any] = {"model": model, "runs": int(spread["seeds"])}
        for key in WITH_STD:
            # The mean as summarize_folds takes it (over folds of the seeds' mean per fold): equal to
            # the mean over seeds up to rounding, and the digits the committed tables have.
            row.update(
                {
                    key: summary["mean"][key],
                    f"{key}_seed_std": spread[f"{key}_seed_std"],
                    f"{key}_fold_std": summary["std"][key],
                }
            )
        rows.append(row)
    return pd.DataFrame(rows)


def combined_markdown(table: pd.DataFrame) -> str:
    """``combine_runs``'s table as mean ± std over seeds (AP and AUROC in %)."""

    def cell(row: pd.Series, key: str, scale: float) -> str:
        return f"{scale * row[key]:.2f} ± {scale * row[f'{key}_seed_std']:.2f}"

    lines = [
        "| Model | Runs | AP % | AUROC % | F1 % | False alarms at 100% recall | "
        "Missed at 0 false alarms | AP std over folds % |",
        "| --- " * 8 + "|",
    ]
    for _, row in table.iterrows():
        lines.append(
            f"| {row['model']} | {row['runs']} | {cell(row, 'ap', 100)} | {cell(row, 'auroc', 100)} | "
            f"{cell(row, 'f1_best', 100)} | {cell(row, 'false_alarms_at_full_recall', 1)} | "
            f"{cell(row, 'missed_at_zero_false_alarms', 1)} | {100 * row['ap_fold_std']:.2f} |"
        )
    return "\n".join(lines) + "\n\nMean over folds and runs ± std over runs (seeds).\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Combine the scores.csv of runs with different seeds into a mean ± std table. "
        "Collect them e.g. with: for s in 0 1 2; do dvc exp run -S seed=$s "
        "&& cp data/evaluation/scores.csv scores_seed$s.csv; done"
    )
    parser.add_argument("scores", nargs="+", help="scores.csv of each run")
    parser.add_argument("--threshold", type=float, default=0.5, help="evaluate.threshold of the runs")
    parser.add_argument("--ids", help="only the test images whose id matches this regular expression")
    parser.add_argument("--out", type=Path, help="also write the table here (.md) and beside it as .csv")
    args = parser.parse_args(argv)
    table = combine_runs(args.scores, args.threshold, args.ids)
    text = combined_markdown(table)
    if args.out:
        args.out.write_text(text)
        table.to_csv(args.out.with_suffix(".csv"), index=False)
    print(text)
