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


HOOK_MODULES = ["lmtune/core/hook.py", "lmtune/engine/hooks/basic.py", "lmtune/engine/hooks/chat.py",
                "lmtune/engine/hooks/logger.py", "lmtune/engine/hooks/throughput.py",
                "lmtune/engine/checkpoint/hook.py", "lmtune/engine/checkpoint/hf_hook.py",
                "lmtune/compat/xtuner/hooks.py"]


def _runner_attributes(path: Path) -> set[str]:
    """The names a module reads or calls on a variable called ``runner``."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "runner"}


def test_hooks_use_only_the_run_view_and_the_runner_provides_it():
    """Hooks see the runner through RunView: every name they use on it is declared there, and the Runner
    has every declared name (as an attribute it assigns, a property or a method)."""
    import ast

    from lmtune.core.hook import RunView
    from lmtune.engine.runner import Runner

    root = Path(__file__).resolve().parents[1]
    declared = set(RunView.__annotations__) | {n for n in vars(RunView) if not n.startswith("_")}
    for rel in HOOK_MODULES:
        used = _runner_attributes(root / rel)
        assert used <= declared, (rel, sorted(used - declared))
    source = ast.parse((root / "lmtune/engine/runner/runner.py").read_text(encoding="utf-8"))
    targets = [t for node in ast.walk(source) if isinstance(node, (ast.Assign, ast.AnnAssign))
               for t in (node.targets if isinstance(node, ast.Assign) else [node.target])]
    targets += [e for t in targets if isinstance(t, ast.Tuple) for e in t.elts]  # a, b = ...
    assigned = {t.attr for t in targets
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
    missing = {n for n in declared if n not in assigned and not hasattr(Runner, n)}
    assert not missing, sorted(missing)
