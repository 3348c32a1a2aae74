"""Model files: what a training stage saves, and the one way every stage and tool loads them.

A model file is a dict of ``config`` (enough to rebuild the network: kind, backbone, input size,
normalisation, variant) and ``state_dict``, loaded without unpickling code.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
from torch import nn

from pipeline.core.artifacts import load_torch, save_torch
from pipeline.core.errors import InputError
from pipeline.models.networks import BACKBONES, DEEP_STRIDE, Classifier, GuidedClassifier
from pipeline.models.variants import LEGACY_VARIANT, variant_of

KINDS = ("baseline", "guided")  # the config's ``kind``: the stage that trained the model is train_<kind>
CONFIG_KEYS = ("kind", "backbone", "in_channels", "mean", "std", "height", "width")
EXPECTED = (
    "a model file written by the training stages (data/baseline/fold<k>.pt or data/guided/fold<k>.pt: "
    "a dict of config and state_dict) or a registered MLflow model, models:/<name>[/<version>|@<alias>]"
)


class ModelError(InputError):
    """The model cannot be used: the message names it and says what was expected."""


def build_model(config: dict, deployed: bool = True) -> nn.Module:
    """The network a saved config describes: as deployed (what inference needs) or as trained
    (the training loop adds its objective's ``training_config``, which no file records)."""
    if config["kind"] != "guided":
        return Classifier(config["backbone"], config["in_channels"])
    model = GuidedClassifier(
        config["backbone"],
        config["in_channels"],
        config.get("variant", LEGACY_VARIANT),
        head_strides=config.get("head_strides", (16,)),
        cam_strides=config.get("cam_strides", (DEEP_STRIDE,)),
    )
    return model.deployable() if deployed else model


def needs_prior(config: dict) -> bool:
    """Whether a saved model's inference needs the baseline's saliency map as input."""
    variant = variant_of(config)
    return variant is not None and variant.prior_at_inference


def inference_priors(config: dict, stored: torch.Tensor) -> torch.Tensor | None:
    """The prior a saved model reads at inference, given the baseline's stored saliency maps:
    those maps where its variant reads them, None (nothing, or zeros inside the model) otherwise."""
    return stored if needs_prior(config) else None


def save_model(path: str | Path, model: nn.Module, config: dict) -> None:
    """Save what inference needs (a guided model's training-only parts are dropped)."""
    if isinstance(model, GuidedClassifier):
        model = model.deployable()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_torch(path, {"config": config, "state_dict": state})


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Load a model file in eval mode; ``ModelError`` says what is wrong with a file that is not one."""
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"{path} is a folder; expected {EXPECTED}")
    if not path.is_file():
        raise ModelError(f"model {path} not found; expected {EXPECTED}")
    # torch.save has written zip archives since torch 1.6; anything else (a text file, an image)
    # would reach the unpickler and fail with a message about pickling, not about the file.
    if not zipfile.is_zipfile(path):
        raise ModelError(f"{path} is not a PyTorch file; expected {EXPECTED}")
    try:
        checkpoint = load_torch(path)
    except (ValueError, RuntimeError, OSError, EOFError) as error:
        raise ModelError(f"{path} cannot be loaded ({error}); expected {EXPECTED}") from error
    if not isinstance(checkpoint, dict) or not {"config", "state_dict"} <= set(checkpoint):
        what = (
            f"a dict with keys {sorted(map(str, checkpoint))[:6]}"
            if isinstance(checkpoint, dict)
            else f"a {type(checkpoint).__name__}"
        )
        raise ModelError(f"{path} holds {what}, not a model of this pipeline; expected {EXPECTED}")
    model = model_from(checkpoint["config"], checkpoint["state_dict"], str(path))
    return model.to(device).eval(), checkpoint["config"]


def model_from(config: object, state_dict: dict, source: str) -> nn.Module:
    """The deployed network of ``config`` with ``state_dict``'s weights; ``source`` names it in errors."""
    if not isinstance(config, dict) or (missing := [k for k in CONFIG_KEYS if k not in config]):
        raise ModelError(
            f"{source}: its config lacks {missing if isinstance(config, dict) else CONFIG_KEYS}; expected {EXPECTED}"
        )
    if config["kind"] not in KINDS or config["backbone"] not in BACKBONES:
        raise ModelError(
            f"{source}: unknown model kind {config['kind']!r} or backbone {config['backbone']!r}; expected {EXPECTED}"
        )
    model = build_model(config)
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, TypeError, AttributeError) as error:
        first = str(error).splitlines()[1:2] or [str(error)]
        raise ModelError(
            f"{source}: its weights do not fit its config ({first[0].strip()}); expected {EXPECTED}"
        ) from error
    return model
