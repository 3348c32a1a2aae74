"""Backbones, the baseline classifier and the knowledge-guided classifier.

Both models share one layout so saliency layer names mean the same thing in each:
``features`` is an ``nn.Sequential`` of the backbone's stages (torchvision's own names:
``features.layer4`` for resnet18, ``features.28`` for vgg16's last convolution), followed by
global average pooling and a linear layer giving one defect logit per image.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tv_models

from pipeline.core.distributed import SyncedBatchNorm
from pipeline.core.errors import InputError, MissingInputError
from pipeline.models.variants import LEGACY_VARIANT, VARIANTS, Variant


def _resnet18_features(in_channels: int) -> tuple[nn.Sequential, int]:
    net = tv_models.resnet18(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    return nn.Sequential(OrderedDict((name, getattr(net, name)) for name in names)), 512


def _vgg16_features(in_channels: int) -> tuple[nn.Sequential, int]:
    # Only the convolutional part: torchvision's full vgg16 also builds (and initialises) a
    # 120M-parameter classifier that is thrown away, seconds per model on a CPU.
    layers = list(tv_models.vgg.make_layers(tv_models.vgg.cfgs["D"]))
    if in_channels != 3:
        layers[0] = nn.Conv2d(in_channels, 64, kernel_size=3, padding=1)
    # The paper's VGG16 uses LeakyReLU; not in-place, so that saliency hooks see clean tensors.
    layers = [nn.LeakyReLU(0.01) if isinstance(m, nn.ReLU) else m for m in layers]
    for module in layers:  # torchvision's VGG initialisation
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            assert module.bias is not None  # every convolution here is built with a bias
            nn.init.zeros_(module.bias)
    return nn.Sequential(*layers), 512


# What a guided network returns beside its logit: segmentation logits S or its own Grad-CAM, one
# map per head or per Grad-CAM stride where it has several; None for the baseline.
AuxiliaryMaps = torch.Tensor | list[torch.Tensor] | None

# The strides guidance reads: those where a backbone's ``splits`` end its finer parts, and the
# deep features' (the last layer, which the classifier pools).
SPLIT_STRIDES = (4, 8, 16)
DEEP_STRIDE = 32
CAM_STRIDES = (*SPLIT_STRIDES, DEEP_STRIDE)


@dataclass(frozen=True)
class Backbone:
    name: str
    build: Callable[[int], tuple[nn.Sequential, int]]  # in_channels -> (features, output channels)
    # Index in ``features`` where the stride-4, -8 and -16 parts end: the guided model's
    # segmentation head reads the stride-16 features (stride 32 is too coarse for thin scratches),
    # extra heads the finer ones (``train_guided.head_strides``); consistency's Grad-CAMs below
    # the last layer read them too (``train_guided.cam_strides``). Keys: ``SPLIT_STRIDES``.
    splits: dict[int, int]
    # Default saliency layers per method (``saliency.layers: null``), named as in ``features``;
    # FullGrad needs none: it uses every layer with a bias.
    saliency_layers: dict[str, list[str]]
    # The layer whose features the defect-free reference compares (``saliency.reference_layer:
    # null``): stride 8, mid-level as PatchCore's, local enough for small defects and less
    # sensitive to pixel noise than the first stages.
    reference_layer: str
    # Where torchvision's weights file keeps the layers of ``features``: resnet18's at the top
    # level (``layer1.0.conv1.weight``, with fc beside them), vgg16's under ``features.``.
    torchvision_prefix: str = ""

    @property
    def stride16_split(self) -> int:
        return self.splits[16]


# fmt: off
BACKBONES: dict[str, Backbone] = {b.name: b for b in (
    Backbone("resnet18", _resnet18_features, splits={4: 5, 8: 6, 16: 7},
             saliency_layers={"gradcam": ["features.layer4"], "fullgrad": [],
                              "layercam": ["features.layer2", "features.layer3", "features.layer4"]},
             reference_layer="features.layer2"),
    # The paper's network: convolutional part only, LeakyReLU; LayerCAM on conv3_3, conv4_3, conv5_3.
    Backbone("vgg16", _vgg16_features, splits={4: 10, 8: 17, 16: 24},
             saliency_layers={"gradcam": ["features.29"], "fullgrad": [],
                              "layercam": ["features.15", "features.22", "features.29"]},
             reference_layer="features.22", torchvision_prefix="features."),
)}
# fmt: on


def build_features(backbone: str, in_channels: int) -> tuple[nn.Sequential, int]:
    """Return the backbone's convolutional stages and their output channel count."""
    if backbone not in BACKBONES:
        raise InputError(f"unknown backbone {backbone!r}: choose one of {', '.join(BACKBONES)}")
    return BACKBONES[backbone].build(in_channels)


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
    """The knowledge-guided model, as trained; ``deployable()`` gives what inference needs.

    teacher / none: F (stride-16 backbone features) is joined with the prior H, resized, as an
    extra channel: F' = [F, H]. A segmentation head maps F' to S. The classifier reads the
    globally average-pooled deep (stride-32) features plus global max and average pooling of S
    and of every channel of F'. S enters the classifier detached, so the classification loss
    sends no gradient into the segmentation head: the head learns from the pseudo-masks alone,
    and through it the shared backbone learns where defects are.
    no_injection: the head reads F alone; the classifier is the baseline's (pooled deep
    features, one linear layer). consistency: no head; the second output is the model's own
    Grad-CAM of its last layer, differentiable (see ``class_activation_map``), or with
    ``cam_strides`` its Grad-CAM of the features at each of those strides (``gradient_cams``).
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        in_channels: int = 1,
        variant: str = LEGACY_VARIANT,
        seg_channels: int = 64,
        head_strides: Sequence[int] = (16,),
        cam_strides: Sequence[int] = (DEEP_STRIDE,),
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise InputError(f"unknown guided variant {variant!r}: choose one of {', '.join(VARIANTS)}")
        self.backbone_name = backbone
        self.in_channels = in_channels
        self.variant: Variant = VARIANTS[variant]
        self.injects_prior = self.variant.injects_prior
        self.features, self.feature_dim = build_features(backbone, in_channels)
        splits = BACKBONES[backbone].splits
        self.split = splits[16]
        stem_channels = _output_channels(self.features[: self.split])
        self.seg_head: nn.Module | None = None
        if self.variant.has_head:
            self.seg_head = _segmentation_head(stem_channels + self.injects_prior, seg_channels)
        # Multi-scale guidance: a head on each finer stride too, trained on the same pseudo-masks.
        finer = sorted(stride for stride in head_strides if stride != 16)
        if finer and not self.variant.has_finer_heads:
            raise InputError(
                f"head_strides {list(head_strides)}: only a variant with a head and no injected prior "
                f"(no_injection) has heads on finer strides; {self.variant.name} reads stride 16 alone"
            )
        self.fine_splits = [splits[stride] for stride in finer]
        self.fine_heads = nn.ModuleList(
            _segmentation_head(_output_channels(self.features[:split]), seg_channels) for split in self.fine_splits
        )
        # Multi-depth consistency: its own Grad-CAM at finer strides too, each pulled towards the prior.
        if list(cam_strides) != [DEEP_STRIDE] and not self.variant.learns_own_grad_cam:
            raise InputError(
                f"cam_strides {list(cam_strides)}: only a variant without a head (consistency) learns from "
                f"its own Grad-CAM; {self.variant.name} learns from its head's pseudo-masks"
            )
        self.cam_splits = [splits[stride] for stride in sorted(cam_strides) if stride != DEEP_STRIDE]
        self.deep_cam = DEEP_STRIDE in cam_strides
        # Injecting variants: max and mean of S (2) and of each channel of F' (2 per channel).
        extra = 2 + 2 * (stem_channels + 1) if self.injects_prior else 0
        # Normalised before the linear layer: the pooled F' is 500+ values, its maxima ~5x the
        # deep features' scale, and unnormalised SGD at the baseline's learning rate oscillated
        # (KolektorSDD: loss between 1 and 8, test AP about 0.3 where the baseline had 0.9).
        self.guidance_norm = nn.BatchNorm1d(extra) if extra else None
        self.fc = nn.Linear(self.feature_dim + extra, 1)

    def forward(self, images: torch.Tensor, prior: torch.Tensor | None = None) -> tuple[torch.Tensor, AuxiliaryMaps]:
        """Return (defect logit (B,), auxiliary map (B, 1, h, w)): segmentation logits S (with heads
        on finer strides, a list of them, finest first), or for consistency the Grad-CAM before its
        ReLU. ``prior`` (B, 1, H, W) in [0, 1]: required by teacher, zeros when None for none,
        ignored by the others."""
        if self.seg_head is None:  # the auxiliary maps are its own Grad-CAM
            return self._with_grad_cams(images)
        *fine, stem, deep_map = self._through(images, [*self.fine_splits, self.split])
        deep = deep_map.mean(dim=(2, 3))
        if not self.injects_prior:
            logit = self.fc(deep).squeeze(1)
            if fine:  # one map per stride, finest first
                return logit, [*(head(f) for head, f in zip(self.fine_heads, fine)), self.seg_head(stem)]
            return logit, self.seg_head(stem)
        if prior is None:
            if self.variant.prior_at_inference:
                raise InputError("the teacher variant needs the baseline's saliency map as prior at inference")
            prior = stem.new_zeros(stem.shape[0], 1, *stem.shape[-2:])
        # F'; the ignore: torch's stubs take no Size (a tuple[int, ...]) for output_size.
        joined = torch.cat([stem, F.adaptive_avg_pool2d(prior, stem.shape[-2:])], dim=1)  # type: ignore[arg-type]
        assert self.seg_head is not None  # every variant that injects the prior has a head
        seg_logits = self.seg_head(joined)
        guidance = torch.cat(
            [_max_and_mean(torch.sigmoid(seg_logits).detach()), joined.amax(dim=(2, 3)), joined.mean(dim=(2, 3))], dim=1
        )
        return self.fc(torch.cat([deep, self._normalise(guidance)], dim=1)).squeeze(1), seg_logits

    def _through(self, images: torch.Tensor, splits: Sequence[int]) -> list[torch.Tensor]:
        """The features where each of ``splits`` (ascending indices of ``features``) ends, then the deep ones."""
        outputs, start, x = [], 0, images
        for split in [*splits, len(self.features)]:
            x = self.features[start:split](x)
            outputs.append(x)
            start = split
        return outputs

    def _with_grad_cams(self, images: torch.Tensor) -> tuple[torch.Tensor, AuxiliaryMaps]:
        """The logit and the model's own Grad-CAM at each of its ``cam_strides``, finest first;
        without autograd (inference: the test fold's monitoring reads the logit alone), the last
        layer's only, which needs none."""
        splits = self.cam_splits if torch.is_grad_enabled() else []
        *tapped, deep_map = self._through(images, splits)
        logit = self.fc(deep_map.mean(dim=(2, 3))).squeeze(1)
        maps = gradient_cams(logit, tapped) if tapped else []
        if self.deep_cam or not maps:
            maps.append(class_activation_map(deep_map, self.fc))
        return logit, maps if len(maps) > 1 else maps[0]

    def _normalise(self, guidance: torch.Tensor) -> torch.Tensor:
        norm = self.guidance_norm
        assert norm is not None  # only injecting variants normalise guidance, and they have extra inputs
        # One image has no batch statistics: use the running ones. A SyncedBatchNorm decides
        # that itself, from the global batch: one process's single image may be one of many.
        if self.training and guidance.shape[0] == 1 and not isinstance(norm, SyncedBatchNorm):
            return F.batch_norm(guidance, norm.running_mean, norm.running_var, norm.weight, norm.bias, eps=norm.eps)
        return norm(guidance)

    def deployable(self) -> nn.Module:
        """The network inference needs: itself where the classifier reads S; otherwise a
        ``Classifier`` sharing the backbone and the linear layer (the baseline's graph)."""
        if not self.variant.deploys_baseline_graph:
            return self
        with torch.device("meta"):  # no allocation: the tensors are assigned just below
            deployed = Classifier(self.backbone_name, self.in_channels)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith(("seg_head.", "fine_heads."))}
        deployed.load_state_dict(state, assign=True)
        return deployed.train(self.training)


