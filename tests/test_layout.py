"""The package's layout: no import circle, no arrow from a lower part to a higher one (tools/import_graph.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "import_graph.py"


def _tool():
    spec = importlib.util.spec_from_file_location("import_graph", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_circle_and_no_upward_arrow():
    graph = _tool()
    edges = graph.graph()
    assert graph.circles(edges) == []
    assert graph.upward(edges) == []
    assert {graph.layer(m) for m in edges if graph.layer(m)} <= set(graph.LAYERS)


def test_the_checker_sees_a_circle_and_an_upward_arrow():
    graph = _tool()
    edges = {"lmtune.core.a": {"lmtune.engine.b"}, "lmtune.engine.b": {"lmtune.core.a"},
             "lmtune.dataset.c": {"lmtune.model.d"}, "lmtune.model.d": set()}
    assert graph.circles(edges) == [["lmtune.core.a", "lmtune.engine.b"]]
    assert graph.upward(edges) == [("lmtune.core.a", "lmtune.engine.b"), ("lmtune.dataset.c", "lmtune.model.d")]


def test_the_ground_floor_imports_nothing_of_lmtune():
    graph = _tool()
    edges = graph.graph()
    assert all(not targets - {t for t in targets if t.startswith("lmtune.core")}
               for source, targets in edges.items() if source.startswith("lmtune.core"))
