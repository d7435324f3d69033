"""Code layout: the package's modules import each other without circles, and only downward:
a package imports only packages of its own layer or below (command-line modules, `*.cli`,
are entry points and may reach up)."""

from __future__ import annotations

import ast
from pathlib import Path

import cm3leon

PACKAGE_DIR = Path(cm3leon.__file__).parent


def _modules() -> dict[str, tuple[Path, bool]]:
    """{dotted name: (file, is a package __init__)} for every module of the package."""
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def import_graph() -> dict[str, set[str]]:
    """{module: modules of the package it imports}, at module level and inside functions alike.

    `from pkg import name` counts as importing `pkg.name` when that is a module, else `pkg`.
    A module's own parent packages are left out: Python runs them before the module anyway."""
    modules = _modules()
    root = PACKAGE_DIR.name
    graph = {}
    for name, (path, is_package) in modules.items():
        here = name.split(".") if is_package else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for a in node.names:
                    deps.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
        parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        graph[name] = {d for d in deps if d in modules and d.split(".")[0] == root and d != name} - parents
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_no_import_circle_among_cm3leon_modules():
    graph = import_graph()
    assert len(graph) > 50 and "cm3leon.retrieval.index" in graph["cm3leon.retrieval.cli"]
    assert import_cycles(graph) == []


def test_cycle_finder_sees_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_cycles(graph) == [["a", "b", "c"]]


# The layers, lowest first (a top-level module or package of cm3leon by name; "" is the root).
LAYERS = (
    {"errors", "utils"},
    {"data", "model"},
    {"tokenizers", "retrieval"},
    {"layout"},  # documents, templates and prompts over the tokenizers' ids
    {"objectives", "decode"},
    {"train", "api"},
    {"sft", "eval", "convert", "baselines"},
    {"hf", "vllm", "serve", "run"},
    {"cli", "__main__", ""},
)


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: its package {top!r} has no layer in LAYERS")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Edges from a module to a package of a higher layer, command-line modules aside."""
    return sorted(f"{m} -> {d}" for m, deps in graph.items() if not m.endswith(".cli")
                  for d in deps if _layer(d) > _layer(m))


def test_imports_go_down_the_layers():
    graph = import_graph()
    assert {_layer(m) for m in graph} == set(range(len(LAYERS)))  # every module has a layer, every layer a module
    assert upward_imports(graph) == []


def test_the_layer_check_sees_an_upward_import():
    assert upward_imports({"cm3leon.data.readers": {"cm3leon.api"}, "cm3leon.decode.cli": {"cm3leon.api"}}) == [
        "cm3leon.data.readers -> cm3leon.api"]
