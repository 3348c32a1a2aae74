"""What each model learns from: the baseline's objective, and the guided one built on its Guidance.

The training loop (``pipeline.training.loop``) is the same for both models; an ``Objective`` carries
what differs: the per-image tensors a step needs besides the image, what the network reads, the
auxiliary loss and its weight λ(t) at epoch t, and the prior read at inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.config import GuidedParams
from pipeline.core.artifacts import read_json
from pipeline.core.layout import TRUE_MASKS
from pipeline.data.prepared import PreparedData
from pipeline.models.losses import AUXILIARY_LOSSES, BatchShare
from pipeline.models.networks import AuxiliaryMaps
from pipeline.models.variants import SALIENCY_MAPS, VARIANTS, Variant


@dataclass
class Guidance:
    """What the guided model of one fold learns from, for every row of the prepared index."""

    # What the network reads as its prior channel (N, H, W) in [0, 1]: the baseline's saliency
    # maps, for the variants that inject a prior; None for the others.
    model_prior: torch.Tensor | None
    # What the auxiliary loss pulls towards (N, H, W): the pseudo-masks, or for a variant whose
    # target is the saliency, the baseline's maps with true masks in their images' rows.
    loss_target: torch.Tensor


def consistency_targets(
    priors: torch.Tensor, targets: torch.Tensor, true_mask_rows: Sequence[int] | np.ndarray
) -> torch.Tensor:
    """The saliency maps with the true mask in place of the map of each of ``true_mask_rows``.

    Under mixed supervision the true mask must replace the saliency of its image wherever the
    loss reads the saliency, or Na would change nothing.
    """
    rows = torch.as_tensor(np.asarray(true_mask_rows, dtype=np.int64))
    if len(rows) == 0:
        return priors
    mixed = priors.clone()
    mixed[rows] = targets[rows]
    return mixed


def guidance_for(
    variant: Variant,
    saliency_maps: torch.Tensor,
    pseudo_masks: torch.Tensor,
    true_mask_rows: Sequence[int] | np.ndarray = (),
) -> Guidance:
    """What ``variant`` reads and targets, from the baseline's saliency maps and the pseudo-masks
    (N, H, W) of every row; ``true_mask_rows`` hold true masks in ``pseudo_masks`` (mixed supervision)."""
    target = pseudo_masks
    if variant.target == SALIENCY_MAPS:
        target = consistency_targets(saliency_maps, pseudo_masks, true_mask_rows)
    return Guidance(model_prior=saliency_maps if variant.injects_prior else None, loss_target=target)


def load_guidance(data: PreparedData, fold: int, variant: Variant, saliency: Path, pseudo_masks: Path) -> Guidance:
    """The Guidance of ``fold``'s guided model from the saliency and pseudo-label stages' folders."""
    every_row = np.arange(len(data.index))
    maps = data.load_maps(saliency / f"fold{fold}", every_row)
    masks = data.load_masks(pseudo_masks / f"fold{fold}", every_row)
    true_ids = read_json(pseudo_masks / TRUE_MASKS)[f"fold{fold}"]
    return guidance_for(variant, maps, masks, np.flatnonzero(data.index["id"].isin(true_ids)))


class Objective:
    """The baseline's: the image alone, the classification loss alone."""

    kind = "baseline"  # the saved model's config["kind"]

    def config(self) -> dict:
        """What else the saved model's config records about the objective."""
        return {}

    def training_config(self) -> dict:
        """What the network as trained reads beside ``config``: settings of training alone, which
        the deployed network does not need, so that its file does not record them."""
        return {}

    def step_tensors(self) -> dict[str, torch.Tensor]:
        """Per-row tensors (N, H, W) each step fetches beside the images, flipped with them."""
        return {}

    def seg_weight(self, epoch: int) -> float:
        return 0.0

    def network_prior(
        self, fetched: dict[str, torch.Tensor], generator: torch.Generator, size: int, rows: np.ndarray
    ) -> torch.Tensor | None:
        """The prior the network reads in a step of a global batch of ``size``; ``rows`` are this
        process's samples of it (``distributed.shard``)."""
        return None

    def forward(
        self, net: nn.Module, x: torch.Tensor, prior: torch.Tensor | None
    ) -> tuple[torch.Tensor, AuxiliaryMaps]:
        return net(x), None

    def auxiliary_loss(
        self, aux: AuxiliaryMaps, fetched: dict[str, torch.Tensor], labels: torch.Tensor, share: BatchShare
    ) -> torch.Tensor:
        return torch.zeros((), device=labels.device)

    def inference_priors(self, rows: np.ndarray) -> torch.Tensor | None:
        """What the trained model reads beside the images of ``rows`` at inference."""
        return None


class GuidedObjective(Objective):
    """The guided model's: its variant's inputs and auxiliary loss, weighted by λ(t)."""

    kind = "guided"

    def __init__(self, guidance: Guidance, params: GuidedParams) -> None:
        self.guidance, self.params = guidance, params
        self.variant = VARIANTS[params.variant]

    def config(self) -> dict:
        # Only where set: models saved before head_strides existed, and the default's, read alike.
        strides = {"head_strides": self.params.head_strides} if self.params.head_strides != [16] else {}
        return {"variant": self.variant.name, **strides}

    def training_config(self) -> dict:
        # Consistency deploys the baseline's graph whatever the strides of its Grad-CAMs.
        return {"cam_strides": self.params.cam_strides}

    def step_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"target": self.guidance.loss_target}
        if self.guidance.model_prior is not None:
            tensors["prior"] = self.guidance.model_prior
        return tensors

    def seg_weight(self, epoch: int) -> float:
        return seg_weight(epoch, self.params)

    def network_prior(
        self, fetched: dict[str, torch.Tensor], generator: torch.Generator, size: int, rows: np.ndarray
    ) -> torch.Tensor | None:
        prior = fetched.get("prior")
        if prior is not None and self.variant.drops_prior:
            # It will see no prior at inference: it must learn to do without one. Drawn for the
            # global batch, so the same images lose their prior whatever the processes.
            keep = torch.rand(size, generator=generator) >= self.params.prior_dropout
            prior = prior * keep[rows].view(-1, 1, 1, 1).to(prior.device)
        return prior

    def forward(
        self, net: nn.Module, x: torch.Tensor, prior: torch.Tensor | None
    ) -> tuple[torch.Tensor, AuxiliaryMaps]:
        return net(x, prior)

    def auxiliary_loss(
        self, aux: AuxiliaryMaps, fetched: dict[str, torch.Tensor], labels: torch.Tensor, share: BatchShare
    ) -> torch.Tensor:
        assert aux is not None  # the guided network always returns its auxiliary map
        loss = AUXILIARY_LOSSES[self.variant.target]
        # Heads on several strides (head_strides) or Grad-CAMs at several (cam_strides): each learns the same target.
        if isinstance(aux, list):
            return torch.stack([loss(m.float(), fetched["target"], labels, share) for m in aux]).mean()
        return loss(aux.float(), fetched["target"], labels, share)

    def inference_priors(self, rows: np.ndarray) -> torch.Tensor | None:
        if not self.variant.prior_at_inference:
            return None
        # A variant that reads a prior at inference injects one, so its Guidance has the maps.
        assert self.guidance.model_prior is not None
        return self.guidance.model_prior[rows]


def seg_weight(epoch: int, params: GuidedParams) -> float:
    """λ(t): the auxiliary loss weight for epoch t (0-based) of T."""
    if params.seg_weight_schedule == "constant":
        return params.seg_weight
    return params.seg_weight * (1.0 - epoch / params.epochs)
