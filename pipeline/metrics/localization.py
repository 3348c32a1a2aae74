"""Saliency localization figures: how much of a map lies on the defect, whether its peak points at it.

Maps and masks are compared pixel for pixel at the same shape; a shape mismatch or a NaN raises
:class:`~pipeline.metrics.classification.MetricsError`, as every metric here is a finite float.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from pipeline.metrics.classification import MetricsError


def _check_map_and_mask(saliency: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    saliency = np.asarray(saliency, dtype=np.float64)
    mask = np.asarray(mask).astype(bool)
    if saliency.shape != mask.shape:
        raise MetricsError(f"saliency shape {saliency.shape} != mask shape {mask.shape}")
    if not np.isfinite(saliency).all():
        raise MetricsError("saliency map contains NaN or infinite values")
    return saliency, mask


def saliency_mass_inside(saliency: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's total mass inside ``mask``; 0.0 for a map with no mass.

    Negative values (e.g. overshoot of bicubic upsampling) carry no mass and are clipped to 0:
    the metric asks where the positive evidence lies.
    """
    saliency, mask = _check_map_and_mask(saliency, mask)
    saliency = np.clip(saliency, 0.0, None)
    total = saliency.sum()
    return float(saliency[mask].sum() / total) if total > 0 else 0.0


def pointing_game_hit(saliency: np.ndarray, mask: np.ndarray, tolerance: float = 0.0) -> bool:
    """Whether the map's maximum falls inside ``mask``, or within ``tolerance`` pixels of it.

    ``tolerance`` 0 is the strict game. Zhang et al. (2018) allow 15 pixels at 224 pixels,
    because a map's peak on a 1-pixel-wide scratch is a matter of interpolation as much as of
    knowledge. Distances are Euclidean, from the peak pixel to the nearest mask pixel.

    Ties: if several pixels share the maximum, a hit is any of them. A constant map (all zero
    included) points nowhere and is a miss, otherwise a blank map would hit every mask; so is
    any map against an empty mask.
    """
    saliency, mask = _check_map_and_mask(saliency, mask)
    if tolerance < 0 or not np.isfinite(tolerance):
        raise MetricsError(f"pointing-game tolerance must be a finite number >= 0, got {tolerance}")
    peak = saliency.max()
    if peak == saliency.min() or not mask.any():
        return False
    peaks = saliency == peak
    if tolerance == 0:
        return bool((peaks & mask).any())
    # Distance of every pixel to the nearest mask pixel (the zeros of the input).
    distance = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return bool((distance[peaks] <= tolerance).any())


def mask_iou(pred: np.ndarray, true: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 1.0 when both are empty."""
    pred, true = np.asarray(pred).astype(bool), np.asarray(true).astype(bool)
    if pred.shape != true.shape:
        raise MetricsError(f"mask shapes differ: {pred.shape} vs {true.shape}")
    union = int((pred | true).sum())
    return float((pred & true).sum() / union) if union else 1.0


def localization_metrics(saliency_maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> dict[str, float]:
    """Mean ``mass_inside`` and ``pointing_game`` hit rate over images with a non-empty mask.

    Defect-free images (empty masks) are skipped, since there is nothing to point at; their
    shapes are still checked. ``n_images`` is the number of defective images scored.
    """
    if len(saliency_maps) != len(masks):
        raise MetricsError(f"{len(saliency_maps)} saliency maps but {len(masks)} masks")
    mass, hits = [], []
    for index, (saliency, mask) in enumerate(zip(saliency_maps, masks, strict=True)):
        try:
            saliency, mask = _check_map_and_mask(saliency, mask)
        except MetricsError as error:
            raise MetricsError(f"image index {index}: {error}") from error
        if mask.any():
            mass.append(saliency_mass_inside(saliency, mask))
            hits.append(pointing_game_hit(saliency, mask))
    if not mass:
        raise MetricsError(f"no defective image (non-empty mask) among {len(masks)}")
    return {"mass_inside": float(np.mean(mass)), "pointing_game": float(np.mean(hits)), "n_images": float(len(mass))}
