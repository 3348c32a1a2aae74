"""Where the models run and at which precision: ``model.device`` and ``model.precision``."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from pipeline.errors import SetupError


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


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast type for ``model.precision`` on ``device``; None = fp32 throughout.

    auto takes bf16 only on a CUDA GPU with bf16 support, where tensor cores make it cheaper and
    its fp32-sized exponent needs no loss scaling; CPUs without bf16 units run it slower than
    fp32, so there it is used only when asked.
    """
    if precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SetupError("model.precision is bf16, but this GPU does not support bfloat16; use fp32 or auto")
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """The forward pass's precision: autocast to ``dtype``, or fp32 (no autocast) for None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
