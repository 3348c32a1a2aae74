"""dvc.yaml and the code agree: each stage's outputs are the paths of ``pipeline.core.layout``, and its
source deps are exactly the modules its script imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline.core import layout
from support.dvc_stages import script, templates

ROOT = Path(__file__).resolve().parents[1]
STAGES = templates()
# A knowledge round's stages (foreach over params `rounds`) with their key and item left as written.
TEMPLATE_ROUND = layout.KnowledgeRound("${key}", "${item}")
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
    module = script(STAGES[stage])
    assert declared == imported_modules(module)
    assert f"{module.replace('.', '/')}.py" in STAGES[stage]["deps"]


ROUND_STAGES = [name for name in STAGES if name.startswith("round_")]


def _declared(stage: str) -> list[str]:
    return [
        next(iter(entry)) if isinstance(entry, dict) else entry
        for key in ("outs", "metrics", "plots")
        for entry in STAGES[stage].get(key, [])
    ]


@pytest.mark.parametrize("stage", [name for name in STAGES if name not in ROUND_STAGES])
def test_a_stage_writes_where_the_layout_says(stage: str) -> None:
    declared = _declared(stage)
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


def test_the_knowledge_rounds_stages_are_the_first_rounds_stages_run_for_a_round() -> None:
    assert ROUND_STAGES == ["round_saliency", "round_pseudo_labels", "round_train_guided"]
    for stage in ROUND_STAGES:
        first = stage.removeprefix("round_")
        assert STAGES[stage]["cmd"] == f"{STAGES[first]['cmd']} ${{key}}"
        assert [d for d in STAGES[stage]["deps"] if not d.startswith("data/")] == [
            d for d in STAGES[first]["deps"] if not d.startswith("data/")
        ]
        assert set(STAGES[stage]["params"]) == {*STAGES[first]["params"], "rounds.${key}"}


@pytest.mark.parametrize(
    ("stage", "reads", "writes"),
    [
        ("round_saliency", {TEMPLATE_ROUND.teacher}, {TEMPLATE_ROUND.saliency, TEMPLATE_ROUND.metrics("saliency")}),
        (
            "round_pseudo_labels",
            {TEMPLATE_ROUND.saliency},
            {TEMPLATE_ROUND.pseudo_masks, TEMPLATE_ROUND.metrics("pseudo_labels")},
        ),
        (
            "round_train_guided",
            {TEMPLATE_ROUND.saliency, TEMPLATE_ROUND.pseudo_masks},
            {TEMPLATE_ROUND.model, TEMPLATE_ROUND.metrics("train_guided"), TEMPLATE_ROUND.plot("train_guided")},
        ),
    ],
)
def test_a_round_stage_reads_the_round_before_and_writes_where_the_layout_says(
    stage: str, reads: set[Path], writes: set[Path]
) -> None:
    data_deps = {Path(dep) for dep in STAGES[stage]["deps"] if dep.startswith("data/")}
    assert data_deps == {layout.PREPARED, *reads}
    assert {Path(path) for path in _declared(stage)} == writes
