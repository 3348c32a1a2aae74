"""Data-parallel training over several processes (``model.nproc_per_node``), launched by torchrun.

A training stage started as a plain process re-runs itself under torchrun with N processes when
N > 1, so ``dvc repro`` keeps the same ``cmd``. Every process trains a DistributedDataParallel
copy of the model on its share of each global batch (``shard``): the global batch, the flips, the
loss and so the gradients are those of one process training with the same ``batch_size``. Rank 0
alone tracks to MLflow and writes outputs and checkpoints.

BatchNorm normalises over the global batch too (``SyncedBatchNorm``): torch's SyncBatchNorm
refuses CPU tensors (torch 2.14), and per-process statistics would make N processes train a
different model than one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.nn.functional import all_gather

from pipeline.core.errors import InputError, SetupError

# Its suggested replacement (torch.distributed._functional_collectives) is private API; this one
# is public, differentiable and works with gloo and NCCL alike.
warnings.filterwarnings(
    "ignore", message="torch.distributed.nn.functional.all_gather is deprecated", category=FutureWarning
)


class DistributedError(SetupError):
    """A training process launched by torchrun failed (its own message comes before this one)."""


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among the training processes."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs, prints and writes files."""
        return self.rank == 0


def in_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def current() -> Ranks:
    """This process's rank and the number of processes (0 of 1 outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def check_batch_split(batch_size: int, processes: int, key: str) -> None:
    """Every process takes batch_size / N images of each batch: N must divide it."""
    if batch_size % processes:
        raise InputError(
            f"{key} {batch_size} does not split over model.nproc_per_node = "
            f"{processes} processes; choose a multiple of {processes}, so that each process "
            "takes the same share of every batch"
        )


def launch(module: str, processes: int, batch_size: int, key: str, device: torch.device) -> bool:
    """Re-run ``python -m module`` under torchrun with ``processes`` workers, unless one process
    is asked for or this already is a worker. True when the workers ran (and all succeeded)."""
    check_batch_split(batch_size, processes, key)
    if processes == 1 or in_torchrun():
        return False
    if device.type == "cuda" and torch.cuda.device_count() < processes:
        raise SetupError(
            f"model.nproc_per_node is {processes}, one process per GPU, but torch finds "
            f"{torch.cuda.device_count()} CUDA GPU(s) here"
        )
    if device.type not in ("cuda", "cpu"):
        raise SetupError(f"model.nproc_per_node > 1 needs CUDA GPUs or the CPU, not {device.type}")
    print(f"  launching {processes} training processes (torchrun)", flush=True)
    # --standalone: a rendezvous on a free local port, so parallel stages or runs never collide.
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        module,
        *sys.argv[1:],  # a round stage's round
    ]
    code = subprocess.run(command, check=False).returncode
    if code != 0:
        raise DistributedError(f"a training process failed (torchrun exit code {code}); its message is above")
    return True


@contextmanager
def process_group(device: torch.device) -> Iterator[Ranks]:
    """Join the training processes of this torchrun launch (nothing to join outside torchrun)."""
    if not in_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        yield Ranks()
        return
    if device.type == "cuda":
        # One GPU per process: "cuda" then means this process's GPU everywhere.
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise SetupError(f"model.nproc_per_node > 1 needs CUDA GPUs or the CPU, not {device.type}")
    dist.init_process_group(backend)
    try:
        yield current()
    finally:
        dist.destroy_process_group()


def shard(size: int, ranks: Ranks) -> np.ndarray:
    """Indices into a global batch of ``size`` of this process's samples, as DistributedSampler
    splits a data set: padded by wrapping around to a multiple of the processes, then every
    N-th sample from this rank on. Samples at index >= ``size`` (``np.arange(...) % size``
    repeats) are padding: they keep every process's batch the same size and get no weight in
    the loss."""
    padded = -(-size // ranks.world) * ranks.world
    return np.arange(ranks.rank, padded, ranks.world) % size


def real_samples(size: int, ranks: Ranks) -> torch.Tensor:
    """1.0 for this process's real samples of a global batch of ``size``, 0.0 for its padding."""
    padded = -(-size // ranks.world) * ranks.world
    return torch.from_numpy(np.arange(ranks.rank, padded, ranks.world) < size).float()


class SyncedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch across processes.

    Each process contributes its sample count, mean and sum of squared deviations, gathered by a
    differentiable all-gather and combined with Chan's parallel formula, which is numerically
    as stable as one process's two-pass variance. Outside a process group, or in eval mode, it
    is plain BatchNorm. A global batch of one sample uses the running statistics, as
    ``GuidedClassifier`` does for a batch of one in a single process; a process may hold none of
    a global batch's samples.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        x = input.float()  # statistics in fp32 under bf16 autocast too, as torch's BatchNorm keeps them
        dims = [0, *range(2, x.dim())]
        shape = [1, -1, *([1] * (x.dim() - 2))]
        count = x.numel() // x.shape[1]
        # A process with no sample of a global batch (fewer samples than processes) still joins the
        # gather, with a count of 0 and zeros that weigh nothing (its own mean would be NaN).
        mean = x.mean(dims) if count else x.new_zeros(x.shape[1])
        squares = (x - mean.view(shape)).pow(2).sum(dims)
        stats = torch.cat([mean.new_full((1,), float(count)), mean, squares])
        gathered = torch.stack(all_gather(stats))  # (processes, 1 + 2C)
        counts, means, all_squares = gathered[:, :1], gathered[:, 1 : 1 + x.shape[1]], gathered[:, 1 + x.shape[1] :]
        total = counts.sum()
        if int(total.item()) == 1:
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, eps=self.eps)
        global_mean = (counts * means).sum(0) / total
        variance = (all_squares + counts * (means - global_mean).pow(2)).sum(0) / total
        if self.track_running_stats:
            # BatchNorm registers these buffers as tensors whenever it tracks running statistics.
            assert self.num_batches_tracked is not None
            assert self.running_mean is not None and self.running_var is not None
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = variance * total / (total - 1)
                self.running_mean.mul_(1 - momentum).add_(global_mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
        y = (x - global_mean.view(shape)) * torch.rsqrt(variance.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer by a ``SyncedBatchNorm`` holding the same tensors (same
    state_dict keys, so saved models load into plain BatchNorm)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncedBatchNorm):
        synced = SyncedBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            device=module.running_mean.device if module.running_mean is not None else None,
        )
        if module.affine:
            synced.weight, synced.bias = module.weight, module.bias
        if module.track_running_stats:
            synced.running_mean, synced.running_var = module.running_mean, module.running_var
            synced.num_batches_tracked = module.num_batches_tracked
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, sync_batchnorm(child))
    return module


