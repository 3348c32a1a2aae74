"""Saliency maps for one-logit defect classifiers: Grad-CAM, LayerCAM and FullGrad.

The layout follows pytorch-grad-cam (a small base class, one small class per method) but each
batch costs one forward and one backward for all target layers together:

* forward hooks capture what a method needs; the first CAM target's output is detached and made a
  leaf, so autograd records nothing before it and the backward stops there;
* one ``torch.autograd.grad`` call returns the gradients w.r.t. the captured outputs (no module
  backward hooks, no parameter gradients: parameters are frozen for the call);
* everything after is batched tensor arithmetic on the model's device.

The model runs in eval mode during extraction (running BatchNorm statistics, no dropout, and the
statistics are not updated); each module's ``training`` flag and each parameter's
``requires_grad`` are restored afterwards and every hook is removed, even on error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

# FullGrad ignores layers: it uses every layer with a bias.
DEFAULT_LAYERS: dict[str, dict[str, list[str]]] = {
    "resnet18": {
        "gradcam": ["features.layer4"],
        "layercam": ["features.layer2", "features.layer3", "features.layer4"],
        "fullgrad": [],
    },
    "vgg16": {  # activations of conv3_3, conv4_3 and conv5_3 (strides 4, 8, 16)
        "gradcam": ["features.29"],
        "layercam": ["features.15", "features.22", "features.29"],
        "fullgrad": [],
    },
}


@dataclass
class SaliencyResult:
    """``maps``: float32 (B, H, W) in [0, 1] at the input size. ``valid``: bool (B,), False where
    the raw map was all zero or non-finite; such maps are returned as all zeros."""

    maps: torch.Tensor
    valid: torch.Tensor


@dataclass
class FullGradTerms:
    """FullGrad's raw, signed contributions (no abs, no normalisation).

    ``input``: input-gradient x input, shaped like the input. ``biases``: (layer name,
    bias-gradient x bias) for every call of every bias layer, shaped like that layer's output.
    """

    input: torch.Tensor
    biases: list[tuple[str, torch.Tensor]]

    def total(self) -> torch.Tensor:
        """Sum of all terms per image (B,): equals the score for a piecewise-linear network."""
        total = self.input.flatten(1).sum(1)
        for _, term in self.biases:
            total = total + term.flatten(1).sum(1)
        return total


def defect_score(output: torch.Tensor) -> torch.Tensor:
    """The defect score (B,) from (B,) or (B, 1) logits or (B, 2) class scores (defect = 1)."""
    if output.ndim == 1:
        return output
    if output.ndim == 2 and output.shape[1] in (1, 2):
        return output[:, -1]
    raise ValueError(f"expected model output (B,), (B, 1) or (B, 2), got {tuple(output.shape)}")


def normalise(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max normalise each map of a non-negative (B, H, W) batch; return (maps, valid)."""
    flat = raw.flatten(1)
    finite = torch.isfinite(flat).all(dim=1)
    flat = flat.masked_fill(~finite[:, None], 0.0)  # keeps NaN out of the min and max
    lo, hi = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    span = hi - lo
    valid = finite & (hi[:, 0] > 0)
    # A constant positive map is valid but locates nothing: it becomes all ones.
    scaled = torch.where(span > 0, (flat - lo) / span.clamp_min(torch.finfo(flat.dtype).tiny), 1.0)
    return (scaled * valid[:, None]).clamp_(0.0, 1.0).view_as(raw), valid


def _upsample(maps: torch.Tensor, size: torch.Size) -> torch.Tensor:
    if maps.shape[-2:] == size:
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _layer_summary(model: nn.Module) -> str:
    """Top-level modules with their children, compactly: 'features.{0..30}, fc'."""
    parts = []
    for name, child in model.named_children():
        sub = [n for n, _ in child.named_children()]
        if sub and all(n.isdigit() for n in sub) and [int(n) for n in sub] == list(range(len(sub))):
            parts.append(f"{name}.{{0..{len(sub) - 1}}}")
        else:
            parts.append(f"{name}.{{{','.join(sub)}}}" if sub else name)
    return ", ".join(parts) or "(no submodules)"


@contextlib.contextmanager
def _frozen_eval(model: nn.Module) -> Iterator[None]:
    training = [(m, m.training) for m in model.modules()]
    requires = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in requires:
            p.requires_grad_(False)
        yield
    finally:
        for m, flag in training:
            m.training = flag
        for p, flag in requires:
            p.requires_grad_(flag)


