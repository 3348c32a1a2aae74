"""Running a trained model on prepared images: defect probabilities and segmentation maps."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.devices import FP32, Precision
from pipeline.data.training_data import batches, to_input
from pipeline.models.networks import GuidedClassifier


def _forward(model: nn.Module, x: torch.Tensor, prior: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(model, GuidedClassifier):
        return model(x, prior)
    return model(x), None


# The test-time views of a model saved with ``test_time_flips``: the image and the flips it
# trained with (``training_data.random_flips``: horizontal, vertical), as dims of (B, C, H, W).
TEST_TIME_FLIPS = ((), (-1,), (-2,))


def defect_probability(model: nn.Module, config: dict, x: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
    """The defect probability of each normalised input (B,), averaged over the flipped views where
    the model's config asks for them; the prior is flipped with its image."""
    views = TEST_TIME_FLIPS if config.get("test_time_flips", False) else ((),)
    probabilities = [
        torch.sigmoid(
            _forward(model, x.flip(dims) if dims else x, prior.flip(dims) if dims and prior is not None else prior)[
                0
            ].float()
        )
        for dims in views
    ]
    return torch.stack(probabilities).mean(dim=0)


@torch.no_grad()
def predict(
    model: nn.Module,
    config: dict,
    images: torch.Tensor,
    priors: torch.Tensor | None = None,
    batch_size: int = 32,
    precision: Precision = FP32,
) -> np.ndarray:
    """Defect probabilities for uint8 images (N, H, W); a model whose variant reads a prior at
    inference also needs priors (see ``model_files.inference_priors``).

    fp32 unless ``precision`` says otherwise: the evaluation, the release and the line score in
    fp32; the fast path (the model must already be in its memory format) serves monitoring."""
    device = next(model.parameters()).device
    model.eval()
    scores = []
    for batch in batches(np.arange(len(images)), batch_size):
        x = precision.input(to_input(images[batch], config["in_channels"], config["mean"], config["std"]).to(device))
        prior = priors[batch].unsqueeze(1).to(device) if priors is not None else None
        with precision.autocast(device):
            scores.append(defect_probability(model, config, x, prior).cpu())
    return torch.cat(scores).numpy()


@torch.no_grad()
def segment(
    model: GuidedClassifier, config: dict, images: torch.Tensor, priors: torch.Tensor | None, batch_size: int = 32
) -> np.ndarray:
    """The guided model's segmentation output, as probabilities at the image size (N, H, W)."""
    device = next(model.parameters()).device
    model.eval()
    outputs = []
    for batch in batches(np.arange(len(images)), batch_size):
        x = to_input(images[batch], config["in_channels"], config["mean"], config["std"]).to(device)
        _, seg_logits = model(x, priors[batch].unsqueeze(1).to(device) if priors is not None else None)
        probabilities = F.interpolate(
            torch.sigmoid(seg_logits.float()), size=images.shape[-2:], mode="bilinear", align_corners=False
        )
        outputs.append(probabilities[:, 0].cpu())
    return torch.cat(outputs).numpy()
