"""Reading a job's structlog JSON log: the last lines, or following it as it grows."""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

SKIP = ("event", "timestamp", "level")


def format_record(line: str, as_json: bool) -> str:
    if as_json:
        return line
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return line
    when = str(record.get("timestamp", ""))[11:19]
    rest = " ".join(f"{k}={v}" for k, v in record.items() if k not in SKIP)
    return f"{when} {record.get('level', ''):<7} {record.get('event', '')}: {rest}"


def tail_log(path: Path, count: int, as_json: bool) -> list[str]:
    if not path.exists():
        return [f"(no log yet at {path})"]
    with path.open(encoding="utf-8", errors="replace") as handle:
        last = deque(handle, maxlen=count)
    return [format_record(line.rstrip("\n"), as_json) for line in last]


def follow_log(path: Path, as_json: bool, poll_s: float = 0.2) -> Iterator[str]:
    """Yield lines appended after now; survives the file appearing later."""
    position = path.stat().st_size if path.exists() else 0
    partial = ""
    while True:
        size = path.stat().st_size if path.exists() else 0
        if size < position:
            position = 0  # rotated (the supervisor's log at 5 MB) or truncated: start over
        if size > position:
            with path.open(encoding="utf-8", errors="replace") as handle:
                handle.seek(position)
                chunk = handle.read()
                position = handle.tell()
            partial += chunk
            *complete, partial = partial.split("\n")
            for line in complete:
                yield format_record(line, as_json)
        else:
            time.sleep(poll_s)
