"""Otsu pseudo-masks: the baseline's saliency, binarised, as the guided model's segmentation target.

Optionally refined first by an edge-aware filter (``pseudo_labels.refine``): OpenCV's guided
filter (``cv2.ximgproc``, from opencv-contrib) with the image as guide, which moves the map's
edges onto the image's own edges where a saliency map, computed at stride 8 to 32 and upsampled,
spills past the defect.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import cv2
import numpy as np
from pydantic import Field

from pipeline.core.artifacts import write_image
from pipeline.core.sections import Section

if TYPE_CHECKING:  # annotations only
    from pipeline.data.prepared import PreparedData


class PseudoLabelParams(Section):
    blur: int = Field(0, ge=0, le=51, description="odd Gaussian kernel applied before Otsu; 0 = none")
    true_masks: Annotated[int, Field(ge=0)] | Literal["all"] = Field(
        0, description="defective training images whose true mask replaces the pseudo-mask (mixed supervision)"
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="which images get their true masks")
    refine: Literal["none", "guided_filter"] = Field(
        "none", description="edge-aware filter on each defective image's map before Otsu, the image as guide"
    )
    refine_radius: int = Field(8, ge=1, le=256, description="guided filter: window radius in pixels")
    refine_eps: float = Field(
        1e-3, gt=0, le=1, description="guided filter: regularisation; image variance (in [0, 1]²) below it is smoothed"
    )


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


def refine_map(saliency: np.ndarray, image: np.ndarray, params: PseudoLabelParams) -> np.ndarray:
    """``saliency`` (H, W) in [0, 1], refined as ``params.refine`` says with the uint8 ``image``
    (H, W) as guide: unchanged for ``none``."""
    if params.refine == "none":
        return saliency
    guide = image.astype(np.float32) / 255.0
    # The output is locally a * guide + b fitted to the map: where the image has an edge within the
    # window, the map's transition moves onto it; on flat image regions it is a box blur.
    refined = cv2.ximgproc.guidedFilter(guide, saliency.astype(np.float32), params.refine_radius, params.refine_eps)
    return np.clip(refined, 0.0, 1.0)


def pseudo_mask(saliency: np.ndarray, label: int, blur: int = 0) -> np.ndarray:
    """The segmentation target of one training image: empty for a defect-free image."""
    if label == 0:
        return np.zeros(saliency.shape, dtype=bool)
    return otsu_mask(saliency, blur)


def write_fold_targets(
    data: PreparedData, fold: int, maps: np.ndarray, params: PseudoLabelParams, folder: Path
) -> tuple[list[np.ndarray], np.ndarray]:
    """Write the segmentation target of every row for ``fold``'s guided model into ``folder``:
    the Otsu pseudo-mask of its saliency map (N, H, W), or its true mask for the fold's
    mixed-supervision rows (``pseudo_labels.true_masks``), each map refined first as
    ``params.refine`` says. Returns the Otsu masks (before any true
    mask replaced one: what is scored) and those rows."""
    labels = data.index["label"].to_numpy()
    # Defect-free images get an empty mask whatever their map: refining theirs would be wasted.
    refined = [
        refine_map(saliency, data.images[i].numpy(), params) if labels[i] else saliency
        for i, saliency in enumerate(maps)
    ]
    masks = [pseudo_mask(saliency, label, params.blur) for saliency, label in zip(refined, labels)]
    true_rows = data.true_mask_rows(fold, params.true_masks, params.seed)
    targets = list(masks)
    for row in true_rows:
        true_mask = data.true_mask(row)
        assert true_mask is not None  # true_mask_rows picks only rows that have a true mask
        targets[row] = true_mask
    for image_id, mask in zip(data.index["id"], targets):
        write_image(folder / f"{image_id}.png", mask.astype(np.uint8) * 255)
    return masks, true_rows
