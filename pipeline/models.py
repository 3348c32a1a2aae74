"""Backbones, the baseline classifier and the knowledge-guided classifier.

Both models share one layout so saliency layer names mean the same thing in each:
``features`` is an ``nn.Sequential`` of the backbone's stages (torchvision's own names:
``features.layer4`` for resnet18, ``features.28`` for vgg16's last convolution), followed by
global average pooling and a linear layer giving one defect logit per image.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tv_models

BACKBONES = ("resnet18", "vgg16")

# Index in ``features`` where the stride-16 part ends: the guided model's segmentation head reads
# the stride-16 features, because stride 32 is too coarse for thin scratches.
_STRIDE16_SPLIT = {"resnet18": 7, "vgg16": 24}


def _resnet18_features(in_channels: int) -> tuple[nn.Sequential, int]:
    net = tv_models.resnet18(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    return nn.Sequential(OrderedDict((name, getattr(net, name)) for name in names)), 512


def _vgg16_features(in_channels: int) -> tuple[nn.Sequential, int]:
    layers = list(tv_models.vgg16(weights=None).features)
    if in_channels != 3:
        layers[0] = nn.Conv2d(in_channels, 64, kernel_size=3, padding=1)
    # The paper's VGG16 uses LeakyReLU; not in-place, so that saliency hooks see clean tensors.
    layers = [nn.LeakyReLU(0.01) if isinstance(m, nn.ReLU) else m for m in layers]
    return nn.Sequential(*layers), 512


def build_features(backbone: str, in_channels: int) -> tuple[nn.Sequential, int]:
    """Return the backbone's convolutional stages and their output channel count."""
    if backbone == "resnet18":
        return _resnet18_features(in_channels)
    if backbone == "vgg16":
        return _vgg16_features(in_channels)
    raise ValueError(f"unknown backbone {backbone!r}: choose one of {', '.join(BACKBONES)}")


class Classifier(nn.Module):
    """The baseline: backbone, global average pooling, one defect logit."""

    def __init__(self, backbone: str = "resnet18", in_channels: int = 1) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.in_channels = in_channels
        self.features, self.feature_dim = build_features(backbone, in_channels)
        self.fc = nn.Linear(self.feature_dim, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(images).mean(dim=(2, 3))).squeeze(1)


class GuidedClassifier(nn.Module):
    """The knowledge-guided model.

    F (stride-16 backbone features) is joined with the saliency prior H as an extra channel
    (F'); a segmentation head maps F' to S. The classifier sees the pooled deep features plus
    global max and average pooling of S and of H. S enters the classifier detached, so the
    classification loss sends no gradient into the segmentation head: the head learns from the
    pseudo-masks alone, and through it the shared backbone learns where defects are.
    """

    def __init__(self, backbone: str = "resnet18", in_channels: int = 1, seg_channels: int = 64) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.in_channels = in_channels
        self.features, self.feature_dim = build_features(backbone, in_channels)
        self.split = _STRIDE16_SPLIT[backbone]
        stem_channels = _output_channels(self.features[: self.split])
        self.seg_head = nn.Sequential(
            nn.Conv2d(stem_channels + 1, seg_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(seg_channels),
            nn.ReLU(),
            nn.Conv2d(seg_channels, seg_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(seg_channels),
            nn.ReLU(),
            nn.Conv2d(seg_channels, 1, kernel_size=1),
        )
        # Deep features plus max and mean of S and of the prior H.
        self.fc = nn.Linear(self.feature_dim + 4, 1)

    def forward(self, images: torch.Tensor, prior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (defect logit of shape (B,), segmentation logits S of shape (B, 1, h, w))."""
        stem = self.features[: self.split](images)
        prior_small = F.adaptive_avg_pool2d(prior, stem.shape[-2:])
        seg_logits = self.seg_head(torch.cat([stem, prior_small], dim=1))
        deep = self.features[self.split :](stem).mean(dim=(2, 3))
        seg_prob = torch.sigmoid(seg_logits).detach()
        pooled = torch.cat(
            [deep, _max_and_mean(seg_prob), _max_and_mean(prior_small)],
            dim=1,
        )
        return self.fc(pooled).squeeze(1), seg_logits


def _max_and_mean(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1)
    return torch.stack([flat.amax(dim=1), flat.mean(dim=1)], dim=1)


def _output_channels(module: nn.Module) -> int:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    last = convs[-1]
    # A residual stage ends in a block whose width is the block's conv width.
    return last.out_channels


def load_pretrained_features(model: nn.Module, weights_path: str | Path) -> None:
    """Load ImageNet (or other) backbone weights from a local file; never downloads.

    The file is a torchvision state dict for the backbone (e.g. ``resnet18-f37072fd.pth``).
    Keys are matched to ``features.*``; the classifier head is left as initialised.
    """
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained weights {path} not found: download the torchvision weights file for "
            f"{model.backbone_name} on a machine with internet access and place it at that path, "
            "or set pretrained_weights to null to train from scratch"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = model.features.state_dict()
    if model.backbone_name == "resnet18":
        renamed = {k: v for k, v in state.items() if k.split(".")[0] in own_prefixes(own)}
    else:
        renamed = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    mismatched = [k for k, v in renamed.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise ValueError(
            f"weights in {path} do not fit {model.backbone_name} with {model.in_channels} input "
            f"channel(s) (first mismatch: {mismatched[0]}); ImageNet weights need in_channels: 3"
        )
    missing = [k for k in own if k not in renamed]
    if missing:
        raise ValueError(f"weights in {path} lack {len(missing)} backbone tensors, e.g. {missing[0]}")
    model.features.load_state_dict(renamed)


def own_prefixes(state: dict[str, torch.Tensor]) -> set[str]:
    return {key.split(".")[0] for key in state}


class PriorAsChannel(nn.Module):
    """The guided model as a one-input network: the prior travels as the input's last channel.

    Saliency methods explain a model of one input; this view lets them explain the guided model
    with its prior fixed per image. Layer names gain the prefix ``guided.``.
    """

    def __init__(self, guided: GuidedClassifier) -> None:
        super().__init__()
        self.guided = guided
        self.backbone_name = guided.backbone_name

    def forward(self, images_and_prior: torch.Tensor) -> torch.Tensor:
        return self.guided(images_and_prior[:, :-1], images_and_prior[:, -1:])[0]
