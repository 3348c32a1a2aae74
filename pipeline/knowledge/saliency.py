"""Saliency maps for one-logit defect classifiers: Grad-CAM, LayerCAM and FullGrad.

Shaped like pytorch-grad-cam, but a batch costs one forward and one backward for all target layers
together: forward hooks capture what a method needs, the first CAM target's output becomes a leaf so
autograd records nothing before it (the backward stops there), and one ``torch.autograd.grad`` call
returns every gradient. Parameters are frozen, so no weight gradients are computed. The model runs
in eval mode (BatchNorm statistics used, not updated); each module's ``training`` flag and each
parameter's ``requires_grad`` are restored and every hook is removed afterwards, even on error.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from pipeline.core.devices import FP32, Precision
from pipeline.core.errors import InputError
from pipeline.core.progress import progress
from pipeline.data.training_data import batches, to_input
from pipeline.models.networks import BACKBONES


@dataclass
class SaliencyResult:
    """``maps``: float32 (B, H, W) in [0, 1] at the input size. ``valid``: bool (B,), False where
    the raw map was all zero or non-finite; such maps are all zeros."""

    maps: torch.Tensor
    valid: torch.Tensor


@dataclass
class FullGradTerms:
    """FullGrad's raw signed terms: ``input`` = input-gradient x input (input's shape); ``biases``
    = (layer name, bias-gradient x bias) per call of each bias layer (that layer's output shape)."""

    input: torch.Tensor
    biases: list[tuple[str, torch.Tensor]]

    def total(self) -> torch.Tensor:
        """Sum of all terms per image (B,): equals the score for a piecewise-linear network."""
        return sum((t.flatten(1).sum(1) for _, t in self.biases), self.input.flatten(1).sum(1))


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
    lo, hi = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    span, valid = hi - lo, torch.isfinite(flat).all(dim=1) & (hi[:, 0] > 0)
    # In place after the first op: at full resolution every temporary costs memory.
    maps = (flat - lo).div_(span.clamp_min(torch.finfo(flat.dtype).tiny))
    maps.add_((span == 0).to(maps.dtype))  # a constant positive map locates nothing: all ones
    return maps.masked_fill_(~valid[:, None], 0.0).clamp_(0.0, 1.0).view_as(raw), valid


def _upsample(maps: torch.Tensor, size: torch.Size) -> torch.Tensor:
    if maps.shape[-2:] == size:
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _layer_summary(model: nn.Module) -> str:
    """Top-level modules and their children, compactly: 'features.{0..30}, fc'."""
    parts = []
    for name, child in model.named_children():
        sub = [n for n, _ in child.named_children()]
        if sub and sub == [str(i) for i in range(len(sub))]:
            sub = [f"0..{len(sub) - 1}"]
        parts.append(f"{name}.{{{','.join(sub)}}}" if sub else name)
    return ", ".join(parts) or "(no submodules)"


def _widened(tensor: torch.Tensor) -> torch.Tensor:
    """A bf16 or fp16 tensor in fp32; fp32 and fp64 ones as they are."""
    return tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor


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

    Subclasses say what a hook keeps (``_capture(name, module, output)`` -> value, gradient
    target, replacement output; or None to skip) and turn values and gradients into a raw
    non-negative map per image at the input size (``_combine(x, captured, grads, input_grad)``).
    """

    # Declared for the type checker only: every subclass defines both.
    _capture: Callable[[str, nn.Module, torch.Tensor], tuple | None]
    _combine: Callable[..., torch.Tensor]

    needs_input_grad = False
    # How many layers it explains at once (saliency.layers); None: any number.
    layer_count: int | None = None
    # Whether the maps stay within tests/test_precision.py's tolerance of fp32 when the forward runs
    # in bf16; a method for which they do not runs in fp32 on every path.
    bf16_forward = True

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None, precision: Precision = FP32) -> None:
        self.model, self.layers = model, list(layers or [])
        self.precision = precision if self.bf16_forward else FP32
        modules = dict(model.named_modules())
        unknown = [name for name in self.layers if not name or name not in modules]
        if unknown:
            raise InputError(f"unknown layer(s) {', '.join(map(repr, unknown))} in {type(model).__name__}; "
                             f"its layers are {_layer_summary(model)}")  # fmt: skip
        self._targets = [(name, modules[name]) for name in self.layers]

    def __call__(self, images: torch.Tensor) -> SaliencyResult:
        """Saliency of the defect score for a batch (B, C, H, W), on the model's device."""
        maps, valid = normalise(self.raw_maps(images))
        return SaliencyResult(maps.float(), valid)

    def raw_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Un-normalised (B, H, W) maps at the input size: non-negative, or non-finite where the
        model's values were."""
        captures = self._forward_backward(images)
        with torch.no_grad():  # the activations still require grad; building a graph would waste memory
            return self._combine(*captures)

    def _forward_backward(self, images: torch.Tensor) -> tuple:
        captured: list[tuple[str, torch.Tensor, torch.Tensor | GradientEdge]] = []
        param = next(self.model.parameters(), None)
        with contextlib.ExitStack() as stack:
            stack.enter_context(_frozen_eval(self.model))
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            for name, module in self._targets:
                stack.callback(module.register_forward_hook(partial(self._hook, captured, name)).remove)
            x = self.precision.input(images.detach().to(images.device if param is None else param.device))
            x = x.clone() if x.is_inference() else x
            with self.precision.autocast(x.device):
                score = _widened(defect_score(self.model(x.requires_grad_(self.needs_input_grad))))
            wanted = [target for _, _, target in captured] + ([x] if self.needs_input_grad else [])
            # Stays so where no captured tensor influences the score.
            grads: list[torch.Tensor | None] = [None] * len(wanted)
            if score.requires_grad and wanted:
                # The ignore: autograd takes a mix of tensors and gradient edges; its stubs only one kind.
                grads = list(torch.autograd.grad(score.sum(), wanted, allow_unused=True))  # type: ignore[arg-type]
        # The maps in fp32 whatever the forward's precision (a no-op on the fp32 path).
        captured = [(name, _widened(value), target) for name, value, target in captured]
        grads = [grad if grad is None else _widened(grad) for grad in grads]
        input_grad = grads.pop() if self.needs_input_grad else None
        return x.detach(), captured, grads, input_grad

    def _hook(self, captured: list, name: str, module: nn.Module, args: tuple, output: torch.Tensor):
        got = self._capture(name, module, output)
        if got is None:
            return None
        captured.append((name, got[0], got[1]))
        return got[2]  # replaces the layer's output unless None


class _CAM(SaliencyMethod):
    """Capture for the CAM methods: each target layer's output and the gradient w.r.t. it."""

    def _capture(self, name: str, module: nn.Module, output: torch.Tensor) -> tuple:
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            raise ValueError(f"layer {name!r} must output a (B, C, h, w) tensor for {type(self).__name__}")
        # Nothing before the first target needs a gradient: cutting the graph here ends the backward.
        act = output if output.requires_grad else output.detach().requires_grad_(True)
        # Later layers get a copy, so an in-place op (ReLU(inplace=True)) cannot change `act`.
        return act, act, act.clone()

    def _pairs(self, captured: list, grads: list) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        last = {name: (act, grad) for (name, act, _), grad in zip(captured, grads)}  # last call wins
        if missing := [name for name in self.layers if name not in last]:
            raise ValueError(f"layer(s) {missing} did not run in the model's forward")
        return [last[name] for name in self.layers]


class GradCAM(_CAM):
    """Grad-CAM on one layer: ReLU of the channel sum of activations weighted by mean gradients."""

    layer_count = 1

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None, precision: Precision = FP32) -> None:
        super().__init__(model, layers, precision)
        if len(self.layers) != self.layer_count:
            raise InputError(f"Grad-CAM takes exactly one layer (saliency.layers), got {self.layers}")

    def _combine(self, x, captured, grads, input_grad) -> torch.Tensor:
        ((act, grad),) = self._pairs(captured, grads)
        if grad is None:
            return x.new_zeros(x.shape[0], *x.shape[-2:])
        cam = torch.relu(torch.einsum("bc,bchw->bhw", grad.mean(dim=(2, 3)), act))
        return _upsample(cam, x.shape[-2:])


