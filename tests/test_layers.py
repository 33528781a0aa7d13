"""The package's imports run one way (docs/architecture.md): no cycle, no import that points up a layer.

Every import counts, also the ones inside functions. A module is named by its dotted path; its
component is the first name under ``mpitrain`` (``mpitrain.sync.ps.worker`` -> ``sync``).
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mpitrain"

BASE = {"runtime", "units"}
UTIL = BASE | {"backend", "config", "optim", "faults", "watchdog", "metrics", "checkpoint", "threads"}
# component -> the components it may import (besides itself)
ALLOWED = {
    "runtime": set(), "units": {"runtime"},
    "backend": BASE, "config": BASE, "optim": BASE | {"backend"}, "faults": BASE, "metrics": BASE,
    "watchdog": BASE | {"metrics"}, "checkpoint": BASE, "threads": BASE,
    "collectives": BASE | {"backend"},
    "models": BASE | {"backend"},
    "data": BASE,
    "perf": BASE | {"backend", "collectives"},
    "bench": BASE | {"backend", "collectives", "perf", "metrics", "threads"},
    "parallel": BASE | {"backend", "collectives", "models", "data"},
    "sync": UTIL | {"collectives", "models", "data", "parallel"},
    "train": UTIL | {"collectives", "models", "data", "parallel", "sync"},
}
TOP = {"cli", "__main__", "compare", "info", "generate", "export"}  # the commands: may import anything


def _modules():
    mods = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(name, path, mods):
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + ".") and t != "mpitrain":
                out.add(t)
    return out


def _graph():
    mods = _modules()
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def _component(mod):
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "mpitrain"


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_no_import_points_up_a_layer():
    bad = []
    for mod, targets in _graph().items():
        c = _component(mod)
        if c in TOP or c == "mpitrain":
            continue
        assert c in ALLOWED, f"{mod}: component {c!r} has no layer in tests/test_layers.py; give it one"
        for t in targets:
            tc = _component(t)
            if tc != c and tc not in ALLOWED[c]:
                bad.append(f"{mod} imports {t}")
    assert not bad, "imports that point up a layer:\n" + "\n".join(sorted(bad))


def test_the_checker_sees_cycles_and_upward_imports():
    """The walker itself: a two-module cycle is found; an import inside a function counts."""
    graph = {"a": {"b"}, "b": {"a"}, "c": set()}
    assert _cycles(graph) == [["a", "b"]]
    mods = {"mpitrain.x": None, "mpitrain.y": None}
    src = PKG.parent / "build" / "layers-probe.py"
    src.parent.mkdir(exist_ok=True)
    src.write_text("def f():\n    from .y import g\n")
    try:
        assert _imports("mpitrain.x", src, mods) == {"mpitrain.y"}
    finally:
        src.unlink()


@pytest.mark.parametrize("limit", [700])
def test_no_module_is_too_big(limit):
    big = [f"{p.relative_to(PKG.parent)} ({n} lines)" for p in PKG.rglob("*.py")
           if (n := p.read_text().count("\n")) > limit]
    assert not big, f"modules over {limit} lines: {big}"
