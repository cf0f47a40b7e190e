"""Install, remove, start and inspect the supervisor service under launchd or systemd --user.

Every launchctl, systemctl and loginctl call goes through one ``CommandRunner``. launchctl's
known failures are handled here, once:

- 125 "Domain does not support specified action": no gui domain (an SSH session), so the
  ``user/$UID`` domain is used instead;
- 5 on bootstrap: already loaded, so it is booted out and bootstrapped again, which also makes
  a changed plist take effect;
- 36 "Operation now in progress": retried after a short backoff;
- 3 and 113 (not loaded, service not found) are what uninstall and status expect to see;
- anything else becomes a ``ServiceError`` holding launchctl's own words and what to do next.
"""

from __future__ import annotations

import configparser
import getpass
import os
import plistlib
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loractl.atomic import atomic_write_bytes
from loractl.launchd.definition import (
    DEFAULT_LABEL,
    LAUNCHD,
    SYSTEMD,
    TARGETS,
    ServiceDefinition,
    ServiceError,
    check_label,
    default_target,
    definition_path,
    unit_name,
)
from loractl.launchd.runner import COMMAND_NOT_FOUND, CommandRunner, SubprocessRunner
from loractl.paths import Layout

# launchctl exit codes (errno values), as reported on macOS 11 and later.
NOT_LOADED = 3  # ESRCH: "No such process", on bootout of a service that is not loaded
ALREADY_LOADED = 5  # EIO: "Input/output error", on bootstrap of a loaded service
IN_PROGRESS = 36  # EINPROGRESS: launchd is still busy with this service
SERVICE_NOT_FOUND = 113  # "Could not find service ... in domain"
DOMAIN_UNSUPPORTED = 125  # no gui/$UID domain, e.g. over SSH
ABSENT = (NOT_LOADED, SERVICE_NOT_FOUND)

# systemd states in which the service's main process is alive.
SYSTEMD_RUNNING_STATES = ("active", "reloading", "deactivating")

RUN_IN_FOREGROUND = "run `loractl daemon run` in a terminal (under tmux or nohup to outlive it)"


class NoUserSystemd(ServiceError):
    """There is no systemd --user manager to talk to (no systemctl, or no user bus)."""


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


def one_line(text: str) -> str:
    return " ".join(text.split())


def _backoff(attempt: int) -> float:
    return min(0.5 * 2.0**attempt, 4.0)


def _remove(path: Path) -> str:
    if path.exists():
        path.unlink()
        return f"removed {path}"
    return f"{path} was already gone"


