"""Training and inference for the baseline and the guided classifier.

One loop serves both models; the guided model's step adds its auxiliary loss (pseudo-mask BCE,
or for the consistency variant the distance between its own Grad-CAM and the prior). Training is
deterministic for a seed on the CPU: the batch order and the flips of epoch ``e`` depend only on
(seed, e), so a run resumed from the checkpoint of epoch ``e`` continues exactly as an
uninterrupted run would. With N training processes (``pipeline.distributed``) each takes its
share of the same global batches, and the result equals one process's up to float rounding.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline import distributed
from pipeline.artifacts import load_torch, save_torch, write_csv, write_json
from pipeline.config import GuidedParams, ModelParams, TrainParams
from pipeline.data import (BalancedEpochs, PreparedData, TrainingBatches, apply_flips, batches, flip_flags, loader,
                           pixel_stats, to_input)
from pipeline.models import Classifier, GuidedClassifier, load_pretrained_features, takes_prior
from pipeline.tracking import StageRun


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class Guidance:
    """What the guided model learns from, for every row of the prepared index."""

    priors: torch.Tensor  # float (N, H, W) in [0, 1]: the baseline's saliency maps
    pseudo_masks: torch.Tensor  # float (N, H, W) 0/1: Otsu masks (empty for defect-free images)


def pick_device(preference: str = "auto") -> torch.device:
    """``model.device``: auto = CUDA, then Apple's MPS, then the CPU; a named device must exist."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("model.device is cuda, but torch finds no CUDA GPU here; use auto or cpu")
    if preference == "mps" and not torch.backends.mps.is_available():
        raise ValueError("model.device is mps, but Apple's MPS is not available here; use auto or cpu")
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
        raise ValueError("model.precision is bf16, but this GPU does not support bfloat16; use fp32 or auto")
    return torch.bfloat16


@dataclass(frozen=True)
class BatchShare:
    """One training process's part of a global batch (``distributed.shard``), for the losses.

    Each process's loss is its term of the global batch's mean, times the number of processes
    (DistributedDataParallel averages the gradients over them): the summed gradient is that of
    one process on the whole batch, padding and uneven shares included.
    """

    real: torch.Tensor  # (b,) 1.0 for this process's real samples, 0.0 for padding
    size: int  # samples in the global batch
    defective: int  # defective samples in the global batch
    processes: int

    def mean(self, per_sample: torch.Tensor, count: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """This process's term of a mean over ``count`` samples of the global batch."""
        real = self.real if rows is None else self.real[rows]
        return (per_sample * real).sum() * (self.processes / count)


def seg_weight(epoch: int, params: GuidedParams) -> float:
    """λ(t): the pseudo-mask loss weight for epoch t (0-based) of T."""
    if params.seg_weight_schedule == "constant":
        return params.seg_weight
    return params.seg_weight * (1.0 - epoch / params.epochs)


def learning_rate(epoch: float, params: TrainParams) -> float:
    """The learning rate at ``epoch`` (0-based, fractional within an epoch) of ``params.epochs``.

    A function of the position alone, with no scheduler state: a run resumed from a checkpoint
    takes the same rates as an uninterrupted one.
    """
    if params.lr_schedule == "constant":
        return params.lr
    return params.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / params.epochs))


def build_model(config: dict, deployed: bool = True) -> nn.Module:
    """The network a saved config describes: as deployed (what inference needs) or as trained."""
    if config["kind"] != "guided":
        return Classifier(config["backbone"], config["in_channels"])
    # Models saved before variants existed are teacher models.
    model = GuidedClassifier(config["backbone"], config["in_channels"], config.get("variant", "teacher"))
    return model.deployable() if deployed else model


def inference_priors(config: dict, stored: torch.Tensor) -> torch.Tensor | None:
    """The prior a saved model reads at inference, given the baseline's stored saliency maps:
    those maps for the teacher variant, None (nothing, or zeros inside the model) otherwise."""
    return stored if takes_prior(config) else None


