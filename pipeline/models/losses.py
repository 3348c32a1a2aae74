"""The training losses: classification, and each variant's auxiliary loss.

Every loss is a mean over the samples of the global batch. With N training processes each holds
its term of that mean (``BatchShare``); in one process the term is the plain mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.models.variants import PSEUDO_MASKS, SALIENCY_MAPS


@dataclass(frozen=True)
class BatchShare:
    """One training process's part of a global batch (``distributed.shard``), for the losses.

    Each process's loss is its term of the global batch's mean, times the number of processes
    (DistributedDataParallel averages the gradients over them): the summed gradient is that of
    one process on the whole batch, padding and uneven shares included.
    """

    real: torch.Tensor  # (b,) 1.0 for this process's real samples, 0.0 for padding
    size: int  # samples in the global batch
    defective: int  # defective samples in the global batch
    processes: int

    def mean(self, losses: torch.Tensor, count: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """This process's term of a mean over ``count`` samples of the global batch; ``losses``
        is (b, ...) per sample (or per element of each sample: each sample's mean counts)."""
        if self.processes == 1:  # the whole batch, no padding: the plain mean, bit for bit
            return losses.mean()
        real = self.real if rows is None else self.real[rows]
        per_sample = losses.flatten(1).mean(dim=1) if losses.dim() > 1 else losses
        return (per_sample * real).sum() * (self.processes / count)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, share: BatchShare) -> torch.Tensor:
    return share.mean(F.binary_cross_entropy_with_logits(logits, labels, reduction="none"), share.size)


def pseudo_mask_loss(
    seg_logits: torch.Tensor, pseudo_masks: torch.Tensor, labels: torch.Tensor, share: BatchShare | None = None
) -> torch.Tensor:
    """BCE of the segmentation output S against the pseudo-masks' coverage of each cell."""
    share = share or single_process_share(labels)
    # A soft target in [0, 1]; the ignore: torch's stubs take no Size (a tuple[int, ...]) for output_size.
    target = F.adaptive_avg_pool2d(pseudo_masks, seg_logits.shape[-2:])  # type: ignore[arg-type]
    return share.mean(F.binary_cross_entropy_with_logits(seg_logits, target, reduction="none"), share.size)


def consistency_loss(
    cam: torch.Tensor, prior: torch.Tensor, labels: torch.Tensor, share: BatchShare | None = None
) -> torch.Tensor:
    """Distance between the model's Grad-CAM and the prior, over defective images only.

    ``cam`` is the model's Grad-CAM before its ReLU (``models.class_activation_map``); the prior
    is pooled to its resolution. Both are L2-normalised and compared by squared distance
    (attention transfer), so only where the model looks matters, not the map's scale. Defect-free
    images are left out for the reason their pseudo-masks are empty: there is nothing for the
    prior to point at.
    """
    defective = labels > 0.5
    if not defective.any():
        return cam.sum() * 0.0  # keeps the graph (and the loss's device) without a term
    # The ignore: torch's stubs take no Size (a tuple[int, ...]) for output_size.
    target = F.adaptive_avg_pool2d(prior[defective], cam.shape[-2:]).flatten(1)  # type: ignore[arg-type]
    own = cam[defective].flatten(1)
    own = own / own.norm(dim=1, keepdim=True).clamp_min(1e-8)
    target = target / target.norm(dim=1, keepdim=True).clamp_min(1e-8)
    distances = (own - target).pow(2).sum(dim=1)
    share = share or single_process_share(labels)
    return share.mean(distances, share.defective, rows=defective)


# The auxiliary loss of each kind of target (``Variant.target``).
AUXILIARY_LOSSES = {PSEUDO_MASKS: pseudo_mask_loss, SALIENCY_MAPS: consistency_loss}


def single_process_share(labels: torch.Tensor) -> BatchShare:
    """The share of a process that holds the whole batch (one process, or a test)."""
    return BatchShare(torch.ones_like(labels), len(labels), int(labels.sum()), 1)
