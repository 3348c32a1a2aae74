"""Saliency methods against analytic answers on tiny networks, state hygiene, and a trained CNN."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.training_data import to_input
from pipeline.knowledge.saliency import (
    FullGrad,
    GradCAM,
    LayerCAM,
    SaliencyResult,
    create_saliency,
    normalise,
    saliency_maps,
)
from pipeline.models.networks import BACKBONES, Classifier, GuidedClassifier, PriorAsChannel

METHOD_NAMES = ("gradcam", "layercam", "fullgrad")


class GapNet(nn.Module):
    """conv -> ReLU -> global average pooling -> linear: Grad-CAM weights are w_c / (h * w)."""

    def __init__(self, classes: int = 1, channels: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).mean(dim=(2, 3)))


class TwoStageNet(nn.Module):
    """Two conv stages, so LayerCAM has two resolutions to fuse."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.act2 = nn.LeakyReLU(0.1)
        self.fc = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act2(self.conv2(self.act1(self.conv1(x)))).mean(dim=(2, 3))).squeeze(1)


class PiecewiseLinearNet(nn.Module):
    """Conv+bias, eval BatchNorm, in-place ReLU, max pool, conv+bias, LeakyReLU, mean, linear+bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)  # modifies the BatchNorm output in place
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 3, 3, stride=2, padding=1)
        self.act = nn.LeakyReLU(0.2)
        self.head = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.relu(self.bn(self.conv1(x))))
        return self.head(self.act(self.conv2(h)).mean(dim=(2, 3)))


def _randomise_bn(bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    return ((flat - lo) / (hi - lo)).view_as(maps)


def _up(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


@pytest.fixture(scope="module")
def resnet() -> Classifier:
    torch.manual_seed(0)
    return Classifier("resnet18").eval()


@pytest.mark.parametrize("classes", [1, 2])
def test_gradcam_equals_weighted_activation_sum_on_gap_linear(classes: int) -> None:
    torch.manual_seed(1)
    model = GapNet(classes).eval()
    x = torch.randn(3, 1, 20, 14)
    result = GradCAM(model, ["act"])(x)
    w = model.fc.weight[-1].detach()  # (B, 2) output: the defect is class 1
    activations = model.act(model.conv(x)).detach()
    expected = _minmax(_up(torch.relu(torch.einsum("c,bchw->bhw", w, activations)), (20, 14)))
    assert isinstance(result, SaliencyResult)
    assert result.maps.shape == (3, 20, 14) and result.maps.dtype == torch.float32
    assert result.valid.all()
    torch.testing.assert_close(result.maps, expected, atol=1e-5, rtol=1e-5)


def test_layercam_single_layer_keeps_positive_weighted_channels() -> None:
    torch.manual_seed(2)
    model = GapNet().eval()
    x = torch.randn(2, 1, 16, 16)
    result = LayerCAM(model, ["act"])(x)
    w = model.fc.weight[0].detach()
    activations = model.act(model.conv(x)).detach()
    # The gradient is w_c / (h * w) everywhere; ReLU(grad) keeps only positive-weight channels.
    expected = _minmax(_up(torch.einsum("c,bchw->bhw", w.clamp(min=0), activations), (16, 16)))
    torch.testing.assert_close(result.maps, expected, atol=1e-5, rtol=1e-5)


def test_layercam_fuses_layers_by_maximum_of_normalised_maps() -> None:
    torch.manual_seed(3)
    model = TwoStageNet().eval()
    x = torch.randn(2, 1, 12, 10)
    result = LayerCAM(model, ["act1", "conv2"])(x)
    # Direct computation with plain autograd, no hooks.
    a1 = model.act1(model.conv1(x)).detach().requires_grad_()
    a2 = model.conv2(a1)
    score = model.fc(model.act2(a2).mean(dim=(2, 3))).sum()
    g1, g2 = torch.autograd.grad(score, [a1, a2])
    maps = [_minmax(_up(torch.relu((torch.relu(g) * a).sum(1)), (12, 10))) for a, g in ((a1, g1), (a2, g2))]
    expected = _minmax(torch.maximum(*maps))
    torch.testing.assert_close(result.maps, expected.detach(), atol=1e-5, rtol=1e-5)


def test_gradcam_on_a_layer_whose_output_is_later_changed_in_place() -> None:
    torch.manual_seed(11)
    model = PiecewiseLinearNet()
    _randomise_bn(model.bn)
    model.eval()
    x = torch.randn(2, 2, 16, 12)
    result = GradCAM(model, ["bn"])(x)  # followed by ReLU(inplace=True)
    a = model.bn(model.conv1(x)).detach().requires_grad_()
    score = model.head(model.act(model.conv2(model.pool(torch.relu(a)))).mean(dim=(2, 3))).sum()
    (g,) = torch.autograd.grad(score, [a])
    expected = _minmax(torch.relu(torch.einsum("bc,bchw->bhw", g.mean(dim=(2, 3)), a)))
    assert (a < 0).any()  # the captured activation is the one before the in-place ReLU
    torch.testing.assert_close(result.maps, expected.detach(), atol=1e-5, rtol=1e-5)


def test_fullgrad_raw_terms_are_complete_with_batchnorm_and_inplace_relu() -> None:
    torch.manual_seed(4)
    model = PiecewiseLinearNet().double()
    _randomise_bn(model.bn)
    model.eval()
    x = torch.randn(3, 2, 16, 12, dtype=torch.float64)
    terms = FullGrad(model).contributions(x)
    assert [name for name, _ in terms.biases] == ["conv1", "bn", "conv2", "head"]
    assert terms.input.shape == x.shape
    torch.testing.assert_close(terms.total(), model(x)[:, 0].detach(), atol=1e-10, rtol=1e-10)
    # Without the BatchNorm's effective bias the sum is off: that term is really needed.
    bn_term = dict(terms.biases)["bn"].flatten(1).sum(1)
    assert (bn_term.abs() > 1e-3).all()


def test_fullgrad_maps_follow_the_paper_post_processing() -> None:
    torch.manual_seed(5)
    model = PiecewiseLinearNet()
    _randomise_bn(model.bn)
    model.eval()
    x = torch.randn(2, 2, 16, 12)
    method = FullGrad(model)
    result = method(x)
    terms = method.contributions(x)

    def post(t: torch.Tensor) -> torch.Tensor:  # the paper's order: abs, min-max, upsample, channel sum
        t = t.abs()
        flat = t.flatten(1)
        t = (t - flat.amin(1)[:, None, None, None]) / (flat.amax(1) - flat.amin(1))[:, None, None, None]
        return F.interpolate(t, size=(16, 12), mode="bilinear", align_corners=False).sum(1)

    expected = post(terms.input) + sum(post(t) for _, t in terms.biases if t.ndim == 4)
    torch.testing.assert_close(result.maps, _minmax(expected), atol=1e-5, rtol=1e-5)
    assert result.valid.all()


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_model_state_is_restored_and_hooks_removed(method: str) -> None:
    torch.manual_seed(6)
    model = Classifier("resnet18")
    model.train()
    model.features.layer1.eval()  # mixed flags must come back exactly
    model.features.conv1.weight.requires_grad_(False)
    training = [m.training for m in model.modules()]
    requires = [p.requires_grad for p in model.parameters()]
    bn_stats = model.features.bn1.running_mean.clone()
    saliency = create_saliency(method, model)
    x = torch.randn(2, 1, 48, 32)
    for _ in range(3):
        result = saliency(x)
        assert _hook_count(model) == 0
    assert [m.training for m in model.modules()] == training
    assert [p.requires_grad for p in model.parameters()] == requires
    assert all(p.grad is None for p in model.parameters())  # no weight gradients computed
    torch.testing.assert_close(model.features.bn1.running_mean, bn_stats)  # ran in eval mode
    assert not x.requires_grad and result.maps.shape == (2, 48, 32)


def test_state_is_restored_when_the_forward_fails() -> None:
    model = PiecewiseLinearNet().train()
    saliency = create_saliency("layercam", model, ["conv1", "conv2"])
    with pytest.raises(RuntimeError):
        saliency(torch.randn(1, 3, 8, 8))  # the model takes two channels
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert _hook_count(model) == 0


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_batch_result_equals_per_image_results(method: str, resnet: Classifier) -> None:
    torch.manual_seed(7)
    x = torch.randn(3, 1, 48, 40)
    saliency = create_saliency(method, resnet)
    # On CPUs with AVX-512/AMX, oneDNN picks its convolution kernel by batch size, and the two
    # kernels' rounding differs by up to 3e-4 after LayerCAM's normalisation; what is tested here
    # is that the images of a batch do not interact, so torch's reference kernels are used.
    with torch.backends.mkldnn.flags(enabled=False):
        batch = saliency(x)
        single = [saliency(x[i : i + 1]) for i in range(3)]
    torch.testing.assert_close(batch.maps, torch.cat([s.maps for s in single]), atol=1e-5, rtol=1e-5)
    assert batch.valid.tolist() == [bool(s.valid) for s in single]
    assert ((batch.maps >= 0) & (batch.maps <= 1)).all()
    assert batch.maps.grad_fn is None and not batch.maps.requires_grad  # holds no autograd graph


def test_works_under_no_grad_and_inference_mode(resnet: Classifier) -> None:
    x = torch.randn(1, 1, 48, 32)
    reference = create_saliency("layercam", resnet)(x).maps
    with torch.no_grad():
        torch.testing.assert_close(create_saliency("layercam", resnet)(x).maps, reference)
    with torch.inference_mode():
        frozen = torch.randn(1, 1, 48, 32)
        assert create_saliency("fullgrad", resnet)(frozen).maps.shape == (1, 48, 32)


def test_default_layers_and_layer_name_errors(resnet: Classifier) -> None:
    assert create_saliency("gradcam", resnet).layers == ["features.layer4"]
    assert create_saliency("layercam", resnet).layers == BACKBONES["resnet18"].saliency_layers["layercam"]
    with pytest.raises(ValueError, match=r"features\.layer9.*features\.\{conv1,bn1.*layer4\}, fc"):
        create_saliency("gradcam", resnet, ["features.layer9"])
    with pytest.raises(ValueError, match="unknown saliency method"):
        create_saliency("gradcam++", resnet)
    with pytest.raises(ValueError, match="exactly one layer"):
        create_saliency("gradcam", resnet, ["features.layer3", "features.layer4"])
    with pytest.raises(ValueError, match="pass layers"):
        create_saliency("gradcam", GapNet())


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_vgg16_default_layers_run_on_the_model_device(method: str) -> None:
    with torch.device("meta"):  # shapes only: building and running vgg16 for real takes seconds
        vgg = Classifier("vgg16").eval()
    with pytest.raises(ValueError, match=r"features\.\{0\.\.30\}, fc"):
        create_saliency(method if method != "fullgrad" else "gradcam", vgg, ["features.31"])
    result = create_saliency(method, vgg)(torch.randn(2, 1, 64, 32))  # CPU images follow the model
    assert result.maps.shape == (2, 64, 32) and result.maps.device.type == "meta"
    assert result.maps.dtype == torch.float32 and result.valid.shape == (2,)


@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_negative_only_score_gives_zero_maps_flagged_invalid(method: str) -> None:
    torch.manual_seed(8)
    model = GapNet().eval()
    with torch.no_grad():
        model.fc.weight.copy_(-model.fc.weight.abs())  # ReLU features x negative weights
    result = create_saliency(method, model, ["act"])(torch.randn(2, 1, 16, 16))
    assert not result.valid.any()
    assert torch.isfinite(result.maps).all() and (result.maps == 0).all()


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_blank_and_non_finite_images_are_flagged_per_image(method: str) -> None:
    torch.manual_seed(9)
    model = GapNet().eval()
    with torch.no_grad():
        model.conv.bias.zero_()  # a blank image then has no activation and no bias term
        model.fc.weight.copy_(model.fc.weight.abs())
    x = torch.rand(3, 1, 16, 16)
    x[1] = 0.0
    x[2, 0, 3, 3] = float("nan")
    result = create_saliency(method, model, ["act"])(x)
    assert result.valid.tolist() == [True, False, False]
    assert torch.isfinite(result.maps).all()
    assert (result.maps[1:] == 0).all() and result.maps[0].max() == 1


def test_normalise_handles_constant_and_empty_maps() -> None:
    maps, valid = normalise(torch.stack([torch.zeros(2, 2), torch.full((2, 2), 3.0), torch.eye(2)]))
    assert valid.tolist() == [False, True, True]
    assert maps[0].eq(0).all() and maps[1].eq(1).all() and torch.equal(maps[2], torch.eye(2))


def test_saliency_maps_batches_uint8_images_and_priors(resnet: Classifier) -> None:
    generator = torch.Generator().manual_seed(12)
    images = torch.randint(0, 256, (5, 48, 32), dtype=torch.uint8, generator=generator)
    config = {"in_channels": 1, "mean": 0.5, "std": 0.25}
    method = create_saliency("gradcam", resnet)
    maps, valid, seconds = saliency_maps(method, config, images, batch_size=2)
    assert maps.shape == (5, 48, 32) and maps.dtype == np.float32 and valid.dtype == bool and seconds > 0
    expected = method(to_input(images, 1, 0.5, 0.25))
    np.testing.assert_allclose(maps, expected.maps.numpy(), atol=1e-4)
    assert valid.tolist() == expected.valid.tolist()
    guided = PriorAsChannel(GuidedClassifier("resnet18").eval())
    assert create_saliency("layercam", guided).layers == [
        f"guided.{n}" for n in BACKBONES["resnet18"].saliency_layers["layercam"]
    ]
    explainer = create_saliency("layercam", guided, ["guided.features.layer3", "guided.features.layer4"])
    priors = torch.rand(5, 48, 32, generator=generator)
    maps, valid, _ = saliency_maps(explainer, config, images, 4, priors)
    assert maps.shape == (5, 48, 32) and np.isfinite(maps).all()
    empty, _, _ = saliency_maps(method, config, images[:0])
    assert empty.shape == (0, 48, 32)


# --- a trained model looks at the defect ------------------------------------------------------


def _synthetic_batch(rng: np.random.Generator, n: int, size: int = 48) -> tuple[np.ndarray, ...]:
    """Noisy backgrounds; positives carry a bright blob or a short dark line at a random place."""
    images = rng.normal(0.5, 0.08, (n, size, size)).astype(np.float32)
    masks = np.zeros((n, size, size), dtype=bool)
    labels = (np.arange(n) % 2).astype(np.float32)
    yy, xx = np.mgrid[:size, :size]
    for i in np.flatnonzero(labels):
        cy, cx = rng.integers(6, size - 6, 2)
        if rng.random() < 0.5:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= 9
            images[i][mask] += 0.5
        else:
            length = rng.integers(6, 11)
            mask = (yy == cy) & (xx >= cx - length // 2) & (xx < cx - length // 2 + length)
            mask |= np.roll(mask, 1, axis=0)
            images[i][mask] -= 0.5
        masks[i] = mask
    return images[:, None], masks, labels


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        block = lambda cin, cout, stride: [  # noqa: E731
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        ]
        self.features = nn.Sequential(*block(1, 16, 1), *block(16, 32, 2), *block(32, 32, 2))
        self.fc = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).amax(dim=(2, 3))).squeeze(1)


@pytest.mark.slow
def test_trained_cnn_saliency_concentrates_on_the_defect() -> None:
    torch.manual_seed(10)
    rng = np.random.default_rng(10)
    model = SmallCNN()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        images, _, labels = _synthetic_batch(rng, 32)
        loss = F.binary_cross_entropy_with_logits(model(torch.from_numpy(images)), torch.from_numpy(labels))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    images, masks, labels = _synthetic_batch(rng, 64)
    x, masks = torch.from_numpy(images), torch.from_numpy(masks)
    with torch.no_grad():
        accuracy = ((model(x) > 0).float() == torch.from_numpy(labels)).float().mean().item()
    assert accuracy > 0.9, f"the CNN did not learn the task (accuracy {accuracy:.2f})"
    positives = torch.from_numpy(labels) == 1
    layers = {"gradcam": ["features.8"], "layercam": ["features.5", "features.8"], "fullgrad": None}
    # Trained, the median ratios are about 30 (Grad-CAM), 55 (LayerCAM) and 20 (FullGrad); untrained
    # about 1, 7 and 1 (LayerCAM's shallow layer already follows contrast), hence the thresholds.
    least_ratio = {"gradcam": 5.0, "layercam": 15.0, "fullgrad": 5.0}
    for method, names in layers.items():
        result = create_saliency(method, model, names)(x[positives])
        inside = (result.maps * masks[positives]).flatten(1).sum(1) / masks[positives].flatten(1).sum(1)
        outside = (result.maps * ~masks[positives]).flatten(1).sum(1) / (~masks[positives]).flatten(1).sum(1)
        ratio = (inside / outside.clamp_min(1e-6)).median().item()
        assert result.valid.all(), method
        assert ratio > least_ratio[method], f"{method}: median inside/outside saliency per pixel {ratio:.2f}"
        assert (inside > outside).float().mean() > 0.9, method
