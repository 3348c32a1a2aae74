"""Training the baseline and the guided classifier: one loop for both.

What the guided model adds (its inputs, its auxiliary loss and the loss's weight) comes with its
``objectives.Objective``; the loop itself knows nothing of variants. Training is deterministic
for a seed on the CPU: the batch order and the flips of epoch ``e`` depend only on (seed, e), so
a run resumed from the checkpoint of epoch ``e`` continues exactly as an uninterrupted run would.
With N training processes (``pipeline.core.distributed``) each takes its share of the same global
batches, and the result equals one process's up to float rounding.

The stage around the loop (one model per fold, saved, tracked and registered, and the
checkpoints' fingerprint) is ``pipeline.training.stage``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch
from sklearn.metrics import average_precision_score
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

from pipeline.config import ModelParams, TrainParams
from pipeline.core import distributed
from pipeline.core.artifacts import load_torch, save_torch
from pipeline.core.devices import FP32, Precision, pick_device, resolve_precision
from pipeline.core.errors import PipelineError
from pipeline.core.progress import progress
from pipeline.data.prepared import PreparedData
from pipeline.data.training_data import (
    BalancedEpochs,
    EpochBatches,
    TrainingBatches,
    apply_flips,
    batches,
    flip_flags,
    loader,
    pixel_stats,
    to_input,
)
from pipeline.models.files import build_model
from pipeline.models.inference import predict
from pipeline.models.losses import BatchShare, classification_loss
from pipeline.models.networks import PriorAsChannel, load_pretrained_features
from pipeline.training.objectives import Objective

LOSSES = ("loss", "cls_loss", "seg_loss")


class TrainingDiverged(PipelineError, RuntimeError):
    """The loss became NaN or infinite."""


def learning_rate(epoch: float, params: TrainParams) -> float:
    """The learning rate at ``epoch`` (0-based, fractional within an epoch) of ``params.epochs``.

    A function of the position alone, with no scheduler state: a run resumed from a checkpoint
    takes the same rates as an uninterrupted one.
    """
    rate = params.lr
    if params.lr_schedule == "cosine":
        rate *= 0.5 * (1.0 + math.cos(math.pi * epoch / params.epochs))
    if epoch < params.warmup_epochs:
        rate *= 0.1 + 0.9 * epoch / params.warmup_epochs
    return rate


def weight_average(model: nn.Module, params: TrainParams, steps_per_epoch: int) -> AveragedModel | None:
    """The exponential moving average of ``model``'s weights and buffers (batch-norm statistics
    too, so that the average is a consistent network), or None without ``ema_epochs``."""
    if not params.ema_epochs:
        return None
    # Per step, so that the time constant in epochs holds whatever the data set's size.
    decay = math.exp(-1.0 / (params.ema_epochs * steps_per_epoch))
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


@dataclass
class FoldTraining:
    """One fold's training in progress: what the set-up builds and every epoch uses."""

    fold: int
    params: TrainParams
    objective: Objective
    config: dict
    model: nn.Module
    net: nn.Module  # what a step runs: the model, or DistributedDataParallel around it
    optimizer: torch.optim.Optimizer
    sampler: BalancedEpochs
    loader: torch.utils.data.DataLoader
    train_rows: np.ndarray
    test_rows: np.ndarray
    labels: torch.Tensor
    device: torch.device
    precision: Precision
    ranks: distributed.Ranks
    pin_memory: bool
    average: AveragedModel | None = None  # with ema_epochs: what is monitored and saved
    history: list[dict] = field(default_factory=list)
    start_epoch: int = 0

    @property
    def result(self) -> nn.Module:
        """The network this training yields: the weights' moving average, or the weights."""
        return self.average.module if self.average is not None else self.model


