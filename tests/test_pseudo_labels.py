import numpy as np

from pipeline.knowledge.pseudo_labels import PseudoLabelParams, otsu_mask, pseudo_mask, refine_map
from pipeline.metrics.localization import mask_iou


def test_otsu_separates_a_bright_blob_from_the_background():
    saliency = np.full((32, 32), 0.1)
    saliency[10:16, 20:26] = 0.9
    mask = otsu_mask(saliency)
    assert mask[10:16, 20:26].all()
    assert mask.sum() == 36


def test_defect_free_images_get_an_empty_mask_whatever_the_map():
    saliency = np.random.default_rng(0).random((16, 16))
    assert not pseudo_mask(saliency, label=0).any()
    assert pseudo_mask(saliency, label=1).any()


def test_flat_or_zero_map_gives_an_empty_mask():
    assert not otsu_mask(np.zeros((8, 8))).any()
    assert not otsu_mask(np.full((8, 8), 0.7)).any()


def test_blur_smooths_isolated_pixels_away():
    saliency = np.zeros((32, 32))
    saliency[8:20, 8:20] = 0.8
    saliency[30, 2] = 1.0  # a single hot pixel
    assert otsu_mask(saliency)[30, 2]
    assert not otsu_mask(saliency, blur=5)[30, 2]


def _bright_rectangle() -> tuple[np.ndarray, np.ndarray]:
    """A gray image (uint8) with a bright rectangle, and the rectangle as a mask."""
    rectangle = np.zeros((64, 64), bool)
    rectangle[20:40, 16:40] = True
    image = np.full((64, 64), 60.0) + np.random.default_rng(0).normal(0, 5, (64, 64))
    image[rectangle] = 200
    return np.clip(image, 0, 255).astype(np.uint8), rectangle


def test_the_guided_filter_moves_the_mask_onto_the_image_edges():
    image, rectangle = _bright_rectangle()
    rows, cols = np.mgrid[:64, :64]
    # A blurred blob over the rectangle, off its centre and spilling past its edges.
    saliency = np.exp(-((rows - 32) ** 2 + (cols - 30) ** 2) / (2 * 12**2))
    refined = refine_map(saliency, image, PseudoLabelParams(refine="guided_filter", refine_radius=8, refine_eps=1e-3))
    plain_iou = mask_iou(otsu_mask(saliency), rectangle)
    refined_iou = mask_iou(otsu_mask(refined), rectangle)
    assert plain_iou < 0.6
    assert refined_iou > plain_iou + 0.2
    assert refined.min() >= 0.0 and refined.max() <= 1.0


def test_no_refinement_is_the_map_itself():
    image, _ = _bright_rectangle()
    saliency = np.random.default_rng(1).random((64, 64))
    assert refine_map(saliency, image, PseudoLabelParams()) is saliency
