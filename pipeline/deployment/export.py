"""Export a deployable model (baseline or guided) to ONNX or TorchScript that stands alone.

    python -m pipeline.deployment.export data/guided/fold0.pt --format onnx --out guided.onnx --threshold 0.3
    python -m pipeline.deployment.export models:/synthetic-guided@champion --format onnx --out release.onnx \\
        --prepared data/prepared --fold 0

The exported graph reads ``images``, uint8 gray (N, height, width) at the model's input size
(resize as ``prepare`` does first), plus ``prior`` (N, 1, height, width) in [0, 1] for a guided
model of variant teacher; it normalises them with the config's mean and std, runs the network
and returns ``score`` (N,), the defect probability, and ``decision`` (N,), true where
``score >= threshold``. The batch size is free. The file's metadata (ONNX ``metadata_props``,
TorchScript extra files ``<key>.json``) holds ``input_size`` ({"height", "width"}),
``threshold``, ``threshold_from``, ``operating_point`` and ``pipeline_config``.

The threshold is ``--threshold``, else the registered version's tag ``threshold`` (a release's),
else predict's (``decision_threshold``); the operating point is ``--operating-point`` or the
version's tag. After writing, the file is run on a random batch and, with ``--prepared``, on the
test fold's prepared images: scores within ``TOLERANCE`` of PyTorch's, and there the same AP and
decisions; otherwise it stops with an error and the file is not written.
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

from pipeline.core.artifacts import atomic_path
from pipeline.core.errors import InputError, SetupError
from pipeline.data.training_data import to_input
from pipeline.deployment.predict import Predictor, decision_threshold, load_any, operating_point
from pipeline.metrics.classification import classification_metrics
from pipeline.models.files import needs_prior
from pipeline.models.inference import defect_probability, predict

FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-4  # absolute, on scores: float32 kernels differ between runtimes in the last bits
INPUTS = ("images", "prior")
OUTPUTS = ("score", "decision")


class ExportError(SetupError):
    """The exported file does not score as PyTorch does in this environment."""


class StandAlone(nn.Module):
    """The deployed model from uint8 images to (score, decision): normalisation, network, sigmoid."""

    def __init__(self, model: nn.Module, config: dict, threshold: float) -> None:
        super().__init__()
        self.model, self.config, self.with_prior = model, config, needs_prior(config)
        self.in_channels, self.mean, self.std = int(config["in_channels"]), float(config["mean"]), float(config["std"])
        self.threshold = float(threshold)

    def forward(self, images: torch.Tensor, prior: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_input(images, self.in_channels, self.mean, self.std)  # as inference.predict normalises
        # The same views and average as inference.predict (test_time_flips): one definition.
        score = defect_probability(self.model, self.config, x, prior if self.with_prior else None)
        return score, score >= self.threshold


def example_inputs(config: dict, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A random batch of what the exported model reads: uint8 images, and the prior where it takes one."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, config["height"], config["width"]), dtype=torch.uint8, generator=generator)
    if not needs_prior(config):
        return (images,)
    return images, torch.rand(batch, 1, config["height"], config["width"], generator=generator)


def file_metadata(config: dict, threshold: float, threshold_from: str, point: str) -> dict[str, str]:
    """What travels in the exported file, each value JSON text."""
    return {
        "input_size": json.dumps({"height": config["height"], "width": config["width"]}),
        "threshold": json.dumps(threshold),
        "threshold_from": json.dumps(threshold_from),
        "operating_point": json.dumps(point),
        "pipeline_config": json.dumps(config, sort_keys=True),
    }


def export(
    model: nn.Module,
    config: dict,
    fmt: str,
    out: str | Path,
    threshold: float,
    metadata: dict[str, str] | None = None,
    check: Sequence[tuple[torch.Tensor, ...]] = (),
) -> float:
    """Write ``model`` (deployed, on the CPU) as a stand-alone graph to ``out``; return the largest
    score difference against PyTorch over a random batch of 3 (not the traced size) and ``check``
    (more input batches, e.g. real images). Beyond ``TOLERANCE``, or any decision different, the
    file is not written (``ExportError``)."""
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    wrapped = StandAlone(model.cpu().eval(), config, threshold).eval()
    inputs = example_inputs(config)
    metadata = metadata or file_metadata(config, threshold, "given", "")
    with atomic_path(out) as temporary:
        if fmt == "onnx":
            _export_onnx(wrapped, inputs, temporary, metadata)
        else:
            with _quiet_jit(), torch.no_grad():
                traced = torch.jit.trace(wrapped, inputs)
                torch.jit.save(traced, str(temporary), _extra_files={f"{k}.json": v for k, v in metadata.items()})
        difference = 0.0
        for batch in (example_inputs(config, batch=3, seed=1), *check):
            with torch.no_grad():
                expected, decided = (t.numpy() for t in wrapped(*batch))
            scores, decisions = run_exported(temporary, fmt, batch)
            difference = max(difference, float(np.abs(scores - expected).max()))
            if not difference <= TOLERANCE or not np.array_equal(decisions, decided):
                raise ExportError(
                    f"the exported {fmt} model's scores differ from PyTorch's by {difference:.3g} "
                    f"(tolerance {TOLERANCE}) or its decisions differ; {out} was not written. "
                    "Check that onnxruntime/torch are the pinned versions of requirements.txt"
                )
    return difference


def _export_onnx(model: nn.Module, inputs: tuple, path: Path, metadata: dict[str, str]) -> None:
    import onnx

    batch = torch.export.Dim("batch", min=1)
    dynamic = {name: {0: batch} for name in INPUTS[: len(inputs)]}
    with warnings.catch_warnings():
        # One batch dimension shared by images and prior: the exporter says it keeps one name.
        warnings.filterwarnings("ignore", message=".*axis name: batch will not be used")
        torch.onnx.export(
            model,
            inputs,
            str(path),
            dynamo=True,
            input_names=list(INPUTS[: len(inputs)]),
            output_names=list(OUTPUTS),
            dynamic_shapes=dynamic,
            external_data=False,
            verbose=False,
        )
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, str(path))


def run_exported(path: str | Path, fmt: str, inputs: tuple[torch.Tensor, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(scores, decisions) of an exported file for ``inputs`` (uint8 images[, prior]), with its own runtime."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {arg.name: tensor.numpy() for arg, tensor in zip(session.get_inputs(), inputs)}
        scores, decisions = session.run(list(OUTPUTS), feed)
        return scores, decisions
    with _quiet_jit(), torch.no_grad():
        scores, decisions = torch.jit.load(str(path), map_location="cpu")(*inputs)
    return scores.numpy(), decisions.numpy()


def parity(path: str | Path, fmt: str, predictor: Predictor, images: torch.Tensor, labels: np.ndarray) -> dict:
    """Compare an exported file with ``pipeline.deployment.predict`` on real images (uint8 (N, H, W) at any
    size, labels 0/1): the largest score difference, both APs, and how many decisions differ."""
    batch, priors = predictor.inputs(list(images.numpy()))
    expected = predict(predictor.loaded.model, predictor.config, batch, priors, 16)
    inputs = (batch,) if priors is None else (batch, priors.unsqueeze(1))
    scores, decisions = run_exported(path, fmt, inputs)
    return {
        "images": len(labels),
        "max_score_difference": float(np.abs(scores - expected).max()),
        "ap_pytorch": classification_metrics(labels, expected, predictor.threshold)["ap"],
        "ap_exported": classification_metrics(labels, scores, predictor.threshold)["ap"],
        "decisions_differing": int((decisions != (expected >= predictor.threshold)).sum()),
    }


@contextmanager
def _quiet_jit() -> Iterator[None]:
    """TorchScript is deprecated in favour of torch.export, but it is what LibTorch (C++)
    deployments load; the warning on every call says nothing the user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated")
        yield


