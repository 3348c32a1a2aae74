"""Where the models run and at which precision: ``model.device`` and ``model.precision``."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.core.errors import SetupError


def pick_device(preference: str = "auto") -> torch.device:
    """``model.device``: auto = CUDA, then Apple's MPS, then the CPU; a named device must exist."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise SetupError("model.device is cuda, but torch finds no CUDA GPU here; use auto or cpu")
    if preference == "mps" and not torch.backends.mps.is_available():
        raise SetupError("model.device is mps, but Apple's MPS is not available here; use auto or cpu")
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass(frozen=True)
class Precision:
    """How a model computes: the autocast type of its forward (None = fp32 throughout) and
    whether its 4-D weights and inputs are channels_last.

    The two go together: oneDNN's bf16 convolutions (AMX, AVX-512 bf16) and CUDA's tensor cores
    run fastest on channels_last, and fp32 keeps the contiguous layout its results were measured
    with. Losses, saliency maps and scores are computed in fp32 on every path.
    """

    dtype: torch.dtype | None = None
    channels_last: bool = False

    @property
    def name(self) -> str:
        return "fp32" if self.dtype is None else str(self.dtype).removeprefix("torch.").replace("bfloat16", "bf16")

    def autocast(self, device: torch.device) -> AbstractContextManager:
        """The forward pass's precision: autocast to ``dtype``, or fp32 (no autocast)."""
        return torch.autocast(device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def model(self, model: nn.Module) -> nn.Module:
        """``model`` with its 4-D weights in this path's memory format (in place, returned)."""
        return model.to(memory_format=self.memory_format)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """A (B, C, H, W) batch in this path's memory format."""
        return x.contiguous(memory_format=self.memory_format)


FP32 = Precision()
BF16 = Precision(torch.bfloat16, channels_last=True)


def cpu_has_bf16_units() -> bool:
    """Whether this CPU computes bf16 in hardware (AMX tiles or AVX-512 bf16), where oneDNN's bf16
    kernels beat fp32; elsewhere bf16 is emulated and slower than fp32."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch's own, as its compiler uses them
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """``model.precision`` on ``device``: auto takes bf16 (with channels_last) where the hardware
    makes it faster (a CUDA GPU with bf16 support, a CPU with bf16 units: detected at run time,
    its fp32-sized exponent needs no loss scaling) and fp32 elsewhere; bf16 is taken when asked
    on any CPU, slow or not."""
    if precision == "fp32":
        return FP32
    if precision == "auto":
        if device.type == "cuda":
            return BF16 if torch.cuda.is_bf16_supported() else FP32
        return BF16 if device.type == "cpu" and cpu_has_bf16_units() else FP32
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SetupError("model.precision is bf16, but this GPU does not support bfloat16; use fp32 or auto")
    return BF16
