"""What the service manager is told to run: the LaunchAgent plist and the systemd --user unit.

Building and rendering are pure (no launchctl, no systemctl), so both files can be rendered and
checked on any OS; Linux CI pins the plist this way.
"""

from __future__ import annotations

import os
import plistlib
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loractl.paths import Layout, default_home

LAUNCHD = "launchd"
SYSTEMD = "systemd"
TARGETS = (LAUNCHD, SYSTEMD)

DEFAULT_LABEL = "io.loractl.supervisor"
DEFAULT_UNIT = "loractl.service"
SUPERVISOR_MODULE = "loractl.supervisor"

# Seconds between restarts; launchd enforces at least 10 anyway.
RESTART_DELAY_S = 10
# Time from SIGTERM to SIGKILL: the supervisor stops the trainer, which writes a final
# checkpoint of a 7B model's adapters and optimizer state. A slow disk needs this long.
STOP_TIMEOUT_S = 120
# systemd gives up after this many failed starts within the window, instead of looping all night.
START_LIMIT_BURST = 5
START_LIMIT_INTERVAL_S = 300

STDOUT_LOG = "supervisor.stdout.log"
STDERR_LOG = "supervisor.stderr.log"

# launchd starts agents with PATH=/usr/bin:/bin:/usr/sbin:/sbin; Homebrew tools (an ssh
# for remote ranks, say) live in /opt/homebrew.
LAUNCHD_PATH = ("/opt/homebrew/bin", "/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin")
SYSTEMD_PATH = ("/usr/local/bin", "/usr/bin", "/bin")

_LABEL_PATTERN = re.compile(r"^[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")


class ServiceError(RuntimeError):
    """An operation on the service failed; the text is one line that says what to do."""


class InvalidLabel(ServiceError):
    """The label is not reverse-DNS."""


def default_target(platform: str = sys.platform) -> str:
    return LAUNCHD if platform == "darwin" else SYSTEMD


def check_label(label: str) -> str:
    if not _LABEL_PATTERN.match(label):
        raise InvalidLabel(
            f"label {label!r} is not reverse-DNS; use something like {DEFAULT_LABEL}"
        )
    return label


def unit_name(label: str) -> str:
    # The default install keeps the short, guessable name; another label (a second home)
    # gets its own unit so the two never overwrite each other.
    return DEFAULT_UNIT if label == DEFAULT_LABEL else f"{label}.service"


def definition_path(target: str, label: str = DEFAULT_LABEL) -> Path:
    """Where the service manager expects the file: LaunchAgents, or the user unit folder."""
    if target == LAUNCHD:
        return Path.home() / "Library" / "LaunchAgents" / f"{label}.plist"
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "systemd" / "user" / unit_name(label)