class LaunchdService:
    """The supervisor as a LaunchAgent, driven through launchctl."""

    target = LAUNCHD

    def __init__(
        self,
        label: str = DEFAULT_LABEL,
        runner: CommandRunner | None = None,
        uid: int | None = None,
        sleep: Callable[[float], None] = time.sleep,
        platform: str = sys.platform,
        attempts: int = 5,
    ):
        self.label = check_label(label)
        self.runner = runner or SubprocessRunner()
        self.uid = os.getuid() if uid is None else uid
        self.sleep = sleep
        self.platform = platform
        self.attempts = attempts

    @property
    def path(self) -> Path:
        return definition_path(LAUNCHD, self.label)

    @property
    def domains(self) -> tuple[str, str]:
        return f"gui/{self.uid}", f"user/{self.uid}"

    def _result(self, action: str, domain: str | None = None) -> OperationResult:
        return OperationResult(LAUNCHD, self.label, str(self.path), action, domain)

    def _require_macos(self) -> None:
        if self.platform != "darwin":
            raise ServiceError(
                "launchd exists only on macOS; `loractl daemon install --dry-run --target "
                "launchd` shows the plist here, and Linux uses --target systemd"
            )

    def _launchctl(self, *args: str) -> tuple[int, str, str]:
        """One launchctl call, retried while launchd answers 36 (busy with this service)."""
        attempt = 0
        while True:
            code, out, err = self.runner.run(["launchctl", *args])
            attempt += 1
            if code != IN_PROGRESS or attempt >= self.attempts:
                return code, out, err
            self.sleep(_backoff(attempt - 1))

    def _on_service(self, *verb: str) -> tuple[str, int, str, str]:
        """Run ``launchctl VERB DOMAIN/LABEL`` in the domain that holds the service.

        The gui domain comes first; the user domain is tried when there is no gui domain
        (SSH) or when the service is not in gui, because an install over SSH put it there.
        """
        gui, user = self.domains
        code, out, err = self._launchctl(*verb, f"{gui}/{self.label}")
        if code in (DOMAIN_UNSUPPORTED, *ABSENT):
            user_code, user_out, user_err = self._launchctl(*verb, f"{user}/{self.label}")
            if code == DOMAIN_UNSUPPORTED or user_code == 0:
                return user, user_code, user_out, user_err
        return gui, code, out, err

    def _failure(self, argv: str, code: int, err: str, advice: str) -> ServiceError:
        said = one_line(err) or "no message"
        return ServiceError(f"launchctl {argv} failed ({code}): {said}; {advice}")

    def _bootstrap(self, result: OperationResult) -> None:
        gui, user = self.domains
        plist = str(self.path)
        domain = gui
        code, _, err = self._launchctl("bootstrap", domain, plist)
        if code == DOMAIN_UNSUPPORTED:
            domain = user
            result.hints.append(f"no GUI session here (SSH?), so it runs in the {user} domain")
            code, _, err = self._launchctl("bootstrap", domain, plist)
        result.steps.append(f"launchctl bootstrap {domain} {plist}")
        if code == ALREADY_LOADED:
            # Loaded by an earlier install: unload it so the plist just written takes effect.
            out_code, _, out_err = self._launchctl("bootout", f"{domain}/{self.label}")
            if out_code not in (0, *ABSENT):
                raise self._failure(
                    f"bootout {domain}/{self.label}",
                    out_code,
                    out_err,
                    f"stop it by hand with `launchctl bootout {domain}/{self.label}` and retry",
                )
            result.steps.append(f"launchctl bootout {domain}/{self.label}")
            was_loaded = out_code == 0
            for attempt in range(self.attempts):
                code, _, err = self._launchctl("bootstrap", domain, plist)
                # Right after a bootout the old supervisor may still be checkpointing, and
                # launchd answers 5 until it is gone. If nothing was loaded, 5 is a real error.
                if code != ALREADY_LOADED or not was_loaded or attempt == self.attempts - 1:
                    break
                self.sleep(_backoff(attempt))
            result.steps.append(f"launchctl bootstrap {domain} {plist}")
        if code != 0:
            raise self._failure(
                f"bootstrap {domain} {plist}",
                code,
                err,
                f"check the file with `plutil -lint {shlex.quote(plist)}` and "
                f"`launchctl print {domain}/{self.label}`, or {RUN_IN_FOREGROUND}",
            )
        result.domain = domain

    def install(self, definition: ServiceDefinition) -> OperationResult:
        """Write the plist atomically and load it; RunAtLoad starts the supervisor."""
        self._require_macos()
        result = self._result("install")
        definition.logs.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, definition.render())
        result.steps.append(f"wrote {self.path}")
        self._bootstrap(result)
        result.hints.append(
            f"logs: {definition.stdout_path}, {definition.stderr_path}; "
            f"check with `loractl daemon status`"
        )
        return result

    def uninstall(self) -> OperationResult:
        """Stop and unload the service (a service that is not loaded is fine), then remove it."""
        self._require_macos()
        domain, code, _, err = self._on_service("bootout")
        result = self._result("uninstall", domain)
        if code == 0:
            result.steps.append(f"launchctl bootout {domain}/{self.label}")
        elif code in ABSENT:
            result.steps.append(f"{self.label} was not loaded")
        else:
            raise self._failure(
                f"bootout {domain}/{self.label}",
                code,
                err,
                "wait for the supervisor to finish its checkpoint and run the uninstall again",
            )
        result.steps.append(_remove(self.path))
        return result

    def start(self, restart: bool = False) -> OperationResult:
        """Start the supervisor now (``restart``: kill the running one first, via ``-k``)."""
        self._require_macos()
        verb = ("kickstart", "-k") if restart else ("kickstart",)
        domain, code, _, err = self._on_service(*verb)
        action = "restart" if restart else "start"
        if code in ABSENT and self.path.exists():
            # Installed but unloaded (booted out by hand): loading it starts it (RunAtLoad).
            result = self._result(action)
            self._bootstrap(result)
            return result
        if code in ABSENT:
            raise ServiceError(
                f"{self.label} is not installed ({one_line(err) or 'not loaded'}); "
                "run `loractl daemon install` first"
            )
        if code != 0:
            raise self._failure(
                f"{' '.join(verb)} {domain}/{self.label}",
                code,
                err,
                f"see `launchctl print {domain}/{self.label}`, or {RUN_IN_FOREGROUND}",
            )
        result = self._result(action, domain)
        result.steps.append(f"launchctl {' '.join(verb)} {domain}/{self.label}")
        return result

    def state(self, layout: Layout) -> ServiceState:
        installed = self.path.exists()
        definition, unreadable = _read_plist(self.path) if installed else ({}, "")
        domain, code, out, err = self._on_service("print")
        state = ServiceState(
            target=LAUNCHD,
            label=self.label,
            unit_path=str(self.path),
            installed=installed,
            loaded=False,
            running=False,
            pid=None,
            last_exit=None,
            process_type=definition.get("ProcessType"),
            detail="",
        )
        notes = [unreadable] if unreadable else []
        if code == 0:
            fields = parse_launchctl_print(out)
            state.loaded = True
            state.running = fields.get("state") == "running"
            state.pid = _leading_int(fields.get("pid"))
            state.last_exit = _leading_int(fields.get("last exit code"))
            notes.append(f"{domain}: {fields.get('state', 'unknown state')}")
            if signal := fields.get("last terminating signal"):
                notes.append(f"last terminating signal: {signal}")
        elif code in ABSENT:
            notes.append("not loaded" if installed else "not installed")
        else:
            notes.append(f"launchctl print failed ({code}): {one_line(err) or 'no message'}")
        served = _served_home(
            definition.get("ProgramArguments", []), definition.get("EnvironmentVariables", {})
        )
        notes.extend(_home_mismatch(served, layout))
        state.detail = "; ".join(notes)
        return state


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
            result.steps.append(_remove(self.path))
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
        result.steps.append(_remove(self.path))
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
            state.pid = _leading_int(fields.get("MainPID")) or None
            state.last_exit = _leading_int(fields.get("ExecMainStatus"))
            notes.append(
                f"{fields.get('LoadState', 'unknown')}, {fields.get('ActiveState', 'unknown')}"
            )
        elif code == COMMAND_NOT_FOUND:
            notes.append("no systemd --user manager here (systemctl not found)")
        else:
            notes.append(f"no systemd --user manager here ({one_line(err) or f'exit {code}'})")
        if installed:
            argv, environment = _read_unit(self.path)
            notes.extend(_home_mismatch(_served_home(argv, environment), layout))
        state.detail = "; ".join(notes)
        return state