def agree(value: int, ranks: Ranks, what: str) -> None:
    """Stop with an error where this process's ``value`` differs from rank 0's (e.g. the epoch a
    checkpoint resumes from): processes that disagree would otherwise wait on each other forever."""
    if ranks.world == 1:
        return
    mine = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        mine = mine.cuda()
    first = mine.clone()
    dist.broadcast(first, src=0)
    if int(first.item()) != value:
        raise DistributedError(f"{what}: this process (rank {ranks.rank}) has {value}, rank 0 has {int(first.item())}")


def all_sum(values: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Sum of a (detached) tensor over the processes; itself in one process."""
    if ranks.world == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values


def whole_batch(values: torch.Tensor, size: int, ranks: Ranks) -> torch.Tensor:
    """A global batch's per-sample values (detached, fp32) from this process's share of them
    (``shard``), in batch order in every process; the padding contributes nothing."""
    if ranks.world == 1:
        return values
    real = real_samples(size, ranks).bool().to(values.device)
    whole = values.new_zeros(size)
    whole[torch.from_numpy(shard(size, ranks)).to(values.device)[real]] = values[real]
    return all_sum(whole, ranks)


def for_processes(model: nn.Module, ranks: Ranks) -> nn.Module:
    """The model with BatchNorm synchronised across the processes (unchanged in one process)."""
    return sync_batchnorm(model) if ranks.world > 1 else model


def data_parallel(model: nn.Module, device: torch.device, ranks: Ranks) -> nn.Module:
    """The network a training step runs: DistributedDataParallel over the processes, which copies
    rank 0's weights to every process when it wraps; the model itself in one process."""
    if ranks.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)
