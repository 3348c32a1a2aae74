"""One fold's saliency maps as the pipeline stores them, and what is reported of them.

The fold's baseline model file explains every image and each map is written as a 16-bit PNG
``<folder>/fold<k>/<id>.png``: the saliency stage does it for every fold and the release for its
model trained on every image, so both store their maps through the same code and the guided
model reads either alike (``pipeline.training.objectives.load_guidance``). Also here: a fold's
localization against the true masks and the rows it adds to the saliency stage's overlay grid.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from pipeline.core.artifacts import write_map
from pipeline.core.devices import Precision
from pipeline.core.errors import InputError
from pipeline.data.prepared import PreparedData
from pipeline.knowledge.reference import fold_distance_maps, fuse
from pipeline.knowledge.saliency import create_saliency, saliency_maps
from pipeline.metrics.figures import heatmap_overlay, mask_outline
from pipeline.metrics.localization import localization_metrics
from pipeline.models.files import load_model
from pipeline.models.variants import VARIANTS, variant_of


class SaliencySettings(Protocol):
    """What the maps depend on of the ``saliency`` params section (``pipeline.config.SaliencyParams``,
    which this layer may not import)."""

    @property
    def method(self) -> str: ...

    @property
    def layers(self) -> list[str] | None: ...

    @property
    def batch_size(self) -> int: ...

    @property
    def reference_weight(self) -> float: ...

    @property
    def reference_layer(self) -> str | None: ...

    @property
    def reference_bank(self) -> int: ...


def write_fold_maps(
    data: PreparedData,
    fold: int,
    model_file: Path,
    settings: SaliencySettings,
    precision: Precision,
    device: torch.device,
    folder: Path,
    bar: str | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Explain every image of ``data`` with ``fold``'s baseline (``model_file``; in a later knowledge
    round, the guided model of the round before) at ``precision`` and write each map to
    ``folder/fold<fold>/<id>.png``. With ``settings.reference_weight`` > 0 each map is fused with
    its distance to the fold's defect-free reference (``reference.fuse``).

    Returns the maps (N, H, W) as computed, their validity (N,) and the seconds they took
    (``saliency.saliency_maps``, and the reference's); with a ``bar`` name a terminal shows the
    batches' progress.
    """
    model, config = load_model(model_file, device)
    variant = variant_of(config)
    if variant is not None and not variant.deploys_baseline_graph:
        usable = " or ".join(v.name for v in VARIANTS.values() if v.deploys_baseline_graph)
        raise InputError(
            f"{model_file}: a {variant.name} model reads a prior besides the image, so its saliency alone cannot guide "
            f"the next knowledge round: knowledge rounds (params rounds) need train_guided.variant {usable}"
        )
    method = create_saliency(settings.method, precision.model(model), settings.layers, precision)
    maps, valid, seconds = saliency_maps(method, config, data.images, settings.batch_size, bar=bar)
    if settings.reference_weight > 0:
        started = time.perf_counter()
        distances = fold_distance_maps(
            model, config, data, fold, settings.reference_layer, settings.reference_bank, settings.batch_size
        )
        maps = fuse(maps, distances, settings.reference_weight)
        valid &= maps.reshape(len(maps), -1).max(axis=1, initial=0.0) > 0  # a zero product locates nothing
        seconds += time.perf_counter() - started
    for image_id, saliency in zip(data.index["id"], maps, strict=False):
        write_map(folder / f"fold{fold}" / f"{image_id}.png", saliency)
    return maps, valid, seconds


def fold_localization(data: PreparedData, maps: np.ndarray, rows: np.ndarray) -> dict:
    """Saliency mass inside the true mask and pointing-game hits, over the defective images among
    ``rows`` that have a true mask; empty where none has."""
    pairs = [
        (maps[i], mask) for i in rows if data.index["label"].iat[i] == 1 and (mask := data.true_mask(i)) is not None
    ]
    if not pairs:
        return {}
    return localization_metrics(*zip(*pairs, strict=False))


def overlay_rows(data: PreparedData, maps: np.ndarray, rows: np.ndarray, count: int) -> list:
    """Up to ``count`` defective images among ``rows``, each as (id, [image with its true mask
    outlined, its map over the image]): rows of ``figures.overlay_grid``."""
    defective = [i for i in rows if data.index["label"].iat[i] == 1][:count]
    picked = []
    for i in defective:
        image = data.images[i].numpy()
        mask = data.true_mask(i)
        shown = mask_outline(np.dstack([image] * 3), mask, color=(255, 255, 255)) if mask is not None else image
        picked.append((str(data.index["id"].iat[i]), [shown, heatmap_overlay(image, maps[i])]))
    return picked