def fold_images(prepared: Path, fold: int) -> tuple[torch.Tensor, np.ndarray]:
    """The prepared images and labels of ``fold``'s test set."""
    from pipeline.data.prepared import PreparedData

    data = PreparedData.load(prepared)
    if fold not in data.folds:
        raise InputError(f"--fold {fold}: {prepared} has test folds {data.folds}; choose one of them")
    _, test = data.split(fold)
    return data.images[test], data.index["label"].to_numpy()[test]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model file (data/guided/fold0.pt) or models:/<name>[/<version>|@<alias>]")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, type=Path, help="file to write (.onnx, .pt)")
    parser.add_argument(
        "--threshold",
        type=float,
        help="decision threshold in the graph (default: the version's tag threshold, else as predict)",
    )
    parser.add_argument("--operating-point", help="what the threshold was chosen at (default: the version's tag)")
    parser.add_argument(
        "--prepared",
        type=Path,
        help="prepared data folder (data/prepared): check the export on the test images of --fold",
    )
    parser.add_argument("--fold", type=int, default=0, help="with --prepared: the test fold (default 0)")
    parser.add_argument("--teacher", help="with --prepared, for variant teacher: the baseline of the same fold")
    args = parser.parse_args(argv)
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold must be a probability in [0, 1], got {args.threshold}")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    loaded = load_any(args.model)
    threshold, origin = decision_threshold(loaded, args.threshold)
    point = args.operating_point if args.operating_point is not None else operating_point(loaded)
    metadata = file_metadata(loaded.config, threshold, origin, point)
    report = {
        "model": loaded.source,
        "format": args.format,
        "out": str(args.out),
        "inputs": list(INPUTS[: len(example_inputs(loaded.config))]),
        "threshold": threshold,
        "threshold_from": origin,
        "operating_point": point,
    }
    if args.prepared is None:
        report["max_score_difference"] = export(loaded.model, loaded.config, args.format, args.out, threshold, metadata)
    else:
        predictor = Predictor(loaded, threshold, teacher=load_any(args.teacher) if args.teacher else None)
        images, labels = fold_images(args.prepared, args.fold)
        batch, priors = predictor.inputs(list(images.numpy()))
        check = [(batch,) if priors is None else (batch, priors.unsqueeze(1))]
        export(loaded.model, loaded.config, args.format, args.out, threshold, metadata, check)
        report["parity"] = parity(args.out, args.format, predictor, images, labels)
        if report["parity"]["ap_exported"] != report["parity"]["ap_pytorch"]:
            args.out.unlink()
            raise ExportError(
                f"the exported {args.format} model's AP on fold {args.fold} of {args.prepared} "
                f"differs from PyTorch's ({report['parity']}); {args.out} was removed"
            )
    print(json.dumps(report))
    return report