def consistency_loss(cam: torch.Tensor, prior: torch.Tensor, labels: torch.Tensor,
                     share: BatchShare | None = None) -> torch.Tensor:
    """Distance between the model's Grad-CAM and the prior, over defective images only.

    ``cam`` is the model's Grad-CAM before its ReLU (``models.class_activation_map``); the prior
    is pooled to its resolution. Both are L2-normalised and compared by squared distance
    (attention transfer), so only where the model looks matters, not the map's scale. Defect-free
    images are left out for the reason their pseudo-masks are empty: there is nothing for the
    prior to point at.
    """
    defective = labels > 0.5
    if not defective.any():
        return cam.sum() * 0.0  # keeps the graph (and the loss's device) without a term
    target = F.adaptive_avg_pool2d(prior[defective], cam.shape[-2:]).flatten(1)
    own = cam[defective].flatten(1)
    own = own / own.norm(dim=1, keepdim=True).clamp_min(1e-8)
    target = target / target.norm(dim=1, keepdim=True).clamp_min(1e-8)
    distances = (own - target).pow(2).sum(dim=1)
    if share is not None:
        return share.mean(distances, share.defective, rows=defective)
    return distances.mean()


def auxiliary_loss(model: GuidedClassifier, aux: torch.Tensor, prior: torch.Tensor, pseudo_mask: torch.Tensor,
                   labels: torch.Tensor, share: BatchShare | None = None) -> torch.Tensor:
    """The loss weighted by λ(t): BCE of S against the pseudo-masks, or the consistency loss."""
    if model.variant == "consistency":
        return consistency_loss(aux, prior, labels, share)
    # Pseudo-mask coverage of each segmentation cell: a soft target in [0, 1].
    target = F.adaptive_avg_pool2d(pseudo_mask, aux.shape[-2:])
    if share is None:
        return F.binary_cross_entropy_with_logits(aux, target)
    per_sample = F.binary_cross_entropy_with_logits(aux, target, reduction="none").flatten(1).mean(dim=1)
    return share.mean(per_sample, share.size)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Load a saved model (weights and config only, no pickled code) in eval mode."""
    checkpoint = load_torch(path)
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a model saved by this pipeline (expected keys config, state_dict)")
    model = build_model(checkpoint["config"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval(), checkpoint["config"]


def save_model(path: str | Path, model: nn.Module, config: dict) -> None:
    """Save what inference needs (a guided model's training-only parts are dropped)."""
    if isinstance(model, GuidedClassifier):
        model = model.deployable()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_torch(path, {"config": config, "state_dict": state})


def _forward(model: nn.Module, x: torch.Tensor, prior: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(model, GuidedClassifier):
        return model(x, prior)
    return model(x), None


@torch.no_grad()
def predict(
    model: nn.Module,
    config: dict,
    images: torch.Tensor,
    priors: torch.Tensor | None = None,
    batch_size: int = 32,
) -> np.ndarray:
    """Defect probabilities for uint8 images (N, H, W); a teacher-guided model also needs priors
    (see ``inference_priors``)."""
    device = next(model.parameters()).device
    model.eval()
    scores = []
    for batch in batches(np.arange(len(images)), batch_size):
        x = to_input(images[batch], config["in_channels"], config["mean"], config["std"]).to(device)
        prior = priors[batch].unsqueeze(1).to(device) if priors is not None else None
        logits, _ = _forward(model, x, prior)
        scores.append(torch.sigmoid(logits.float()).cpu())
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
        probabilities = F.interpolate(torch.sigmoid(seg_logits.float()), size=images.shape[-2:],
                                      mode="bilinear", align_corners=False)
        outputs.append(probabilities[:, 0].cpu())
    return torch.cat(outputs).numpy()


def train(
    data: PreparedData,
    fold: int,
    model_params: ModelParams,
    params: TrainParams,
    guidance: Guidance | None = None,
    checkpoint: Path | None = None,
    on_epoch: Callable[[dict], None] = lambda record: None,
    fingerprint: str = "",
) -> tuple[nn.Module, dict, list[dict]]:
    """Train the model for ``fold`` (baseline, or guided when ``guidance`` is given).

    Returns the model, its config (enough to rebuild it) and the per-epoch history. With a
    ``checkpoint`` path, the state after each epoch is saved there and a run finding a checkpoint
    with the same ``fingerprint`` (a digest of the params and inputs) resumes from it. Inside a
    process group (``distributed.process_group``) this process trains its share of every batch
    with DistributedDataParallel; only rank 0 monitors the test fold, calls ``on_epoch`` and
    writes the checkpoint, and the other ranks' history has NaN test APs.
    """
    device = pick_device(model_params.device)
    amp = autocast_dtype(model_params.precision, device)
    ranks = distributed.current()
    distributed.check_batch_split(params.batch_size, ranks.world, "batch_size")
    train_rows, test_rows = data.split(fold)
    mean, std = pixel_stats(data.images[train_rows])
    kind = "guided" if guidance is not None else "baseline"
    config = {"kind": kind, "backbone": model_params.backbone, "in_channels": model_params.in_channels,
              "mean": mean, "std": std, "height": int(data.images.shape[1]), "width": int(data.images.shape[2])}
    if guidance is not None:
        config["variant"] = params.variant

    torch.manual_seed(params.seed)
    model = build_model(config, deployed=False)
    if model_params.pretrained_weights:
        load_pretrained_features(model, model_params.pretrained_weights)
    if ranks.world > 1:
        model = distributed.sync_batchnorm(model)
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=params.lr, momentum=params.momentum,
                                weight_decay=params.weight_decay)
    sampler = BalancedEpochs(data.index["label"].to_numpy()[train_rows], params.seed)
    labels = data.labels
    history: list[dict] = []
    start_epoch = 0
    state = _resumable_state(checkpoint, fingerprint)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, start_epoch = state["history"], state["epoch"] + 1
        if ranks.main:
            print(f"  resuming fold {fold} from its checkpoint after epoch {start_epoch}", flush=True)
            for record in history:  # so that this run's log holds every epoch, not only the new ones
                on_epoch(record)
    distributed.agree(start_epoch, ranks, f"fold {fold}: epochs restored from {checkpoint}")
    # After loading the checkpoint: DDP copies rank 0's weights to every process when it wraps.
    net = model
    if ranks.world > 1:
        device_ids = [torch.cuda.current_device()] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=device_ids)
    pin_memory = model_params.pin_memory and device.type == "cuda"
    dataset = TrainingBatches(data.images, labels, config["in_channels"], mean, std,
                              *((guidance.priors, guidance.pseudo_masks) if guidance is not None else ()))
    epoch_loader = loader(dataset, model_params.num_workers, pin_memory)
    precision = (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else nullcontext

    for epoch in range(start_epoch, params.epochs):
        started = time.perf_counter()
        model.train()
        generator = torch.Generator().manual_seed(params.seed * 100_003 + epoch)
        weight = seg_weight(epoch, params) if guidance is not None else 0.0
        totals = {"loss": 0.0, "cls_loss": 0.0, "seg_loss": 0.0}
        order = train_rows[sampler.epoch(epoch)]
        global_batches = list(batches(order, params.batch_size))
        shares = [distributed.shard(len(batch), ranks) for batch in global_batches]
        epoch_loader.batch_sampler.batches = [batch[share] for batch, share in zip(global_batches, shares)]
        for batch_number, (batch, mine, inputs) in enumerate(zip(global_batches, shares, epoch_loader)):
            # Drawn for the global batch in every process: the same flips whatever the processes.
            flags = flip_flags(generator, len(batch))
            if ranks.world > 1:
                flags = tuple(flag[mine] for flag in flags)
            flags = tuple(flag.to(device) for flag in flags)
            x = inputs["x"].to(device, non_blocking=pin_memory)
            y = inputs["y"].to(device, non_blocking=pin_memory)
            if guidance is None:
                (x,) = apply_flips(flags, x)
                prior = target = None
            else:
                x, prior, target = apply_flips(flags, x, inputs["prior"].to(device, non_blocking=pin_memory),
                                               inputs["target"].to(device, non_blocking=pin_memory))
            model_prior = prior
            if guidance is not None and model.variant == "none":
                # It will see no prior at inference: it must learn to do without one.
                keep = torch.rand(len(batch), generator=generator) >= params.prior_dropout
                if ranks.world > 1:
                    keep = keep[mine]
                model_prior = prior * keep.view(-1, 1, 1, 1).to(device)
            with precision():
                logits, aux = net(x, model_prior) if guidance is not None else (net(x), None)
            # The losses in fp32 whatever the forward's precision.
            logits = logits.float()
            aux = aux.float() if aux is not None else None
            share = None
            if ranks.world > 1:
                share = BatchShare(distributed.real_samples(len(batch), ranks).to(device), len(batch),
                                   int(labels[batch].sum()), ranks.world)
            if share is None:
                cls_loss = F.binary_cross_entropy_with_logits(logits, y)
            else:
                cls_loss = share.mean(F.binary_cross_entropy_with_logits(logits, y, reduction="none"), share.size)
            seg_loss = torch.zeros((), device=device)
            if aux is not None:
                seg_loss = auxiliary_loss(model, aux, prior, target, y, share)
            loss = cls_loss + weight * seg_loss
            # The global batch's losses (each process holds its term of them): every process
            # sees the same values, so all stop together on a non-finite one.
            values = distributed.all_sum(torch.stack([loss, cls_loss, seg_loss]).detach(), ranks) / ranks.world
            if not torch.isfinite(values[0]):
                raise TrainingDiverged(
                    f"fold {fold}: loss is {values[0].item()} at epoch {epoch + 1}, batch {batch_number + 1}; "
                    "lower the learning rate or check the input images. No model was written."
                )
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(epoch + batch_number / len(global_batches), params)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for name, value in zip(("loss", "cls_loss", "seg_loss"), values.tolist()):
                totals[name] += value * len(batch)
        if not all(t.isfinite().all() for t in model.state_dict().values() if t.is_floating_point()):
            # A step can break the weights although the loss before it was finite.
            raise TrainingDiverged(f"fold {fold}: the weights are not finite after epoch {epoch + 1}; "
                                   "lower the learning rate. No model was written.")

        record = {"fold": fold, "epoch": epoch + 1, "lr": learning_rate(epoch, params), "seg_weight": weight,
                  **{name: total / len(order) for name, total in totals.items()}}
        record["test_ap"] = math.nan
        if ranks.main:
            # Monitoring only: the test fold never selects a model or stops training.
            priors = inference_priors(config, guidance.priors[test_rows]) if guidance is not None else None
            scores = predict(model, config, data.images[test_rows], priors, params.batch_size * 2)
            record["test_ap"] = _average_precision(labels[test_rows].numpy(), scores)
        record["seconds"] = time.perf_counter() - started
        history.append(record)
        if ranks.main:
            on_epoch(record)
            if checkpoint is not None:
                save_torch(checkpoint, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                        "history": history, "epoch": epoch, "fingerprint": fingerprint})
    return model.eval(), config, history


