import numpy as np

from pipeline.knowledge.pseudo_labels import otsu_mask, pseudo_mask


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
