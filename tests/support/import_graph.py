"""The import graph between the library's subpackages, and the rule it must keep.

``pipeline/`` is layered: each subpackage may import only from itself and the layers listed
before it, so that no import points upward and no cycle can form. Run it to see the graph::

    python tests/support/import_graph.py

It prints one line per pair of layers that import each other and exits 1 on an upward import
(``tests/test_architecture.py`` runs the same check).
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Lowest first. config is the schema of params.yaml: it reads the allowed values the concerns
# below define and is read by the orchestration above.
LAYERS = (
    "core",
    "data",
    "models",
    "metrics",
    "knowledge",
    "config",
    "training",
    "evaluation",
    "deployment",
    "experiments",
    "cli",
)


def layer_of(module: str) -> str:
    """``pipeline.data.sources.kolektorsdd`` -> ``data``; ``pipeline.config`` -> ``config``."""
    return module.split(".")[1]


def imports_of(path: Path) -> set[str]:
    """Every ``pipeline.*`` module a file imports, at any depth (also under TYPE_CHECKING)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "pipeline":
            found |= {f"pipeline.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("pipeline.")}
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_graph() -> dict[tuple[str, str], list[str]]:
    """(importing layer, imported layer) -> the imports behind that edge, ``a -> b``."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        source = module_name(path)
        if source == "pipeline":
            continue
        for target in sorted(imports_of(path)):
            if layer_of(target) != layer_of(source):
                edges[layer_of(source), layer_of(target)].append(f"{source} -> {target}")
    return dict(edges)


def upward_imports(edges: dict[tuple[str, str], list[str]]) -> list[str]:
    """The imports that point from a layer to one above it (or to an unknown layer)."""
    bad = []
    for (source, target), lines in edges.items():
        known = source in LAYERS and target in LAYERS
        if not known or LAYERS.index(target) > LAYERS.index(source):
            bad += lines
    return bad


def main() -> int:
    edges = layer_graph()
    for source in LAYERS:
        targets = sorted({t for s, t in edges if s == source}, key=lambda t: LAYERS.index(t) if t in LAYERS else -1)
        print(f"{source:12} -> {', '.join(targets) or '(nothing)'}")
    bad = upward_imports(edges)
    for line in bad:
        print(f"upward import: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