class SaliencyMethod:
    """Owns the hooks, the one forward and backward per batch, upsampling and normalisation.

    Subclasses say what a hook captures (``_capture``) and turn the captures and their gradients
    into one raw non-negative map per image at the input size (``_combine``).
    """

    needs_input_grad = False

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None) -> None:
        self.model = model
        self.layers = list(layers or [])
        modules = dict(model.named_modules())
        unknown = [name for name in self.layers if not name or name not in modules]
        if unknown:
            raise ValueError(
                f"unknown layer(s) {', '.join(map(repr, unknown))} in {type(model).__name__}; "
                f"its layers are {_layer_summary(model)}"
            )
        self._targets = [(name, modules[name]) for name in self.layers]

    def __call__(self, images: torch.Tensor) -> SaliencyResult:
        """Saliency of the defect score for a batch (B, C, H, W)."""
        maps, valid = normalise(self.raw_maps(images))
        return SaliencyResult(maps.float(), valid)

    def raw_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Un-normalised, non-negative (B, H, W) maps at the input size."""
        return self._combine(*self._forward_backward(images))

    def _capture(self, name: str, module: nn.Module, output: torch.Tensor):
        """Return (value, gradient target, replacement output or None), or None to skip."""
        raise NotImplementedError

    def _combine(self, x: torch.Tensor, captured: list, grads: list, input_grad) -> torch.Tensor:
        raise NotImplementedError

    def _forward_backward(self, images: torch.Tensor) -> tuple:
        captured: list[tuple[str, torch.Tensor, torch.Tensor | GradientEdge]] = []

        def hook_for(name: str):
            def hook(module: nn.Module, args: tuple, output: torch.Tensor):
                got = self._capture(name, module, output)
                if got is None:
                    return None
                captured.append((name, got[0], got[1]))
                return got[2]

            return hook

        param = next(self.model.parameters(), None)
        device = images.device if param is None else param.device
        with contextlib.ExitStack() as stack:
            stack.enter_context(_frozen_eval(self.model))
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            for name, module in self._targets:
                stack.callback(module.register_forward_hook(hook_for(name)).remove)
            x = images.to(device).detach()
            x = x.clone() if x.is_inference() else x
            if self.needs_input_grad:
                x.requires_grad_(True)
            score = defect_score(self.model(x))
            wanted = [target for _, _, target in captured] + ([x] if self.needs_input_grad else [])
            if score.requires_grad and wanted:
                grads = list(torch.autograd.grad(score.sum(), wanted, allow_unused=True))
            else:  # no captured tensor influences the score
                grads = [None] * len(wanted)
        input_grad = grads.pop() if self.needs_input_grad else None
        return x.detach(), captured, grads, input_grad


class _CAM(SaliencyMethod):
    """Shared capture for the CAM methods: the layer output and the gradient w.r.t. it."""

    def _capture(self, name: str, module: nn.Module, output: torch.Tensor):
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            raise ValueError(f"layer {name!r} must output a (B, C, h, w) tensor for {type(self).__name__}")
        # Nothing before the first target needs a gradient: cutting the graph here stops the backward.
        act = output if output.requires_grad else output.detach().requires_grad_(True)
        # Later layers get a copy, so an in-place op (ReLU(inplace=True)) cannot change `act`.
        return act, act, act.clone()

    def _pairs(self, captured: list, grads: list) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        last = {name: (act, grad) for (name, act, _), grad in zip(captured, grads)}  # last call wins
        missing = [name for name in self.layers if name not in last]
        if missing:
            raise ValueError(f"layer(s) {missing} did not run in the model's forward")
        return [last[name] for name in self.layers]


class GradCAM(_CAM):
    """Grad-CAM on one layer: ReLU of the channel sum of activations weighted by mean gradients."""

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None) -> None:
        super().__init__(model, layers)
        if len(self.layers) != 1:
            raise ValueError(f"Grad-CAM takes exactly one layer, got {self.layers}")

    def _combine(self, x, captured, grads, input_grad) -> torch.Tensor:
        ((act, grad),) = self._pairs(captured, grads)
        if grad is None:
            return x.new_zeros(x.shape[0], *x.shape[-2:])
        weights = grad.mean(dim=(2, 3))
        return _upsample(torch.relu(torch.einsum("bc,bchw->bhw", weights, act)), x.shape[-2:])


class LayerCAM(_CAM):
    """LayerCAM on one or more layers, fused by the element-wise maximum of per-layer maps."""

    def _combine(self, x, captured, grads, input_grad) -> torch.Tensor:
        fused = x.new_zeros(x.shape[0], *x.shape[-2:])
        finite = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        for act, grad in self._pairs(captured, grads):
            if grad is None:
                continue
            cam = torch.relu((torch.relu(grad) * act).sum(dim=1))
            finite &= torch.isfinite(cam).flatten(1).all(dim=1)
            # Each layer is scaled to [0, 1] first, so deep layers' larger values do not win.
            fused = torch.maximum(fused, normalise(_upsample(cam, x.shape[-2:]))[0])
        return fused.masked_fill(~finite[:, None, None], float("nan"))


def _effective_bias(module: nn.Module) -> torch.Tensor | None:
    """The per-channel bias a layer adds; BatchNorm in eval mode adds beta - mean * gamma / std."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.running_mean is None:  # batch statistics even in eval mode: no fixed bias
            return None
        scale = torch.rsqrt(module.running_var + module.eps)
        if module.weight is not None:
            scale = scale * module.weight
        bias = -module.running_mean * scale
        return bias if module.bias is None else bias + module.bias
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and module.bias is not None:
        return module.bias
    return None


