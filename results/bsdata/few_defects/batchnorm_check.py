"""Is a collapsed guided model's constant score its BatchNorm statistics or its weights?

Scores each fold's test images with the saved baseline and guided models as they are, then again
after re-estimating every BatchNorm layer's running statistics (``torch.optim.swa_utils.update_bn``:
weights untouched) on the fold's training images, and on a balanced share of them (its defective
images and as many defect-free ones, drawn with a fixed seed: the classes' shares in the training
batches). Run from a project whose ``data/`` holds a finished run up to ``train_guided``:

    python results/bsdata/few_defects/batchnorm_check.py > batchnorm_check.md
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score
from torch.optim.swa_utils import update_bn

sys.path.insert(0, str(Path.cwd()))
from pipeline.core import layout
from pipeline.data.prepared import PreparedData
from pipeline.data.training_data import batches, to_input
from pipeline.models.files import load_model
from pipeline.models.inference import predict


def recalibrated(model: torch.nn.Module, config: dict, images: torch.Tensor) -> torch.nn.Module:
    """A copy of ``model`` whose BatchNorm statistics are the plain average over ``images``."""
    copied = copy.deepcopy(model)
    x = to_input(images, config["in_channels"], config["mean"], config["std"])
    update_bn([x[rows] for rows in batches(torch.arange(len(x)).numpy(), 32)], copied)
    return copied.eval()


def balanced(rows: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The defective rows and as many defect-free ones, drawn with a fixed seed."""
    defective, free = rows[labels[rows] == 1], rows[labels[rows] == 0]
    return np.concatenate([defective, np.random.default_rng(0).choice(free, len(defective), replace=False)])


def main() -> None:
    data = PreparedData.load(layout.PREPARED)
    all_labels = data.labels.numpy()
    print(
        "| fold | model | AP % | scores min–max | AP %, BatchNorm re-estimated on every training image | "
        "scores min–max | AP %, on a balanced share | scores min–max |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for fold in data.folds:
        train_rows, test_rows = data.split(fold)
        labels, images = all_labels[test_rows], data.images[test_rows]
        even = balanced(train_rows, all_labels)
        for kind, folder in (("baseline", layout.BASELINE), ("guided", layout.GUIDED)):
            model, config = load_model(folder / f"fold{fold}.pt")
            cells = []
            variants = (recalibrated(model, config, data.images[rows]) for rows in (train_rows, even))
            for scored in (model, *variants):
                scores = predict(scored, config, images)
                ap = 100 * average_precision_score(labels, scores)
                cells += [f"{ap:.1f}", f"{scores.min():.3f}–{scores.max():.3f}"]
            print(f"| {fold} | {kind} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
