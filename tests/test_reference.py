"""The defect-free reference (pipeline/knowledge/reference.py): nearest-neighbour distances to a
memory bank of the baseline's own features, and their fusion with the CAM map."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.core.devices import FP32
from pipeline.core.errors import InputError
from pipeline.data.prepared import PreparedData
from pipeline.knowledge.fold_maps import write_fold_maps
from pipeline.knowledge.reference import (
    distance_maps,
    fold_distance_maps,
    fuse,
    memory_bank,
    nearest_distances,
    reference_layer,
)
from pipeline.models.files import save_model
from pipeline.models.networks import Classifier

CONFIG = {"in_channels": 1, "mean": 0.5, "std": 0.25}
LAYER = "features.layer2"  # stride 8


@pytest.fixture(scope="module")
def model() -> Classifier:
    torch.manual_seed(0)
    return Classifier("resnet18", 1).eval()


def _texture(seed: int, size: int = 64) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(60, 190, (size, size), dtype=np.uint8))


def _maps(model: Classifier, references: torch.Tensor, images: torch.Tensor, bank_size: int = 10**6) -> np.ndarray:
    bank = memory_bank(model, LAYER, references, CONFIG, bank_size, seed=0, batch_size=1)
    return distance_maps(model, LAYER, images, bank, CONFIG, batch_size=1)


def test_an_image_equal_to_its_reference_has_a_zero_distance_map(model: Classifier) -> None:
    image = _texture(0)
    maps = _maps(model, torch.stack([_texture(1), image]), image[None])
    assert maps.shape == (1, 64, 64)
    assert not maps.any()


def test_the_distance_peaks_inside_the_one_patch_that_differs_from_the_reference(model: Classifier) -> None:
    reference = _texture(0)
    altered = reference.clone()
    patch = np.zeros((64, 64), bool)
    patch[24:48, 16:40] = True  # three feature locations wide at stride 8
    altered[torch.from_numpy(patch)] = 255
    (distance,) = _maps(model, reference[None], altered[None])
    assert patch[np.unravel_index(distance.argmax(), distance.shape)]
    assert distance.max() == pytest.approx(1.0)
    assert distance[patch].mean() > 2 * distance[~patch].mean()


def test_fusion_with_weight_zero_returns_the_cam_unchanged() -> None:
    cam = np.random.default_rng(0).random((2, 16, 16)).astype(np.float32)
    distance = np.random.default_rng(1).random((2, 16, 16)).astype(np.float32)
    assert fuse(cam, distance, 0.0) is cam
    # Weight 1 is the distance alone, min-max normalised.
    low, span = distance.min(axis=(1, 2), keepdims=True), np.ptp(distance, axis=(1, 2), keepdims=True)
    assert np.allclose(fuse(cam, distance, 1.0), (distance - low) / span, atol=1e-6)


def test_fusion_keeps_where_both_maps_are_high() -> None:
    cam = np.zeros((1, 8, 8), np.float32)
    cam[0, 2:6, 2:6] = 1.0  # the CAM's blob spills over two locations, 2 and 5
    distance = np.zeros((1, 8, 8), np.float32)
    distance[0, 3:5, 3:5] = 1.0  # the surface differs only at its centre
    distance[0, 7, 7] = 0.5  # a texture outlier the classifier ignores
    fused = fuse(cam, distance, 0.5)[0]
    assert fused[3:5, 3:5].min() == 1.0
    assert fused.sum() == 4.0


def test_the_bank_holds_the_requested_number_of_vectors_drawn_by_the_seed(model: Classifier) -> None:
    images = torch.stack([_texture(seed) for seed in range(3)])  # 3 images x 8 x 8 locations
    bank = memory_bank(model, LAYER, images, CONFIG, 50, seed=0, batch_size=2)
    assert bank.shape == (50, 128)
    # The same vectors whatever the batches (up to the convolutions' rounding, which varies with them).
    assert torch.allclose(bank, memory_bank(model, LAYER, images, CONFIG, 50, seed=0, batch_size=3), atol=1e-5)
    assert not torch.allclose(bank, memory_bank(model, LAYER, images, CONFIG, 50, seed=1, batch_size=2), atol=1e-5)
    assert memory_bank(model, LAYER, images, CONFIG, 10**6, seed=0, batch_size=2).shape == (192, 128)


def test_nearest_distances_match_a_brute_force_search() -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 4, 3, 5, generator=generator)
    bank = torch.randn(7, 4, generator=generator)
    queries = features.permute(0, 2, 3, 1).reshape(-1, 4)
    expected = torch.cdist(queries, bank, compute_mode="donot_use_mm_for_euclid_dist")
    assert torch.allclose(nearest_distances(features, bank), expected.amin(dim=1).view(2, 3, 5), atol=1e-5)


def test_only_the_folds_defect_free_training_images_enter_the_bank(model: Classifier) -> None:
    """The test image and a defective training image equal to it are not in the bank: the test
    image's map is not zero. Where it joins the training images as defect-free, it is."""
    reference, other = _texture(0), _texture(1)
    index = pd.DataFrame({"id": ["a", "b", "c"], "fold": [1, 1, 0], "label": [0, 1, 0]})
    data = PreparedData(None, index, torch.stack([reference, other, other]))  # type: ignore[arg-type]
    assert fold_distance_maps(model, CONFIG, data, 0, LAYER, 10**6, 2)[2].any()
    data.index["label"] = [0, 0, 0]
    assert not fold_distance_maps(model, CONFIG, data, 0, LAYER, 10**6, 1)[2].any()


def test_the_layer_defaults_per_backbone_and_an_unknown_one_is_refused_naming_the_key(model: Classifier) -> None:
    assert reference_layer(model, None) == "features.layer2"
    assert reference_layer(Classifier("vgg16", 1), None) == "features.22"
    with pytest.raises(InputError, match=r"saliency.reference_layer 'features.layer9'.*features.layer4"):
        reference_layer(model, "features.layer9")


def test_write_fold_maps_stores_the_fused_prior_the_stage_and_the_release_read(
    model: Classifier, tmp_path: Path
) -> None:
    images = torch.stack([_texture(seed, 32) for seed in range(4)])
    index = pd.DataFrame({"id": list("abcd"), "fold": [1, 1, 1, 0], "label": [0, 0, 1, 1]})
    data = PreparedData(tmp_path, index, images)
    file, cpu = tmp_path / "fold0.pt", torch.device("cpu")
    save_model(file, model, {"kind": "baseline", "backbone": "resnet18", "height": 32, "width": 32, **CONFIG})
    settings = SimpleNamespace(
        method="layercam", layers=None, batch_size=2, reference_weight=0.0, reference_layer=None, reference_bank=1000
    )
    cam, _, _ = write_fold_maps(data, 0, file, settings, FP32, cpu, tmp_path / "off")
    settings.reference_weight = 0.5
    maps, valid, _ = write_fold_maps(data, 0, file, settings, FP32, cpu, tmp_path / "on")
    expected = fuse(cam, fold_distance_maps(model, CONFIG, data, 0, None, 1000, 2), 0.5)
    assert expected.any() and not np.allclose(expected, cam)
    assert np.allclose(maps, expected, atol=1e-6)
    assert np.array_equal(valid, expected.reshape(4, -1).max(axis=1) > 0)
    stored = data.load_maps(tmp_path / "on" / "fold0", np.arange(4)).numpy()
    assert np.allclose(stored, maps, atol=1 / 65535)
