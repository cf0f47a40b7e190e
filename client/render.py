"""Rendering for the CLI, kept apart from the commands: JSON for machines, text for people."""

from __future__ import annotations

import json
import sys
from typing import Any

import click


def _text(value: Any, indent: int = 0) -> list[str]:
    pad = "  " * indent
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}{key}:")
                lines.extend(_text(item, indent + 1))
            else:
                lines.append(f"{pad}{key}: {item}")
        return lines
    if isinstance(value, list):
        lines = []
        for item in value:
            if isinstance(item, dict):
                inner = _text(item, indent + 1)
                lines.append(f"{pad}- {inner[0].strip()}")
                lines.extend(inner[1:])
            else:
                lines.append(f"{pad}- {item}")
        return lines
    return [f"{pad}{value}"]


def emit(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        click.echo("\n".join(_text(data)))


def fail(message: str, code: int, as_json: bool) -> None:
    """Report an error in one line (or a JSON object) and exit with ``code``; no traceback."""
    if as_json:
        click.echo(json.dumps({"ok": False, "error": int(code), "reason": message}))
    else:
        click.echo(f"loractl: {message}", err=True)
    sys.exit(int(code))
