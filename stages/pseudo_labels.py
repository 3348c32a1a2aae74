"""Stage pseudo_labels: binarise each saliency map with Otsu's threshold into a pseudo-mask.

Defective images get the Otsu foreground of their map; defect-free images an empty mask (their
label says there is nothing to find). Where true masks exist, the pseudo-masks are scored against
them, which tells how much the transferred knowledge is worth before any guided training.
Outputs: data/pseudo_masks/fold<k>/<id>.png (0/255) and run.json; data/metrics/pseudo_labels.json.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.artifacts import output_dir, read_json, write_image, write_json
from pipeline.config import PseudoLabelParams, load_section
from pipeline.data import PreparedData
from pipeline.metrics import mask_iou, mean_over_folds
from pipeline.pseudo_labels import pseudo_mask
from pipeline.runner import run_stage
from pipeline.tracking import stage_run

PREPARED = Path("data/prepared")
SALIENCY = Path("data/saliency")
OUT = Path("data/pseudo_masks")
METRICS = Path("data/metrics/pseudo_labels.json")


def main() -> None:
    params: PseudoLabelParams = load_section("pseudo_labels")
    data = PreparedData.load(PREPARED)
    dataset = read_json(PREPARED / "report.json")["dataset"]
    labels = data.index["label"].to_numpy()
    defective = np.flatnonzero(labels == 1)
    with stage_run("pseudo_labels", {"pseudo_labels": params}, dataset=dataset) as run:
        run.link_upstream(PREPARED, SALIENCY)
        summary: dict[str, dict] = {}
        with output_dir(OUT) as out:
            for fold in data.folds:
                maps = data.load_maps(SALIENCY / f"fold{fold}", np.arange(len(labels))).numpy()
                masks = [pseudo_mask(saliency, label, params.blur) for saliency, label in zip(maps, labels)]
                for image_id, mask in zip(data.index["id"], masks):
                    write_image(out / f"fold{fold}" / f"{image_id}.png", mask.astype(np.uint8) * 255)
                summary[f"fold{fold}"] = _score(data, fold, masks, defective)
            run.write_lineage(out)
        means = mean_over_folds(summary)
        write_json(METRICS, {"per_fold": summary, **means})
        run.log_metrics(means)
        for name, value in means.items():
            print(f"  {name}: {value:.4f}")


def _score(data: PreparedData, fold: int, masks: list[np.ndarray], defective: np.ndarray) -> dict:
    """Foreground share of the pseudo-masks and, with true masks, their IoU (train and test rows)."""
    train_rows, _ = data.split(fold)
    is_train = np.isin(defective, train_rows)
    scores = {"foreground_share": float(np.mean([masks[i].mean() for i in defective]))}
    for name, rows in (("train", defective[is_train]), ("test", defective[~is_train])):
        ious = [mask_iou(masks[i], true) for i in rows if (true := data.true_mask(i)) is not None]
        if ious:
            scores[f"iou_{name}"] = float(np.mean(ious))
    return scores


if __name__ == "__main__":
    run_stage("pseudo_labels", main)
