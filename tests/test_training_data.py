import numpy as np
import pytest
import torch

from pipeline.data.training_data import BalancedEpochs, flip_flags, random_flips, to_input


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


def test_hard_negatives_are_the_highest_scored_defect_free_images_beside_a_shorter_fresh_slice():
    labels = np.array([1] * 4 + [0] * 16)
    sampler = BalancedEpochs(labels, seed=2, hard_share=0.5)
    plain = BalancedEpochs(labels, seed=2)
    first = sampler.epoch(0)
    assert len(first) == len(set(first)) == plain.size == 8 and sorted(first[labels[first] == 1]) == [0, 1, 2, 3]
    # Every defect-free image scored once, images 10 and 17 highest (and 5: a defect does not count).
    sampler.record(np.arange(20), np.where(np.isin(np.arange(20), [2, 10, 17]), 5.0, -5.0))
    epoch = sampler.epoch(1)
    negatives = set(epoch[labels[epoch] == 0])
    fresh = BalancedEpochs(labels, seed=2, hard_share=0.5)  # what epoch 1's shorter fresh slice holds
    fresh.negative_scores[:] = -np.inf
    slice_only = set(fresh.epoch(1)[labels[fresh.epoch(1)] == 0]) - {10, 17}
    assert {10, 17} <= negatives and len(negatives) == 4 and len(set(epoch)) == 8
    assert len(slice_only & negatives) >= 2
    # The state: another sampler given it draws the same epochs; without it, others.
    restored = BalancedEpochs(labels, seed=2, hard_share=0.5)
    restored.load_state_dict(sampler.state_dict())
    sampler.record(np.arange(20), np.zeros(20))  # the state given is a copy
    assert np.array_equal(restored.epoch(1), epoch)
    assert not np.array_equal(BalancedEpochs(labels, seed=2, hard_share=0.5).epoch(1), epoch)


def test_hard_negatives_still_show_every_defect_free_image_over_the_run_and_need_undersampling():
    labels = np.array([1] * 4 + [0] * 12)
    sampler = BalancedEpochs(labels, seed=0, hard_share=0.5)
    sampler.record(np.arange(16), np.where(np.arange(16) == 4, 9.0, 0.0))
    seen = []
    for number in range(6):  # 2 fresh a epoch: the 12 are seen within 6 epochs however hard picks fall
        epoch = sampler.epoch(number)
        sampler.record(epoch, np.where(epoch == 4, 9.0, 0.0))  # image 4 always hardest
        seen.append(epoch)
    seen = np.concatenate(seen)
    assert set(seen[labels[seen] == 0]) == set(range(4, 16))
    assert (seen == 4).sum() == 6  # in every epoch: a hard negative where the fresh slice did not hold it
    with pytest.raises(ValueError, match="hard negatives need undersampled epochs"):
        BalancedEpochs(labels, seed=0, oversample=True, hard_share=0.5)
