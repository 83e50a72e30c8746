"""The layers of ``models`` stay apart: no import cycle, and training never loads the runtime.

Training writes bundles with the contract (``models.manifest``) and the writer (``models.bundle``)
only; the device runtime (``models.runtime``) is the service's. A cycle or a stray import would
still run today, so these tests check the import graph itself.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import models

MODELS = Path(models.__file__).parent
ROOT = MODELS.parent

# In a fresh interpreter in which importing ``models.runtime`` raises ImportError (a ``None`` entry
# in sys.modules): import every training module (but ``__main__``, which runs the program) and print
# their names; then, as a control that the block bites, try a service module that needs the runtime.
_IMPORT_WITHOUT_RUNTIME = """
import importlib, pkgutil, sys
sys.modules["models.runtime"] = None
import training
names = ["training"] + [f"training.{info.name}" for info in pkgutil.iter_modules(training.__path__)
    if info.name != "__main__"]
for name in names:
    importlib.import_module(name)
print(" ".join(names))
try:
    importlib.import_module("service.registry")
except ImportError as error:
    print("blocked:", error)
"""


def _models_imports(path: Path) -> set[str]:
    """The ``models.<module>`` names that the file at ``path`` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("models."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("models."))
    return found


def _import_graph() -> dict[str, set[str]]:
    return {path.stem: _models_imports(path) for path in MODELS.glob("*.py") if path.stem != "__init__"}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path that returns to its start, or ``None`` if acyclic."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        for imported in sorted(graph.get(module, ())):
            found = visit(imported, path + [module])
            if found:
                return found
        done.add(module)
        return None

    for module in sorted(graph):
        found = visit(module, [])
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def without_runtime() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _IMPORT_WITHOUT_RUNTIME], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_models_modules_import_each_other_without_a_cycle() -> None:
    graph = _import_graph()
    assert {"manifest", "bundle", "index", "runtime"} <= graph.keys()
    assert _cycle(graph) is None, f"import cycle in models/: {' -> '.join(_cycle(graph) or [])}"


def test_the_contract_and_the_writer_do_not_import_the_runtime_or_the_index() -> None:
    graph = _import_graph()
    assert graph["manifest"].isdisjoint({"bundle", "index", "runtime"})
    assert graph["bundle"].isdisjoint({"index", "runtime"})


def test_every_training_module_imports_with_the_runtime_blocked(
    without_runtime: subprocess.CompletedProcess[str],
) -> None:
    assert without_runtime.returncode == 0, without_runtime.stderr
    imported = without_runtime.stdout.splitlines()[0].split()
    assert "training.export" in imported  # the writer's user was among them


def test_the_block_does_stop_a_module_that_needs_the_runtime(
    without_runtime: subprocess.CompletedProcess[str],
) -> None:
    assert without_runtime.returncode == 0, without_runtime.stderr
    assert without_runtime.stdout.splitlines()[1].startswith("blocked: import of models.runtime halted")
