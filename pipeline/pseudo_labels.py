"""Otsu pseudo-masks: the baseline's saliency, binarised, as the guided model's segmentation target."""

from __future__ import annotations

import cv2
import numpy as np


def otsu_mask(saliency: np.ndarray, blur: int = 0) -> np.ndarray:
    """Binarise a [0, 1] map at Otsu's threshold; an all-zero or constant map gives an empty mask."""
    levels = np.round(np.clip(saliency, 0.0, 1.0) * 255.0).astype(np.uint8)
    if blur:
        size = blur if blur % 2 else blur + 1
        levels = cv2.GaussianBlur(levels, (size, size), 0)
    if levels.min() == levels.max():
        # Otsu is undefined on a flat map: there is no knowledge to transfer, so no foreground.
        return np.zeros(saliency.shape, dtype=bool)
    threshold, _ = cv2.threshold(levels, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return levels > threshold


def pseudo_mask(saliency: np.ndarray, label: int, blur: int = 0) -> np.ndarray:
    """The segmentation target of one training image: empty for a defect-free image."""
    if label == 0:
        return np.zeros(saliency.shape, dtype=bool)
    return otsu_mask(saliency, blur)