def _abs_scaled_channel_sum(term: torch.Tensor) -> torch.Tensor:
    """FullGrad paper's post-processing, abs then min-max over (C, h, w) per image, channel-summed.

    The channel sum is taken here, before upsampling (linear, so the same as after but cheaper).
    """
    term = term.abs()
    lo, hi = term.flatten(1).aminmax(dim=1)
    summed = term.sum(dim=1) - term.shape[1] * lo[:, None, None]
    span = (hi - lo)[:, None, None]
    return torch.where(span > 0, summed / span.clamp_min(torch.finfo(term.dtype).tiny), 0.0)


class FullGrad(SaliencyMethod):
    """FullGrad: |input-gradient x input| plus |bias-gradient x bias| of every layer with a bias.

    Maps use the paper's post-processing for each term (abs, per-image min-max, channel sum,
    upsampling, sum over terms). Biases of non-spatial layers (Linear) shift every pixel
    equally and are left out of the maps. ``contributions`` gives the raw signed terms, whose sum
    equals the score for piecewise-linear networks (completeness). ``layers`` is ignored.
    """

    needs_input_grad = True

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None) -> None:
        super().__init__(model, None)
        self._targets = [(n, m) for n, m in model.named_modules() if _effective_bias(m) is not None]

    def _capture(self, name: str, module: nn.Module, output: torch.Tensor):
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None
        bias = _effective_bias(module).detach()
        # The gradient edge names the layer's own output even if a later op changes it in place,
        # and does not keep the activation alive.
        return bias.view(1, -1, *[1] * (output.ndim - 2)), get_gradient_edge(output), None

    def contributions(self, images: torch.Tensor) -> FullGradTerms:
        """The raw, signed FullGrad terms (no abs, no normalisation) for a batch."""
        x, captured, grads, input_grad = self._forward_backward(images)
        terms = [(name, grad * bias) for (name, bias, _), grad in zip(captured, grads) if grad is not None]
        return FullGradTerms(input_grad * x, terms)

    def _combine(self, x, captured, grads, input_grad) -> torch.Tensor:
        total = _abs_scaled_channel_sum(input_grad * x)
        by_size: dict[torch.Size, torch.Tensor] = {}
        for (_, bias, _), grad in zip(captured, grads):
            if grad is not None and grad.ndim == 4:
                term = _abs_scaled_channel_sum(grad * bias)
                size = term.shape[-2:]
                by_size[size] = by_size[size] + term if size in by_size else term
        for term in by_size.values():  # one upsampling per resolution
            total = total + _upsample(term, x.shape[-2:])
        return total


METHODS: dict[str, type[SaliencyMethod]] = {"gradcam": GradCAM, "layercam": LayerCAM, "fullgrad": FullGrad}


def create_saliency(method: str, model: nn.Module, layers: Sequence[str] | None = None) -> SaliencyMethod:
    """Build a saliency method by name; ``layers=None`` uses ``DEFAULT_LAYERS`` for the backbone."""
    if method not in METHODS:
        raise ValueError(f"unknown saliency method {method!r}: choose one of {', '.join(METHODS)}")
    if layers is None and method != "fullgrad":
        backbone = getattr(model, "backbone_name", None)
        if backbone not in DEFAULT_LAYERS:
            raise ValueError(f"no default {method} layers for backbone {backbone!r}: pass layers")
        layers = DEFAULT_LAYERS[backbone][method]
    return METHODS[method](model, layers)
