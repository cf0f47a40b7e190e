"""The supervisor as a systemd --user unit (Linux), driven through systemctl and loginctl.

Every systemctl and loginctl call goes through the ``CommandRunner``. No systemctl, or no user
bus, is ``NoUserSystemd``; any other failure is a ``ServiceError`` holding systemctl's own words
and where to look next.
"""

from __future__ import annotations

import configparser
import getpass
import shlex
from pathlib import Path

from loractl.atomic import atomic_write_bytes
from loractl.launchd.definition import (
    DEFAULT_LABEL,
    SYSTEMD,
    ServiceDefinition,
    ServiceError,
    check_label,
    definition_path,
    unit_name,
)
from loractl.launchd.interface import (
    RUN_IN_FOREGROUND,
    OperationResult,
    ServiceState,
    home_mismatch,
    leading_int,
    one_line,
    remove_file,
    served_home,
)
from loractl.launchd.runner import COMMAND_NOT_FOUND, CommandRunner, SubprocessRunner
from loractl.paths import Layout

# systemd states in which the service's main process is alive.
SYSTEMD_RUNNING_STATES = ("active", "reloading", "deactivating")


class NoUserSystemd(ServiceError):
    """There is no systemd --user manager to talk to (no systemctl, or no user bus)."""


class SystemdService:
    """The supervisor as a systemd --user unit, driven through systemctl and loginctl."""

    target = SYSTEMD

    def __init__(
        self,
        label: str = DEFAULT_LABEL,
        runner: CommandRunner | None = None,
        user: str | None = None,
    ):
        self.label = check_label(label)
        self.unit = unit_name(self.label)
        self.runner = runner or SubprocessRunner()
        self.user = user or getpass.getuser()

    @property
    def path(self) -> Path:
        return definition_path(SYSTEMD, self.label)

    def _result(self, action: str) -> OperationResult:
        return OperationResult(SYSTEMD, self.unit, str(self.path), action)

    def _systemctl(self, *args: str) -> tuple[int, str, str]:
        return self.runner.run(["systemctl", "--user", *args])

    def _user_manager_problem(self) -> str | None:
        """Why there is no usable systemd --user manager, or None when there is one."""
        code, _, err = self._systemctl("show", "--property=Version")
        if code == 0:
            return None
        if code == COMMAND_NOT_FOUND:
            return "systemctl not found"
        return f"systemctl --user: {one_line(err) or f'exit {code}'}"

    def _require_user_manager(self) -> None:
        if problem := self._user_manager_problem():
            raise NoUserSystemd(f"no systemd --user manager here ({problem}); {RUN_IN_FOREGROUND}")

    def _checked(self, result: OperationResult, *args: str) -> None:
        code, _, err = self._systemctl(*args)
        if code != 0:
            raise ServiceError(
                f"systemctl --user {' '.join(args)} failed ({code}): "
                f"{one_line(err) or 'no message'}; see `systemctl --user status {self.unit}` "
                f"and `journalctl --user -u {self.unit}`"
            )
        result.steps.append(f"systemctl --user {' '.join(args)}")

    def lingering(self) -> bool | None:
        """Whether the user's services run with no one logged in; None when unknown."""
        code, out, _ = self.runner.run(["loginctl", "show-user", self.user, "-p", "Linger"])
        if code != 0:
            return None
        return out.strip() == "Linger=yes"

    def install(self, definition: ServiceDefinition) -> OperationResult:
        """Write the unit atomically, reload systemd, enable and start it."""
        self._require_user_manager()
        result = self._result("install")
        was_active = self._systemctl("is-active", "--quiet", self.unit)[0] == 0
        definition.logs.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, definition.render())
        result.steps.append(f"wrote {self.path}")
        self._checked(result, "daemon-reload")
        self._checked(result, "enable", "--now", self.unit)
        if was_active:
            # enable --now leaves a running supervisor on the old definition; launchd's
            # reinstall (bootout, bootstrap) restarts it too, so both targets behave alike.
            self._checked(result, "restart", self.unit)
        lingering = self.lingering()
        if lingering is not True:
            unknown = " (could not ask loginctl)" if lingering is None else ""
            result.hints.append(
                f"run `loginctl enable-linger {self.user}` so jobs keep running when no one is "
                f"logged in{unknown}"
            )
        result.hints.append(f"logs: `journalctl --user -u {self.unit}` and {definition.logs}")
        return result

    def uninstall(self) -> OperationResult:
        """Disable and stop the unit (tolerating one that is not loaded), then remove it."""
        result = self._result("uninstall")
        if problem := self._user_manager_problem():
            # No user manager means nothing can be loaded: removing the file is all there is.
            result.steps.append(remove_file(self.path))
            result.hints.append(f"systemd --user was not reachable ({problem})")
            return result
        code, _, err = self._systemctl("disable", "--now", self.unit)
        if code == 0:
            result.steps.append(f"systemctl --user disable --now {self.unit}")
        elif "not loaded" in err or "does not exist" in err or "not found" in err:
            result.steps.append(f"{self.unit} was not loaded")
        else:
            raise ServiceError(
                f"systemctl --user disable --now {self.unit} failed ({code}): "
                f"{one_line(err) or 'no message'}; see `systemctl --user status {self.unit}`"
            )
        result.steps.append(remove_file(self.path))
        self._checked(result, "daemon-reload")
        return result

    def start(self, restart: bool = False) -> OperationResult:
        self._require_user_manager()
        if not self.path.exists():
            raise ServiceError(f"{self.unit} is not installed; run `loractl daemon install` first")
        result = self._result("restart" if restart else "start")
        self._checked(result, "restart" if restart else "start", self.unit)
        return result

    def state(self, layout: Layout) -> ServiceState:
        installed = self.path.exists()
        state = ServiceState(
            target=SYSTEMD,
            label=self.unit,
            unit_path=str(self.path),
            installed=installed,
            loaded=False,
            running=False,
            pid=None,
            last_exit=None,
            process_type=None,
            detail="",
        )
        code, out, err = self._systemctl(
            "show", self.unit, "-p", "LoadState,ActiveState,MainPID,ExecMainStatus"
        )
        notes = []
        if code == 0:
            fields = dict(line.partition("=")[::2] for line in out.splitlines() if "=" in line)
            state.loaded = fields.get("LoadState") == "loaded"
            state.running = fields.get("ActiveState") in SYSTEMD_RUNNING_STATES
            state.pid = leading_int(fields.get("MainPID")) or None
            state.last_exit = leading_int(fields.get("ExecMainStatus"))
            notes.append(
                f"{fields.get('LoadState', 'unknown')}, {fields.get('ActiveState', 'unknown')}"
            )
        elif code == COMMAND_NOT_FOUND:
            notes.append("no systemd --user manager here (systemctl not found)")
        else:
            notes.append(f"no systemd --user manager here ({one_line(err) or f'exit {code}'})")
        if installed:
            argv, environment = _read_unit(self.path)
            notes.extend(home_mismatch(served_home(argv, environment), layout))
        state.detail = "; ".join(notes)
        return state


class _CaseSensitiveParser(configparser.ConfigParser):
    """Keys are case-sensitive in systemd; ConfigParser lowercases them by default."""

    def optionxform(self, optionstr: str) -> str:
        return optionstr


def _read_unit(path: Path) -> tuple[list[str], dict[str, str]]:
    """ExecStart's argv and the Environment of a unit written by ``ServiceDefinition.unit``."""
    parser = _CaseSensitiveParser(strict=False, interpolation=None)
    try:
        parser.read(path)
        service = parser["Service"]
    except (configparser.Error, KeyError, OSError):
        return [], {}

    def words(value: str) -> list[str]:
        try:
            return shlex.split(value.replace("%%", "%").replace("$$", "$"))
        except ValueError:
            return []

    environment = dict(
        word.partition("=")[::2] for word in words(service.get("Environment", "")) if "=" in word
    )
    return words(service.get("ExecStart", "")), environment