class LayerCAM(_CAM):
    """LayerCAM on one or more layers, fused by the element-wise maximum of per-layer maps."""

    def _combine(self, x, captured, grads, input_grad) -> torch.Tensor:
        fused = x.new_zeros(x.shape[0], *x.shape[-2:])
        finite = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        for act, grad in self._pairs(captured, grads):
            if grad is not None:
                cam = torch.relu((torch.relu(grad) * act).sum(dim=1))
                finite &= torch.isfinite(cam).flatten(1).all(dim=1)
                # Each layer is scaled to [0, 1] first, so deep layers' larger values do not win.
                torch.maximum(fused, normalise(_upsample(cam, x.shape[-2:]))[0], out=fused)
        return fused.masked_fill_(~finite[:, None, None], float("nan"))


def _effective_bias(module: nn.Module) -> torch.Tensor | None:
    """The per-channel bias a layer adds; BatchNorm in eval mode adds beta - mean * gamma / std."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.running_mean is None:  # batch statistics even in eval mode: no fixed bias
            return None
        assert module.running_var is not None  # BatchNorm registers it together with running_mean
        scale = torch.rsqrt(module.running_var + module.eps)
        scale = scale if module.weight is None else scale * module.weight
        bias = -module.running_mean * scale
        return bias if module.bias is None else bias + module.bias
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and module.bias is not None:
        return module.bias
    return None


def _abs_scaled_channel_sum(term: torch.Tensor) -> torch.Tensor:
    """FullGrad's post-processing (abs, min-max over C, h, w per image), channel-summed here,
    before upsampling: both are linear, and the sum is cheaper at low resolution."""
    term = term.abs_()  # callers pass a fresh product
    lo, hi = term.amin(dim=(1, 2, 3)), term.amax(dim=(1, 2, 3))  # far faster than aminmax on CPU
    summed = term.sum(dim=1) - term.shape[1] * lo[:, None, None]
    span = (hi - lo)[:, None, None]
    return torch.where(span > 0, summed / span.clamp_min(torch.finfo(term.dtype).tiny), 0.0)


class FullGrad(SaliencyMethod):
    """FullGrad: |input-gradient x input| plus |bias-gradient x bias| of every layer with a bias.

    Maps follow the FullGrad paper: each term abs'd and min-max scaled per image, channel-summed,
    upsampled and added. Non-spatial biases (Linear) shift every pixel alike and are left out of
    the maps. ``contributions`` gives the raw signed terms, which sum to the score for a
    piecewise-linear network (completeness). ``layers`` is ignored.
    """

    needs_input_grad = True
    # In bf16 the input-gradient term drifts: Otsu masks overlapped their fp32 ones with IoU 0.82.
    bf16_forward = False

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None, precision: Precision = FP32) -> None:
        super().__init__(model, None, precision)
        self._targets = [(n, m) for n, m in model.named_modules() if _effective_bias(m) is not None]

    def _capture(self, name: str, module: nn.Module, output: torch.Tensor) -> tuple | None:
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None
        effective = _effective_bias(module)
        assert effective is not None  # _targets holds only the layers with an effective bias
        bias = effective.detach().view(1, -1, *[1] * (output.ndim - 2))
        # The edge names this layer's own output even if a later op changes it in place, and does
        # not keep the activation alive.
        return bias, get_gradient_edge(output), None

    def contributions(self, images: torch.Tensor) -> FullGradTerms:
        """The raw, signed FullGrad terms (no abs, no normalisation) for a batch."""
        x, captured, grads, input_grad = self._forward_backward(images)
        biases = [(name, grad * bias) for (name, bias, _), grad in zip(captured, grads) if grad is not None]
        return FullGradTerms(x * (0.0 if input_grad is None else input_grad), biases)

    def _combine(self, x, captured, grads, input_grad) -> torch.Tensor:
        total = _abs_scaled_channel_sum(x * (0.0 if input_grad is None else input_grad))
        by_size: dict[torch.Size, torch.Tensor] = {}
        for (_, bias, _), grad in zip(captured, grads):
            if grad is not None and grad.ndim == 4:
                term = _abs_scaled_channel_sum(grad * bias)
                by_size[term.shape[-2:]] = by_size.get(term.shape[-2:], 0.0) + term
        for term in by_size.values():  # one upsampling per resolution
            total.add_(_upsample(term, x.shape[-2:]))
        return total


METHODS: dict[str, type[SaliencyMethod]] = {"gradcam": GradCAM, "layercam": LayerCAM, "fullgrad": FullGrad}


def create_saliency(
    method: str, model: nn.Module, layers: Sequence[str] | None = None, precision: Precision = FP32
) -> SaliencyMethod:
    """Build a saliency method by name; ``layers=None`` uses the backbone's default layers.
    ``precision`` is the forward's (``devices.resolve_precision``); the model is expected in its
    memory format (``Precision.model``)."""
    if method not in METHODS:
        raise InputError(f"unknown saliency method {method!r}: choose one of {', '.join(METHODS)}")
    if layers is None and method != "fullgrad":
        backbone = getattr(model, "backbone_name", None)
        if backbone not in BACKBONES:
            raise InputError(f"no default {method} layers for backbone {backbone!r}: pass layers")
        layers = _within(model, BACKBONES[backbone].saliency_layers[method])
    return METHODS[method](model, layers, precision)


def _within(model: nn.Module, names: list[str]) -> list[str]:
    """Default names are relative to the backbone model; a wrapper holding it as a submodule
    (``PriorAsChannel``'s ``guided.``) gets the first prefix under which they all exist."""
    modules = dict(model.named_modules())
    for prefix in ["", *(f"{name}." for name in modules if name)]:
        if all(prefix + name in modules for name in names):
            return [prefix + name for name in names]
    return names  # unknown: the method's constructor lists the model's layers


def saliency_maps(
    method: SaliencyMethod,
    config: dict,
    images: torch.Tensor,
    batch_size: int = 32,
    priors: torch.Tensor | None = None,
    bar: str | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Maps (N, H, W) float32 in [0, 1], validity (N,) and seconds taken, for uint8 images (N, H, W).

    Images are normalised as in training (``config``: in_channels, mean, std); ``priors``
    (N, H, W), where given, join as the last input channel (``models.PriorAsChannel``). With a
    ``bar`` name, a terminal shows the batches' progress under that name.
    """
    maps, valid = [], []
    started = time.perf_counter()
    steps = list(batches(np.arange(len(images)), batch_size))
    for batch in progress(steps, bar or "saliency", "batch", leave=False, shown=bar is not None):
        x = to_input(images[batch], config["in_channels"], config["mean"], config["std"])
        if priors is not None:
            x = torch.cat([x, priors[batch].unsqueeze(1).to(x.dtype)], dim=1)
        result = method(x)
        maps.append(result.maps.cpu())  # .cpu() waits for the device, so the time is real
        valid.append(result.valid.cpu())
    if not maps:
        return np.zeros((0, *images.shape[-2:]), np.float32), np.zeros(0, bool), 0.0
    return torch.cat(maps).numpy(), torch.cat(valid).numpy(), time.perf_counter() - started