def train(
    data: PreparedData,
    fold: int,
    model_params: ModelParams,
    params: TrainParams,
    objective: Objective | None = None,
    checkpoint: Path | None = None,
    on_epoch: Callable[[dict], None] = lambda record: None,
    fingerprint: str = "",
) -> tuple[nn.Module, dict, list[dict]]:
    """Train the model for ``fold``: the baseline, or what ``objective`` makes of it.

    Returns the model, its config (enough to rebuild it) and the per-epoch history. With a
    ``checkpoint`` path, the state after each epoch is saved there and a run finding a checkpoint
    with the same ``fingerprint`` (a digest of the params and inputs) resumes from it. Inside a
    process group (``distributed.process_group``) this process trains its share of every batch
    with DistributedDataParallel; only rank 0 monitors the test fold, calls ``on_epoch`` and
    writes the checkpoint, and the other ranks' history has NaN test APs.
    """
    run = set_up(data, fold, model_params, params, objective or Objective())
    resume(run, checkpoint, fingerprint, on_epoch)
    # After resuming: DDP copies rank 0's weights to every process when it wraps.
    run.net = distributed.data_parallel(run.model, run.device, run.ranks)
    epochs = progress(
        range(run.start_epoch, params.epochs),
        f"fold {fold}",
        "epoch",
        params.epochs,
        run.start_epoch,
        shown=run.ranks.main,
    )
    for epoch in epochs:
        started = time.perf_counter()
        totals, seen = train_epoch(run, epoch)
        end_epoch(run, data, epoch, totals, seen, time.perf_counter() - started, on_epoch, checkpoint, fingerprint)
    # Saved in the contiguous layout whatever the path trained in: the same files for every reader.
    return FP32.model(run.result).eval(), run.config, run.history


def set_up(
    data: PreparedData, fold: int, model_params: ModelParams, params: TrainParams, objective: Objective
) -> FoldTraining:
    """The model (seeded), optimizer, epoch sampler and loader of ``fold``'s training."""
    device = pick_device(model_params.device)
    ranks = distributed.current()
    distributed.check_batch_split(params.batch_size, ranks.world, "batch_size")
    train_rows, test_rows = data.split(fold)
    mean, std = pixel_stats(data.images[train_rows])
    config = {
        "kind": objective.kind,
        "backbone": model_params.backbone,
        "in_channels": model_params.in_channels,
        "mean": mean,
        "std": std,
        "height": int(data.images.shape[1]),
        "width": int(data.images.shape[2]),
        **objective.config(),
        **({"test_time_flips": True} if model_params.test_time_flips else {}),
    }
    torch.manual_seed(params.seed)
    model = build_model({**config, **objective.training_config()}, deployed=False)
    if model_params.pretrained_weights:
        load_pretrained_features(model, model_params.pretrained_weights)
    precision = resolve_precision(model_params.precision, device)
    model = precision.model(distributed.for_processes(model, ranks).to(device))
    optimizer = torch.optim.SGD(
        model.parameters(), lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay
    )
    labels = data.labels
    pin_memory = model_params.pin_memory and device.type == "cuda"
    dataset = TrainingBatches(data.images, labels, config["in_channels"], mean, std, objective.step_tensors())
    sampler = BalancedEpochs(
        data.index["label"].to_numpy()[train_rows], params.seed, params.sampling == "oversample", params.hard_negatives
    )
    return FoldTraining(
        fold,
        params,
        objective,
        config,
        model,
        model,
        optimizer,
        sampler,
        loader(dataset, model_params.num_workers, pin_memory),
        train_rows,
        test_rows,
        labels,
        device,
        precision,
        ranks,
        pin_memory,
        weight_average(model, params, sampler.steps(params.batch_size)),
    )


def resume(run: FoldTraining, checkpoint: Path | None, fingerprint: str, on_epoch: Callable[[dict], None]) -> None:
    """Continue from the checkpoint written for this fingerprint, if there is one."""
    state = _resumable_state(checkpoint, fingerprint)
    if state is not None:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        if run.average is not None:
            run.average.load_state_dict(state["average"])
        run.sampler.load_state_dict(state["sampler"])
        run.history, run.start_epoch = state["history"], state["epoch"] + 1
        if run.ranks.main:
            print(f"  resuming fold {run.fold} from its checkpoint after epoch {run.start_epoch}", flush=True)
            for record in run.history:  # so that this run's log holds every epoch, not only the new ones
                on_epoch(record)
    distributed.agree(run.start_epoch, run.ranks, f"fold {run.fold}: epochs restored from {checkpoint}")