def _resumable_state(checkpoint: Path | None, fingerprint: str) -> dict | None:
    """The checkpoint's state if it was written for this fingerprint and can be used, else None."""
    if checkpoint is None or not checkpoint.is_file():
        return None
    try:
        state = load_torch(checkpoint)
    except (RuntimeError, ValueError, OSError, EOFError) as error:
        # Only costs the epochs it held: the run starts over instead of failing.
        print(f"  ignoring unreadable checkpoint {checkpoint} ({error}); starting over", flush=True)
        return None
    return state if isinstance(state, dict) and state.get("fingerprint") == fingerprint else None


def _average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    if labels.sum() == 0:
        return math.nan
    return float(average_precision_score(labels, scores))


def format_epoch(record: dict) -> str:
    """One readable log line per epoch, for terminals and CI logs alike."""
    parts = [f"fold {record['fold']}", f"epoch {record['epoch']:3d}", f"loss {record['loss']:.4f}"]
    if record.get("seg_weight"):
        parts.append(f"seg {record['seg_loss']:.4f} (λ={record['seg_weight']:.2f})")
    parts += [f"test AP {record['test_ap']:.4f}", f"{record['seconds']:.1f}s"]
    return "  " + " | ".join(parts)


def train_folds(
    stage: str,
    data: PreparedData,
    model_params: ModelParams,
    params: TrainParams,
    run: StageRun | None,
    out: Path | None,
    guidance_for: Callable[[int], Guidance] | None = None,
    fingerprint: str = "",
) -> list[dict]:
    """Train one model per fold into ``out/fold<k>.pt``, logging every epoch; return the history.

    Checkpoints live outside the stage's outputs (DVC deletes those before a stage runs), in
    ``data/checkpoints/<stage>``, and are removed once the stage succeeds. Training processes of
    rank > 0 pass no ``run`` and no ``out``: they log and write nothing.
    """
    checkpoints = Path("data/checkpoints") / stage
    checkpoints.mkdir(parents=True, exist_ok=True)
    history: list[dict] = []
    for fold in data.folds:
        def log(record: dict, fold: int = fold) -> None:
            print(format_epoch(record), flush=True)
            if run is not None:
                run.log_metrics({k: v for k, v in record.items() if k not in ("fold", "epoch")},
                                step=record["epoch"], prefix=f"fold{fold}/")

        guidance = guidance_for(fold) if guidance_for is not None else None
        model, config, fold_history = train(data, fold, model_params, params, guidance,
                                            checkpoints / f"fold{fold}.pt", log, fingerprint)
        if out is not None:
            save_model(out / f"fold{fold}.pt", model, config)
        history.extend(fold_history)
    return history


