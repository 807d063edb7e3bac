"""The architecture as a test: layers import only downwards, no import circles, no imports hidden in
functions to dodge one, a pure core, and a plugin that does not drag the tools in."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("serving_mfu", "scheduler_hooks", "loadgen")
# Lower imports nothing higher.  loadgen and scheduler_hooks sit on serve/runtime; tools on everything.
# files.py (private folders, safe writes) and format.py (figures as text) sit beneath them all; derived.py
# (a model's FLOPs read off its modules, torch imported lazily) beside model/.
RANK = {"serving_mfu.files": 0, "serving_mfu.format": 0, "serving_mfu.model": 0, "serving_mfu.derived": 1,
        "serving_mfu.cost": 1, "serving_mfu.peaks": 2, "serving_mfu.schema": 2,
        "serving_mfu.runtime": 3, "serving_mfu.serve": 4, "loadgen": 5, "scheduler_hooks": 5, "serving_mfu.tools": 6, "serving_mfu": 6}
# CLI entry points import their subcommands lazily (so `--help` does not load vLLM and torch), and
# `scheduler_hooks.MFUScheduler` is resolved on first use (so the endpoint plugin loads without the scheduler).
LAZY_OK = {"serving_mfu/tools/cli.py", "loadgen/cli.py", "scheduler_hooks/__init__.py"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(mod: str) -> str:
    parts = mod.split(".")
    if parts[0] != "serving_mfu":
        return parts[0]
    return ".".join(parts[:2]) if len(parts) > 1 and ".".join(parts[:2]) in RANK else "serving_mfu"


def _resolve(name: str) -> str | None:
    """The project module an import names (the longest known prefix), or None for a third-party one."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in MODULES:
            return ".".join(parts[:i])
    return None


def _imports(path: Path, top_level: bool) -> list[tuple[int, str]]:
    """(line, imported name) of the module's top-level imports, or of those inside functions."""
    tree = ast.parse(path.read_text())
    nodes = []
    if top_level:
        nodes = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    else:
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                nodes += [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
    out = []
    for n in nodes:
        if isinstance(n, ast.Import):
            out += [(n.lineno, a.name) for a in n.names]
        elif n.module and n.level == 0:
            out += [(n.lineno, f"{n.module}.{a.name}") for a in n.names]
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for mod, path in MODULES.items():
        deps = {_resolve(name) for _, name in _imports(path, top_level=True)}
        graph[mod] = {d for d in deps if d and d != mod}
    return graph


def test_layers_import_only_downwards():
    bad = [f"{mod} ({_layer(mod)}) imports {dep} ({_layer(dep)})"
           for mod, deps in _graph().items() for dep in deps
           if RANK[_layer(dep)] > RANK[_layer(mod)] and not (mod == "serving_mfu" and dep.startswith("serving_mfu."))]
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    graph, state, cycles = _graph(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_no_project_imports_hidden_in_functions():
    hidden = [f"{path.relative_to(ROOT)}:{line}: {name}"
              for mod, path in MODULES.items() if str(path.relative_to(ROOT)) not in LAZY_OK
              for line, name in _imports(path, top_level=False) if _resolve(name)]
    assert not hidden, "\n".join(hidden)


@pytest.mark.parametrize("layer", ["serving_mfu.model", "serving_mfu.cost"])
def test_the_core_is_pure(layer):
    """model/ and cost/: no threads, no environment, no torch, no vLLM, at any depth of the module."""
    banned = {"threading", "os", "torch", "vllm", "queue", "multiprocessing"}
    found = [f"{mod}: {name}" for mod, path in MODULES.items() if _layer(mod) == layer
             for _, name in _imports(path, True) + _imports(path, False) if name.split(".")[0] in banned]
    assert not found, found


def test_the_plugin_does_not_import_the_tools():
    code = ("import sys, scheduler_hooks, scheduler_hooks.hook, scheduler_hooks.endpoint\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'matplotlib', 'rich', 'uvicorn', 'IPython', "
            "'loadgen', 'httpx'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_every_package_says_what_it_holds_and_the_layer_map_names_every_layer():
    """Each package opens with a docstring; serving_mfu/__init__'s map names every layer RANK knows."""
    missing = [str(p.relative_to(ROOT)) for p in ROOT.glob("*/**/__init__.py")
               if p.parts[len(ROOT.parts)] in PACKAGES and not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, missing
    layer_map = ast.get_docstring(ast.parse((ROOT / "serving_mfu" / "__init__.py").read_text()))
    for layer in RANK:
        if layer.startswith("serving_mfu."):
            name = layer.split(".")[1]
            assert f"{name}/" in layer_map or f"{name}.py" in layer_map, f"{layer} is not in the layer map"


MAX_FUNCTION_LINES = 80
LONG_OK: set[str] = set()  # no exceptions: build_record is now named steps of at most 50 lines


def test_no_function_is_over_80_lines():
    long = []
    for mod, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                key = f"{path.relative_to(ROOT)}:{node.name}"
                if lines > MAX_FUNCTION_LINES and key not in LONG_OK:
                    long.append(f"{key} ({lines} lines)")
    assert not long, long
