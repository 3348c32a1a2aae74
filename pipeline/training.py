"""Training and inference for the baseline and the guided classifier.

One loop serves both models; the guided model's step adds its auxiliary loss (pseudo-mask BCE,
or for the consistency variant the distance between its own Grad-CAM and the prior). Training is
deterministic for a seed on the CPU: the batch order and the flips of epoch ``e`` depend only on
(seed, e), so a run resumed from the checkpoint of epoch ``e`` continues exactly as an
uninterrupted run would.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score
from torch import nn

from pipeline.artifacts import load_torch, save_torch, write_csv, write_json
from pipeline.config import GuidedParams, ModelParams, TrainParams
from pipeline.data import BalancedEpochs, PreparedData, batches, pixel_stats, random_flips, to_input
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
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seg_weight(epoch: int, params: GuidedParams) -> float:
    """λ(t): the pseudo-mask loss weight for epoch t (0-based) of T."""
    if params.seg_weight_schedule == "constant":
        return params.seg_weight
    return params.seg_weight * (1.0 - epoch / params.epochs)


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


def consistency_loss(cam: torch.Tensor, prior: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
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
    return (own - target).pow(2).sum(dim=1).mean()


def auxiliary_loss(model: GuidedClassifier, aux: torch.Tensor, prior: torch.Tensor, pseudo_mask: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    """The loss weighted by λ(t): BCE of S against the pseudo-masks, or the consistency loss."""
    if model.variant == "consistency":
        return consistency_loss(aux, prior, labels)
    # Pseudo-mask coverage of each segmentation cell: a soft target in [0, 1].
    return F.binary_cross_entropy_with_logits(aux, F.adaptive_avg_pool2d(pseudo_mask, aux.shape[-2:]))


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
    with the same ``fingerprint`` (a digest of the params and inputs) resumes from it.
    """
    device = pick_device(model_params.device)
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
        print(f"  resuming fold {fold} from its checkpoint after epoch {start_epoch}", flush=True)
        for record in history:  # so that this run's log holds every epoch, not only the new ones
            on_epoch(record)

    for epoch in range(start_epoch, params.epochs):
        started = time.perf_counter()
        model.train()
        generator = torch.Generator().manual_seed(params.seed * 100_003 + epoch)
        weight = seg_weight(epoch, params) if guidance is not None else 0.0
        totals = {"loss": 0.0, "cls_loss": 0.0, "seg_loss": 0.0}
        order = train_rows[sampler.epoch(epoch)]
        for batch_number, batch in enumerate(batches(order, params.batch_size)):
            x = to_input(data.images[batch], config["in_channels"], mean, std)
            y = labels[batch]
            if guidance is None:
                (x,) = random_flips(generator, x)
                prior = target = None
            else:
                prior, target = guidance.priors[batch].unsqueeze(1), guidance.pseudo_masks[batch].unsqueeze(1)
                x, prior, target = random_flips(generator, x, prior, target)
                prior, target = prior.to(device), target.to(device)
            model_prior = prior
            if guidance is not None and model.variant == "none":
                # It will see no prior at inference: it must learn to do without one.
                keep = torch.rand(len(batch), generator=generator) >= params.prior_dropout
                model_prior = prior * keep.view(-1, 1, 1, 1).to(device)
            logits, aux = _forward(model, x.to(device), model_prior)
            cls_loss = F.binary_cross_entropy_with_logits(logits, y.to(device))
            seg_loss = torch.zeros((), device=device)
            if aux is not None:
                seg_loss = auxiliary_loss(model, aux, prior, target, y.to(device))
            loss = cls_loss + weight * seg_loss
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"fold {fold}: loss is {loss.item()} at epoch {epoch + 1}, batch {batch_number + 1}; "
                    "lower the learning rate or check the input images. No model was written."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for name, value in (("loss", loss), ("cls_loss", cls_loss), ("seg_loss", seg_loss)):
                totals[name] += value.item() * len(batch)
        if not all(t.isfinite().all() for t in model.state_dict().values() if t.is_floating_point()):
            # A step can break the weights although the loss before it was finite.
            raise TrainingDiverged(f"fold {fold}: the weights are not finite after epoch {epoch + 1}; "
                                   "lower the learning rate. No model was written.")

        record = {"fold": fold, "epoch": epoch + 1, "seg_weight": weight,
                  **{name: total / len(order) for name, total in totals.items()}}
        # Monitoring only: the test fold never selects a model or stops training.
        priors = inference_priors(config, guidance.priors[test_rows]) if guidance is not None else None
        scores = predict(model, config, data.images[test_rows], priors, params.batch_size * 2)
        record["test_ap"] = _average_precision(labels[test_rows].numpy(), scores)
        record["seconds"] = time.perf_counter() - started
        history.append(record)
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
    run: StageRun,
    out: Path,
    guidance_for: Callable[[int], Guidance] | None = None,
    fingerprint: str = "",
) -> list[dict]:
    """Train one model per fold into ``out/fold<k>.pt``, logging every epoch; return the history.

    Checkpoints live outside the stage's outputs (DVC deletes those before a stage runs), in
    ``data/checkpoints/<stage>``, and are removed once the stage succeeds.
    """
    checkpoints = Path("data/checkpoints") / stage
    checkpoints.mkdir(parents=True, exist_ok=True)
    history: list[dict] = []
    for fold in data.folds:
        def log(record: dict, fold: int = fold) -> None:
            print(format_epoch(record), flush=True)
            run.log_metrics({k: v for k, v in record.items() if k not in ("fold", "epoch")},
                            step=record["epoch"], prefix=f"fold{fold}/")

        guidance = guidance_for(fold) if guidance_for is not None else None
        model, config, fold_history = train(data, fold, model_params, params, guidance,
                                            checkpoints / f"fold{fold}.pt", log, fingerprint)
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
    code = (__file__, inspect.getfile(Classifier), inspect.getfile(BalancedEpochs))
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
