"""A defect-free reference fused into the prior: PatchCore-style nearest-neighbour distances.

The baseline's own features at one layer (``saliency.reference_layer``; null = the backbone's
``reference_layer``) of a fold's defect-free TRAINING images form a memory bank of location
vectors, subsampled at random to ``saliency.reference_bank`` (seeded by the fold, so a rerun
gives the same maps). Each image's map is, per location, the distance to the nearest bank vector,
upsampled to the image size and min-max normalised: high where the image looks like no
defect-free surface the model was trained on. No new model and nothing downloaded; test images
never enter the bank, so a fold's test maps use nothing of its test set.

``fuse`` joins it with the CAM map into the prior (``saliency.reference_weight``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import InputError
from pipeline.data.prepared import PreparedData
from pipeline.data.training_data import batches, to_input
from pipeline.knowledge.saliency import normalise
from pipeline.models.networks import BACKBONES

# Query rows x bank vectors per ``torch.cdist`` call: 16M distances (64 MB in fp32) at a time.
DISTANCES_PER_CHUNK = 1 << 24


class _Reached(Exception):
    """Raised by the hook once the reference layer has run: the deeper layers are not needed."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output


def reference_layer(model: nn.Module, layer: str | None) -> str:
    """``layer``, or the model's backbone default where None; refused where the model lacks it."""
    if layer is None:
        backbone = getattr(model, "backbone_name", None)
        if backbone not in BACKBONES:
            raise InputError(f"no default saliency.reference_layer for backbone {backbone!r}: set one")
        layer = BACKBONES[backbone].reference_layer
    if layer not in dict(model.named_modules()):
        features = model.get_submodule("features") if hasattr(model, "features") else model
        names = ", ".join(f"features.{name}" for name, _ in features.named_children())
        raise InputError(f"saliency.reference_layer {layer!r} is not a layer of the model; its stages are {names}")
    return layer


@torch.no_grad()
def layer_features(
    model: nn.Module, layer: str, images: torch.Tensor, config: dict, batch_size: int
) -> Iterator[torch.Tensor]:
    """The output (B, C, h, w) of ``layer`` for uint8 images (N, H, W), batch by batch, in fp32.

    fp32 whatever ``model.precision``: bf16 features would add noise to the distances, and the
    forward stops at the layer (an exception from its hook), a fraction of the saliency's cost."""
    module = model.get_submodule(layer)
    device = next(model.parameters()).device

    def stop(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
        raise _Reached(output)

    handle = module.register_forward_hook(stop)
    try:
        for rows in batches(np.arange(len(images)), batch_size):
            x = to_input(images[rows], config["in_channels"], config["mean"], config["std"]).to(device)
            try:
                model(x)
            except _Reached as reached:
                output = reached.output
            else:
                raise InputError(f"saliency.reference_layer {layer!r} did not run in the model's forward")
            if not isinstance(output, torch.Tensor) or output.ndim != 4:
                raise InputError(f"saliency.reference_layer {layer!r} must output a (B, C, h, w) tensor")
            yield output.float()
    finally:
        handle.remove()


def _vectors(features: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B*h*w, C): one row per image location, images in order, row-major."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def memory_bank(
    model: nn.Module, layer: str, images: torch.Tensor, config: dict, size: int, seed: int, batch_size: int
) -> torch.Tensor:
    """``size`` location vectors (M, C) drawn uniformly without replacement from those of
    ``images`` (all of them where they are fewer). The draw is made once the first batch tells
    the locations per image, so only the chosen vectors are ever held: bounded memory."""
    generator = np.random.default_rng(seed)
    chosen: np.ndarray | None = None
    kept, offset = [], 0
    for features in layer_features(model, layer, images, config, batch_size):
        vectors = _vectors(features)
        if chosen is None:
            total = len(images) * features.shape[2] * features.shape[3]
            chosen = np.sort(generator.choice(total, size=min(size, total), replace=False))
        start, stop = np.searchsorted(chosen, [offset, offset + len(vectors)])
        kept.append(vectors[torch.from_numpy(chosen[start:stop] - offset).to(vectors.device)])
        offset += len(vectors)
    if not kept:
        raise InputError("the defect-free reference has no images: the fold has no defect-free training image")
    return torch.cat(kept)


def nearest_distances(features: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Per location of (B, C, h, w), the Euclidean distance (B, h, w) to the nearest bank vector."""
    queries = _vectors(features)
    chunk = max(1, DISTANCES_PER_CHUNK // len(bank))
    nearest = torch.cat([torch.cdist(part, bank).argmin(dim=1) for part in queries.split(chunk)])
    # cdist's matrix-product form is fast but loses digits (|q|² + |b|² − 2q·b); the exact distance
    # to the neighbour it found makes a location that equals a bank vector exactly 0.
    distances = (queries - bank[nearest]).norm(dim=1)
    return distances.view(features.shape[0], *features.shape[2:])


def distance_maps(
    model: nn.Module, layer: str, images: torch.Tensor, bank: torch.Tensor, config: dict, batch_size: int
) -> np.ndarray:
    """Nearest-bank distance maps (N, H, W) float32 at the image size, each min-max normalised
    to [0, 1]; a map of zeros where an image's locations all equal bank vectors."""
    maps = []
    for features in layer_features(model, layer, images, config, batch_size):
        distances = nearest_distances(features, bank)
        upsampled = F.interpolate(distances[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)
        maps.append(normalise(upsampled[:, 0])[0].cpu())
    if not maps:
        return np.zeros((0, *images.shape[-2:]), np.float32)
    return torch.cat(maps).numpy()


def fold_distance_maps(
    model: nn.Module, config: dict, data: PreparedData, fold: int, layer: str | None, bank_size: int, batch_size: int
) -> np.ndarray:
    """The distance maps (N, H, W) of every image of ``data`` against ``fold``'s reference: its
    defect-free training images (``data.split``), never a test image."""
    train, _ = data.split(fold)
    defect_free = train[data.index["label"].to_numpy()[train] == 0]
    layer = reference_layer(model, layer)
    # The bank's images pass through the layer twice, for the bank and for their own maps: a
    # fraction of the saliency's cost, where keeping every image's features would hold the whole
    # data set's feature maps (about 1 GB for KolektorSDD's layer1 at 256x704) at once.
    bank = memory_bank(model, layer, data.images[defect_free], config, bank_size, fold, batch_size)
    return distance_maps(model, layer, data.images, bank, config, batch_size)


def fuse(cam: np.ndarray, distance: np.ndarray, weight: float) -> np.ndarray:
    """The prior (N, H, W) from CAM maps and distance maps in [0, 1]: their weighted geometric
    mean cam^(1−w) · distance^w, min-max normalised per image (all zeros where it is zero).

    A geometric mean, not an arithmetic one: it is high only where both are, where the classifier
    looks AND the surface differs from defect-free ones. An arithmetic mean keeps the CAM's spill
    over normal surface and adds the reference's harmless texture outliers as a second, weaker
    peak, which Otsu then keeps or splits; the product suppresses both. ``weight`` 0 returns the
    CAM maps unchanged, 1 the distance maps alone (PatchCore)."""
    if weight == 0:
        return cam
    product = torch.from_numpy(cam).pow(1.0 - weight) * torch.from_numpy(distance).pow(weight)
    return normalise(product)[0].numpy()
