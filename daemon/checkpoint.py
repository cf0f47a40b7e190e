"""Crash-proof checkpoint writes.

The format, and reading it back, is ``loractl.checkpoints``; this is the trainer's side. A
checkpoint is written into a temporary folder, fsynced, renamed into place, and only then is
the ``latest`` pointer swapped with ``os.replace``. A SIGKILL at any instant therefore leaves
either the old or the new checkpoint fully usable, and the reader skips a torn one for the one
before it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from loractl.atomic import atomic_write_bytes, fsync_path
from loractl.checkpoints import (
    LATEST_POINTER,
    STATE_FILE,
    Checkpoint,
    CheckpointReader,
    sha256_file,
    state_checksum,
)


class CheckpointStore(CheckpointReader):
    """The checkpoints of one job, newest first, keeping the last ``keep``."""

    def __init__(self, root: Path, keep: int = 3):
        super().__init__(root)
        self.keep = keep

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
            body["self_sha256"] = state_checksum(body)
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
        atomic_write_bytes(self.root / LATEST_POINTER, name.encode(), mode=0o600)
        self._prune(keep_name=name)
        body.pop("self_sha256")
        return Checkpoint(path=final, state=body)

    def _prune(self, keep_name: str) -> None:
        for folder in self.folders()[self.keep :]:
            if folder.name != keep_name:
                shutil.rmtree(folder, ignore_errors=True)
        for leftover in self.root.glob(".step-*.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
