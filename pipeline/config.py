"""Typed, validated sections of ``params.yaml``.

Each stage reads only the sections it declares in ``dvc.yaml``. Validation happens when the stage
starts, so a misspelled key or an out-of-range value stops it before any work, with a message
that names the key and what is allowed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin, overload

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import ErrorDetails

from pipeline.core.errors import InputError
from pipeline.core.layout import FIRST_ROUND, KnowledgeRound, project_root
from pipeline.core.sections import SEED, Section
from pipeline.data.images import HEADER_PARSERS
from pipeline.data.sources import SOURCE_KINDS
from pipeline.data.sources.labelme import LabelmeParams
from pipeline.knowledge.pseudo_labels import PseudoLabelParams
from pipeline.knowledge.saliency import METHODS
from pipeline.metrics.classification import MetricsError
from pipeline.metrics.operating_points import OPERATING_POINTS, OperatingPoint, parse_condition
from pipeline.models.files import KINDS
from pipeline.models.networks import BACKBONES, CAM_STRIDES, DEEP_STRIDE, SPLIT_STRIDES
from pipeline.models.variants import VARIANTS

PARAMS_FILE = Path("params.yaml")


class ConfigError(InputError):
    """params.yaml is unreadable, or a section has an unknown key or a bad value."""


class SyntheticParams(Section):
    items: int = Field(40, ge=2, description="physical items; all images of an item share a fold")
    images_per_item: int = Field(6, ge=1)
    defect_ratio: float = Field(0.5, gt=0, lt=1)
    defect_contrast: float = Field(1.0, gt=0, description="defect contrast in units of the texture's noise")


class PrepareParams(Section):
    dataset: Literal[("synthetic", *SOURCE_KINDS)] = "synthetic"  # type: ignore[valid-type]
    path: str | None = Field(None, description="data folder, zip file or manifest CSV (not for synthetic)")
    group_pattern: str | None = Field(
        None,
        description="regular expression searched in each image's file name: its group 'item', else the "
        "whole match, is the physical item; null = the data set's own groups (docs/datasets.md)",
    )
    width: int = Field(128, ge=16, le=4096)
    height: int = Field(128, ge=16, le=4096)
    split: Literal["cv", "holdout"] = "cv"
    folds: int = Field(3, ge=2, le=20)
    seed: int = SEED
    max_image_pixels: int = Field(50_000_000, ge=1, description="larger source images are refused, not decoded")
    defective_images: Annotated[int, Field(ge=1)] | Literal["all"] = Field(
        "all", description="defective images each model trains on (data efficiency); defect-free ones all kept"
    )
    subset_seed: int = Field(0, ge=0, le=2**32 - 1, description="which defective images are kept; folds do not change")
    synthetic: SyntheticParams = SyntheticParams()
    labelme: LabelmeParams = LabelmeParams()

    @field_validator("group_pattern")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern == "":
            raise ValueError("is empty; use null for the data set's own groups")
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"not a valid regular expression ({error})") from None
        return pattern

    @model_validator(mode="after")
    def _path_for_real_data(self) -> PrepareParams:
        if self.dataset != "synthetic" and not self.path:
            raise ValueError(f"prepare.path is required for dataset {self.dataset!r}")
        if self.dataset == "synthetic" and self.group_pattern is not None:
            raise ValueError(
                "prepare.group_pattern does not apply to dataset 'synthetic', whose items are generated; remove it"
            )
        return self


class ModelParams(Section):
    backbone: Literal[tuple(BACKBONES)] = "resnet18"  # type: ignore[valid-type]
    in_channels: Literal[1, 3] = 1
    pretrained_weights: str | None = Field(None, description="local torchvision weights file; never downloaded")
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    # Training only (both training stages; the saliency and evaluation stages read model.device and precision).
    nproc_per_node: int = Field(
        1,
        ge=1,
        le=64,
        description="training processes on this machine (torchrun, DistributedDataParallel): "
        "one per GPU; each stage's batch_size must be a multiple",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="auto = bf16 autocast with channels_last where the hardware runs it faster (a CUDA "
        "GPU with bf16, a CPU with AMX or AVX-512 bf16: detected at run time), else fp32; training and saliency maps",
    )
    num_workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes per training process")
    pin_memory: bool = Field(False, description="page-locked batches, for faster copies to a CUDA GPU")
    test_time_flips: bool = Field(
        False,
        description="a saved model's defect probability is the mean over the image and its horizontal and "
        "vertical flips (the flips it trained with): evaluation, predict, serving and export alike",
    )

    @model_validator(mode="after")
    def _one_process_on_mps(self) -> ModelParams:
        if self.nproc_per_node > 1 and self.device == "mps":
            raise ValueError("Apple's MPS is one device: model.nproc_per_node must be 1 with device mps")
        return self


class TrainParams(Section):
    epochs: int = Field(15, ge=1, le=10_000)
    batch_size: int = Field(16, ge=1, le=1024)
    lr: float = Field(0.01, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0, lt=1)
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="cosine: lr decays to 0 over the epochs, batch by batch (a calm last epoch)"
    )
    sampling: Literal["undersample", "oversample"] = Field(
        "oversample",
        description="how epochs balance the classes: undersample = every defective image and as many "
        "defect-free ones; oversample = every image, the defective ones repeated (pipeline/data/training_data.py)",
    )
    hard_negatives: float = Field(
        0.0,
        ge=0,
        le=1,
        description="undersample only: share of each epoch's defect-free images that are those the "
        "classifier scored highest when it last saw them (hard negatives), the rest a fresh slice; 0 = none",
    )
    warmup_epochs: float = Field(
        0.0, ge=0, description="epochs over which the lr rises linearly from a tenth to its schedule's value; 0 = none"
    )
    ema_epochs: float = Field(
        0.0,
        ge=0,
        description="time constant, in epochs, of an exponential moving average of the weights, which "
        "becomes the saved model; 0 = none (the last weights are saved)",
    )
    recalibrate_bn: bool = Field(
        False,
        description="after the last epoch, batch normalisation's running statistics of the saved network "
        "are re-estimated as plain averages over the last epoch's images, the classes balanced as in "
        "training (weights unchanged); with few optimiser steps they still lag behind the weights",
    )
    monitor_every: int = Field(
        1,
        ge=1,
        le=10_000,
        description="the test fold is scored after every N-th epoch and after the last (monitoring "
        "only: it never selects a model); each scoring is a forward pass over the test fold, three with flips",
    )
    seed: int = SEED

    @model_validator(mode="after")
    def _warmup_within_the_run(self) -> TrainParams:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be below epochs ({self.epochs})")
        return self

    @model_validator(mode="after")
    def _hard_negatives_undersample(self) -> TrainParams:
        if self.hard_negatives and self.sampling != "undersample":
            raise ValueError(
                "hard_negatives needs sampling: undersample (an oversampled epoch holds every "
                "defect-free image already)"
            )
        return self


class GuidedParams(TrainParams):
    # Default chosen on KolektorSDD (docs/method.md, "Guided variants"): best AP, no added inference cost.
    variant: Literal[tuple(VARIANTS)] = Field(  # type: ignore[valid-type]
        "consistency",
        description="how the baseline's knowledge is used; see pipeline/models/variants.py and docs/method.md",
    )
    seg_weight: float = Field(1.0, ge=0, description="λ at the first epoch: weight of the auxiliary loss")
    seg_weight_schedule: Literal["linear", "constant"] = "linear"
    prior_dropout: float = Field(
        0.5, ge=0, le=1, description="variant none: share of training images whose prior is zeroed"
    )
    head_strides: list[Literal[SPLIT_STRIDES]] = Field(  # type: ignore[valid-type]
        [16],
        min_length=1,
        description="strides of the features a segmentation head reads, one head each (no_injection: "
        "4, 8 and/or 16; the other variants: 16)",
    )
    cam_strides: list[Literal[CAM_STRIDES]] = Field(  # type: ignore[valid-type]
        [DEEP_STRIDE],
        min_length=1,
        description="strides of the features whose Grad-CAM the consistency variant pulls towards the "
        "prior, one term each (4, 8, 16 and/or 32, the last layer; the other variants: 32)",
    )

    @field_validator("head_strides", "cam_strides")
    @classmethod
    def _finest_first(cls, strides: list[int], info: ValidationInfo) -> list[int]:
        # Finest first, as the network returns its maps; a model with heads always has the stride-16 one.
        heads = info.field_name == "head_strides"
        if sorted(set(strides)) != strides or (heads and strides[-1] != 16):
            rule = ", ending at 16, e.g. [4, 8, 16]" if heads else ", e.g. [8, 16, 32]"
            raise ValueError(f"distinct strides, ascending{rule}")
        return strides

    @field_validator("cam_strides")
    @classmethod
    def _own_grad_cams_for_consistency(cls, strides: list[int], info: ValidationInfo) -> list[int]:
        variant = info.data.get("variant")  # absent where the variant itself was refused
        if strides != [DEEP_STRIDE] and variant is not None and not VARIANTS[variant].learns_own_grad_cam:
            raise ValueError(
                f"variant {variant!r} learns from its head's pseudo-masks, not from its own Grad-CAM "
                f"(only consistency does); set cam_strides: [{DEEP_STRIDE}]"
            )
        return strides

    @model_validator(mode="after")
    def _heads_where_the_variant_has_them(self) -> GuidedParams:
        variant = VARIANTS[self.variant]
        if self.head_strides != [16] and not variant.has_finer_heads:
            raise ValueError(
                f"head_strides {self.head_strides}: variant {self.variant!r} has no heads on finer strides "
                "(only no_injection has); set head_strides: [16]"
            )
        return self

    @model_validator(mode="after")
    def _none_needs_dropout(self) -> GuidedParams:
        if VARIANTS[self.variant].drops_prior and self.prior_dropout == 0:
            raise ValueError(
                f"variant {self.variant!r} feeds a zero prior at inference, so it must train with "
                "prior_dropout > 0 (e.g. 0.5)"
            )
        return self


class SaliencyParams(Section):
    method: Literal[tuple(METHODS)] = "layercam"  # type: ignore[valid-type]
    layers: list[str] | None = Field(None, description="layer names; null = the backbone's defaults")
    batch_size: int = Field(16, ge=1, le=1024)
    overlays: int = Field(6, ge=0, le=100)
    reference_weight: float = Field(
        0.0,
        ge=0,
        le=1,
        description="weight w of the defect-free reference in the prior cam^(1-w) * distance^w; 0 = off",
    )
    reference_layer: str | None = Field(
        None, description="layer whose features the reference compares; null = the backbone's default"
    )
    reference_bank: int = Field(
        20_000, ge=1, le=10_000_000, description="location vectors of defect-free training images kept per fold"
    )

    @model_validator(mode="after")
    def _layers_the_method_explains(self) -> SaliencyParams:
        count = METHODS[self.method].layer_count
        if count is not None and self.layers is not None and len(self.layers) != count:
            raise ValueError(
                f"saliency.method {self.method!r} explains {count} layer, saliency.layers names {len(self.layers)}: "
                f"name one (e.g. layers: [{self.layers[-1]}]) or set layers: null for the backbone's default"
            )
        return self

    @field_validator("reference_layer")
    @classmethod
    def _named_layer(cls, layer: str | None) -> str | None:
        if layer == "":
            raise ValueError("is empty; use null for the backbone's default layer")
        return layer


class EvaluateParams(Section):
    threshold: float = Field(0.5, gt=0, lt=1, description="decision threshold on the defect probability")
    overlays: int = Field(4, ge=0, le=50, description="hardest images per class in the overlay grid")
    pointing_tolerance: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="pixels (prepared size) a map's maximum may lie off the true mask and still hit; "
        "0 = strict pointing game only, > 0 also reports the tolerant one",
    )


class ReleaseParams(Section):
    model: Literal[KINDS] = Field(  # type: ignore[valid-type]
        "guided", description="which model the release trains on all labelled images and registers"
    )
    operating_point: str | dict[str, float] = Field(
        "zero_misses",
        description="where the threshold lies on the pooled out-of-fold scores: zero_misses, "
        "{max_false_alarm_rate: x} or {min_precision: p}",
    )
    gate: dict[str, str] = Field(
        default_factory=dict, description="metric -> condition ('>= 0.9') the candidate must pass to become champion"
    )

    @field_validator("operating_point")
    @classmethod
    def _known_point(cls, value: str | dict[str, float]) -> str | dict[str, float]:
        if isinstance(value, dict) and len(value) != 1:
            raise ValueError(f"write one of {', '.join(OPERATING_POINTS)} (a mapping of one key), got {value!r}")
        try:
            cls._point_of(value)
        except MetricsError as error:
            raise ValueError(str(error)) from None
        return value

    @field_validator("gate")
    @classmethod
    def _conditions(cls, gate: dict[str, str]) -> dict[str, str]:
        for key, condition in gate.items():
            try:
                parse_condition(condition)
            except MetricsError as error:
                raise ValueError(f"gate {key!r}: {error}") from None
        return gate

    @staticmethod
    def _point_of(value: str | dict[str, float]) -> OperatingPoint:
        return OperatingPoint(value) if isinstance(value, str) else OperatingPoint(*next(iter(value.items())))

    @property
    def point(self) -> OperatingPoint:
        return self._point_of(self.operating_point)


# The formats serving may accept: those whose size Pillow reads from the header before decoding.
SERVING_FORMATS = tuple(name.lower() for name in HEADER_PARSERS)


class ServingParams(Section):
    """The scoring endpoint's limits (docs/deploy.md, "Limits"): carried in the released model's
    model config by the release stage; a scoring model logged without them takes these defaults."""

    max_image_pixels: int = Field(
        default=50_000_000, ge=1, le=1_000_000_000, description="an image larger than this (from its header) is refused"
    )
    max_request_pixels: int = Field(
        default=200_000_000,
        ge=1,
        le=10_000_000_000,
        description="the images of one request are decoded until their pixels would pass this; the rest are refused",
    )
    heatmap_max_side: int = Field(
        default=1024,
        ge=16,
        le=16_384,
        description="longer side of a heatmap overlay, in pixels; larger images are shrunk",
    )
    formats: list[Literal[SERVING_FORMATS]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(SERVING_FORMATS),
        min_length=1,
        description="formats accepted, each checked from its header before decoding",
    )
    concurrent_images: int = Field(
        default=1,
        ge=1,
        le=64,
        description="images one worker decodes or chunks it scores at once over all its request threads",
    )

    @model_validator(mode="after")
    def _request_holds_an_image(self) -> ServingParams:
        if self.max_request_pixels < self.max_image_pixels:
            raise ValueError(
                f"serving.max_request_pixels ({self.max_request_pixels:,}) is below serving.max_image_pixels "
                f"({self.max_image_pixels:,}): a request must hold at least one image of the largest size"
            )
        return self


SECTIONS: dict[str, type[Section]] = {
    "prepare": PrepareParams,
    "model": ModelParams,
    "train_baseline": TrainParams,
    "train_guided": GuidedParams,
    "saliency": SaliencyParams,
    "pseudo_labels": PseudoLabelParams,
    "evaluate": EvaluateParams,
    "release": ReleaseParams,
    "serving": ServingParams,
}

S = TypeVar("S", bound=Section)

RUN_SEED = "seed"
# Knowledge rounds after the first (docs/method.md): ``round<k>: <the round before>``, each a
# set of stages of its own in dvc.yaml (foreach), so adding a round runs only the new one.
ROUNDS = "rounds"
# The seeds that differ between repetitions of one setting: each takes the top-level `seed` unless
# set on its own, so `-S seed=1` is a whole repetition. `prepare.seed` (the folds) is not among
# them: every repetition is tested on the same folds.
DERIVED_SEEDS: dict[str, str] = {
    "prepare": "subset_seed",
    "train_baseline": "seed",
    "train_guided": "seed",
    "pseudo_labels": "seed",
}
# Paths in params that name files of the project (relative ones are meant from its root).
PROJECT_PATHS: dict[str, str] = {"prepare": "path", "model": "pretrained_weights"}


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers as YAML 1.2 does: ``1e-3`` is a number, not text.

    DVC reads and writes params.yaml as YAML 1.2 (ruamel.yaml): it writes ``-S lr=0.00001`` as
    ``1e-05``, which PyYAML's YAML 1.1 reads as the text '1e-05', and strict sections refuse text.
    """


