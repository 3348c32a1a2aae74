"""Training in several processes (DDP, torchrun, gloo on the CPU) matches one process with the
same global batch; device, precision and DataLoader params; batch sharding.

The two-process run is tests/support/ddp_worker.py under torchrun; its results are compared here with a
single-process run of the same cases.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import ConfigError, ModelParams, parse_section
from pipeline.core import distributed
from pipeline.core.devices import BF16, FP32, pick_device, resolve_precision
from pipeline.core.distributed import Ranks, shard
from pipeline.core.errors import InputError, SetupError
from pipeline.models.files import build_model
from pipeline.training.loop import train
from support.distributed_cases import CASES, MODEL, PARAMS, train_cases
from support.helpers import SHRUNK, dvc, make_shrunk_project, merge, noise_data, project_env

ROOT = Path(__file__).resolve().parents[1]
# Float sums in another order (per process, then across processes) are all that differs.
TOLERANCE = {"atol": 2e-6, "rtol": 1e-4}


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "tests" / "support" / "ddp_worker.py"),
        str(out),
    ]
    env = {**project_env(out), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.fixture(scope="module")
def single_process() -> dict[str, dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results = train_cases(noise_data())
    torch.set_num_threads(threads)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_two_processes_train_the_model_of_one_with_the_same_global_batch(
    name: str, two_processes: Path, single_process: dict
) -> None:
    ddp = torch.load(two_processes / "results.pt", weights_only=False)[name]
    one = single_process[name]
    assert ddp["state"].keys() == one["state"].keys()  # saved models load as plain ones
    for key, value in one["state"].items():
        torch.testing.assert_close(ddp["state"][key], value, **TOLERANCE, msg=key)
    np.testing.assert_allclose(ddp["scores"], one["scores"], atol=1e-5)
    torch.manual_seed(PARAMS.seed)
    initial = build_model(one["config"], deployed=False).state_dict()
    moved = max((one["state"][k] - initial[k]).abs().max().item() for k in initial if k.endswith("weight"))
    assert moved > 100 * TOLERANCE["atol"]
    for got, expected in zip(ddp["history"], one["history"], strict=True):
        for key in ("loss", "cls_loss", "seg_loss", "test_ap"):
            assert got[key] == pytest.approx(expected[key], abs=1e-5), key


@pytest.mark.slow
def test_two_processes_resume_from_a_checkpoint_to_the_uninterrupted_result(two_processes: Path) -> None:
    results = torch.load(two_processes / "results.pt", weights_only=False)
    resumed, uninterrupted = results["resumed"], results["baseline"]
    for key, value in uninterrupted["state"].items():
        assert torch.equal(resumed["state"][key], value), key
    strip = lambda history: [{k: v for k, v in r.items() if k != "seconds"} for r in history]  # noqa: E731
    assert strip(resumed["history"]) == strip(uninterrupted["history"])


@pytest.mark.slow
def test_two_processes_gather_the_per_sample_values_of_a_global_batch(two_processes: Path) -> None:
    gathered = torch.load(two_processes / "results.pt", weights_only=False)["whole_batch"]
    assert gathered.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


@pytest.mark.slow
def test_a_process_without_samples_leaves_the_global_batch_statistics_to_the_others(two_processes: Path) -> None:
    """Rank 0 holds all three samples of a global batch, rank 1 none (recalibrating a last batch
    smaller than the number of processes): the statistics are plain BatchNorm's over the three."""
    synced = torch.load(two_processes / "results.pt", weights_only=False)["empty_share"]
    plain = torch.nn.BatchNorm2d(2, momentum=None)
    output = plain(torch.arange(24.0).view(3, 2, 2, 2))
    torch.testing.assert_close(synced["running_mean"], plain.running_mean)
    torch.testing.assert_close(synced["running_var"], plain.running_var)
    torch.testing.assert_close(synced["output"], output)


@pytest.mark.slow
def test_a_non_finite_loss_in_one_process_stops_every_process(two_processes: Path) -> None:
    for rank in (0, 1):
        message = (two_processes / f"diverged_rank{rank}.txt").read_text()
        assert message.startswith("fold 0: loss is nan at epoch 1, batch 1; lower the learning rate")


