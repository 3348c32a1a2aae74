"""What the training loop feeds on: balanced epochs, batches, random flips and the DataLoader.

Everything here is deterministic for a seed and an epoch number, so that a resumed run and a run
on several processes draw what an uninterrupted single-process run draws. ``to_input`` (the
images' normalisation) serves inference too.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from pipeline.core.errors import InputError


def to_input(images: torch.Tensor, in_channels: int, mean: float, std: float) -> torch.Tensor:
    """uint8 (B, H, W) -> normalised float (B, C, H, W); gray is replicated for 3-channel models."""
    x = (images.float() / 255.0 - mean) / std
    return x.unsqueeze(1).expand(-1, in_channels, -1, -1).contiguous()


def pixel_stats(images: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation of the training pixels, stored with each model."""
    x = images.float() / 255.0
    return float(x.mean()), float(x.std().clamp_min(1e-3))


class BalancedEpochs:
    """Epochs of as many defective as defect-free images, deterministic for a seed; the state is
    the epoch number alone, which lets an interrupted run resume with the same order.

    Defects are rare, so a plain epoch would teach the model that everything is fine. Two ways
    to balance (``TrainParams.sampling``):
    undersample: every defective image once and a fresh slice of as many defect-free ones, so all
    of these are seen over the run: short epochs, whose number of steps does not grow with the
    defect-free images.
    oversample: every image once and the defective ones repeated to as many as the defect-free
    ones: an epoch is a pass over the whole training set, as a plain epoch is, so a larger data
    set trains longer.

    Hard negatives (undersampled epochs, ``hard_share`` > 0): that share of an epoch's defect-free
    images are those the classifier scored highest when it last saw them (``record``), among the
    ones the fresh slice left out; an image not yet seen counts as hardest. The rest is the fresh
    slice, shorter by as many, so every defect-free image is still seen over the run. The scores
    are then part of the state (``state_dict``): a resumed run needs them to draw the same epochs.
    Several training processes gather every process's share of the scores and so draw the same
    epochs; those equal one process's up to float rounding, which can swap two near-equal scores.
    """

    def __init__(self, labels: np.ndarray, seed: int, oversample: bool = False, hard_share: float = 0.0) -> None:
        self.positives = np.flatnonzero(labels == 1)
        self.negatives = np.flatnonzero(labels == 0)
        if len(self.positives) == 0 or len(self.negatives) == 0:
            raise InputError(
                f"training needs both classes; got {len(self.positives)} defective and "
                f"{len(self.negatives)} defect-free images: check the data set and its folds"
            )
        if oversample and hard_share:
            raise InputError(
                "hard negatives need undersampled epochs: an oversampled epoch holds every defect-free image already"
            )
        self.seed = seed
        self.oversample = oversample
        self.hard_share = hard_share
        self.negative_scores = np.full(len(self.negatives), np.inf)  # the last logit of each defect-free image
        self._negative_slot = np.full(len(labels), -1)
        self._negative_slot[self.negatives] = np.arange(len(self.negatives))

    @property
    def size(self) -> int:
        """Images in every epoch."""
        if self.oversample:
            return 2 * max(len(self.positives), len(self.negatives))
        return len(self.positives) + min(len(self.positives), len(self.negatives))

    def steps(self, batch_size: int) -> int:
        """Optimiser steps in every epoch (the last batch may be short)."""
        return math.ceil(self.size / batch_size)

    def epoch(self, number: int) -> np.ndarray:
        if self.oversample:
            count = max(len(self.positives), len(self.negatives))
            chosen = np.concatenate(
                [
                    _cycled(self.positives, count, number, [self.seed, 1]),
                    _cycled(self.negatives, count, number, [self.seed, 0]),
                ]
            )
        else:
            per_epoch = min(len(self.positives), len(self.negatives))
            hard = round(self.hard_share * per_epoch)
            fresh = _cycled(self.negatives, per_epoch - hard, number, [self.seed])
            chosen = np.concatenate([self.positives, fresh, self._hardest(hard, fresh, number)])
        return np.random.default_rng([self.seed, number, 7]).permutation(chosen)

    def _hardest(self, count: int, taken: np.ndarray, number: int) -> np.ndarray:
        """The ``count`` defect-free images outside ``taken`` with the highest last scores; ties
        (images not yet seen) in an order seeded by the epoch."""
        if count == 0:
            return self.negatives[:0]
        slots = np.setdiff1d(np.arange(len(self.negatives)), self._negative_slot[taken])
        tiebreak = np.random.default_rng([self.seed, number, 3]).permutation(len(slots))
        # lexsort orders by its last key first: highest score, then the seeded tiebreak.
        return self.negatives[slots[np.lexsort((tiebreak, -self.negative_scores[slots]))[:count]]]

    def record(self, positions: np.ndarray, logits: np.ndarray) -> None:
        """The classifier's training logits for the images at ``positions`` (of the labels given):
        the defect-free ones' become their last scores."""
        slots = self._negative_slot[positions]
        negative = slots >= 0
        self.negative_scores[slots[negative]] = logits[negative]

    def state_dict(self) -> dict[str, torch.Tensor]:
        # A tensor: checkpoints load with torch.load(weights_only=True), which refuses numpy arrays.
        return {"negative_scores": torch.from_numpy(self.negative_scores.copy())}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.negative_scores = state["negative_scores"].numpy().astype(float)


