"""The package's imports flow one way: algorithms -> core, never algorithm -> algorithm.

Imports are read from the source (``ast``), in functions too, and from the lazy-export
tables of the ``__init__`` files (``"name": "etpo_lightning.x.y"``), so a cycle or a
cross-import cannot hide behind a deferred import.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Source folder -> the package it installs as (pyproject.toml's package-dir).
PACKAGE_DIRS = {
    "etpo_lightning": "etpo_lightning",
    "datamodules": "etpo_lightning.datamodules",
    "callbacks": "etpo_lightning.callbacks",
    "cli": "etpo_lightning.cli",
}
ALGORITHMS = ("etpo", "ppo", "grpo")
#: What core may not import: the algorithms, and the parts built on core (the demo model and
#: the environments are registered into core, never imported by it).
NOT_FOR_CORE = (*ALGORITHMS, "tiny_coder", "envs", "datamodules", "callbacks", "cli")
#: Neither the rollout datamodule nor the callbacks may depend on one algorithm.
ALGORITHM_FREE = ("datamodules", "callbacks")


def module_name(root: Path, path: Path) -> str:
    for folder, package in PACKAGE_DIRS.items():
        base = root / folder
        if path.is_relative_to(base):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join([package, *parts])
    raise ValueError(path)


def imports_of(path: Path, name: str) -> set[str]:
    """Every ``etpo_lightning`` module ``path`` (module ``name``) imports, anywhere in it."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and path.name == "__init__.py":
            if node.value.startswith("etpo_lightning."):  # lazy-export tables
                found.add(node.value)
    return {m for m in found if m == "etpo_lightning" or m.startswith("etpo_lightning.")}


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = {module_name(root, p): p for folder in PACKAGE_DIRS for p in (root / folder).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        # "from etpo_lightning.x import y" names a module or an attribute: keep the modules.
        graph[name] = {m for m in imports_of(path, name) if m in modules and m != name}
    return graph


def subpackage(module: str) -> str:
    """``etpo_lightning.<sub>.*`` -> ``<sub>`` (``""`` for top-level modules)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in (*NOT_FOR_CORE, "core")) else ""


def layering_violations(root: Path) -> list[str]:
    problems = []
    for module, imported in sorted(import_graph(root).items()):
        sub = subpackage(module)
        for target in sorted(imported):
            other = subpackage(target)
            if sub in ALGORITHMS and other in ALGORITHMS and other != sub:
                problems.append(f"{module} imports {target}: algorithms never import each other")
            if sub == "core" and other in NOT_FOR_CORE:
                problems.append(f"{module} imports {target}: core imports no package built on it")
            if sub in ALGORITHM_FREE and other in ALGORITHMS:
                problems.append(f"{module} imports {target}: {sub} must work with every algorithm")
    return problems


def import_cycles(root: Path) -> list[list[str]]:
    """Elementary cycles found by depth-first search (one per back edge)."""
    graph, cycles, state, stack = import_graph(root), [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    # A package's __init__ importing its own submodules (lazily or not) is not a cycle of layers.
    return [c for c in cycles if not all(m.startswith(c[0] + ".") or m == c[0] for m in c[1:-1])]


def test_algorithms_core_datamodules_and_callbacks_import_one_way():
    assert layering_violations(ROOT) == []


def test_no_import_cycles():
    assert import_cycles(ROOT) == []


def _copy_tree(tmp_path: Path) -> Path:
    for folder in PACKAGE_DIRS:
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    return tmp_path


@pytest.mark.parametrize("planted, expected", [
    ("etpo_lightning/grpo/module.py", "etpo_lightning.grpo.module imports etpo_lightning.ppo.losses"),
    ("etpo_lightning/core/forwards.py", "etpo_lightning.core.forwards imports etpo_lightning.ppo.losses"),
    ("datamodules/rollout.py", "etpo_lightning.datamodules.rollout imports etpo_lightning.ppo.losses"),
])
def test_a_planted_cross_import_is_caught(tmp_path, planted, expected):
    root = _copy_tree(tmp_path)
    path = root / planted
    # Inside a function, as a deferred import would hide it from a module-level check.
    path.write_text(path.read_text() + "\n\ndef _planted():\n    from etpo_lightning.ppo.losses import gae\n    return gae\n")
    assert [p for p in layering_violations(root) if p.startswith(expected)], layering_violations(root)


def test_a_planted_cycle_is_caught(tmp_path):
    root = _copy_tree(tmp_path)
    path = root / "etpo_lightning/core/batch.py"
    path.write_text(path.read_text() + "\n\ndef _planted():\n    from etpo_lightning.core.base_module import TokenRLModule\n")
    cycles = import_cycles(root)
    assert any("etpo_lightning.core.batch" in c and "etpo_lightning.core.base_module" in c for c in cycles), cycles