def service_manager(
    target: str | None = None,
    label: str | None = None,
    runner: CommandRunner | None = None,
) -> LaunchdService | SystemdService:
    """The manager for ``target`` (default: this OS's service manager)."""
    target = target or default_target()
    if target not in TARGETS:
        raise ServiceError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    manager = LaunchdService if target == LAUNCHD else SystemdService
    return manager(label or DEFAULT_LABEL, runner)


def service_state(
    layout: Layout,
    target: str | None = None,
    label: str | None = None,
    runner: CommandRunner | None = None,
) -> ServiceState:
    """The service manager's view of the supervisor service for ``layout`` (never raises for
    a missing or broken service manager: that is reported in ``detail``)."""
    return service_manager(target, label, runner).state(layout)


def parse_launchctl_print(text: str) -> dict[str, str]:
    """The top-level ``key = value`` fields of ``launchctl print DOMAIN/LABEL``."""
    fields: dict[str, str] = {}
    depth = 0
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.endswith("{"):
            depth += 1
        elif stripped == "}":
            depth -= 1
        elif depth == 1 and " = " in stripped:
            key, _, value = stripped.partition(" = ")
            fields.setdefault(key, value)
    return fields


def _leading_int(value: str | None) -> int | None:
    """The number in "0", "78: EX_CONFIG" or "-9"; None for "(never exited)" or nothing."""
    if not value:
        return None
    head = value.split(":", 1)[0].strip()
    try:
        return int(head)
    except ValueError:
        return None


def _read_plist(path: Path) -> tuple[dict[str, Any], str]:
    try:
        with path.open("rb") as handle:
            loaded = plistlib.load(handle)
    except (OSError, plistlib.InvalidFileException, ValueError) as exc:
        return {}, f"cannot read {path}: {exc}"
    return (loaded if isinstance(loaded, dict) else {}), ""


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


def _served_home(argv: list[str], environment: dict[str, str]) -> Path | None:
    """The home the installed service names explicitly, or None when it uses the default."""
    if "--home" in argv[:-1]:
        return Path(argv[argv.index("--home") + 1])
    if home := environment.get("LORACTL_HOME"):
        return Path(home)
    return None


def _home_mismatch(served: Path | None, layout: Layout) -> list[str]:
    if served is None or served == layout.home:
        return []
    return [f"the installed service serves {served}, not {layout.home}"]
