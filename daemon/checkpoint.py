"""Crash-proof checkpoints.

A checkpoint is a folder ``step-NNNNNNNN`` holding ``adapters.safetensors`` (mlx-lm's tensor
names), ``optimizer.safetensors`` (``tree_flatten(optimizer.state)``) and ``state.json`` (step,
examples seen, rung, loss history, config hash, and sha256 checksums of the other files and of
itself). It is written into a temporary folder, fsynced, renamed into place, and only then is
the ``latest`` pointer swapped with ``os.replace``. A SIGKILL at any instant therefore leaves
either the old or the new checkpoint fully usable; a checkpoint that fails its checksums is
skipped in favour of the one before it.

Reading ``state.json`` needs no mlx, so the supervisor can inspect checkpoints cheaply.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
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


def _canonical(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write a file so that readers see the old content or the new, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


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
    if hashlib.sha256(_canonical(state)).hexdigest() != claimed:
        raise CorruptCheckpoint(f"{path}: {STATE_FILE} fails its checksum")
    for name, expected in state.get("files", {}).items():
        file = path / name
        if not file.exists():
            raise CorruptCheckpoint(f"{path}: {name} is missing")
        if sha256_file(file) != expected:
            raise CorruptCheckpoint(f"{path}: {name} fails its checksum")
    return Checkpoint(path=path, state=state)


class CheckpointStore:
    """The checkpoints of one job, newest first, keeping the last ``keep``."""

    def __init__(self, root: Path, keep: int = 3):
        self.root = Path(root)
        self.keep = keep

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

    def write(
        self,
        step: int,
        state: dict[str, Any],
        write_tensors: dict[str, Any],
    ) -> Checkpoint:
        """Write a checkpoint atomically.

        ``write_tensors`` maps a file name to a callable that writes that file at a given path;
        it keeps this module free of mlx.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:08d}"
        final = self.root / name
        staging = self.root / f".{name}.tmp-{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        try:
            files = {}
            for file_name, writer in write_tensors.items():
                target = staging / file_name
                writer(target)
                fsync_path(target)
                files[file_name] = sha256_file(target)
            body = dict(state, step=step, files=files)
            body["self_sha256"] = hashlib.sha256(_canonical(body)).hexdigest()
            with (staging / STATE_FILE).open("wb") as handle:
                handle.write(json.dumps(body, sort_keys=True, indent=1).encode())
                handle.flush()
                os.fsync(handle.fileno())
            fsync_path(staging)
        except BaseException:
            # A full disk, most likely: give its space back now, and the previous checkpoint
            # stays the newest one.
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if final.exists():
            # Same step written twice (a stop right after a periodic checkpoint); the new one
            # is identical in content, so replace the old one.
            shutil.rmtree(final)
        os.rename(staging, final)
        fsync_path(self.root)
        atomic_write_bytes(self.root / LATEST_POINTER, name.encode())
        self._prune(keep_name=name)
        body.pop("self_sha256")
        return Checkpoint(path=final, state=body)

    def _prune(self, keep_name: str) -> None:
        for folder in self.folders()[self.keep :]:
            if folder.name != keep_name:
                shutil.rmtree(folder, ignore_errors=True)
        for leftover in self.root.glob(".step-*.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)


def completed_in(adapter_path: str | Path) -> bool:
    """Whether the adapter folder holds a finished run: its newest valid checkpoint consumed
    every example, and the adapters beside it are that checkpoint's. Reads no mlx."""
    folder = Path(adapter_path)
    checkpoint, _ = CheckpointStore(folder / CHECKPOINT_DIR).newest_valid()
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