# Appended after YAML 1.1's float pattern, which it widens by numbers without a point.
_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def load_yaml(text: str) -> Any:
    """Params text (params.yaml, a preset, a ``--set`` value) as DVC reads it; raises yaml.YAMLError."""
    return yaml.load(text, Loader=_ParamsLoader)  # a SafeLoader: plain data only


def read_params(path: Path = PARAMS_FILE) -> dict:
    try:
        params = load_yaml(path.read_text())
    except FileNotFoundError as error:
        raise ConfigError(f"{path} not found: run the stage from the project root") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(params, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, found {type(params).__name__}")
    check_top_level(params, path)
    knowledge_rounds(params, str(path))
    return params


def check_top_level(values: dict, path: Path | str) -> None:
    """Refuse a top-level key of a params file (or preset) that is neither a section nor the run seed."""
    unknown = sorted(set(values) - set(SECTIONS) - {RUN_SEED, ROUNDS})
    if unknown:
        raise ConfigError(
            f"{path}: unknown section(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(SECTIONS)} and the top-level {RUN_SEED} and {ROUNDS}"
        )


def knowledge_rounds(params: dict, source: str = "params") -> dict[str, KnowledgeRound]:
    """The rounds after the first, by name, from ``params[rounds]``: ``round2: guided``,
    ``round3: round2``, ... Each must learn from the round before it; the chain is written out
    because dvc.yaml cannot compute a round's predecessor from its name."""
    value = params.get(ROUNDS) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {ROUNDS}: expected a mapping such as {{round2: guided}}, got {value!r}")
    rounds: dict[str, KnowledgeRound] = {}
    before = FIRST_ROUND.name
    for number, (name, learns_from) in enumerate(value.items(), start=2):
        expected = f"round{number}"
        if (name, learns_from) != (expected, before):
            written = f"{name}: {learns_from}"
            raise ConfigError(
                f"{source}: {ROUNDS}: found '{written}' where round {number} must be '{expected}: {before}' "
                f"(rounds are numbered from 2, each learning from the one before; round 1 is train_guided)"
            )
        rounds[name] = KnowledgeRound(name, learns_from)
        before = name
    return rounds


def load_round(name: str | None, path: Path = PARAMS_FILE) -> KnowledgeRound:
    """The knowledge round a round stage runs for: the first (the pipeline's own stages) without a
    name, else the params' round of that name (refused where params.yaml has no such round)."""
    if name is None:
        return FIRST_ROUND
    rounds = knowledge_rounds(read_params(path), str(path))
    if name not in rounds:
        raise ConfigError(
            f"{path}: {ROUNDS}: no round {name!r} (declared: {', '.join(rounds) or 'none'}); "
            f"dvc.yaml generates the round stages from {ROUNDS}"
        )
    return rounds[name]


def run_seed(params: dict, source: str = "params") -> int:
    """The top-level ``seed`` of a params mapping; 0 where it is absent (files older than it)."""
    value = params.get(RUN_SEED, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**32 - 1:
        raise ConfigError(
            f"{source}: {RUN_SEED}: expected a whole number from 0 to {2**32 - 1} "
            f"(the seed of the whole run), got {value!r}"
        )
    return value


def section_values(name: str, params: dict, source: str = "params") -> dict:
    """A section's raw values as its stage sees them: a derived seed left unset (absent or null)
    takes the top-level ``seed``."""
    values = dict(params.get(name) or {})
    key = DERIVED_SEEDS.get(name)
    if key and values.get(key) is None:
        values[key] = run_seed(params, source)
    return values


def parse_params(params: dict, source: str = "params") -> dict[str, Section]:
    """Every section of a whole params mapping, validated, derived seeds filled in."""
    return {name: parse_section(name, section_values(name, params, source), source) for name in SECTIONS}


# One overload per section, so that a stage's ``params = load_section("train_guided")`` is typed
# ``GuidedParams`` for a type checker (``SECTIONS`` is what the code looks up).
@overload
def load_section(name: Literal["prepare"], path: Path = ...) -> PrepareParams: ...
@overload
def load_section(name: Literal["model"], path: Path = ...) -> ModelParams: ...
@overload
def load_section(name: Literal["train_baseline"], path: Path = ...) -> TrainParams: ...
@overload
def load_section(name: Literal["train_guided"], path: Path = ...) -> GuidedParams: ...
@overload
def load_section(name: Literal["saliency"], path: Path = ...) -> SaliencyParams: ...
@overload
def load_section(name: Literal["pseudo_labels"], path: Path = ...) -> PseudoLabelParams: ...
@overload
def load_section(name: Literal["evaluate"], path: Path = ...) -> EvaluateParams: ...
@overload
def load_section(name: Literal["release"], path: Path = ...) -> ReleaseParams: ...
@overload
def load_section(name: Literal["serving"], path: Path = ...) -> ServingParams: ...


def load_section(name: str, path: Path = PARAMS_FILE) -> Section:
    """Validate and return one section of params.yaml (missing keys take their defaults).

    Every section in the file is validated, not only this one: a typo in a later stage's section
    then stops ``dvc repro`` at its first stage instead of after hours of training. Derived seeds
    come from the top-level ``seed`` unless set on their own; relative project paths are resolved
    against the project root when the stage runs elsewhere (a queued experiment's copy).
    """
    sections = parse_params(read_params(path), source=str(path))
    return _with_project_paths(name, sections[name])


def _with_project_paths(name: str, section: S) -> S:
    """Relative paths in params mean the project root; the working directory is only that root
    outside queued experiments, so they are made absolute only where the two differ (a run in the
    workspace keeps and logs exactly what params.yaml says)."""
    key = PROJECT_PATHS.get(name)
    value = getattr(section, key) if key else None
    if not value or Path(value).is_absolute():
        return section
    assert key is not None  # value is only set where the section has a path key
    root = project_root()
    if root == Path.cwd().resolve():
        return section
    return section.model_copy(update={key: os.path.normpath(root / value)})


def parse_section(name: str, values: dict, source: str = "params") -> Section:
    model = SECTIONS[name]
    try:
        return model.model_validate(values)
    except ValidationError as error:
        problems: list[tuple[str, str, bool]] = []  # key, message, whether it says what to write
        for item in error.errors():
            key = _key(name, model, item["loc"])
            if item["type"] == "extra_forbidden":
                field_model = _nested_model(model, item["loc"][:-1])
                allowed = ", ".join(field_model.model_fields)
                problems.append((key, f"unknown key {key!r} (allowed here: {allowed})", False))
            else:
                problems.append((key, *_problem(key, item)))
        # A union (a number or 'all') fails once per member: where one says what to write, it alone.
        hinted = [key for key, _, says in problems if says]
        kept = [
            text for key, text, says in problems if says or not any(h == key or h.startswith(f"{key}.") for h in hinted)
        ]
        raise ConfigError(f"{source}: " + "; ".join(kept)) from None


def _key(name: str, model: type[BaseModel], location: tuple) -> str:
    """``section.key.subkey`` of an error's location, without the tags pydantic adds to it for
    each member of a union (``prepare.defective_images``, not ``...defective_images.constrained-int``)."""
    parts, tagged = [name], False
    current: object = model
    for part in location:
        if tagged:
            tagged = False
            continue
        parts.append(str(part))
        fields = current.model_fields if isinstance(current, type) and issubclass(current, BaseModel) else {}
        annotation = fields[part].annotation if isinstance(part, str) and part in fields else None
        members = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else ()
        tagged = len([member for member in members if member is not type(None)]) > 1
        current = annotation
    return ".".join(parts)


# Strict types (pipeline/core/sections.py): the errors of a value of the wrong type, and what is expected.
_EXPECTED = {"int_type": "a whole number", "float_type": "a number", "bool_type": "true or false"}


def _problem(key: str, item: ErrorDetails) -> tuple[str, bool]:
    """One error's message, and whether it says what to write instead."""
    value = item.get("input")
    expected = _EXPECTED.get(item["type"])
    if expected is None:
        return f"{key}: {item['msg'].removeprefix('Value error, ')} (got {value!r})", False
    got = f"the text {value!r}" if isinstance(value, str) else repr(value)
    written = _as_written(item["type"], value)
    if written is None:
        return f"{key}: expected {expected}, got {got}", False
    quoted = " without quotes (YAML reads a quoted value as text)" if isinstance(value, str) else ""
    return f"{key}: expected {expected}, got {got}; write {key.rsplit('.', 1)[-1]}: {written}{quoted}", True


def _as_written(kind: str, value: object) -> str | None:
    """How params.yaml writes ``value`` as a value of the expected type; None where it is none."""
    parsed = value
    if isinstance(value, str):
        try:
            parsed = load_yaml(value)
        except yaml.YAMLError:
            return None
    if kind == "bool_type" and (isinstance(parsed, bool) or parsed in (0, 1)):
        return "true" if parsed else "false"
    if isinstance(parsed, bool) or not isinstance(parsed, int | float):
        return None
    if kind == "float_type":
        return value.strip() if isinstance(value, str) else repr(parsed)
    if kind == "int_type" and float(parsed).is_integer():
        return str(int(parsed))
    return None


def _nested_model(model: type[BaseModel], location: tuple) -> type[BaseModel]:
    for part in location:
        annotation = model.model_fields[part].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return model