def remove_checkpoints(stage: str) -> None:
    folder = Path("data/checkpoints") / stage
    for path in folder.glob("*.pt"):
        path.unlink()


def summarize(history: list[dict]) -> dict:
    """Last-epoch figures per fold and their mean, for the stage's metrics file."""
    last = {}
    for record in history:
        last[record["fold"]] = record
    per_fold = {f"fold{fold}": {"loss": r["loss"], "test_ap": r["test_ap"]} for fold, r in sorted(last.items())}
    aps = [r["test_ap"] for r in last.values()]
    # No timings: the file must be identical for identical runs (they go to MLflow instead).
    return {"per_fold": per_fold, "test_ap_mean": float(np.nanmean(aps))}


def register_models(run: StageRun, out: Path, dataset: str, kind: str) -> None:
    """Log every fold's model to MLflow and register it as a version of ``<dataset>-<kind>``."""
    for path in sorted(out.glob("fold*.pt")):
        model, config = load_model(path)
        images = np.zeros((2, config["in_channels"], config["height"], config["width"]), np.float32)
        example = (images, np.zeros((2, 1, *images.shape[2:]), np.float32)) if takes_prior(config) else (images,)
        # The config (input size, normalisation, variant) travels with the model: the exported graph
        # alone cannot be fed images (``pipeline.predict`` rebuilds the network from both).
        run.log_model(model, example, name=f"model_{path.stem}", registered_name=f"{dataset}-{kind}",
                      tags={"fold": path.stem.removeprefix("fold"), "pipeline_run": run.pipeline_id},
                      metadata={"pipeline_config": config})


