"""Where loractl keeps things, per platform, all movable with LORACTL_HOME or --home."""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path


def default_home() -> Path:
    if env := os.environ.get("LORACTL_HOME"):
        return Path(env).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "loractl"
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "loractl"


def default_logs(home: Path) -> Path:
    if sys.platform == "darwin" and "LORACTL_HOME" not in os.environ:
        return Path.home() / "Library" / "Logs" / "loractl"
    return home / "logs"


def runtime_root() -> Path:
    # Not $TMPDIR: on macOS it is a long /var/folders/... path, and a Unix socket path must
    # fit in 104 bytes there.
    base = os.environ.get("LORACTL_RUNTIME_DIR") or f"/tmp/loractl-{os.getuid()}"
    return Path(base)


@dataclass(frozen=True)
class Layout:
    """Every path of one loractl home."""

    home: Path

    @classmethod
    def at(cls, home: str | Path | None = None) -> Layout:
        return cls(Path(home).expanduser().resolve() if home else default_home().resolve())

    @property
    def jobs(self) -> Path:
        return self.home / "jobs"

    @property
    def inbox(self) -> Path:
        return self.home / "inbox"

    @property
    def database(self) -> Path:
        return self.home / "loractl.db"

    @property
    def pidfile(self) -> Path:
        return self.home / "supervisor.pid"

    @property
    def logs(self) -> Path:
        return default_logs(self.home)

    @property
    def runtime(self) -> Path:
        # One short folder per home, so several homes (tests) never share sockets.
        digest = hashlib.sha256(str(self.home).encode()).hexdigest()[:10]
        return runtime_root() / digest

    def endpoint(self, name: str) -> str:
        return f"ipc://{self.runtime / name}"

    @property
    def control(self) -> str:
        return self.endpoint("control")

    @property
    def events(self) -> str:
        return self.endpoint("events")

    @property
    def telemetry(self) -> str:
        return self.endpoint("telemetry")

    def job_dir(self, job_id: str) -> Path:
        return self.jobs / job_id

    def ensure(self) -> None:
        for folder in (self.home, self.jobs, self.inbox, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        runtime_root().mkdir(mode=0o700, parents=True, exist_ok=True)
        self.runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.runtime, 0o700)