def train_epoch(run: FoldTraining, epoch: int) -> tuple[list[float], int]:
    """One epoch's steps; returns the summed losses (weighted by batch size) and the images seen."""
    run.model.train()
    generator = torch.Generator().manual_seed(run.params.seed * 100_003 + epoch)
    sampled = list(batches(run.sampler.epoch(epoch), run.params.batch_size))  # positions in the training rows
    global_batches = [run.train_rows[positions] for positions in sampled]
    shares = [distributed.shard(len(batch), run.ranks) for batch in global_batches]
    batch_sampler = cast(EpochBatches, run.loader.batch_sampler)  # what ``loader`` gives every DataLoader
    batch_sampler.batches = [batch[share] for batch, share in zip(global_batches, shares)]
    totals = [0.0] * len(LOSSES)
    steps = progress(
        zip(global_batches, shares, run.loader),
        f"epoch {epoch + 1}",
        "batch",
        len(global_batches),
        leave=False,
        shown=run.ranks.main,
    )
    for number, (batch, mine, fetched) in enumerate(steps):
        loss, values, logits = batch_losses(run, batch, mine, fetched, generator, run.objective.seg_weight(epoch))
        if not math.isfinite(values[0]):
            raise TrainingDiverged(
                f"fold {run.fold}: loss is {values[0]} at epoch {epoch + 1}, batch {number + 1}; "
                "lower the learning rate or check the input images. No model was written."
            )
        for group in run.optimizer.param_groups:
            group["lr"] = learning_rate(epoch + number / len(global_batches), run.params)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        if run.average is not None:
            run.average.update_parameters(run.model)
        if run.sampler.hard_share:
            # The step's own logits (flipped images, training mode): scoring the defect-free images
            # apart would cost a forward pass over all of them every epoch.
            run.sampler.record(sampled[number], distributed.whole_batch(logits, len(batch), run.ranks).cpu().numpy())
        totals = [total + value * len(batch) for total, value in zip(totals, values)]
    return totals, sum(len(batch) for batch in global_batches)


def batch_losses(
    run: FoldTraining,
    batch: np.ndarray,
    mine: np.ndarray,
    fetched: dict[str, torch.Tensor],
    generator: torch.Generator,
    weight: float,
) -> tuple[torch.Tensor, list[float], torch.Tensor]:
    """This process's loss on its share of a global batch, the global batch's losses and this
    process's (detached) logits."""
    # Drawn for the global batch in every process: the same flips whatever the processes.
    flags = cast(
        tuple[torch.Tensor, torch.Tensor],  # flip_flags' two, each cut to this process's share
        tuple(flag[mine].to(run.device) for flag in flip_flags(generator, len(batch))),
    )
    fetched = {name: tensor.to(run.device, non_blocking=run.pin_memory) for name, tensor in fetched.items()}
    labels = fetched.pop("y")
    fetched = dict(zip(fetched, apply_flips(flags, *fetched.values())))
    prior = run.objective.network_prior(fetched, generator, len(batch), mine)
    with run.precision.autocast(run.device):
        logits, aux = run.objective.forward(run.net, run.precision.input(fetched["x"]), prior)
    logits = logits.float()  # the losses in fp32 whatever the forward's precision (the auxiliary one: its own)
    share = BatchShare(
        distributed.real_samples(len(batch), run.ranks).to(run.device),
        len(batch),
        int(run.labels[batch].sum()),
        run.ranks.world,
    )
    cls_loss = classification_loss(logits, labels, share)
    seg_loss = run.objective.auxiliary_loss(aux, fetched, labels, share)
    loss = cls_loss + weight * seg_loss
    # The global batch's losses (each process holds its term of them): every process sees the
    # same values, so all stop together on a non-finite one.
    values = distributed.all_sum(torch.stack([loss, cls_loss, seg_loss]).detach(), run.ranks) / run.ranks.world
    return loss, values.tolist(), logits.detach().flatten()