def fingerprint_of(sections: dict, *input_files: Path) -> str:
    """A digest of a stage's params, inputs and training code: a checkpoint resumes only under the same one."""
    import hashlib
    import inspect
    import json

    digest = hashlib.sha256(json.dumps({k: v.model_dump() for k, v in sections.items()}, sort_keys=True).encode())
    # The code that defines the computation counts too: resuming a checkpoint written by other code
    # would mix two trainings (or fail on changed layers).
    code = (__file__, inspect.getfile(Classifier), inspect.getfile(BalancedEpochs), distributed.__file__)
    for path in (*input_files, *code):
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def publish(run: StageRun, stage: str, kind: str, history: list[dict], out: Path, dataset: str) -> None:
    """What a training stage leaves besides its models: metrics and plot files for DVC, the
    summary and the registered models in MLflow; then its checkpoints go."""
    summary = summarize(history)
    write_json(Path(f"data/metrics/{stage}.json"), summary)
    plot = Path(f"data/plots/{stage}.csv")
    # Timings stay out of the DVC files, which must be identical for identical runs.
    write_csv(plot, pd.DataFrame(history).drop(columns="seconds"))
    run.log_metrics({"test_ap_mean": summary["test_ap_mean"], "train_seconds": sum(r["seconds"] for r in history)})
    run.log_artifact(plot)
    register_models(run, out, dataset, kind)
    remove_checkpoints(stage)
    print(f"  mean test AP over folds (last epoch): {summary['test_ap_mean']:.4f}")
