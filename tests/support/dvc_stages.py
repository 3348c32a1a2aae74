"""dvc.yaml's stages as DVC runs them: a ``foreach`` template expanded over its params mapping."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from support.helpers import ROOT

_PARAM = re.compile(r"^\$\{(\w+)\}$")


def templates(root: Path = ROOT) -> dict[str, dict]:
    """Every stage definition of dvc.yaml by name; a foreach stage's ``do`` under its own name."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


def script(definition: dict) -> str:
    """The module a stage runs: ``python -m stages.saliency ${key}`` -> ``stages.saliency``."""
    return definition["cmd"].split()[2]


def expanded(root: Path = ROOT, params: dict | None = None) -> dict[str, dict]:
    """Every stage DVC generates, by the name DVC gives it (``round_saliency@round2``), each
    ``${key}`` and ``${item}`` of a foreach stage replaced by its entry of the params mapping."""
    params = params if params is not None else yaml.safe_load((root / "params.yaml").read_text())
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    found: dict[str, dict] = {}
    for name, stage in stages.items():
        if "foreach" not in stage:
            found[name] = stage
            continue
        matched = _PARAM.match(stage["foreach"])
        assert matched, f"{name}: foreach over {stage['foreach']!r}, expected one params key"
        for key, item in (params.get(matched[1]) or {}).items():
            found[f"{name}@{key}"] = _substituted(stage["do"], str(key), str(item))
    return found


def _substituted(value: Any, key: str, item: str) -> Any:
    if isinstance(value, str):
        return value.replace("${key}", key).replace("${item}", item)
    if isinstance(value, list):
        return [_substituted(entry, key, item) for entry in value]
    if isinstance(value, dict):
        return {_substituted(k, key, item): _substituted(v, key, item) for k, v in value.items()}
    return value
