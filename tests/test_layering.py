"""The layers import downward only, read from the source (every import statement, those inside
functions too, and importlib.import_module / __import__ of a literal name), not by importing
anything.

common/ (the package ``loractl``) is the bottom layer; launchd/ builds on it alone; the
supervisor and the client never reach the trainer (daemon/) or mlx, so they start fast and stay
small on a machine where training is what needs the memory.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Folder -> package, as pyproject.toml maps them (common/ is loractl itself).
PACKAGE_OF: dict[str, str] = {
    folder: package
    for package, folder in tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))[
        "tool"
    ]["setuptools"]["package-dir"].items()
}
FOLDER_OF = {package: folder for folder, package in PACKAGE_OF.items()}
COMMON_MODULES = frozenset(path.stem for path in (ROOT / FOLDER_OF["loractl"]).glob("*.py"))
MLX = ("mlx", "mlx_lm")
# `python -m loractl` runs common/__main__.py, which hands over to the client's command line,
# as the `loractl` script does. No module imports it, so the shared layer does not depend on the
# client through it.
ENTRY_POINT = ("common/__main__.py", "loractl.client.cli")


def module_name(path: Path) -> str:
    """The dotted name ``path`` is imported as (common/config.py: loractl.config)."""
    relative = path.relative_to(ROOT)
    package = PACKAGE_OF[relative.parts[0]]
    parts = [*package.split("."), *relative.parts[1:-1]]
    if relative.stem != "__init__":
        parts.append(relative.stem)
    return ".".join(parts)


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of everything the file at ``path`` imports."""
    source = path.read_text(encoding="utf-8")
    return imports_in(source, module_name(path), is_package=path.name == "__init__.py")


def imports_in(source: str, module: str, is_package: bool = False) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of everything ``source``, the module ``module``, imports.
    ``from a import b`` yields ``a`` and ``a.b`` (b may be a module); relative imports are
    resolved to absolute names."""
    tree = ast.parse(source)
    here = module.split(".")
    if not is_package:
        here = here[:-1]  # the package a module's relative imports start from
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            yield node.lineno, target
            for alias in node.names:
                if alias.name != "*":
                    yield node.lineno, f"{target}.{alias.name}"
        elif isinstance(node, ast.Call) and _is_dynamic_import(node.func):
            if node.args and isinstance(node.args[0], ast.Constant):
                if isinstance(node.args[0].value, str):
                    yield node.lineno, node.args[0].value


def _is_dynamic_import(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id in ("__import__", "import_module")
    return isinstance(func, ast.Attribute) and func.attr == "import_module"


def within(name: str, *packages: str) -> bool:
    return any(name == package or name.startswith(package + ".") for package in packages)


def offenders(folders: tuple[str, ...], forbidden: Callable[[str, str], bool]) -> list[str]:
    """``file:line: imports name`` for every import in ``folders`` that ``forbidden`` (given
    the file's repository path and the imported name) refuses."""
    found = []
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            where = path.relative_to(ROOT).as_posix()
            reported = set()  # one line per statement: `from a import b` yields a and a.b
            for line, name in imports(path):
                if line not in reported and forbidden(where, name):
                    reported.add(line)
                    found.append(f"{where}:{line}: imports {name}")
    return found


def test_supervisor_and_client_import_neither_the_trainer_nor_mlx():
    """supervisor/ and client/ never import loractl.daemon, mlx or mlx_lm."""
    bad = offenders(
        (FOLDER_OF["loractl.supervisor"], FOLDER_OF["loractl.client"]),
        lambda where, name: within(name, "loractl.daemon", *MLX),
    )
    assert not bad, "the supervisor and the client must not load the trainer or mlx:\n" + (
        "\n".join(bad)
    )


def test_common_imports_no_other_layer():
    """common/ (loractl) imports nothing from daemon/, supervisor/, client/ or launchd/."""
    upper = ("loractl.daemon", "loractl.supervisor", "loractl.client", "loractl.launchd")
    bad = offenders(
        (FOLDER_OF["loractl"],),
        lambda where, name: (
            within(name, *upper) and not (where == ENTRY_POINT[0] and within(name, ENTRY_POINT[1]))
        ),
    )
    assert not bad, "the shared layer must not depend on the layers above it:\n" + "\n".join(bad)


def test_launchd_imports_only_common_and_itself():
    """launchd/ imports of loractl are its own modules or common/'s (loractl.<module>)."""

    def forbidden(where: str, name: str) -> bool:
        if not within(name, "loractl") or within(name, "loractl.launchd"):
            return False
        parts = name.split(".")
        return len(parts) > 1 and parts[1] not in COMMON_MODULES

    bad = offenders((FOLDER_OF["loractl.launchd"],), forbidden)
    assert not bad, "launchd/ may build on common/ alone:\n" + "\n".join(bad)


def test_the_walk_sees_imports_inside_functions_relative_and_dynamic_ones():
    """The reader finds nested, relative and importlib imports, so a pass above means it."""
    source = (
        "import importlib\n"
        "def f():\n"
        "    from ..daemon import trainer\n"
        "    import mlx.core as mx\n"
        "    importlib.import_module('mlx_lm')\n"
        "    from . import render\n"
    )
    names = set(imports_in(source, "loractl.client.probe"))
    assert {(3, "loractl.daemon"), (3, "loractl.daemon.trainer"), (4, "mlx.core")} <= names
    assert {(5, "mlx_lm"), (6, "loractl.client.render")} <= names
    # The same lines in the package's __init__.py resolve from the package itself.
    in_package = set(imports_in(source, "loractl.client", is_package=True))
    assert {(3, "loractl.daemon"), (6, "loractl.client.render")} <= in_package
