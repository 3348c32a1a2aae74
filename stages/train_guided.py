"""Stage train_guided: the same backbone retrained with the baseline's knowledge.

The baseline's saliency map of each image is its prior channel; the Otsu pseudo-masks supervise
the segmentation head with a loss weight that decays over the epochs (variant consistency: the
saliency maps are the target of the consistency loss). Under mixed supervision, an image's true
mask replaces its pseudo-mask and, for consistency, its saliency map as that target. One model
per fold, each guided by the baseline of the same fold (never by a model that saw its test images).
Outputs: data/guided/fold<k>.pt and run.json; data/metrics/train_guided.json;
data/plots/train_guided.csv.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import distributed
from pipeline.artifacts import output_dir, read_json
from pipeline.config import GuidedParams, ModelParams, load_section
from pipeline.data import PreparedData
from pipeline.pseudo_labels import TRUE_MASKS, consistency_targets
from pipeline.runner import run_stage
from pipeline.tracking import stage_run
from pipeline.training import Guidance, fingerprint_of, pick_device, publish, train_folds

PREPARED = Path("data/prepared")
SALIENCY = Path("data/saliency")
PSEUDO_MASKS = Path("data/pseudo_masks")
OUT = Path("data/guided")


def main() -> None:
    model_params: ModelParams = load_section("model")
    params: GuidedParams = load_section("train_guided")
    device = pick_device(model_params.device)
    if distributed.launch("stages.train_guided", model_params.nproc_per_node, params.batch_size,
                          "train_guided.batch_size", device):
        return
    data = PreparedData.load(PREPARED)
    dataset = read_json(PREPARED / "report.json")["dataset"]
    every_row = np.arange(len(data.index))
    true_mask_ids = read_json(PSEUDO_MASKS / TRUE_MASKS)

    def guidance_for(fold: int) -> Guidance:
        priors = data.load_maps(SALIENCY / f"fold{fold}", every_row)
        pseudo_masks = data.load_masks(PSEUDO_MASKS / f"fold{fold}", every_row)
        if params.variant == "consistency":  # the other variants read the prior as an input, too
            true_rows = np.flatnonzero(data.index["id"].isin(true_mask_ids[f"fold{fold}"]))
            priors = consistency_targets(priors, pseudo_masks, true_rows)
        return Guidance(priors=priors, pseudo_masks=pseudo_masks)

    sections = {"model": model_params, "train_guided": params}
    fingerprint = fingerprint_of(sections, SALIENCY / "run.json", PSEUDO_MASKS / "run.json")
    with distributed.process_group(device) as ranks:
        if not ranks.main:  # trains alongside rank 0, which alone tracks and writes
            train_folds("train_guided", data, model_params, params, None, None, guidance_for, fingerprint)
            return
        with stage_run("train_guided", sections, dataset=dataset) as run:
            run.link_upstream(PREPARED, SALIENCY, PSEUDO_MASKS)
            with output_dir(OUT) as out:
                history = train_folds("train_guided", data, model_params, params, run, out, guidance_for,
                                      fingerprint)
                run.write_lineage(out)
            publish(run, "train_guided", "guided", history, OUT, dataset)


if __name__ == "__main__":
    run_stage("train_guided", main)
