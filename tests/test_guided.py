"""The guided model and its variants: gradient flow, λ schedule, one training step, deployment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError, GuidedParams, ModelParams, parse_section
from pipeline.models.files import CONFIG_KEYS, inference_priors, load_model, save_model
from pipeline.models.inference import predict, segment
from pipeline.models.losses import consistency_loss, pseudo_mask_loss, single_process_share
from pipeline.models.networks import BACKBONES as NETWORKS
from pipeline.models.networks import (
    Classifier,
    GuidedClassifier,
    PriorAsChannel,
    class_activation_map,
    load_pretrained_features,
)
from pipeline.models.variants import VARIANTS
from pipeline.training.loop import train
from pipeline.training.objectives import seg_weight
from support.helpers import guided, tiny_data

BACKBONES = ("resnet18", "vgg16")


pytestmark = pytest.mark.usefixtures("one_thread")


def _parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _batch(size: tuple[int, int] = (64, 96), n: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, *size, generator=generator)
    prior = torch.rand(n, 1, *size, generator=generator)
    labels = torch.tensor([1.0, 0.0] * (n // 2))
    return images, prior, labels


@pytest.mark.parametrize("variant", ["teacher", "none", "no_injection"])
def test_classification_loss_leaves_no_gradient_in_the_segmentation_head(variant: str) -> None:
    torch.manual_seed(0)
    model = GuidedClassifier("resnet18", variant=variant)
    images, prior, labels = _batch()
    logits, seg_logits = model(images, prior)
    F.binary_cross_entropy_with_logits(logits, labels).backward(retain_graph=True)
    head = list(model.seg_head.parameters())
    assert all(p.grad is None or not p.grad.any() for p in head)
    assert model.features[0].weight.grad.abs().sum() > 0  # the backbone does learn from it
    # ... while the pseudo-mask loss does reach the head.
    model.zero_grad()
    F.binary_cross_entropy_with_logits(seg_logits, torch.zeros_like(seg_logits)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)


def test_classifier_reads_pooled_features_s_and_every_channel_of_f_prime() -> None:
    model = GuidedClassifier("resnet18", variant="teacher")
    stem_channels = 256  # resnet18's layer3: the stride-16 features F
    assert model.fc.in_features == 512 + 2 + 2 * (stem_channels + 1)
    assert model.guidance_norm.num_features == 2 + 2 * (stem_channels + 1)
    model(*_batch(n=1)[:2])  # a batch of one image trains too (running statistics)
    assert model.seg_head[0].in_channels == stem_channels + 1  # F' = [F, H]
    assert GuidedClassifier("resnet18", variant="no_injection").seg_head[0].in_channels == stem_channels


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_lambda_follows_its_schedule(schedule: str) -> None:
    params = GuidedParams(epochs=4, seg_weight=2.0, seg_weight_schedule=schedule)
    expected = [2.0, 1.5, 1.0, 0.5] if schedule == "linear" else [2.0] * 4
    assert [seg_weight(t, params) for t in range(4)] == pytest.approx(expected)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_a_step_deploys_and_predicts(variant: str, backbone: str, tmp_path: Path) -> None:
    data = tiny_data()
    size = data.images.shape[1:]
    priors = torch.rand(len(data.images), *size)
    params = GuidedParams(epochs=1, batch_size=8, variant=variant)
    objective = guided(params, priors, (torch.rand(8, *size) > 0.8).float())
    model, config, history = train(data, 0, ModelParams(backbone=backbone, device="cpu"), params, objective)
    assert len(history) == 1 and np.isfinite(history[0]["loss"]) and history[0]["seg_loss"] > 0
    assert config["variant"] == variant

    save_model(tmp_path / "model.pt", model, config)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(saved) == {"config", "state_dict"}
    injects = VARIANTS[variant].injects_prior
    assert any(k.startswith("seg_head.") for k in saved["state_dict"]) == injects
    deployed, deployed_config = load_model(tmp_path / "model.pt")
    assert isinstance(deployed, GuidedClassifier if injects else Classifier)

    test_images = data.images[:3]
    priors = inference_priors(deployed_config, priors[:3])
    assert (priors is not None) == (variant == "teacher")
    scores = predict(deployed, deployed_config, test_images, priors)
    assert scores.shape == (3,) and ((scores >= 0) & (scores <= 1)).all()
    # The deployed network gives the trained network's scores.
    np.testing.assert_allclose(scores, predict(model, config, test_images, priors), atol=1e-5)
    if injects:
        assert segment(deployed, deployed_config, test_images, priors).shape == (3, *size)


def test_no_injection_and_consistency_infer_with_exactly_the_baselines_graph() -> None:
    baseline = Classifier("resnet18")
    for variant in ("no_injection", "consistency"):
        deployed = GuidedClassifier("resnet18", variant=variant).deployable()
        assert type(deployed) is Classifier
        assert _parameter_count(deployed) == _parameter_count(baseline)
        assert deployed.state_dict().keys() == baseline.state_dict().keys()
    # The training-time head is extra; the classifier path is the baseline's, parameter for parameter.
    trained = GuidedClassifier("resnet18", variant="no_injection")
    head = _parameter_count(trained.seg_head)
    assert _parameter_count(trained) - head == _parameter_count(baseline)


def test_none_variant_reads_zeros_without_a_prior_and_teacher_insists_on_one() -> None:
    images, prior, _ = _batch()
    model = GuidedClassifier("resnet18", variant="none").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images)[0], model(images, torch.zeros_like(prior))[0])
    with pytest.raises(ValueError, match="teacher variant needs"):
        GuidedClassifier("resnet18", variant="teacher").eval()(images)


def test_prior_as_channel_without_a_prior_explains_the_image_alone() -> None:
    images, _, _ = _batch()
    model = GuidedClassifier("resnet18", variant="none").eval()
    with torch.no_grad():
        torch.testing.assert_close(PriorAsChannel(model, with_prior=False)(images), model(images)[0])
        torch.testing.assert_close(PriorAsChannel(model.deployable(), with_prior=False)(images), model(images)[0])


def test_consistency_map_is_grad_cam_built_with_create_graph() -> None:
    torch.manual_seed(2)
    model = GuidedClassifier("resnet18", variant="consistency").eval()
    images, prior, labels = _batch()
    features = model.features(images)
    logit = model.fc(features.mean(dim=(2, 3))).squeeze(1)
    (grads,) = torch.autograd.grad(logit.sum(), features, create_graph=True)
    grad_cam = torch.relu((grads.mean(dim=(2, 3), keepdim=True) * features).sum(dim=1, keepdim=True))
    cam = class_activation_map(features, model.fc)
    torch.testing.assert_close(torch.relu(cam), grad_cam)
    loss = consistency_loss(cam, prior, labels)
    loss.backward()
    assert model.fc.weight.grad.abs().sum() > 0 and model.features[0].weight.grad.abs().sum() > 0


def test_consistency_loss_is_zero_for_matching_maps_and_ignores_defect_free_images() -> None:
    prior = torch.rand(2, 1, 8, 8)
    cam = F.adaptive_avg_pool2d(prior, (4, 4)) * 7.0  # same shape of attention, other scale
    labels = torch.tensor([1.0, 0.0])
    assert consistency_loss(cam, prior, labels).item() == pytest.approx(0.0, abs=1e-6)
    cam[1] = torch.rand(1, 4, 4)  # a defect-free image's map may be anything
    assert consistency_loss(cam, prior, labels).item() == pytest.approx(0.0, abs=1e-6)
    assert consistency_loss(cam, prior, torch.zeros(2)).item() == 0.0


def test_variant_params_are_validated() -> None:
    assert parse_section("train_guided", {"variant": "none", "prior_dropout": 0.3}).prior_dropout == 0.3
    with pytest.raises(ConfigError, match="prior_dropout > 0"):
        parse_section("train_guided", {"variant": "none", "prior_dropout": 0})
    with pytest.raises(ConfigError, match="train_guided.variant"):
        parse_section("train_guided", {"variant": "student"})


@pytest.mark.parametrize("backbone", BACKBONES)
def test_pretrained_weights_load_from_a_local_file(backbone: str, tmp_path: Path) -> None:
    torch.manual_seed(3)
    source = Classifier(backbone, in_channels=3)
    # The torchvision file layout: resnet18 keys at the top level, vgg16's under features.*,
    # both with an ImageNet classifier that is not used.
    prefix = "" if backbone == "resnet18" else "features."
    state = {prefix + k: v for k, v in source.features.state_dict().items()}
    state["fc.weight" if backbone == "resnet18" else "classifier.6.weight"] = torch.zeros(1000, 8)
    path = tmp_path / f"{backbone}.pth"
    torch.save(state, path)
    model = GuidedClassifier(backbone, in_channels=3)
    load_pretrained_features(model, path)
    for key, value in source.features.state_dict().items():
        torch.testing.assert_close(model.features.state_dict()[key], value)
    with pytest.raises(ValueError, match="in_channels: 3"):
        load_pretrained_features(Classifier(backbone, in_channels=1), path)


def test_missing_pretrained_weights_say_where_to_put_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "weights" / "resnet18-f37072fd.pth"
    with pytest.raises(FileNotFoundError, match=r"place it at that path.*pretrained_weights to null"):
        load_pretrained_features(Classifier("resnet18", 3), missing)
    with pytest.raises(FileNotFoundError, match="resnet18-f37072fd.pth"):
        train(
            tiny_data(),
            0,
            ModelParams(pretrained_weights=str(missing), in_channels=3, device="cpu"),
            GuidedParams(epochs=1),
        )


# --- multi-scale guidance: heads on finer strides (train_guided.head_strides) ---------------------


@pytest.mark.parametrize("backbone", BACKBONES)
def test_heads_on_finer_strides_read_the_features_at_those_strides(backbone: str) -> None:
    images = torch.rand(2, 1, 64, 96)
    torch.manual_seed(0)
    model = GuidedClassifier(backbone, variant="no_injection", head_strides=[4, 8, 16]).eval()
    logit, maps = model(images)
    assert isinstance(maps, list) and [m.shape[-2:] for m in maps] == [(16, 24), (8, 12), (4, 6)]
    # The stride-16 head and the logit are the single-head model's, weight for weight.
    torch.manual_seed(0)
    single = GuidedClassifier(backbone, variant="no_injection").eval()
    single.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("fine_heads.")})
    single_logit, single_map = single(images)
    assert torch.equal(logit, single_logit) and torch.equal(maps[-1], single_map)
    # Training-only: the deployed network is the baseline's graph.
    assert type(model.deployable()) is Classifier


def test_the_multi_scale_loss_is_the_mean_of_each_heads_loss_and_its_model_saves_as_the_baseline_graph(
    tmp_path: Path,
) -> None:
    data = tiny_data()
    size = data.images.shape[1:]
    masks = (torch.rand(8, *size) > 0.8).float()
    params = GuidedParams(epochs=1, batch_size=8, variant="no_injection", head_strides=[4, 8, 16])
    objective = guided(params, torch.rand(8, *size), masks)
    labels = torch.tensor([1.0, 0.0])
    maps = [torch.randn(2, 1, 16, 16), torch.randn(2, 1, 8, 8), torch.randn(2, 1, 4, 4)]
    fetched = {"target": masks[:2].unsqueeze(1)}
    share = single_process_share(labels)
    expected = np.mean([pseudo_mask_loss(m, fetched["target"], labels, share).item() for m in maps])
    assert objective.auxiliary_loss(maps, fetched, labels, share).item() == pytest.approx(expected, rel=1e-6)

    model, config, history = train(data, 0, ModelParams(device="cpu"), params, objective)
    assert config["head_strides"] == [4, 8, 16] and np.isfinite(history[0]["seg_loss"])
    save_model(tmp_path / "model.pt", model, config)
    deployed, _ = load_model(tmp_path / "model.pt")
    assert type(deployed) is Classifier
    # The default writes no head_strides: its saved config is what it was before the param.
    default = guided(GuidedParams(variant="no_injection"), torch.rand(8, *size), masks)
    assert "head_strides" not in default.config()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"variant": "consistency", "head_strides": [8, 16]}, "variant 'consistency' has no heads on finer strides"),
        ({"variant": "teacher", "head_strides": [4, 16]}, "variant 'teacher' has no heads on finer strides"),
        ({"variant": "no_injection", "head_strides": [16, 4]}, "ascending, ending at 16"),
        ({"variant": "no_injection", "head_strides": [4, 8]}, "ascending, ending at 16"),
        ({"variant": "no_injection", "head_strides": [2, 16]}, "train_guided.head_strides"),
    ],
)
def test_head_strides_are_validated_naming_the_key(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_section("train_guided", values)


# --- multi-depth consistency: its own Grad-CAM at finer strides (train_guided.cam_strides) -------


def test_the_default_cam_strides_give_todays_output_and_loss_bit_for_bit() -> None:
    images, prior, labels = _batch()
    torch.manual_seed(0)
    model = GuidedClassifier("resnet18", variant="consistency")
    logit, cam = model(images)
    # Today's forward: the stem to stride 16, the rest, the closed-form map of the last layer.
    stem = model.features[: model.split](images)
    deep_map = model.features[model.split :](stem)
    assert torch.equal(logit, model.fc(deep_map.mean(dim=(2, 3))).squeeze(1))
    assert torch.equal(cam, class_activation_map(deep_map, model.fc))
    objective = guided(GuidedParams(), prior[:, 0], prior[:, 0])
    fetched, share = {"target": prior}, single_process_share(labels)
    expected = consistency_loss(class_activation_map(deep_map, model.fc), prior, labels, share)
    assert torch.equal(objective.auxiliary_loss(cam, fetched, labels, share), expected)
    assert objective.training_config() == {"cam_strides": [32]} and "cam_strides" not in objective.config()


def _reference_grad_cam(model: GuidedClassifier, images: torch.Tensor, split: int) -> torch.Tensor:
    """Grad-CAM of the features where ``features[:split]`` ends, from a hook and a plain backward."""
    captured = []
    hook = model.features[split - 1].register_forward_hook(lambda module, inputs, output: captured.append(output))
    deep = model.features(images)
    hook.remove()
    (features,) = captured
    features.retain_grad()
    model.fc(deep.mean(dim=(2, 3))).sum().backward()
    weights = features.grad.mean(dim=(2, 3), keepdim=True)
    return (weights * features).sum(dim=1, keepdim=True).detach()


@pytest.mark.parametrize("backbone", BACKBONES)
def test_a_finer_strides_map_is_grad_cam_of_the_features_at_that_stride(backbone: str) -> None:
    images, _, _ = _batch(size=(64, 96))
    torch.manual_seed(0)
    model = GuidedClassifier(backbone, variant="consistency", cam_strides=[8, 16, 32])  # training mode, as trained
    logit, maps = model(images)
    assert isinstance(maps, list) and [m.shape[-2:] for m in maps] == [(8, 12), (4, 6), (2, 3)]
    splits = NETWORKS[backbone].splits
    for stride, cam in zip((8, 16), maps):
        torch.testing.assert_close(cam.detach(), _reference_grad_cam(model, images, splits[stride]))
    # The stride-32 map and the logit are the default model's.
    default = GuidedClassifier(backbone, variant="consistency")
    default.load_state_dict(model.state_dict())
    default_logit, deep_cam = default(images)
    assert torch.equal(logit, default_logit) and torch.equal(maps[-1], deep_cam)
    # Without autograd (monitoring the test fold, which reads the logit) the same logit, and the
    # last layer's map alone: no backward pass that nothing would read.
    with torch.no_grad():
        quiet_logit, quiet_map = model(images)
    assert not quiet_logit.requires_grad and torch.equal(quiet_logit, logit)
    assert isinstance(quiet_map, torch.Tensor) and torch.equal(quiet_map, deep_cam.detach())


def test_the_multi_depth_loss_is_the_mean_of_each_maps_consistency_loss() -> None:
    images, prior, labels = _batch()
    params = GuidedParams(cam_strides=[16, 32])
    objective = guided(params, prior[:, 0], prior[:, 0])
    torch.manual_seed(0)
    model = GuidedClassifier("resnet18", variant="consistency", cam_strides=params.cam_strides)
    _, maps = model(images)
    fetched, share = {"target": prior}, single_process_share(labels)
    expected = torch.stack([consistency_loss(m, prior, labels, share) for m in maps]).mean()
    torch.testing.assert_close(objective.auxiliary_loss(maps, fetched, labels, share), expected)


def test_the_stride_16_term_trains_the_layers_below_and_above_its_features() -> None:
    images, prior, labels = _batch()
    torch.manual_seed(0)
    model = GuidedClassifier("resnet18", variant="consistency", cam_strides=[16, 32])
    _, (cam16, _) = model(images)
    consistency_loss(cam16, prior, labels).backward()
    for name in ("features.conv1.weight", "features.layer1.0.conv1.weight", "features.layer3.1.conv2.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name  # below the split: through the features
    # Above it: through the gradient that weighs the channels (create_graph).
    assert model.features.layer4[1].conv2.weight.grad.abs().sum() > 0 and model.fc.weight.grad.abs().sum() > 0


def test_multi_depth_consistency_trains_and_saves_the_baselines_graph_without_its_strides(tmp_path: Path) -> None:
    baseline = Classifier("resnet18")
    deployed = GuidedClassifier("resnet18", variant="consistency", cam_strides=[8, 16, 32]).deployable()
    assert type(deployed) is Classifier and deployed.state_dict().keys() == baseline.state_dict().keys()

    data = tiny_data()
    size = data.images.shape[1:]
    params = GuidedParams(epochs=1, batch_size=8, cam_strides=[8, 16, 32])
    objective = guided(params, torch.rand(8, *size), (torch.rand(8, *size) > 0.8).float())
    model, config, history = train(data, 0, ModelParams(device="cpu"), params, objective)
    assert model.cam_splits == [6, 7] and np.isfinite(history[0]["seg_loss"]) and np.isfinite(history[0]["test_ap"])
    # Training-only: the file is the default model's, config and layout alike.
    assert config.keys() == {*CONFIG_KEYS, "variant"}
    save_model(tmp_path / "model.pt", model, config)
    loaded, _ = load_model(tmp_path / "model.pt")
    assert type(loaded) is Classifier and loaded.state_dict().keys() == baseline.state_dict().keys()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"variant": "no_injection", "cam_strides": [8, 32]}, "train_guided.cam_strides: variant 'no_injection'"),
        ({"variant": "teacher", "cam_strides": [16]}, "train_guided.cam_strides: variant 'teacher'"),
        ({"cam_strides": [32, 8]}, r"train_guided.cam_strides: distinct strides, ascending, e.g. \[8, 16, 32\]"),
        ({"cam_strides": [8, 8, 32]}, "train_guided.cam_strides: distinct strides"),
        ({"cam_strides": [2, 32]}, r"train_guided.cam_strides.0: Input should be 4, 8, 16 or 32"),
        ({"cam_strides": []}, "train_guided.cam_strides: List should have at least 1 item"),
        ({"variant": "consistency", "head_strides": [8, 16]}, "variant 'consistency' has no heads on finer strides"),
    ],
)
def test_cam_strides_are_validated_naming_the_key(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_section("train_guided", values)


def test_only_consistency_takes_cam_strides_and_any_ascending_subset_of_them() -> None:
    for strides in ([4, 8, 16, 32], [16], [8, 16]):
        assert parse_section("train_guided", {"cam_strides": strides}).cam_strides == strides
    with pytest.raises(ValueError, match=r"cam_strides \[8, 32\]: only a variant without a head"):
        GuidedClassifier("resnet18", variant="no_injection", cam_strides=[8, 32])
    _, cam16 = GuidedClassifier("resnet18", variant="consistency", cam_strides=[16])(torch.rand(2, 1, 64, 96))
    assert isinstance(cam16, torch.Tensor) and cam16.shape == (2, 1, 4, 6)  # one stride: one map, not a list