def _cycled(indices: np.ndarray, count: int, number: int, seed: list[int]) -> np.ndarray:
    """The ``number``-th run of ``count`` items of an endless sequence of seeded permutations of
    ``indices``: every item once per permutation, whatever the run length."""
    cycle, offset = divmod(number * count, len(indices))
    orders: list[np.ndarray] = []
    while len(orders) * len(indices) < offset + count:
        orders.append(np.random.default_rng([*seed, cycle + len(orders)]).permutation(indices))
    return np.concatenate(orders)[offset : offset + count]


def batches(positions: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(positions), batch_size):
        yield positions[start : start + batch_size]


def random_flips(generator: torch.Generator, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Flip each sample horizontally and vertically at random, identically in every tensor.

    Tensors are (B, ..., H, W); image, prior and pseudo-mask of one sample flip together.
    """
    return apply_flips(flip_flags(generator, tensors[0].shape[0]), *tensors)


def flip_flags(generator: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which samples of a batch flip horizontally and which vertically.

    Drawn for the whole global batch in every training process, so that the flips (and the
    generator's state after them) do not depend on how many processes share the batch.
    """
    flip_w = torch.rand(batch, generator=generator) < 0.5
    flip_h = torch.rand(batch, generator=generator) < 0.5
    return flip_w, flip_h


def apply_flips(flags: tuple[torch.Tensor, torch.Tensor], *tensors: torch.Tensor) -> list[torch.Tensor]:
    flip_w, flip_h = flags
    flipped = []
    for tensor in tensors:
        tensor = torch.where(_expand(flip_w, tensor), tensor.flip(-1), tensor)
        tensor = torch.where(_expand(flip_h, tensor), tensor.flip(-2), tensor)
        flipped.append(tensor)
    return flipped


class TrainingBatches(torch.utils.data.Dataset):
    """The training tensors of one fold, fetched a whole batch of row positions at a time.

    A ``torch.utils.data.DataLoader`` over it (``loader``) builds the normalised inputs in
    ``model.num_workers`` worker processes and can pin them for the copy to a GPU. The random
    flips stay in the training loop: they come from one generator whose sequence must not depend
    on the workers, so results are the same for any number of them. ``extras`` are per-row maps
    (N, H, W) a step needs beside the images (``objectives.Objective.step_tensors``).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        in_channels: int,
        mean: float,
        std: float,
        extras: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.images, self.labels, self.extras = images, labels, extras or {}
        self.in_channels, self.mean, self.std = in_channels, mean, std

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        batch = {
            "x": to_input(self.images[positions], self.in_channels, self.mean, self.std),
            "y": self.labels[positions],
        }
        for name, maps in self.extras.items():
            batch[name] = maps[positions].unsqueeze(1)
        return batch

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__(np.array([position])).items()}


class EpochBatches(torch.utils.data.Sampler):
    """The batches of row positions of the current epoch; the loop sets them before each epoch
    (the sampler is iterated in the main process, so persistent workers see the new ones)."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _whole_batch(batch: Any) -> dict[str, torch.Tensor]:
    # Any: DataLoader types a collate_fn's argument as a list of samples, but here it is the dict
    return batch  # ``__getitems__`` returns the batch already stacked


def loader(dataset: TrainingBatches, num_workers: int = 0, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader yielding the batches its ``batch_sampler`` (an ``EpochBatches``) holds."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=EpochBatches(),
        collate_fn=_whole_batch,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


def _expand(flags: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return flags.view(-1, *([1] * (like.dim() - 1)))
