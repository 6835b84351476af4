"""The FAB holds exactly the code the two apps import (issue 17): every module `serverapp.server_app` and
`clientapp.client_app` reach through imports (function-local ones included), README.md, nothing else —
no launchers, key tools, exporter, demo or eval. Built with Flower's own FAB builder from the checkout."""

from __future__ import annotations

import ast
import io
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

from fedtune import toml_io
from tests.conftest import REPO

OURS = ("fedtune", "serverapp", "clientapp", "superlink", "supernode", "bench")


def module_file(module: str) -> Path | None:
    for candidate in (REPO / f"{module.replace('.', '/')}.py", REPO / module.replace(".", "/") / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported(path: Path, module: str) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {n for n in names if n.split(".")[0] in OURS}


def import_closure(*roots: str) -> set[str]:
    """Repository files reachable from `roots` (and each module's parent packages)."""
    seen: set[str] = set()
    files: set[str] = set()
    todo = list(roots)
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):
            module = ".".join(parts[:i])
            path = module_file(module)
            if path is None or module in seen:
                continue
            seen.add(module)
            files.add(path.relative_to(REPO).as_posix())
            todo.extend(imported(path, module))
    return files


def components() -> list[str]:
    app = toml_io.read(REPO / "pyproject.toml")["tool"]["flwr"]["app"]["components"]
    return [ref.partition(":")[0] for ref in app.values()]


def test_fab_holds_exactly_what_the_apps_import():
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(REPO))) as fab:
        names = set(fab.namelist())
    code = {n for n in names if n.endswith(".py")}
    needed = import_closure(*components())
    assert needed - code == set(), f"imported by the apps but missing from fab-include: {sorted(needed - code)}"
    assert code - needed == set(), f"in the FAB but imported by neither app: {sorted(code - needed)}"
    assert "README.md" in names
    for shipped_elsewhere in ("fedtune/certs.py", "fedtune/k8s_keys.py", "fedtune/exporter.py", "fedtune/demo.py"):
        assert shipped_elsewhere not in names