def _segmentation_head(in_channels: int, channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, 1, kernel_size=1),
    )


def class_activation_map(features: torch.Tensor, fc: nn.Linear) -> torch.Tensor:
    """Grad-CAM of the last layer before its ReLU, (B, 1, h, w), differentiable in the features
    and the weights.

    For global average pooling followed by one linear layer, d(logit)/dA_c(i, j) = w_c / (h w)
    everywhere, so Grad-CAM's channel weights are w_c / (h w) and its map is
    ReLU(sum_c w_c A_c) / (h w): what ``autograd.grad(..., create_graph=True)`` would build,
    without the double backward (the tests check the two agree). The ReLU is left out: where
    the map is negative everywhere (often, on an untrained model) it would pass no gradient.
    """
    height, width = features.shape[-2:]
    return torch.einsum("c,bchw->bhw", fc.weight[0], features).unsqueeze(1) / (height * width)


def gradient_cams(logit: torch.Tensor, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Grad-CAM of ``logit`` (B,) on each of ``features`` (B, C, h, w) before its ReLU (as
    ``class_activation_map``), (B, 1, h, w) each: channel weights w_c = the spatial mean of
    d(logit)/dA_c, map = sum_c w_c A_c.

    The maps are differentiable in the weights through the gradient as well (``create_graph``),
    so a loss on them trains the backbone below and above the features. The gradient is
    that of the batch's summed logit: in training mode, batch normalisation lets an image's
    features move the other images' logits too, and those terms count.
    """
    grads = torch.autograd.grad(logit.sum(), list(features), create_graph=True)
    return [(grad.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1, keepdim=True) for grad, a in zip(grads, features)]


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
        raise MissingInputError(
            f"pretrained weights {path} not found: download the torchvision weights file for "
            f"{model.backbone_name} on a machine with internet access and place it at that path, "
            "or set pretrained_weights to null to train from scratch"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    # nn.Module types attribute access as Tensor | Module; these are the model's features and its name.
    features = cast(nn.Module, model.features)
    own = features.state_dict()
    prefix = BACKBONES[cast(str, model.backbone_name)].torchvision_prefix
    renamed = {
        k.removeprefix(prefix): v
        for k, v in state.items()
        if k.startswith(prefix) and k.removeprefix(prefix).split(".")[0] in own_prefixes(own)
    }
    mismatched = [k for k, v in renamed.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise InputError(
            f"weights in {path} do not fit {model.backbone_name} with {model.in_channels} input "
            f"channel(s) (first mismatch: {mismatched[0]}); ImageNet weights need in_channels: 3"
        )
    missing = [k for k in own if k not in renamed]
    if missing:
        raise InputError(f"weights in {path} lack {len(missing)} backbone tensors, e.g. {missing[0]}")
    features.load_state_dict(renamed)


def own_prefixes(state: dict[str, torch.Tensor]) -> set[str]:
    return {key.split(".")[0] for key in state}


class PriorAsChannel(nn.Module):
    """The guided model as a one-input network giving the defect logit.

    Saliency methods explain a model of one input; with ``with_prior`` the prior travels as the
    input's last channel (fixed per image), otherwise the input is the image alone (variants
    that read no prior at inference). Layer names gain the prefix ``guided.``.
    """

    def __init__(self, guided: nn.Module, with_prior: bool = True) -> None:
        super().__init__()
        self.guided = guided
        self.with_prior = with_prior
        self.backbone_name = guided.backbone_name

    def forward(self, images_and_prior: torch.Tensor) -> torch.Tensor:
        if self.with_prior:
            return self.guided(images_and_prior[:, :-1], images_and_prior[:, -1:])[0]
        output = self.guided(images_and_prior)
        return output[0] if isinstance(output, tuple) else output
