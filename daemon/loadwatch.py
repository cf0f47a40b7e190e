"""Signs of life while the trainer loads, for the supervisor's stall detection.

Loading a model is one opaque call (mlx-lm's ``load``, a Hub download inside it) and so is
evaluating its weights. While it runs, a small thread looks for evidence of work every few
seconds: the process's memory footprint reaching a new high (weights arriving), bytes read
from storage (Linux's /proc/self/io ``read_bytes``), or the Hugging Face cache folder of the
model growing (a download). Any of them is progress, and the session passes it on (as a
"loading" trainer event, throttled). A trainer blocked in an open() of a FIFO or a dead
network mount shows none, so the supervisor's stall timeout ends it as a hang.

Heartbeats are no evidence: the telemetry thread sends them whatever the main thread does.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from loractl.memory import footprint_mb

# Growth below this is noise (the interpreter's own allocations), not loading.
_GROWTH_MB = 1.0


def _storage_read_bytes() -> int:
    try:
        with open("/proc/self/io", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def hub_cache_folder(repo_id: str) -> Path | None:
    """Where huggingface_hub downloads ``repo_id`` (a model), or None if not a Hub id."""
    if os.path.isabs(repo_id) or repo_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    return Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))


def _folder_bytes(folder: Path | None) -> int:
    if folder is None:
        return 0
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


class LoadWatch:
    """``with LoadWatch(progress):`` calls ``progress()`` from a thread whenever work shows."""

    def __init__(
        self,
        progress: Callable[[], None],
        *,
        interval_s: float = 2.0,
        download: Path | None = None,
    ) -> None:
        self._progress = progress
        self._interval = interval_s
        self._download = download
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="loractl-loadwatch", daemon=True)

    def __enter__(self) -> LoadWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def _sample(self) -> tuple[float, int, int]:
        try:
            footprint = footprint_mb(os.getpid())
        except Exception:  # a reading must never kill the watch
            footprint = 0.0
        return footprint, _storage_read_bytes(), _folder_bytes(self._download)

    def _watch(self) -> None:
        high, read, downloaded = self._sample()
        while not self._done.wait(self._interval):
            footprint, now_read, now_downloaded = self._sample()
            moved = footprint > high + _GROWTH_MB or now_read > read or now_downloaded > downloaded
            high, read, downloaded = max(high, footprint), now_read, now_downloaded
            if moved:
                try:
                    self._progress()
                except Exception:  # the watch only reports; it must not take the trainer down
                    pass
