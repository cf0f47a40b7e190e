"""The one interface both service managers implement, what they report, and the helpers they share.

``ServiceManager`` is what the client holds: launchd.py's ``LaunchdService`` and systemd.py's
``SystemdService`` each implement it, and manager.py's ``service_manager`` picks one. Nothing
here runs launchctl or systemctl.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from loractl.launchd.definition import ServiceDefinition
from loractl.paths import Layout

RUN_IN_FOREGROUND = "run `loractl daemon run` in a terminal (under tmux or nohup to outlive it)"


@dataclass
class ServiceState:
    """The service manager's view of the supervisor service; every field is JSON-able."""

    target: str
    label: str
    unit_path: str
    installed: bool
    loaded: bool
    running: bool
    pid: int | None
    last_exit: int | None
    process_type: str | None  # read from the installed plist; None for systemd
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class OperationResult:
    """What an install, uninstall, start or restart did, and what the user should do next."""

    target: str
    label: str
    unit_path: str
    action: str
    domain: str | None = None
    steps: list[str] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ServiceManager(Protocol):
    """Installs, removes, starts and inspects the supervisor service under one service manager.

    Operations raise ``ServiceError`` (one line that says what to do); ``state`` never raises
    for a missing or broken service manager, it reports that in ``detail``.
    """

    @property
    def target(self) -> str:
        """``LAUNCHD`` or ``SYSTEMD``."""
        ...

    @property
    def label(self) -> str:
        """The reverse-DNS label the service was asked for."""
        ...

    @property
    def path(self) -> Path:
        """Where the plist or unit is (or would be) installed."""
        ...

    def install(self, definition: ServiceDefinition) -> OperationResult:
        """Write the file atomically and load it, which starts the supervisor."""
        ...

    def uninstall(self) -> OperationResult:
        """Stop and unload the service (one that is not loaded is fine), then remove its file."""
        ...

    def start(self, restart: bool = False) -> OperationResult:
        """Start the installed supervisor now (``restart``: stop the running one first)."""
        ...

    def state(self, layout: Layout) -> ServiceState:
        """What the service manager sees, and whether the installed service serves ``layout``."""
        ...


def one_line(text: str) -> str:
    return " ".join(text.split())


def remove_file(path: Path) -> str:
    """Remove ``path`` if it is there; the step to report either way."""
    if path.exists():
        path.unlink()
        return f"removed {path}"
    return f"{path} was already gone"


def leading_int(value: str | None) -> int | None:
    """The number in "0", "78: EX_CONFIG" or "-9"; None for "(never exited)" or nothing."""
    if not value:
        return None
    head = value.split(":", 1)[0].strip()
    try:
        return int(head)
    except ValueError:
        return None


def served_home(argv: list[str], environment: dict[str, str]) -> Path | None:
    """The home the installed service names explicitly, or None when it uses the default."""
    if "--home" in argv[:-1]:
        return Path(argv[argv.index("--home") + 1])
    if home := environment.get("LORACTL_HOME"):
        return Path(home)
    return None


def home_mismatch(served: Path | None, layout: Layout) -> list[str]:
    if served is None or served == layout.home:
        return []
    return [f"the installed service serves {served}, not {layout.home}"]
