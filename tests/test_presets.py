"""Presets: every shipped preset is valid; apply keeps params.yaml's comments; show matches apply."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_section
from pipeline.experiments import presets

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def params(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    return path


@pytest.mark.parametrize("name", presets.available())
def test_every_preset_applies_and_validates(name: str, params: Path) -> None:
    assert presets.apply(name, params_path=params)
    for section in presets.load_preset(name):
        load_section(section, params)  # raises on an invalid result
    assert presets.apply(name, params_path=params) == []  # applying twice changes nothing


def test_paper_presets_hold_the_papers_setting() -> None:
    sizes = {"paper-kolektorsdd": (512, 1408), "paper-kolektorsdd2": (224, 640)}
    for name, (width, height) in sizes.items():
        preset = presets.load_preset(name)
        assert preset["model"]["backbone"] == "vgg16"
        assert (preset["prepare"]["width"], preset["prepare"]["height"]) == (width, height)
        for stage in ("train_baseline", "train_guided"):
            assert {k: preset[stage][k] for k in ("lr", "momentum", "batch_size")} == {
                "lr": 5e-4,
                "momentum": 0.9,
                "batch_size": 4,
            }


def test_apply_keeps_comments_and_other_values(params: Path) -> None:
    before = params.read_text()
    presets.apply("paper-kolektorsdd", params_path=params)
    after = params.read_text()
    comments = lambda text: [line.partition("#")[2].strip() for line in text.splitlines() if "#" in line]  # noqa: E731
    assert comments(after) == comments(before)
    values = yaml.safe_load(after)
    assert values["model"]["backbone"] == "vgg16" and values["train_guided"]["lr"] == 5e-4
    assert values["saliency"]["method"] == yaml.safe_load(before)["saliency"]["method"]


def test_show_gives_the_dvc_command_that_sets_what_apply_writes(params: Path, tmp_path: Path) -> None:
    from dvc.utils.hydra import apply_overrides  # what `dvc exp run -S` does to params.yaml

    command = shlex.split(presets.exp_run_command("paper-kolektorsdd2", params_path=params))
    assert command[:5] == ["dvc", "exp", "run", "-n", "paper-kolektorsdd2"]
    via_dvc = tmp_path / "via_dvc.yaml"
    shutil.copy(params, via_dvc)
    apply_overrides(str(via_dvc), [arg for arg in command[5:] if arg != "-S"])
    presets.apply("paper-kolektorsdd2", params_path=params)
    assert yaml.safe_load(via_dvc.read_text()) == yaml.safe_load(params.read_text())


def test_an_invalid_preset_is_refused_before_anything_is_written(params: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("train_guided:\n  variant: student\n")
    (tmp_path / "odd.yaml").write_text("training:\n  epochs: 3\n")
    before = params.read_text()
    with pytest.raises(ConfigError, match="train_guided.variant"):
        presets.apply("bad", folder=tmp_path, params_path=params)
    with pytest.raises(ConfigError, match="unknown section"):
        presets.exp_run_command("odd", folder=tmp_path, params_path=params)
    with pytest.raises(ConfigError, match="available: bad, odd"):
        presets.load_preset("missing", folder=tmp_path)
    assert params.read_text() == before


def test_a_preset_may_set_the_whole_run_seed_which_every_derived_seed_follows(params: Path, tmp_path: Path) -> None:
    folder = tmp_path / "presets"
    folder.mkdir()
    (folder / "repeat.yaml").write_text("# one repetition\nseed: 2\n")
    assert "-S seed=2" in presets.exp_run_command("repeat", folder, params)
    assert presets.apply("repeat", folder, params) == ["seed"]
    assert load_section("train_guided", params).seed == 2 and load_section("prepare", params).seed == 0
    (folder / "bad.yaml").write_text("seed: yes\n")
    with pytest.raises(ConfigError, match="preset bad: seed: expected a whole number"):
        presets.exp_run_command("bad", folder, params)


# params.yaml's defaults are tuned for the embedded synthetic run (results/synthetic/README.md) and
# move with it; a preset names each of these itself, so that retuning them cannot change the recipe
# behind its measured figures (an unnamed key silently took the synthetic run's value before).
RECIPE = {
    "train_baseline": ("epochs", "batch_size", "lr", "lr_schedule", "sampling"),
    "train_guided": ("epochs", "batch_size", "lr", "lr_schedule", "sampling", "variant"),
    "saliency": ("method", "layers"),
}


@pytest.mark.parametrize("name", presets.available())
def test_every_preset_names_its_whole_training_recipe(name: str) -> None:
    preset = presets.load_preset(name)
    missing = [f"{section}.{key}" for section, keys in RECIPE.items() for key in keys if key not in preset[section]]
    assert not missing, f"presets/{name}.yaml leaves {missing} to params.yaml's synthetic-run defaults"


@pytest.mark.parametrize("name", presets.available())
def test_a_preset_applied_over_other_defaults_gives_the_same_recipe(name: str, params: Path) -> None:
    presets.apply(name, params_path=params)
    expected = {section: load_section(section, params) for section in RECIPE}
    retuned = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section in ("train_baseline", "train_guided"):
        retuned[section].update(epochs=2, lr=0.1, lr_schedule="constant", sampling="oversample")
    retuned["train_guided"]["variant"] = "none"
    retuned["saliency"]["layers"] = ["features.layer4"]
    params.write_text(yaml.safe_dump(retuned))
    presets.apply(name, params_path=params)
    for section, keys in RECIPE.items():
        got = load_section(section, params)
        assert {k: getattr(got, k) for k in keys} == {k: getattr(expected[section], k) for k in keys}, section