@dataclass(frozen=True)
class ServiceDefinition:
    """Everything either file says, decided once so the two targets cannot drift apart."""

    target: str
    label: str
    python: Path
    home: Path | None  # passed as --home only when it is not the default home
    logs: Path
    environment: dict[str, str]

    @property
    def program_arguments(self) -> list[str]:
        argv = [str(self.python), "-m", SUPERVISOR_MODULE, "--wait-for-lock"]
        if self.home is not None:
            argv += ["--home", str(self.home)]
        return argv

    @property
    def stdout_path(self) -> Path:
        return self.logs / STDOUT_LOG

    @property
    def stderr_path(self) -> Path:
        return self.logs / STDERR_LOG

    @property
    def path(self) -> Path:
        return definition_path(self.target, self.label)

    def render(self) -> bytes:
        """The exact bytes of the file the install writes."""
        if self.target == LAUNCHD:
            return plistlib.dumps(self.plist())
        return self.unit().encode()

    def plist(self) -> dict[str, Any]:
        return {
            "Label": self.label,
            "ProgramArguments": self.program_arguments,
            "RunAtLoad": True,
            # Restart after a crash or SIGKILL, not after a requested stop (exit 0).
            "KeepAlive": {"SuccessfulExit": False},
            "ThrottleInterval": RESTART_DELAY_S,
            # Unset or "Background" lets macOS throttle the whole process tree, trainer
            # included: Metal work has been reported about 8x slower under Background.
            "ProcessType": "Interactive",
            "ExitTimeOut": STOP_TIMEOUT_S,
            "StandardOutPath": str(self.stdout_path),
            "StandardErrorPath": str(self.stderr_path),
            "EnvironmentVariables": dict(self.environment),
        }

    def unit(self) -> str:
        exec_start = " ".join(
            _systemd_quote(arg, expand_dollar=True) for arg in self.program_arguments
        )
        environment = " ".join(
            _systemd_quote(f"{key}={value}", expand_dollar=False)
            for key, value in self.environment.items()
        )
        return "\n".join(
            [
                "# Written by `loractl daemon install`; rewritten by the next install.",
                "[Unit]",
                "Description=loractl supervisor (MLX LoRA fine-tuning jobs)",
                f"StartLimitIntervalSec={START_LIMIT_INTERVAL_S}",
                f"StartLimitBurst={START_LIMIT_BURST}",
                "",
                "[Service]",
                "Type=simple",
                f"ExecStart={exec_start}",
                "Restart=on-failure",
                f"RestartSec={RESTART_DELAY_S}",
                "# Exit 3 is a second supervisor for the same home: restarting it cannot help.",
                "RestartPreventExitStatus=3",
                "# Signals reach the supervisor only: a stop makes it checkpoint and stop the",
                "# trainer itself, and a trainer that outlives a supervisor crash is re-adopted",
                "# by the restarted one (as under launchd, where it runs in its own session).",
                "KillMode=process",
                f"TimeoutStopSec={STOP_TIMEOUT_S}",
                f"Environment={environment}",
                "# The supervisor writes its own JSON log into the logs folder; stdout and",
                f"# stderr go to the journal (journalctl --user -u {unit_name(self.label)}).",
                "StandardOutput=journal",
                "StandardError=journal",
                "",
                "[Install]",
                "WantedBy=default.target",
                "",
            ]
        )


def build_definition(
    layout: Layout,
    target: str | None = None,
    label: str = DEFAULT_LABEL,
    python: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServiceDefinition:
    """The service for ``layout``'s home, run by this installation's interpreter."""
    target = target or default_target()
    if target not in TARGETS:
        raise ServiceError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    environ = os.environ if environ is None else environ
    # Not resolved: a venv's python is a symlink, and resolving it would escape the venv.
    interpreter = Path(os.path.abspath(python or sys.executable))
    if not os.access(interpreter, os.X_OK):
        raise ServiceError(
            f"the interpreter {interpreter} does not exist or is not executable; "
            "run the install from the Python environment loractl is installed in"
        )
    search_path = LAUNCHD_PATH if target == LAUNCHD else SYSTEMD_PATH
    environment = {"PATH": ":".join([str(interpreter.parent), *search_path])}
    # The service manager does not see the shell's environment, so a home chosen by
    # LORACTL_HOME has to be written down, or the service would serve another folder.
    if env_home := environ.get("LORACTL_HOME"):
        environment["LORACTL_HOME"] = str(Path(env_home).expanduser().resolve())
    explicit_home = None if layout.home == default_home().resolve() else layout.home
    return ServiceDefinition(
        target=target,
        label=check_label(label),
        python=interpreter,
        home=explicit_home,
        logs=layout.logs,
        environment=environment,
    )


def _systemd_quote(word: str, expand_dollar: bool) -> str:
    """One word as systemd reads it back: specifiers (%) and, in ExecStart, $VARS escaped."""
    word = word.replace("%", "%%")
    if expand_dollar:
        word = word.replace("$", "$$")
    if word and not re.search(r"[\s\"'\\;]", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
