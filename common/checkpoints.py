"""The checkpoint format, and its reader.

A checkpoint is a folder ``step-NNNNNNNN`` holding ``adapters.safetensors`` (mlx-lm's tensor
names), ``optimizer.safetensors`` (``tree_flatten(optimizer.state)``) and ``state.json`` (step,
examples seen, rung, loss history, config hash, and sha256 checksums of the other files and of
itself). The ``latest`` file beside the folders names the newest one. A checkpoint that fails
its checksums is skipped in favour of the one before it.

This is the half both sides need: the trainer resumes through it, and the supervisor reads it
to tell a finished run from a vanished one. It needs no mlx and imports nothing from
``loractl.daemon``, so the supervisor stays small. The writer (staging folder, fsync, rename,
pointer swap, pruning) is ``loractl.daemon.checkpoint``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The checkpoints' folder inside a job's adapter folder.
CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.json"
ADAPTERS_FILE = "adapters.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
LATEST_POINTER = "latest"
_NAME = re.compile(r"^step-(\d{8})$")


class CorruptCheckpoint(ValueError):
    """A checkpoint whose files are missing, torn or fail their checksum."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_checksum(state: dict[str, Any]) -> str:
    """The ``self_sha256`` of a ``state.json`` body (which must not hold it yet): the sha256
    of its canonical JSON, so the file's layout on disk does not matter."""
    canonical = json.dumps(state, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def adapters_file(self) -> Path:
        return self.path / ADAPTERS_FILE

    @property
    def optimizer_file(self) -> Path:
        return self.path / OPTIMIZER_FILE


def verify(path: Path) -> Checkpoint:
    """Load a checkpoint's state and check every checksum; raise CorruptCheckpoint if torn."""
    try:
        state = json.loads((path / STATE_FILE).read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpoint(f"{path}: unreadable {STATE_FILE}: {exc}") from None
    if not isinstance(state, dict) or "self_sha256" not in state:
        raise CorruptCheckpoint(f"{path}: {STATE_FILE} lacks its checksum")
    claimed = state.pop("self_sha256")
    if state_checksum(state) != claimed:
        raise CorruptCheckpoint(f"{path}: {STATE_FILE} fails its checksum")
    for name, expected in state.get("files", {}).items():
        file = path / name
        if not file.exists():
            raise CorruptCheckpoint(f"{path}: {name} is missing")
        if sha256_file(file) != expected:
            raise CorruptCheckpoint(f"{path}: {name} fails its checksum")
    return Checkpoint(path=path, state=state)


class CheckpointReader:
    """The checkpoints of one job (the folder ``root``), newest first."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def folders(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name)]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def latest_name(self) -> str | None:
        try:
            return (self.root / LATEST_POINTER).read_text().strip() or None
        except OSError:
            return None

    def newest_valid(self) -> tuple[Checkpoint | None, list[str]]:
        """The newest checkpoint that passes its checksums, and why newer ones were skipped.

        The ``latest`` pointer is tried first; the folders are then scanned newest first, so a
        pointer left dangling by a crash costs nothing.
        """
        skipped: list[str] = []
        candidates = self.folders()
        pointed = self.latest_name()
        if pointed and (self.root / pointed) in candidates:
            candidates.remove(self.root / pointed)
            candidates.insert(0, self.root / pointed)
        for folder in candidates:
            try:
                return verify(folder), skipped
            except CorruptCheckpoint as exc:
                skipped.append(str(exc))
        return None, skipped


def completed_in(adapter_path: str | Path) -> bool:
    """Whether the adapter folder holds a finished run: its newest valid checkpoint consumed
    every example, and the adapters beside it are that checkpoint's. Reads no mlx."""
    folder = Path(adapter_path)
    checkpoint, _ = CheckpointReader(folder / CHECKPOINT_DIR).newest_valid()
    if checkpoint is None:
        return False
    total = checkpoint.state.get("total_examples") or 0
    if not total or checkpoint.state.get("examples_seen", 0) < total:
        return False
    final = folder / ADAPTERS_FILE
    expected = checkpoint.state.get("files", {}).get(ADAPTERS_FILE)
    try:
        return expected is not None and sha256_file(final) == expected
    except OSError:
        return False
