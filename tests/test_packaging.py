"""Packaging: the installed `db-writer` command and its version, the module list in
pyproject.toml, and every import declared as a dependency (no network, no servers)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

import version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Top-level files that are not part of the service: standalone mode and its helpers.
HELPERS = {"standalone", "embedded_servers", "demo_producer"}


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group()).lower()


RUNTIME = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
DEV = {_name(r) for r in PYPROJECT["dependency-groups"]["dev"]}
PY_MODULES = set(PYPROJECT["tool"]["setuptools"]["py-modules"])
TOP_LEVEL = {path.stem for path in ROOT.glob("*.py")}


def _imports(path: Path) -> set[str]:
    """Top-level names imported anywhere in the file (function-level imports too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names - {"__future__"}


def _third_party(path: Path) -> set[str]:
    return {name for name in _imports(path) if name not in sys.stdlib_module_names and name not in TOP_LEVEL}


def test_every_top_level_module_is_listed_or_a_known_helper():
    assert PY_MODULES <= TOP_LEVEL, f"listed in py-modules but missing: {sorted(PY_MODULES - TOP_LEVEL)}"
    unlisted = TOP_LEVEL - PY_MODULES - HELPERS
    assert not unlisted, (
        f"new top-level modules {sorted(unlisted)}: add them to [tool.setuptools] py-modules in pyproject.toml "
        "(or, for a standalone/test helper, to HELPERS here)"
    )
    assert not PY_MODULES & HELPERS


def test_the_service_imports_only_listed_modules() -> None:
    """What main.py, migrations.py and alembic/env.py import, transitively, is installed with them."""
    seen: set[str] = set()
    todo = ["main", "migrations", *(_imports(ROOT / "alembic" / "env.py") & TOP_LEVEL)]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo += sorted(_imports(ROOT / f"{module}.py") & TOP_LEVEL)
    assert seen <= PY_MODULES, f"imported by the service but not in py-modules: {sorted(seen - PY_MODULES)}"


def _declared(module: str, allowed: set[str], where: str) -> None:
    distributions = metadata.packages_distributions().get(module)
    assert distributions, f"{where} imports {module!r}, which no installed distribution provides"
    names = {_name(d) for d in distributions}
    assert names & allowed, f"{where} imports {module!r} (from {sorted(names)}): declare it in pyproject.toml"


@pytest.mark.parametrize(
    "path",
    sorted([*(ROOT / f"{m}.py" for m in PY_MODULES), *(ROOT / "alembic").rglob("*.py")]),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_service_imports_are_runtime_dependencies(path):
    """The image and `uv sync --no-dev` have the runtime dependencies only; a package that
    arrives only as another's dependency may go away with it, so it is declared too."""
    for module in sorted(_third_party(path)):
        _declared(module, RUNTIME, str(path.relative_to(ROOT)))


@pytest.mark.parametrize("name", sorted(HELPERS))
def test_helper_imports_are_declared(name):
    for module in sorted(_third_party(ROOT / f"{name}.py")):
        _declared(module, RUNTIME | DEV, f"{name}.py")


def test_version_comes_from_pyproject():
    assert version.version() == PYPROJECT["project"]["version"]


def test_version_without_installed_metadata(monkeypatch):
    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    assert version.version() == PYPROJECT["project"]["version"]


def test_console_script_and_main_print_the_version(tmp_path):
    expected = f"db-writer {PYPROJECT['project']['version']}"
    script = Path(sys.executable).parent / "db-writer"
    assert script.exists(), "the db-writer command is not installed: run `uv sync`"
    # From another directory: the installed command finds the modules without the project on sys.path.
    done = subprocess.run([str(script), "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == expected, done
    done = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == expected, done


def test_licence():
    assert PYPROJECT["project"]["license"] == "MIT"
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "the db-writer authors" in text


def test_the_deferred_asyncio_client_of_redis_loads_when_used():
    """main.py leaves redis-py's asyncio client unexecuted until something asks it for a
    name: then it is the real module, and its submodules import as usual."""
    code = (
        "import sys, main; main._defer_redis_asyncio(); import redis, redis.asyncio;"
        " assert 'redis.asyncio.client' not in sys.modules;"
        " from redis.asyncio import Redis; from redis.asyncio.client import Redis as Same;"
        " assert Redis is Same and redis.asyncio.Redis is Redis and redis.asyncio.from_url;"
        " print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr
