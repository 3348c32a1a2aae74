"""Export a deployable model (baseline or guided) to ONNX or TorchScript, checked against PyTorch.

    python -m pipeline.export data/guided/fold0.pt --format onnx --out guided.onnx
    python -m pipeline.export models:/synthetic-baseline/1 --format torchscript --out baseline.pt

The exported network is what inference runs (``GuidedClassifier.deployable()``): input
``images``, float (B, in_channels, height, width) normalised as ``(pixel / 255 - mean) / std``,
plus ``prior`` (B, 1, height, width) in [0, 1] for a guided model of variant teacher; output
``logit`` (B,), the defect probability being its sigmoid. The batch size is free. The config
(size, mean, std, kind, variant) and the decision threshold travel in the file: ONNX metadata
``pipeline_config`` and ``threshold``, TorchScript extra files ``pipeline_config.json`` and
``threshold.json``. After writing, the file is run on a random batch and its logits compared with
PyTorch's; a difference beyond ``TOLERANCE`` stops with an error.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.artifacts import atomic_path
from pipeline.errors import InputError
from pipeline.model_files import needs_prior
from pipeline.models import GuidedClassifier
from pipeline.predict import decision_threshold, load_any

FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-4  # absolute, on logits: float32 kernels differ between runtimes in the last bits


class LogitOnly(nn.Module):
    """The deployed model with one output, the logit (a guided model also returns its map S)."""

    def __init__(self, model: nn.Module, with_prior: bool) -> None:
        super().__init__()
        self.model, self.with_prior = model, with_prior

    def forward(self, images: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(self.model, GuidedClassifier):
            return self.model(images, prior if self.with_prior else None)[0]
        return self.model(images)


def example_inputs(config: dict, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A random batch of what the exported model reads: images, and the prior where it takes one."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, config["in_channels"], config["height"], config["width"], generator=generator)
    if not needs_prior(config):
        return (images,)
    return images, torch.rand(batch, 1, config["height"], config["width"], generator=generator)


def export(model: nn.Module, config: dict, fmt: str, out: str | Path, threshold: float) -> float:
    """Write ``model`` (deployed, on the CPU) to ``out``; return the largest logit difference
    against PyTorch on a random batch of 3 (a batch size other than the traced one)."""
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    wrapped = LogitOnly(model.cpu().eval(), needs_prior(config)).eval()
    inputs = example_inputs(config)
    names = ["images", "prior"][: len(inputs)]
    metadata = {"pipeline_config": json.dumps(config, sort_keys=True), "threshold": json.dumps(threshold)}
    with atomic_path(out) as temporary:
        if fmt == "onnx":
            _export_onnx(wrapped, inputs, names, temporary, metadata)
        else:
            with _quiet_jit():
                traced = torch.jit.trace(wrapped, inputs)
                torch.jit.save(traced, str(temporary), _extra_files={f"{k}.json": v for k, v in metadata.items()})
        check = example_inputs(config, batch=3, seed=1)
        difference = float(np.abs(run_exported(temporary, fmt, check) - wrapped(*check).detach().numpy()).max())
        if not difference <= TOLERANCE:
            raise RuntimeError(f"the exported {fmt} model's logits differ from PyTorch's by {difference:.3g} "
                               f"(tolerance {TOLERANCE}); {out} was not written")
    return difference


def _export_onnx(model: nn.Module, inputs: tuple, names: list[str], path: Path, metadata: dict[str, str]) -> None:
    import onnx

    batch = torch.export.Dim("batch", min=1)
    dynamic = {name: {0: batch} for name in ("images", "prior")[: len(inputs)]}
    with warnings.catch_warnings():
        # One batch dimension shared by images and prior: the exporter says it keeps one name.
        warnings.filterwarnings("ignore", message=".*axis name: batch will not be used")
        torch.onnx.export(model, inputs, str(path), dynamo=True, input_names=names, output_names=["logit"],
                          dynamic_shapes=dynamic, external_data=False, verbose=False)
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, str(path))


def run_exported(path: str | Path, fmt: str, inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
    """Logits of an exported file for ``inputs`` (images[, prior]), with its own runtime."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {arg.name: tensor.numpy() for arg, tensor in zip(session.get_inputs(), inputs)}
        return session.run(None, feed)[0]
    with _quiet_jit():
        return torch.jit.load(str(path), map_location="cpu")(*inputs).detach().numpy()


@contextmanager
def _quiet_jit() -> Iterator[None]:
    """TorchScript is deprecated in favour of torch.export, but it is what LibTorch (C++)
    deployments load; the warning on every call says nothing the user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated")
        yield


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model file (data/guided/fold0.pt) or models:/<name>[/<version>|@<alias>]")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, type=Path, help="file to write (.onnx, .pt)")
    parser.add_argument("--threshold", type=float, help="decision threshold stored with it (default: as predict)")
    args = parser.parse_args(argv)
    loaded = load_any(args.model)
    threshold, origin = decision_threshold(loaded, args.threshold)
    difference = export(loaded.model, loaded.config, args.format, args.out, threshold)
    print(json.dumps({"model": loaded.source, "format": args.format, "out": str(args.out),
                      "inputs": ["images", "prior"][: len(example_inputs(loaded.config))],
                      "threshold": threshold, "threshold_from": origin, "max_logit_difference": difference}))


if __name__ == "__main__":
    from pipeline.runner import run_stage

    run_stage("export", main)
