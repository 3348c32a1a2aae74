"""A paired ablation of the two remedies for seed-to-seed spread that leave training unchanged:
averaged weights (``ema_epochs``) and test-time flips (``model.test_time_flips``).

The moving average never feeds back into the steps and the flips only change how a model is
scored, so one training run per fold and seed yields every combination: the last weights and
the averages of several time constants, each scored with and without flips, on the same test
fold. The baseline's training params come from ``params.yaml`` (``train_baseline``, ``model``),
with ``--set KEY=VALUE`` overriding ``train_baseline`` keys, so that a change to training (a
warm-up, hard negatives) is measured on the same seeds and folds as the default:

    kgi variance data/prepared --seeds 0,1,2 --ema-epochs 1,3,10 \\
        --out results/kolektorsdd/variance
    kgi variance data/prepared --seeds 0,1,2 --ema-epochs 1,3,10 \\
        --set warmup_epochs=2 --out results/kolektorsdd/warmup
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import cast

import pandas as pd
from torch import nn
from torch.optim.swa_utils import AveragedModel

from pipeline.config import ModelParams, TrainParams, load_section, load_yaml, parse_section
from pipeline.core.artifacts import write_bytes, write_csv
from pipeline.core.devices import FP32
from pipeline.core.errors import InputError
from pipeline.core.progress import log_line
from pipeline.data.prepared import PreparedData
from pipeline.evaluation.seeds import fold_means, seed_spread
from pipeline.metrics.classification import classification_metrics
from pipeline.models.inference import predict
from pipeline.training.loop import set_up, train_epoch, weight_average
from pipeline.training.objectives import Objective

LAST = "last weights"


def average_name(epochs: float) -> str:
    return f"EMA {epochs:g} epochs"


class _Averages:
    """Several moving averages updated by the loop's one ``update_parameters`` call per step."""

    def __init__(self, averages: dict[str, AveragedModel]) -> None:
        self.averages = averages

    def update_parameters(self, model: nn.Module) -> None:
        for average in self.averages.values():
            average.update_parameters(model)


def fold_scores(
    data: PreparedData, fold: int, model_params: ModelParams, params: TrainParams, ema_epochs: list[float]
) -> list[dict]:
    """Train the baseline of ``fold`` once; the test AP and the false alarms at full recall of its
    last weights and of each average, with and without test-time flips."""
    run = set_up(data, fold, model_params, params, Objective())
    steps = run.sampler.steps(params.batch_size)
    # The epochs asked for are positive, so each weight_average is an average, never None.
    averages = cast(
        dict[str, AveragedModel],
        {
            average_name(epochs): weight_average(run.model, params.model_copy(update={"ema_epochs": epochs}), steps)
            for epochs in ema_epochs
        },
    )
    run.average = cast(AveragedModel, _Averages(averages))  # the epoch loop only calls update_parameters
    for epoch in range(params.epochs):
        train_epoch(run, epoch)
    labels = run.labels[run.test_rows].numpy()
    rows = []
    for weights, model in {LAST: run.model, **{k: a.module for k, a in averages.items()}}.items():
        model = FP32.model(model)
        for flips in (False, True):
            scores = predict(
                model, {**run.config, "test_time_flips": flips}, data.images[run.test_rows], None, params.batch_size * 2
            )
            metrics = classification_metrics(labels, scores)
            rows.append(
                {
                    "seed": params.seed,
                    "fold": fold,
                    "weights": weights,
                    "test_time_flips": flips,
                    "ap": metrics["ap"],
                    "false_alarms": metrics["false_alarms_at_full_recall"],
                }
            )
    return rows


