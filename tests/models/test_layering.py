"""The layers of ``models`` stay apart: no import cycle, and training never loads the runtime.

Training writes bundles with the contract (``models.contract.manifest``) and the writer
(``models.contract.bundle``) only; the device runtime (``models.runtime``) is the service's. A cycle
or a stray import would still run today, so these tests check the import graph itself.
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
names = ["training"] + [info.name for info in pkgutil.walk_packages(training.__path__, "training.")
    if info.name != "training.__main__"]
for name in names:
    importlib.import_module(name)
print(" ".join(names))
try:
    importlib.import_module("service.runtime.registry")
except ImportError as error:
    print("blocked:", error)
"""


def _models_imports(path: Path) -> set[str]:
    """The names under ``models.`` (``contract.bundle``) that the file at ``path`` imports; for
    ``from models.<package> import <name>`` both the package and ``<package>.<name>``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("models."):
            package = node.module.removeprefix("models.")
            found.add(package)
            found.update(f"{package}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name.removeprefix("models.") for alias in node.names if alias.name.startswith("models."))
    return found


def _module_name(path: Path) -> str:
    """``models/contract/bundle.py`` -> ``contract.bundle``."""
    return ".".join(path.relative_to(MODELS).with_suffix("").parts)


def _import_graph() -> dict[str, set[str]]:
    return {_module_name(path): _models_imports(path) for path in MODELS.rglob("*.py") if path.stem != "__init__"}


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
    assert {"contract.manifest", "contract.bundle", "contract.index", "runtime"} <= graph.keys()
    assert _cycle(graph) is None, f"import cycle in models/: {' -> '.join(_cycle(graph) or [])}"


def test_the_contract_and_the_writer_do_not_import_the_runtime_or_the_index() -> None:
    graph = _import_graph()
    assert graph["contract.manifest"].isdisjoint({"contract.bundle", "contract.index", "runtime"})
    assert graph["contract.bundle"].isdisjoint({"contract.index", "runtime"})


def test_every_training_module_imports_with_the_runtime_blocked(
    without_runtime: subprocess.CompletedProcess[str],
) -> None:
    assert without_runtime.returncode == 0, without_runtime.stderr
    imported = without_runtime.stdout.splitlines()[0].split()
    assert "training.export" in imported  # the writer's user was among them
    assert "training.fit.trainer" in imported  # and the modules of the subpackages


def test_the_block_does_stop_a_module_that_needs_the_runtime(
    without_runtime: subprocess.CompletedProcess[str],
) -> None:
    assert without_runtime.returncode == 0, without_runtime.stderr
    assert without_runtime.stdout.splitlines()[1].startswith("blocked: import of models.runtime halted")
