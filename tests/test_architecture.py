"""The library's layers import one way: no subpackage imports one listed above it
(``tests/support/import_graph.py`` prints the graph)."""

from __future__ import annotations

from support.import_graph import LAYERS, ROOT, layer_graph, upward_imports


def test_no_import_points_upward_between_the_library_layers() -> None:
    assert upward_imports(layer_graph()) == []


def test_every_subpackage_is_a_known_layer() -> None:
    packages = {path.name for path in (ROOT / "pipeline").iterdir() if (path / "__init__.py").is_file()}
    modules = {path.stem for path in (ROOT / "pipeline").glob("*.py") if path.stem != "__init__"}
    assert packages | modules == set(LAYERS)


def test_an_upward_import_is_reported() -> None:
    edges = {
        ("data", "core"): ["pipeline.data.a -> pipeline.core.b"],
        ("models", "training"): ["pipeline.models.x -> pipeline.training.y"],
    }
    assert upward_imports(edges) == ["pipeline.models.x -> pipeline.training.y"]
