"""Stage pseudo_labels: binarise each saliency map with Otsu's threshold into a pseudo-mask.

Defective images get the Otsu foreground of their map; defect-free images an empty mask (their
label says there is nothing to find). Where true masks exist, the pseudo-masks are scored against
them, which tells how much the transferred knowledge is worth before any guided training.
Mixed supervision (``true_masks`` > 0): for that many defective training images of each fold,
drawn from ``seed``, the true mask is the target instead (the rest keep their pseudo-masks).
Outputs: data/pseudo_masks/fold<k>/<id>.png (0/255), true_masks.json (per fold, the ids whose
target is a true mask) and run.json; data/metrics/pseudo_labels.json.
``python -m stages.pseudo_labels round<k>`` does the same for knowledge round k (dvc.yaml's
round_pseudo_labels), from data/round<k>_saliency into data/round<k>_pseudo_masks.
"""

from __future__ import annotations

import numpy as np

from pipeline.config import load_round, load_section
from pipeline.core import layout
from pipeline.core.artifacts import output_dir, read_json, write_json
from pipeline.core.runner import run_round_stage
from pipeline.core.tracking import stage_run
from pipeline.data.prepared import PreparedData
from pipeline.knowledge.pseudo_labels import write_fold_targets
from pipeline.metrics.classification import mean_over_folds
from pipeline.metrics.localization import mask_iou

PREPARED = layout.PREPARED


def main(round_name: str | None = None) -> None:
    """The stage for the knowledge round ``round_name``; None: the first (the pipeline's own stage)."""
    knowledge_round = load_round(round_name)
    params = load_section("pseudo_labels")
    data = PreparedData.load(PREPARED)
    dataset = read_json(PREPARED / "report.json")["dataset"]
    labels = data.index["label"].to_numpy()
    defective = np.flatnonzero(labels == 1)
    with stage_run(knowledge_round.stage("pseudo_labels"), {"pseudo_labels": params}, dataset=dataset) as run:
        run.link_upstream(PREPARED, knowledge_round.saliency)
        summary: dict[str, dict] = {}
        true_mask_ids: dict[str, list[str]] = {}
        with output_dir(knowledge_round.pseudo_masks) as out:
            for fold in data.folds:
                maps = data.load_maps(knowledge_round.saliency / f"fold{fold}", np.arange(len(labels))).numpy()
                masks, true_rows = write_fold_targets(data, fold, maps, params, out / f"fold{fold}")
                summary[f"fold{fold}"] = {**_score(data, fold, masks, defective), "true_masks": len(true_rows)}
                true_mask_ids[f"fold{fold}"] = data.index["id"].iloc[true_rows].tolist()
            write_json(out / layout.TRUE_MASKS, true_mask_ids)
            run.write_lineage(out)
        means = mean_over_folds(summary)
        write_json(knowledge_round.metrics("pseudo_labels"), {"per_fold": summary, **means})
        run.log_metrics(means)
        for name, value in means.items():
            print(f"  {name}: {value:.4f}")


def _score(data: PreparedData, fold: int, masks: list[np.ndarray], defective: np.ndarray) -> dict:
    """Foreground share of the pseudo-masks and, with true masks, their IoU (train and test rows).

    Scored before any true mask replaces a pseudo-mask: this measures the Otsu masks alone."""
    train_rows, test_rows = data.split(fold)
    scores = {"foreground_share": float(np.mean([masks[i].mean() for i in defective]))}
    for name, rows in (
        ("train", np.intersect1d(defective, train_rows)),
        ("test", np.intersect1d(defective, test_rows)),
    ):
        ious = [mask_iou(masks[i], true) for i in rows if (true := data.true_mask(i)) is not None]
        if ious:
            scores[f"iou_{name}"] = float(np.mean(ious))
    return scores


if __name__ == "__main__":
    run_round_stage("pseudo_labels", main)
