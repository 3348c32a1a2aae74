"""Named training settings: ``presets/<name>.yaml`` holds overrides of ``params.yaml``.

    kgi presets list                  # the presets and their first comment line
    kgi presets show cpu-kolektorsdd  # the `dvc exp run -S ...` line that runs it
    kgi presets apply cpu-kolektorsdd # writes it into params.yaml, comments kept

A preset has the shape of ``params.yaml`` and names only what it changes; the result is
validated as the stages would validate it before anything is written or printed.
"""

from __future__ import annotations

import argparse
import io
import re
import shlex
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML  # DVC's own YAML library (a dependency of dvc): keeps comments

from pipeline.config import (
    PARAMS_FILE,
    RUN_SEED,
    SECTIONS,
    ConfigError,
    check_top_level,
    knowledge_rounds,
    load_yaml,
    parse_section,
    run_seed,
    section_values,
)
from pipeline.core.artifacts import atomic_path

PRESETS = Path(__file__).resolve().parents[2] / "presets"


def available(folder: Path = PRESETS) -> list[str]:
    return sorted(path.stem for path in folder.glob("*.yaml"))


def load_preset(name: str, folder: Path = PRESETS) -> dict:
    path = folder / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no preset {name!r} in {folder}; available: {', '.join(available(folder)) or 'none'}")
    overrides = load_yaml(path.read_text()) or {}
    check_top_level(overrides, path)
    return overrides


def flat_overrides(overrides: dict, prefix: str = "") -> dict[str, Any]:
    """{"model": {"backbone": "vgg16"}} -> {"model.backbone": "vgg16"}."""
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            flat.update(flat_overrides(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _merged(params: dict, overrides: dict) -> dict:
    merged = dict(params)
    for key, value in overrides.items():
        merged[key] = _merged(params.get(key) or {}, value) if isinstance(value, dict) else value
    return merged


def validate(params: dict, overrides: dict, source: str) -> None:
    """Raise ConfigError unless every section the preset touches is valid once it is applied."""
    merged = _merged(params, overrides)
    run_seed(merged, source)
    knowledge_rounds(merged, source)
    # A new top-level seed reaches every section whose seed derives from it.
    touched = SECTIONS if RUN_SEED in overrides else [name for name in overrides if name in SECTIONS]
    for section in touched:
        parse_section(section, section_values(section, merged, source), source=source)


def exp_run_command(name: str, folder: Path = PRESETS, params_path: Path = PARAMS_FILE) -> str:
    """The ``dvc exp run`` line that runs the preset as an experiment, params.yaml untouched."""
    overrides = load_preset(name, folder)
    validate(load_yaml(params_path.read_text()) or {}, overrides, f"preset {name}")
    sets = [f"-S {shlex.quote(f'{key}={_override_value(value)}')}" for key, value in flat_overrides(overrides).items()]
    return " ".join(["dvc exp run -n", shlex.quote(name), *sets])


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def _override_value(value: Any) -> str:
    """The value as ``dvc exp run -S`` (Hydra's override grammar) reads it back."""
    if isinstance(value, str) and not re.fullmatch(r"[\w./-]*", value):
        # Unquoted, Hydra reads parentheses, braces, brackets and more as syntax (e.g. in a regular
        # expression); quoted, a backslash escapes only a quote, or the backslashes before one.
        escaped = re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), value)
        return f"'{escaped}'"
    return _yaml_scalar(value)


def apply(name: str, folder: Path = PRESETS, params_path: Path = PARAMS_FILE) -> list[str]:
    """Write the preset into params.yaml, keeping its comments; return the keys it changed."""
    overrides = load_preset(name, folder)
    round_trip = YAML()
    round_trip.preserve_quotes = True
    document = round_trip.load(params_path.read_text())
    validate(load_yaml(params_path.read_text()) or {}, overrides, f"preset {name}")
    changed = []
    for key, value in flat_overrides(overrides).items():
        *sections, leaf = key.split(".")
        node = document
        for section in sections:
            if node.get(section) is None:
                node[section] = {}
            node = node[section]
        if node.get(leaf) != value:
            node[leaf] = value
            changed.append(key)
    text = io.StringIO()
    round_trip.dump(document, text)
    with atomic_path(params_path) as temporary:
        temporary.write_text(text.getvalue())
    return changed


def _description(name: str) -> str:
    first = (PRESETS / f"{name}.yaml").read_text().splitlines()[0]
    return first.removeprefix("#").strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["list", "show", "apply"])
    parser.add_argument("name", nargs="?")
    args = parser.parse_args(argv)
    if args.action == "list":
        for name in available():
            print(f"{name}: {_description(name)}")
        return
    if not args.name:
        parser.error(f"{args.action} needs a preset name: one of {', '.join(available())}")
    # A ConfigError ends the command with one line and exit status 1 (kgi's run_command).
    if args.action == "show":
        print(exp_run_command(args.name))
    else:
        changed = apply(args.name)
        print(f"{PARAMS_FILE}: {len(changed)} value(s) set: {', '.join(changed) or 'none (already applied)'}")
