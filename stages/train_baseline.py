"""Stage train_baseline: the plain classifier, image-level labels only, one model per fold.

Outputs: data/baseline/fold<k>.pt and run.json; data/metrics/train_baseline.json;
data/plots/train_baseline.csv (per-epoch losses and test AP).
"""

from __future__ import annotations

from pathlib import Path


from pipeline import distributed
from pipeline.artifacts import output_dir, read_json
from pipeline.config import ModelParams, TrainParams, load_section
from pipeline.data import PreparedData
from pipeline.runner import run_stage
from pipeline.tracking import stage_run
from pipeline.training import fingerprint_of, pick_device, publish, train_folds

PREPARED = Path("data/prepared")
OUT = Path("data/baseline")


def main() -> None:
    model_params: ModelParams = load_section("model")
    params: TrainParams = load_section("train_baseline")
    device = pick_device(model_params.device)
    if distributed.launch("stages.train_baseline", model_params.nproc_per_node, params.batch_size,
                          "train_baseline.batch_size", device):
        return
    data = PreparedData.load(PREPARED)
    dataset = read_json(PREPARED / "report.json")["dataset"]
    sections = {"model": model_params, "train_baseline": params}
    fingerprint = fingerprint_of(sections, PREPARED / "run.json")
    with distributed.process_group(device) as ranks:
        if not ranks.main:  # trains alongside rank 0, which alone tracks and writes
            train_folds("train_baseline", data, model_params, params, None, None, fingerprint=fingerprint)
            return
        with stage_run("train_baseline", sections, dataset=dataset) as run:
            run.link_upstream(PREPARED)
            with output_dir(OUT) as out:
                history = train_folds("train_baseline", data, model_params, params, run, out,
                                      fingerprint=fingerprint)
                run.write_lineage(out)
            publish(run, "train_baseline", "baseline", history, OUT, dataset)


if __name__ == "__main__":
    run_stage("train_baseline", main)
