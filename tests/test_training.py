"""Training: the same seed repeats, an interrupted run resumes to the uninterrupted result, the
learning rate, hard negatives, monitoring, weight averaging, checkpoints and their fingerprint, and
non-finite losses stopped (the library on tiny in-memory data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score
from torch import nn

from pipeline.config import GuidedParams, ModelParams, TrainParams
from pipeline.core.artifacts import load_torch, output_dir, save_torch
from pipeline.core.devices import FP32, Precision, resolve_precision
from pipeline.data.prepared import PreparedData
from pipeline.data.training_data import BalancedEpochs, batches, to_input
from pipeline.models.files import save_model
from pipeline.models.inference import predict
from pipeline.training import loop as training
from pipeline.training.loop import TrainingDiverged, _resumable_state, learning_rate, train
from pipeline.training.objectives import Objective
from pipeline.training.stage import fingerprint_of, summarize, train_folds
from support.helpers import guided, leftovers, noise_data, same_weights

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
MODEL = ModelParams(device="cpu")
PARAMS = TrainParams(epochs=3, batch_size=4, seed=0)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data() -> PreparedData:
    return noise_data()


@pytest.fixture(scope="module")
def reference(data: PreparedData) -> tuple[nn.Module, list[dict]]:
    """An uninterrupted training run."""
    model, _, history = train(data, 0, MODEL, PARAMS)
    return model, history


def without_timings(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


# --- determinism and resuming -------------------------------------------------------------------


def test_same_seed_gives_identical_metrics_and_weights(data: PreparedData, reference) -> None:
    model, _, history = train(data, 0, MODEL, PARAMS)
    assert without_timings(history) == without_timings(reference[1])
    assert json.dumps(summarize(history)) == json.dumps(summarize(reference[1]))  # the metrics file's content
    assert same_weights(model.state_dict(), reference[0].state_dict())
    _, _, other_seed = train(data, 0, MODEL, PARAMS.model_copy(update={"seed": 1}))
    assert without_timings(other_seed) != without_timings(history)


@pytest.mark.parametrize(
    "is_guided, update",
    [
        (False, {}),
        (True, {}),
        (False, {"lr_schedule": "cosine"}),
        (True, {"ema_epochs": 1.0, "warmup_epochs": 1.5}),
        (False, {"sampling": "undersample", "hard_negatives": 0.5}),
    ],
    ids=["baseline", "guided", "baseline-cosine-lr", "guided-ema-warmup", "baseline-hard-negatives"],
)
def test_run_interrupted_mid_training_resumes_to_the_uninterrupted_result(
    is_guided: bool, update: dict, data: PreparedData, reference, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    params, guidance = PARAMS.model_copy(update=update), None
    if is_guided:
        priors = torch.from_numpy(np.random.default_rng(1).random(data.images.shape, dtype=np.float32))
        params = GuidedParams(**params.model_dump())
        guidance = guided(params, priors, (priors > 0.8).float())
    if is_guided or update:
        uninterrupted, _, uninterrupted_history = train(data, 0, MODEL, params, guidance)
        reference = (uninterrupted, uninterrupted_history)
    checkpoint = tmp_path / "fold0.pt"

    def crash_in_epoch_2(record: dict) -> None:
        if record["epoch"] == 2:  # before epoch 2's checkpoint: the last complete one is epoch 1
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(data, 0, MODEL, params, guidance, checkpoint, crash_in_epoch_2, fingerprint="f")
    assert load_torch(checkpoint)["epoch"] == 0

    logged: list[dict] = []
    model, _, history = train(data, 0, MODEL, params, guidance, checkpoint, logged.append, fingerprint="f")
    assert "resuming fold 0 from its checkpoint after epoch 1" in capsys.readouterr().out
    assert without_timings(history) == without_timings(reference[1])
    assert same_weights(model.state_dict(), reference[0].state_dict())  # momentum and BatchNorm state restored
    assert logged == history  # the resumed run logs every epoch, the restored ones included


def test_cosine_learning_rate_decays_to_zero_batch_by_batch_and_changes_training(data: PreparedData, reference) -> None:
    cosine = PARAMS.model_copy(update={"epochs": 4, "lr": 0.2, "lr_schedule": "cosine"})
    assert [learning_rate(t, cosine) for t in (0, 1, 2, 3, 3.5, 4)] == pytest.approx(
        [0.2, 0.2 * (1 + 2**-0.5) / 2, 0.1, 0.2 * (1 - 2**-0.5) / 2, 0.2 * (1 - np.cos(np.pi / 8)) / 2, 0.0]
    )
    assert [learning_rate(t, PARAMS) for t in (0, 1.5, 3)] == [PARAMS.lr] * 3
    model, _, history = train(data, 0, MODEL, PARAMS.model_copy(update={"lr_schedule": "cosine"}))
    assert [record["lr"] for record in history] == pytest.approx([PARAMS.lr, PARAMS.lr * 0.75, PARAMS.lr * 0.25])
    assert [record["lr"] for record in reference[1]] == [PARAMS.lr] * 3
    assert history[1]["loss"] != reference[1][1]["loss"]
    assert not same_weights(model.state_dict(), reference[0].state_dict())


def test_hard_negatives_change_which_defect_free_images_train(data: PreparedData) -> None:
    undersampled = PARAMS.model_copy(update={"sampling": "undersample"})
    model, _, history = train(data, 0, MODEL, undersampled)
    hard, _, hard_history = train(data, 0, MODEL, undersampled.model_copy(update={"hard_negatives": 0.5}))
    assert without_timings(hard_history) != without_timings(history)
    assert not same_weights(hard.state_dict(), model.state_dict())


def test_hard_negative_scores_are_each_defect_free_images_last_training_logit(data: PreparedData) -> None:
    params = PARAMS.model_copy(update={"sampling": "undersample", "hard_negatives": 0.5, "batch_size": 3})
    run = training.set_up(data, 0, MODEL, params, Objective())
    logits, forward = [], run.objective.forward

    def recorded(*args):
        out = forward(*args)
        logits.append(out[0].detach().float().flatten())
        return out

    run.objective.forward = recorded
    positions = run.sampler.epoch(0)
    training.train_epoch(run, 0)
    by_position = dict(zip(positions.tolist(), torch.cat(logits).tolist()))
    negatives = run.sampler.negatives
    expected = [by_position.get(position, np.inf) for position in negatives]
    np.testing.assert_array_equal(run.sampler.negative_scores, expected)
    assert np.isfinite(run.sampler.negative_scores).sum() == len(positions) // 2


def test_warm_up_ramps_the_learning_rate_from_a_tenth_then_follows_the_schedule() -> None:
    warm = PARAMS.model_copy(update={"epochs": 4, "lr": 0.2, "warmup_epochs": 2.0})
    assert [learning_rate(t, warm) for t in (0, 1, 1.5, 2, 3.5)] == pytest.approx([0.02, 0.11, 0.155, 0.2, 0.2])
    cosine = warm.model_copy(update={"lr_schedule": "cosine"})
    assert learning_rate(1, cosine) == pytest.approx(0.55 * 0.2 * (1 + 2**-0.5) / 2)
    assert learning_rate(3, cosine) == pytest.approx(learning_rate(3, cosine.model_copy(update={"warmup_epochs": 0})))


def test_monitoring_every_other_epoch_scores_the_test_fold_then_and_at_the_end_and_trains_the_same(
    data: PreparedData, reference
) -> None:
    model, _, history = train(data, 0, MODEL, PARAMS.model_copy(update={"monitor_every": 2}))
    aps = [r["test_ap"] for r in history]
    assert np.isnan(aps[0]) and aps[1:] == [r["test_ap"] for r in reference[1]][1:]  # epochs 2 and 3 (the last)
    assert same_weights(model.state_dict(), reference[0].state_dict())
    assert "test AP" not in training.format_epoch(history[0]) and "test AP" in training.format_epoch(history[1])
    assert summarize(history)["test_ap_mean"] == pytest.approx(aps[-1])


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_monitoring_scores_on_the_training_path_but_the_last_epoch_in_fp32_as_evaluation_does(
    data: PreparedData, precision: str
) -> None:
    used: list[Precision] = []
    original = training.predict

    def recording_predict(*args, **kwargs):
        used.append(args[5])
        return original(*args, **kwargs)

    model_params = MODEL.model_copy(update={"precision": precision})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "predict", recording_predict)
        model, config, history = train(data, 0, model_params, PARAMS)
    path = resolve_precision(precision, torch.device("cpu"))
    assert used == [path, path, FP32]
    _, test = data.split(0)
    scores = predict(model, config, data.images[test], batch_size=PARAMS.batch_size * 2)  # evaluate's fp32 scores
    assert history[-1]["test_ap"] == average_precision_score(data.labels[test].numpy(), scores)


@pytest.mark.parametrize("ema_epochs", [0.0, 0.5])
def test_recalibrated_batch_norm_holds_the_training_images_plain_statistics_and_the_same_weights(
    data: PreparedData, reference, ema_epochs: float
) -> None:
    params = PARAMS.model_copy(update={"recalibrate_bn": True, "ema_epochs": ema_epochs})
    model, config, history = train(data, 0, MODEL, params)
    train_rows, test = data.split(0)
    # The first BatchNorm reads conv1's output: its statistics over the last epoch's images (the
    # defective ones repeated to balance the classes, as every training batch has them), by hand.
    sampler = BalancedEpochs(data.labels[train_rows].numpy(), params.seed, oversample=True)
    last_epoch = train_rows[sampler.epoch(params.epochs - 1)]
    assert data.labels[last_epoch].float().mean() == 0.5
    x = to_input(data.images[last_epoch], 1, config["mean"], config["std"])
    with torch.no_grad():
        first = model.features.conv1(x).transpose(0, 1).flatten(1)
    norm = model.features.bn1
    torch.testing.assert_close(norm.running_mean, first.mean(dim=1), rtol=1e-4, atol=1e-5)
    # torch's update_bn: each batch's (unbiased) variance, averaged over the batches with equal weights.
    per_batch = first.view(first.shape[0], -1, x.shape[-2] // 2 * x.shape[-1] // 2)
    batch_vars = [per_batch[:, part].flatten(1).var(dim=1) for part in batches(np.arange(len(x)), 8)]
    torch.testing.assert_close(norm.running_var, torch.stack(batch_vars).mean(dim=0), rtol=1e-4, atol=1e-5)
    assert norm.momentum == 0.1  # restored for anyone who trains the network further
    # Only the statistics change: the weights are those of the same run without it.
    plain, _, plain_history = train(data, 0, MODEL, params.model_copy(update={"recalibrate_bn": False}))
    assert same_weights(dict(model.named_parameters()), dict(plain.named_parameters()))
    assert not torch.equal(norm.running_mean, plain.features.bn1.running_mean)
    assert [r["loss"] for r in history] == [r["loss"] for r in plain_history]
    # The last epoch's monitoring scores the saved network, as the evaluation will.
    scores = predict(model, config, data.images[test], batch_size=PARAMS.batch_size * 2)
    assert history[-1]["test_ap"] == average_precision_score(data.labels[test].numpy(), scores)


def test_recalibrating_a_guided_model_that_reads_its_prior_feeds_it_the_prior(data: PreparedData) -> None:
    prior = torch.rand(len(data.images), 32, 32)
    params = GuidedParams(epochs=2, batch_size=4, seed=0, variant="teacher", recalibrate_bn=True)
    model, config, _ = train(data, 0, MODEL, params, guided(params, prior, (prior > 0.5).float()))
    assert config["variant"] == "teacher"
    # The guidance's last input is the mean of the prior channel: over the last epoch's images,
    # the mean of their priors (zeros, had the prior not been fed).
    train_rows, _ = data.split(0)
    sampler = BalancedEpochs(data.labels[train_rows].numpy(), params.seed, oversample=True)
    expected = prior[train_rows[sampler.epoch(params.epochs - 1)]].mean()
    torch.testing.assert_close(model.guidance_norm.running_mean[-1], expected, rtol=1e-4, atol=1e-5)


def test_weight_average_is_the_saved_model_and_is_an_exponential_average_per_step(
    data: PreparedData, reference
) -> None:
    """With ema_epochs the saved weights are the average, not the last ones: rebuilt here from
    the per-step weights of a plain run with the same seed (the averaging never feeds back)."""
    steps: list[list[torch.Tensor]] = []
    original_step = torch.optim.SGD.step

    def recording_step(self, *args, **kwargs):
        result = original_step(self, *args, **kwargs)
        steps.append([p.detach().clone() for p in self.param_groups[0]["params"]])
        return result

    averaged = PARAMS.model_copy(update={"ema_epochs": 0.5})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.SGD, "step", recording_step)
        model, _, history = train(data, 0, MODEL, averaged)
    decay = np.exp(-1 / (0.5 * len(steps) / PARAMS.epochs))
    expected = steps[0][0]  # the average starts at the weights after the first step
    for weights in steps[1:]:
        expected = decay * expected + (1 - decay) * weights[0]
    saved = next(model.parameters())
    assert torch.allclose(saved, expected, atol=1e-6)
    assert not torch.allclose(saved, steps[-1][0], atol=1e-4)  # not the last weights
    assert [r["loss"] for r in history] == [r["loss"] for r in reference[1]]  # training itself is unchanged
    assert [r["test_ap"] for r in history] != [r["test_ap"] for r in reference[1]]  # the average is monitored


def test_checkpoint_of_other_params_or_unreadable_is_not_resumed(
    data: PreparedData, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoint = tmp_path / "fold0.pt"
    train(data, 0, MODEL, PARAMS.model_copy(update={"epochs": 1}), checkpoint=checkpoint, fingerprint="params A")
    assert _resumable_state(checkpoint, "params A")["epoch"] == 0
    assert _resumable_state(checkpoint, "params B") is None
    checkpoint.write_bytes(b"not a checkpoint")  # e.g. cut short by a power loss
    assert _resumable_state(checkpoint, "params A") is None
    assert "ignoring unreadable checkpoint" in capsys.readouterr().out


def test_fingerprint_covers_params_inputs_and_training_code(tmp_path: Path) -> None:
    inputs = tmp_path / "run.json"
    inputs.write_text("a")
    sections = {"train_baseline": PARAMS}
    fingerprint = fingerprint_of(sections, inputs)
    assert fingerprint == fingerprint_of(sections, inputs)
    assert fingerprint != fingerprint_of({"train_baseline": PARAMS.model_copy(update={"lr": 0.02})}, inputs)
    inputs.write_text("b")
    assert fingerprint != fingerprint_of(sections, inputs)


def test_checkpoints_and_models_load_with_weights_only(data: PreparedData, reference, tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint.pt"
    train(data, 0, MODEL, PARAMS.model_copy(update={"epochs": 1}), checkpoint=checkpoint)
    torch.load(checkpoint, weights_only=True)
    save_model(tmp_path / "model.pt", reference[0], {"kind": "baseline", "backbone": "resnet18", "in_channels": 1})
    assert same_weights(torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"], reference[0].state_dict())
    torch.save({"config": {}, "state_dict": {}, "code": Path("x")}, tmp_path / "pickled.pt")  # arbitrary object
    with pytest.raises(ValueError, match="refusing to load .*pickled.pt"):
        load_torch(tmp_path / "pickled.pt")


def test_the_same_training_saves_byte_identical_model_and_checkpoint_files(data: PreparedData, tmp_path: Path) -> None:
    params = PARAMS.model_copy(update={"epochs": 1})
    models = []
    for run in ("first", "second"):
        model, config, _ = train(data, 0, MODEL, params, checkpoint=tmp_path / run / "checkpoint.pt")
        save_model(tmp_path / run / "fold0.pt", model, config)
        models.append((tmp_path / run / "fold0.pt").read_bytes())
    assert models[0] == models[1]  # DVC recognises a retrained model as the one it stored
    # A checkpoint's history holds each epoch's seconds; the same state gives the same bytes.
    state = load_torch(tmp_path / "first" / "checkpoint.pt")
    save_torch(tmp_path / "again.pt", state)
    assert (tmp_path / "again.pt").read_bytes() == (tmp_path / "first" / "checkpoint.pt").read_bytes()


# --- non-finite loss ----------------------------------------------------------------------------


class BreakAtTrainingCall(nn.Module):
    """Wraps a model; its n-th forward pass in training mode gives NaN logits or breaks a weight."""

    def __init__(self, model: nn.Module, call: int, weights: bool) -> None:
        super().__init__()
        self.model, self.call, self.weights, self.calls = model, call, weights, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += self.training
        logits = self.model(x)
        if self.training and self.calls == self.call:
            if not self.weights:
                return logits * float("nan")
            with torch.no_grad():  # after this batch's forward pass: its loss stays finite
                self.model.fc.bias.fill_(float("nan"))
        return logits


class NoTracking:
    def log_metrics(self, *args: object, **kwargs: object) -> None:
        pass


@pytest.mark.parametrize(
    ("weights", "call", "message"),
    [
        (False, 4, r"fold 0: loss is nan at epoch 2, batch 2; lower the learning rate"),
        (True, 2, r"fold 0: the weights are not finite after epoch 1; lower the learning rate"),
    ],
    ids=["nan-loss", "nan-weights"],
)
def test_non_finite_loss_or_weights_stop_training_naming_where_and_write_no_model(
    weights: bool, call: int, message: str, data: PreparedData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 16 training images, 4 defective: undersampled epochs of 8 images, 2 batches of 4.
    params = PARAMS.model_copy(update={"sampling": "undersample"})
    build = training.build_model
    monkeypatch.setattr(
        training, "build_model", lambda config, **kwargs: BreakAtTrainingCall(build(config, **kwargs), call, weights)
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TrainingDiverged, match=message), output_dir(tmp_path / "baseline") as out:
        train_folds(
            data, MODEL, params, lambda data, fold: Objective(), tmp_path / "checkpoints", run=NoTracking(), out=out
        )
    assert not (tmp_path / "baseline").exists()
    assert leftovers(tmp_path) == []
