"""dvc.yaml and the code agree: each stage's outputs are the paths of ``pipeline.core.layout``, and its
source deps are exactly the modules its script imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from pipeline.core import layout

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
# pipeline/config.py imports the concerns' modules only for the allowed values of their params
# (and the params sections they define): a stage that merely validates them does not run their
# code, so they are not its deps (dvc.yaml's header says so). Its core imports are real deps.


def _validation_only(module: str, imported: str) -> bool:
    return module == "pipeline.config" and not imported.startswith("pipeline.core.")


def _source(module: str) -> Path:
    path = ROOT / module.replace(".", "/")
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _imports(module: str) -> set[str]:
    """The pipeline modules ``module`` imports: ``from pipeline.core import layout`` is
    ``pipeline.core.layout``, the package itself where the name is not a module of it."""
    found = set()
    for node in ast.walk(ast.parse(_source(module).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if _source(candidate).exists() else node.module)
    return {imported for imported in found if not _validation_only(module, imported)}


def imported_modules(script: str) -> set[str]:
    seen, todo = set(), [script]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += _imports(module)
    return {_source(m).relative_to(ROOT).as_posix() for m in seen if m.startswith("pipeline.")}


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_stage_depends_on_exactly_the_modules_its_script_imports(stage: str) -> None:
    declared = {dep for dep in STAGES[stage]["deps"] if dep.startswith("pipeline/")}
    assert declared == imported_modules(f"stages.{stage}")
    assert f"stages/{stage}.py" in STAGES[stage]["deps"]


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_stage_writes_where_the_layout_says(stage: str) -> None:
    declared = [
        next(iter(entry)) if isinstance(entry, dict) else entry
        for key in ("outs", "metrics", "plots")
        for entry in STAGES[stage].get(key, [])
    ]
    folders = {
        layout.PREPARED,
        layout.BASELINE,
        layout.SALIENCY,
        layout.PSEUDO_MASKS,
        layout.GUIDED,
        layout.EVALUATION,
        layout.RELEASE,
    }
    expected = {str(folder) for folder in folders if folder.name in STAGES[stage]["outs"][0]} | {
        str(layout.metrics_file(stage))
    }
    assert str(layout.metrics_file(stage)) in declared
    assert {Path(path) for path in declared if not path.startswith("data/plots/")} == {Path(p) for p in expected}
    for path in declared:
        if path.startswith("data/plots/"):
            assert Path(path) == layout.plot_file(Path(path).stem)
