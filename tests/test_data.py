import numpy as np
import pytest
import torch

from pipeline.training_data import BalancedEpochs, flip_flags, random_flips, to_input


def test_balanced_epoch_holds_every_defect_and_as_many_defect_free_images():
    labels = np.array([1] * 5 + [0] * 23)
    sampler = BalancedEpochs(labels, seed=3)
    epoch = sampler.epoch(0)
    assert sorted(epoch[labels[epoch] == 1]) == list(range(5))
    assert (labels[epoch] == 0).sum() == 5
    assert len(set(epoch)) == 10


def test_balanced_epochs_cycle_through_all_defect_free_images_and_repeat_for_a_seed():
    labels = np.array([1] * 4 + [0] * 12)
    sampler = BalancedEpochs(labels, seed=0)
    seen = np.concatenate([sampler.epoch(e) for e in range(3)])
    assert set(seen[labels[seen] == 0]) == set(range(4, 16))
    assert np.array_equal(sampler.epoch(5), BalancedEpochs(labels, seed=0).epoch(5))
    assert not np.array_equal(sampler.epoch(5), BalancedEpochs(labels, seed=1).epoch(5))


def test_training_without_one_class_is_refused():
    with pytest.raises(ValueError, match="both classes"):
        BalancedEpochs(np.zeros(10, dtype=int), seed=0)


def test_flips_move_image_prior_and_mask_together():
    image = torch.arange(64 * 1 * 4 * 5, dtype=torch.float32).view(64, 1, 4, 5)
    mask = image * 2 + 1  # another tensor with the same layout: it must flip exactly as the image
    flip_w, flip_h = flip_flags(torch.Generator().manual_seed(1), len(image))
    assert 0 < flip_w.sum() < len(image) and 0 < flip_h.sum() < len(image)  # some flip, some do not
    flipped_image, flipped_mask = random_flips(torch.Generator().manual_seed(1), image, mask)
    assert torch.equal(flipped_mask, flipped_image * 2 + 1)
    for sample in range(len(image)):
        expected = image[sample]
        expected = expected.flip(-1) if flip_w[sample] else expected
        expected = expected.flip(-2) if flip_h[sample] else expected
        assert torch.equal(flipped_image[sample], expected), sample


def test_to_input_normalises_and_replicates_gray_for_three_channel_models():
    images = torch.full((2, 3, 3), 255, dtype=torch.uint8)
    x = to_input(images, in_channels=3, mean=0.5, std=0.25)
    assert x.shape == (2, 3, 3, 3)
    assert torch.allclose(x, torch.full_like(x, 2.0))


def test_oversampled_epoch_holds_every_image_and_repeats_the_defects_evenly():
    labels = np.array([1] * 5 + [0] * 23)
    sampler = BalancedEpochs(labels, seed=3, oversample=True)
    epochs = [sampler.epoch(number) for number in range(5)]
    for epoch in epochs:
        assert len(epoch) == sampler.size == 46
        assert sorted(epoch[labels[epoch] == 0]) == list(range(5, 28))  # each defect-free image once
        assert np.bincount(epoch[labels[epoch] == 1], minlength=5).min() >= 3  # 23 draws, ~4.6 each
    seen = np.concatenate(epochs)
    assert list(np.bincount(seen[labels[seen] == 1])) == [23] * 5  # evenly over the run: 5 x 23 draws
    assert np.array_equal(sampler.epoch(2), BalancedEpochs(labels, seed=3, oversample=True).epoch(2))
    assert not np.array_equal(sampler.epoch(2), sampler.epoch(3))
    undersampled = BalancedEpochs(labels, seed=3)
    assert undersampled.size == len(undersampled.epoch(0)) == 10