def with_overrides(params: TrainParams, overrides: list[str]) -> TrainParams:
    """``params`` with ``KEY=VALUE`` overrides (YAML values), validated as params.yaml's are."""
    update = {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or key not in TrainParams.model_fields:
            raise InputError(
                f"--set {override!r}: write KEY=VALUE with KEY one of train_baseline's keys "
                f"({', '.join(TrainParams.model_fields)})"
            )
        update[key] = load_yaml(value)
    section = parse_section("train_baseline", {**params.model_dump(), **update}, source=f"--set {' '.join(overrides)}")
    return cast(TrainParams, section)  # train_baseline's section is a TrainParams


def measured_rows(path: Path, ema_epochs: list[float], overrides: list[str]) -> list[dict]:
    """The rows an earlier, interrupted call wrote to ``path``, so that a rerun trains only the
    folds still missing; refused if that call measured other averages or other training."""
    if not path.is_file():
        return []
    rows = pd.read_csv(path, keep_default_na=False).to_dict("records")
    expected = {LAST, *(average_name(epochs) for epochs in ema_epochs)}
    if (found := {row["weights"] for row in rows}) != expected:
        raise InputError(
            f"{path} holds {', '.join(sorted(found))}, not the {', '.join(sorted(expected))} that "
            "--ema-epochs asks for: give the same --ema-epochs as before, or another --out"
        )
    if (trained := {row.get("overrides", "") for row in rows}) != {" ".join(overrides)}:
        raise InputError(
            f"{path} was trained with --set {' '.join(sorted(trained)) or '(none)'}, not "
            f"{' '.join(overrides) or '(none)'}: give the same --set as before, or another --out"
        )
    return rows


def summary_table(rows: pd.DataFrame) -> str:
    """Markdown: AP per combination, mean over folds then seeds ± std over seeds, and per seed;
    false alarms at full recall per fold, where the rows have them (older files do not)."""
    combination = ["weights", "test_time_flips"]
    per_seed = fold_means(rows, combination, ["ap", *(["false_alarms"] if "false_alarms" in rows else [])])
    # Seeds ascending within each combination, as the per-seed column lists them and sums them.
    percent = (100 * per_seed[["ap"]]).reset_index().sort_values("seed", kind="stable")
    spread = seed_spread(percent, combination, ["ap"], ddof=1).set_index(combination)
    alarms = per_seed["false_alarms"].groupby(level=[0, 1], sort=False).mean() if "false_alarms" in rows else None
    lines = [
        "| weights | test-time flips | AP % (mean ± std over seeds) | per seed "
        "| false alarms at full recall per fold |",
        "| --- | --- | --- | --- | --- |",
    ]
    for (weights, flips), seeds in per_seed["ap"].unstack("seed").iterrows():
        figures = spread.loc[(weights, flips)]
        std = f" ± {figures['ap_seed_std']:.2f}" if figures["seeds"] > 1 else ""
        false_alarms = f"{alarms[(weights, flips)]:.1f}" if alarms is not None else "–"
        lines.append(
            f"| {weights} | {'yes' if flips else 'no'} | {figures['ap']:.2f}{std} | "
            f"{' / '.join(f'{v:.1f}' for v in 100 * seeds.to_numpy())} | {false_alarms} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prepared", type=Path, help="a prepared data set (data/prepared)")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds (default 0)")
    parser.add_argument("--ema-epochs", default="1,3,10", help="comma-separated time constants, in epochs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override train_baseline.KEY")
    parser.add_argument("--out", type=Path, required=True, help="folder for ablation.csv and ablation.md")
    args = parser.parse_args(argv)
    data = PreparedData.load(args.prepared)
    model_params, params = load_section("model"), with_overrides(load_section("train_baseline"), args.set)
    ema_epochs = [float(value) for value in args.ema_epochs.split(",")]
    rows = measured_rows(args.out / "ablation.csv", ema_epochs, args.set)
    done = {(row["seed"], row["fold"]) for row in rows}
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in (int(value) for value in args.seeds.split(",")):
        for fold in data.folds:
            if (seed, fold) in done:
                continue
            new = [
                {**row, "overrides": " ".join(args.set)}
                for row in fold_scores(data, fold, model_params, params.model_copy(update={"seed": seed}), ema_epochs)
            ]
            log_line(
                f"seed {seed} fold {fold}: "
                + ", ".join(f"{r['weights']}{' +flips' if r['test_time_flips'] else ''} {r['ap']:.3f}" for r in new)
            )
            rows += new
            # After every fold: a long ablation cut short keeps what it measured.
            write_csv(args.out / "ablation.csv", pd.DataFrame(rows))
            write_bytes(args.out / "ablation.md", summary_table(pd.DataFrame(rows)).encode())
    table = summary_table(pd.DataFrame(rows))
    write_bytes(args.out / "ablation.md", table.encode())  # also when every fold was measured before
    print(table, end="")
    return 0
