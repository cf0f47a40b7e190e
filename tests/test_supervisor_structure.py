"""The supervisor stays a set of collaborators: no class inherits behaviour from another
supervisor module, and the service module stays the loop and its wiring."""

from __future__ import annotations

import ast
from pathlib import Path

SUPERVISOR = Path(__file__).resolve().parent.parent / "supervisor"
SERVICE_MAX_LINES = 600


def imported_from_supervisor(tree: ast.Module, module: str) -> dict[str, str]:
    """Names this module imports from other supervisor modules, and from which."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "loractl.supervisor."
        ):
            source = node.module.rsplit(".", 1)[1]
            if source != module:
                for alias in node.names:
                    names[alias.asname or alias.name] = source
    return names


def test_no_supervisor_class_inherits_from_another_supervisor_module():
    """Each class's bases are its own module's or from outside supervisor/: no mixins."""
    offenders = []
    for path in sorted(SUPERVISOR.glob("*.py")):
        tree = ast.parse(path.read_text())
        foreign = imported_from_supervisor(tree, path.stem)
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            for base in node.bases:
                name = base.id if isinstance(base, ast.Name) else None
                if name in foreign:
                    offenders.append(f"{path.name}:{node.lineno} {node.name}({name})")
    assert not offenders, "classes built on another supervisor module's: " + ", ".join(offenders)


def test_the_service_module_stays_under_its_size():
    """service.py holds the loop, sockets, lock, recovery and wiring, and nothing more."""
    lines = len((SUPERVISOR / "service.py").read_text().splitlines())
    assert lines < SERVICE_MAX_LINES, f"service.py has {lines} lines"
