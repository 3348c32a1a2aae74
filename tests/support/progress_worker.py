"""A long loop of each kind on tiny data, for tests/test_progress.py to watch from a pipe or a
terminal: training (epochs and batches, with the per-epoch log line), saliency over batches and
predict over files (one of them unreadable)."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from pipeline.config import ModelParams, TrainParams
from pipeline.deployment.predict import Predictor, load_file, predict_files
from pipeline.knowledge.saliency import create_saliency, saliency_maps
from pipeline.training.objectives import Objective
from pipeline.training.stage import train_folds

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: support.* as the tests import it
from support.helpers import tiny_data

EPOCHS = 3


def main(out: Path) -> None:
    torch.set_num_threads(1)
    data = tiny_data(32, 8)
    params = TrainParams(epochs=EPOCHS, batch_size=2)
    train_folds(
        data,
        ModelParams(backbone="resnet18", device="cpu"),
        params,
        lambda data, fold: Objective(),
        out / "checkpoints",
        out=out,
    )
    loaded = load_file(out / "fold0.pt")
    saliency_maps(create_saliency("gradcam", loaded.model), loaded.config, data.images, 2, bar="saliency fold 0")
    images = out / "images"
    images.mkdir()
    for k in range(3):
        cv2.imwrite(str(images / f"{k}.png"), np.full((40, 40), 60 * k, np.uint8))
    (images / "broken.png").write_bytes(b"not a png")
    predict_files(Predictor(loaded, 0.5), sorted(images.iterdir()), out / "predictions", batch_size=2)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