def end_epoch(
    run: FoldTraining,
    data: PreparedData,
    epoch: int,
    totals: list[float],
    seen: int,
    seconds: float,
    on_epoch: Callable[[dict], None],
    checkpoint: Path | None,
    fingerprint: str,
) -> None:
    """Check the weights, record the epoch, monitor the test fold and write the checkpoint."""
    if not all(t.isfinite().all() for t in run.model.state_dict().values() if t.is_floating_point()):
        # A step can break the weights although the loss before it was finite.
        raise TrainingDiverged(
            f"fold {run.fold}: the weights are not finite after epoch {epoch + 1}; "
            "lower the learning rate. No model was written."
        )
    record = {
        "fold": run.fold,
        "epoch": epoch + 1,
        "lr": learning_rate(epoch, run.params),
        "seg_weight": run.objective.seg_weight(epoch),
        **{name: total / seen for name, total in zip(LOSSES, totals)},
    }
    if epoch + 1 == run.params.epochs and run.params.recalibrate_bn:
        # Before the last monitoring and the checkpoint: both see the network that is saved.
        recalibrate_batch_norm(run, data)
    record["test_ap"] = math.nan
    # A model trained on every image (the release) has no test fold, and epochs between two
    # scorings are not monitored: their test AP stays NaN, which MLflow logging and the epoch line skip.
    if run.ranks.main and len(run.test_rows) and monitored(epoch, run.params):
        # Monitoring only: the test fold never selects a model or stops training. On the training's
        # fast path (at 256x704 a fp32 pass over a fold costs as much as a few epochs), but the last
        # epoch's in fp32: its AP is the evaluation's, the figure a run is compared on.
        priors = run.objective.inference_priors(run.test_rows)
        precision = FP32 if epoch + 1 == run.params.epochs else run.precision
        images = data.images[run.test_rows]
        scores = predict(run.result, run.config, images, priors, run.params.batch_size * 2, precision)
        record["test_ap"] = _average_precision(run.labels[run.test_rows].numpy(), scores)
    record["seconds"] = seconds
    run.history.append(record)
    if run.ranks.main:
        on_epoch(record)
        if checkpoint is not None:
            save_torch(
                checkpoint,
                {
                    "model": run.model.state_dict(),
                    "optimizer": run.optimizer.state_dict(),
                    "average": run.average.state_dict() if run.average is not None else None,
                    "sampler": run.sampler.state_dict(),
                    "history": run.history,
                    "epoch": epoch,
                    "fingerprint": fingerprint,
                },
            )


def recalibrate_batch_norm(run: FoldTraining, data: PreparedData) -> None:
    """Re-estimate every BatchNorm layer's running statistics of the trained network as plain
    averages over the last epoch's images, in the sampler's order (the classes balanced as in
    every training batch), in fp32 and without flips; weights unchanged.

    The running statistics are a momentum-0.1 average along training, so after 10 to 20 steps
    (a few-defect regime's whole run) they still carry the first steps' features. Balanced,
    because a guided model's features can depend on the class so much that statistics over the
    fold's mostly defect-free images leave it scoring every image alike
    (results/bsdata/few_defects). With N training processes each passes every N-th image of each
    batch (no padding: a repeated image would weigh twice) and synchronised BatchNorm combines
    their statistics into the whole batch's, so the result is one process's at 1/N of the pass."""
    rows = run.train_rows[run.sampler.epoch(run.params.epochs - 1)]
    priors = run.objective.inference_priors(rows)
    config, images = run.config, data.images
    # update_bn feeds the network one tensor per batch: where the variant reads a prior, it rides as a channel.
    network = run.result if priors is None else PriorAsChannel(run.result)
    inputs = (
        _with_prior(to_input(images[rows[mine]], config["in_channels"], config["mean"], config["std"]), priors, mine)
        for mine in _own_shares(len(rows), run.params.batch_size * 2, run.ranks)
    )
    update_bn(inputs, network, device=run.device)


def _own_shares(size: int, batch_size: int, ranks: distributed.Ranks) -> Iterator[np.ndarray]:
    """This process's positions in each batch of ``size`` positions: every N-th from its rank on,
    empty where a batch has fewer images than processes (every process must take part in it)."""
    for part in batches(np.arange(size), batch_size):
        yield part[ranks.rank :: ranks.world]


def _with_prior(x: torch.Tensor, priors: torch.Tensor | None, part: np.ndarray) -> torch.Tensor:
    return x if priors is None else torch.cat([x, priors[part].unsqueeze(1)], dim=1)


def monitored(epoch: int, params: TrainParams) -> bool:
    """Whether the test fold is scored after ``epoch`` (0-based): every ``monitor_every``-th and the last."""
    return (epoch + 1) % params.monitor_every == 0 or epoch + 1 == params.epochs


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
    if math.isfinite(record["test_ap"]):  # NaN: an epoch not monitored, or a release without a test fold
        parts.append(f"test AP {record['test_ap']:.4f}")
    parts.append(f"{record['seconds']:.1f}s")
    return "  " + " | ".join(parts)
