"""The layering, checked: flows -> components -> slotwise (the library) -> slotwise.kernels; nothing imports upward.

The contracts are [tool.importlinter] in pyproject.toml (import-linter: a layers contract over every
top-level module, and independent stage components). slotwise is installed from four directories
(pyproject's package-dir: slotwise.kernels = kernels/, slotwise.components = components/, ...), which
a tool reading the tree cannot see; so the tests lay the installed package out as one tree, every
package found through importlib as Python imports it, and run lint-imports on that.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
PACKAGES = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["packages"]
UPPER = ("slotwise.components", "slotwise.flows")


def package_dir(name: str) -> Path:
    """Where the installed package `name` is imported from."""
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, f"{name} is not an installed package"
    return Path(next(iter(spec.submodule_search_locations)))


def installed_tree(dest: Path) -> Path:
    """The installed slotwise as one directory tree under dest (as a wheel would lay it out)."""
    for name in PACKAGES:
        out = dest.joinpath(*name.split("."))
        out.mkdir(parents=True, exist_ok=True)
        for f in package_dir(name).glob("*.py"):
            shutil.copy2(f, out / f.name)
    return dest


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(PYPROJECT)!r}, no_cache=True, no_logo=True))")
    env = {**os.environ, "PYTHONPATH": str(tree)}  # the laid-out tree, not the editable install's mapping
    return subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True, timeout=300)


def test_import_contracts_are_kept(tmp_path):
    res = lint_imports(installed_tree(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "2 kept, 0 broken" in res.stdout


@pytest.mark.parametrize("module,line,broken", [
    ("slotwise/memory.py", "import slotwise.flows.tasks", "slotwise.memory is not allowed to import slotwise.flows"),
    ("slotwise/kernels/histogram.py", "from slotwise.retrofit import record_lookups",
     "slotwise.kernels is not allowed to import slotwise.retrofit"),
    ("slotwise/components/gate.py", "from slotwise.components.update import run",
     "slotwise.components.gate is not allowed to import slotwise.components.update"),
])
def test_an_upward_or_sideways_import_breaks_a_contract(tmp_path, module, line, broken):
    tree = installed_tree(tmp_path)
    with open(tree / module, "a") as f:
        f.write(f"\n{line}\n")
    res = lint_imports(tree)
    assert res.returncode != 0 and broken in res.stdout, res.stdout[-3000:]


def upward_imports(path: Path) -> list[str]:
    """Every import of slotwise.components / slotwise.flows in a file: statements at any depth, and
    importlib.import_module / __import__ of a literal name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__"):
            names = [node.args[0].value]
        found += [f"{path.name}:{node.lineno}: {n}" for n in names if n.startswith(UPPER)]
    return found


def test_no_library_module_imports_components_or_flows():
    library = [p for name in PACKAGES if not name.startswith(UPPER) for p in package_dir(name).glob("*.py")]
    assert len(library) > 20  # slotwise, slotwise.continual, slotwise.evaluation, slotwise.kernels
    assert [hit for p in library for hit in upward_imports(p)] == []


def test_the_ast_check_sees_nested_and_dynamic_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import importlib\n\ndef f():\n    from slotwise.components._cli import run_cli\n"
                   "    return importlib.import_module('slotwise.flows.nightly')\n")
    assert upward_imports(bad) == ["bad.py:4: slotwise.components._cli", "bad.py:4: slotwise.components._cli.run_cli",
                                   "bad.py:5: slotwise.flows.nightly"]