@pytest.mark.parametrize(("size", "world"), [(6, 2), (2, 2), (7, 2), (5, 4), (1, 3), (8, 1)])
def test_shards_cover_the_batch_like_distributed_sampler(size: int, world: int) -> None:
    batch = np.arange(100, 100 + size)
    shares = [shard(size, Ranks(rank, world)) for rank in range(world)]
    assert len({len(share) for share in shares}) == 1  # every process takes the same number of images
    real = [distributed.real_samples(size, Ranks(rank, world)) for rank in range(world)]
    taken = np.concatenate([batch[share][mask.numpy() > 0] for share, mask in zip(shares, real)])
    assert sorted(taken) == list(batch)  # each real image exactly once; the rest is weightless padding
    sampler = torch.utils.data.DistributedSampler(range(size), num_replicas=world, rank=0, shuffle=False)
    assert list(shares[0]) == list(sampler)


def test_batch_size_must_split_over_the_processes() -> None:
    with pytest.raises(InputError, match="train_guided.batch_size 6 does not split over model.nproc_per_node = 4"):
        distributed.launch("stages.train_guided", 4, 6, "train_guided.batch_size", torch.device("cpu"))
    assert distributed.launch("stages.train_guided", 1, 6, "train_guided.batch_size", torch.device("cpu")) is False


@pytest.mark.skipif(torch.cuda.device_count() >= 64, reason="this machine has 64 CUDA GPUs: the error cannot occur")
def test_more_processes_than_gpus_is_refused() -> None:
    with pytest.raises(SetupError, match="model.nproc_per_node is 64, one process per GPU"):
        distributed.launch("stages.train_guided", 64, 64, "train_guided.batch_size", torch.device("cuda"))


def test_compute_params_are_validated() -> None:
    assert parse_section("model", {}) == ModelParams(
        nproc_per_node=1, precision="auto", num_workers=0, pin_memory=False
    )
    for values, key in [
        ({"nproc_per_node": 0}, "model.nproc_per_node"),
        ({"precision": "fp16"}, "model.precision"),
        ({"num_workers": -1}, "model.num_workers"),
        ({"pin_memory": "maybe"}, "model.pin_memory"),
        ({"nproc_per_node": 2, "device": "mps"}, "model"),
    ]:
        with pytest.raises(ConfigError, match=key):
            parse_section("model", values)


def test_device_and_precision_choice() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("bf16", cpu) == BF16 and resolve_precision("fp32", cpu) == FP32
    assert pick_device("cpu") == cpu


@NO_CUDA
def test_a_missing_cuda_device_is_refused_and_auto_falls_back() -> None:
    assert pick_device("auto").type in ("mps", "cpu")
    with pytest.raises(SetupError, match="model.device is cuda, but torch finds no CUDA GPU"):
        pick_device("cuda")


def test_bf16_on_the_cpu_trains_close_to_fp32_and_workers_change_nothing() -> None:
    data = noise_data()
    params = PARAMS.model_copy(update={"epochs": 1})
    reference, _, history = train(data, 0, MODEL, params)
    with_workers, _, worker_history = train(data, 0, MODEL.model_copy(update={"num_workers": 2}), params)
    for key, value in reference.state_dict().items():
        assert torch.equal(with_workers.state_dict()[key], value), key
    assert [r["loss"] for r in worker_history] == [r["loss"] for r in history]
    _, _, bf16_history = train(data, 0, MODEL.model_copy(update={"precision": "bf16"}), params)
    assert bf16_history[0]["loss"] == pytest.approx(history[0]["loss"], rel=0.05)
    assert bf16_history[0]["loss"] != history[0]["loss"]  # autocast was on


@pytest.mark.slow
def test_training_stage_with_two_processes_under_dvc_repro(tmp_path: Path) -> None:
    """The stage relaunches itself under torchrun; only rank 0 tracks and writes."""
    project = make_shrunk_project(tmp_path, merge(merge({}, SHRUNK), {"model": {"nproc_per_node": 2}}))
    output = dvc(project, "repro", "train_baseline", OMP_NUM_THREADS="1")
    assert "launching 2 training processes (torchrun)" in output
    assert (project / "data/baseline/fold0.pt").is_file()
    assert not list((project / "data/checkpoints/train_baseline").glob("*.pt"))
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("knowledge-guided").experiment_id])
    assert sorted(run.data.tags["stage"] for run in runs) == ["prepare", "train_baseline"]
    train_run = next(run for run in runs if run.data.tags["stage"] == "train_baseline")
    assert train_run.data.params["model.nproc_per_node"] == "2"
    assert "fold0/loss" in client.get_run(train_run.info.run_id).data.metrics
