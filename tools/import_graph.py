"""lmtune's import graph: circles, and arrows that point up the layers (docs: README, "Where things live").

Every ``import`` / ``from ... import`` of lmtune modules in the package's own code counts, those inside
functions too (a lazy import is still a dependency); the generated configs of the library are data
and are left out. Layers, lowest first; a module may import its own layer and the ones below:

    core                        errors, constants, dist, device; imports nothing of lmtune
    config, configs             loading and building configs; the config index and library
    dataset | model             data (rows -> tokens -> packs) and the model (with its ports); neither
                                imports the other
    compat, demo                XTuner stand-ins; the demo's tiny model and data
    engine                      the runner, loops, hooks, checkpoints, strategies
    tools, cli                  the subcommands and the command line

    .venv/bin/python tools/import_graph.py            # exit 1 if there is a circle or an upward arrow
    .venv/bin/python tools/import_graph.py --edges    # and print every module-to-module arrow
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lmtune"

LAYERS = {"core": 0, "config": 1, "configs": 1, "dataset": 2, "model": 2, "compat": 3, "demo": 3, "engine": 4,
          "tools": 5, "cli": 6}
SIBLINGS = {frozenset({"dataset", "model"})}  # same layer, no arrow either way


def modules() -> dict[str, Path]:
    found = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        rel = file.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[1] == "configs" and len(parts) > 3:
            continue  # the library's configs: data
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = file
    return found


def imports_of(name: str, file: Path, known: set[str]) -> set[str]:
    """The lmtune modules ``name`` imports (resolved to the longest known module of each dotted name)."""
    tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    package = name if file.name == "__init__.py" else name.rsplit(".", 1)[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            subs = [f"{base}.{alias.name}" for alias in node.names]
            # `from pkg import submodule` is an arrow to the submodule; `from pkg import name`, to pkg
            names = subs + ([base] if any(sub not in known for sub in subs) else [])
        for dotted in names:
            if not dotted.startswith("lmtune"):
                continue
            parts = dotted.split(".")
            while parts and ".".join(parts) not in known:
                parts.pop()
            if parts and ".".join(parts) != name:
                targets.add(".".join(parts))
    return targets


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    edges = {name: imports_of(name, file, known) for name, file in found.items()}
    # a package's __init__ that only re-exports is reached by importing any of its modules: not an arrow
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    bad = []
    for source, targets in sorted(edges.items()):
        a = layer(source)
        for target in sorted(targets):
            b = layer(target)
            if a is None or b is None or a == b:
                continue
            if a not in LAYERS or b not in LAYERS:
                bad.append((source, target))  # a part outside the layers: name it in LAYERS
            elif LAYERS[b] > LAYERS[a] or frozenset({a, b}) in SIBLINGS:
                bad.append((source, target))
    return bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", action="store_true", help="print every arrow")
    args = parser.parse_args()
    edges = graph()
    if args.edges:
        for source, targets in sorted(edges.items()):
            for target in sorted(targets):
                print(f"{source} -> {target}")
    found = circles(edges)
    bad = upward(edges)
    for component in found:
        print("circle: " + " <-> ".join(component))
    for source, target in bad:
        print(f"upward: {source} -> {target}")
    parts = sorted({layer(m) for m in edges if layer(m)} - set(LAYERS))
    if parts:
        print("outside the layers: " + ", ".join(parts))
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} arrows, {len(found)} circles, {len(bad)} upward")
    return 1 if found or bad or parts else 0


if __name__ == "__main__":
    sys.exit(main())
