"""Stage train_baseline: the plain classifier, image-level labels only, one model per fold.

Outputs: data/baseline/fold<k>.pt and run.json; data/metrics/train_baseline.json;
data/plots/train_baseline.csv (per-epoch losses and test AP).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.artifacts import output_dir, read_json, write_csv, write_json
from pipeline.config import ModelParams, TrainParams, load_section
from pipeline.data import PreparedData
from pipeline.runner import run_stage
from pipeline.tracking import stage_run
from pipeline.training import fingerprint_of, register_models, remove_checkpoints, summarize, train_folds

PREPARED = Path("data/prepared")
OUT = Path("data/baseline")
METRICS = Path("data/metrics/train_baseline.json")
PLOT = Path("data/plots/train_baseline.csv")


def main() -> None:
    model_params: ModelParams = load_section("model")
    params: TrainParams = load_section("train_baseline")
    data = PreparedData.load(PREPARED)
    dataset = read_json(PREPARED / "report.json")["dataset"]
    sections = {"model": model_params, "train_baseline": params}
    with stage_run("train_baseline", sections, dataset=dataset) as run:
        run.link_upstream(PREPARED)
        with output_dir(OUT) as out:
            history = train_folds("train_baseline", data, model_params, params, run, out,
                                  fingerprint=fingerprint_of(sections, PREPARED / "run.json"))
            run.write_lineage(out)
        summary = summarize(history)
        write_json(METRICS, summary)
        # Timings stay out of the DVC files, which must be identical for identical runs.
        write_csv(PLOT, pd.DataFrame(history).drop(columns="seconds"))
        run.log_metrics({"test_ap_mean": summary["test_ap_mean"],
                         "train_seconds": sum(r["seconds"] for r in history)})
        run.log_artifact(PLOT)
        register_models(run, OUT, dataset, "baseline")
        remove_checkpoints("train_baseline")
        print(f"  mean test AP over folds (last epoch): {summary['test_ap_mean']:.4f}")


if __name__ == "__main__":
    run_stage("train_baseline", main)
