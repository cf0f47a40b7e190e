"""The supervisor as a LaunchAgent (macOS), driven through launchctl.

Every launchctl call goes through the ``CommandRunner``. launchctl's known failures are handled
here, once:

- 125 "Domain does not support specified action": no gui domain (an SSH session), so the
  ``user/$UID`` domain is used instead;
- 5 on bootstrap: already loaded, so it is booted out and bootstrapped again, which also makes
  a changed plist take effect;
- 36 "Operation now in progress": retried after a short backoff;
- 3 and 113 (not loaded, service not found) are what uninstall and status expect to see;
- anything else becomes a ``ServiceError`` holding launchctl's own words and what to do next.
"""

from __future__ import annotations

import os
import plistlib
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loractl.atomic import atomic_write_bytes
from loractl.launchd.definition import (
    DEFAULT_LABEL,
    LAUNCHD,
    ServiceDefinition,
    ServiceError,
    check_label,
    definition_path,
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
from loractl.launchd.runner import CommandRunner, SubprocessRunner
from loractl.paths import Layout

# launchctl exit codes (errno values), as reported on macOS 11 and later.
NOT_LOADED = 3  # ESRCH: "No such process", on bootout of a service that is not loaded
ALREADY_LOADED = 5  # EIO: "Input/output error", on bootstrap of a loaded service
IN_PROGRESS = 36  # EINPROGRESS: launchd is still busy with this service
SERVICE_NOT_FOUND = 113  # "Could not find service ... in domain"
DOMAIN_UNSUPPORTED = 125  # no gui/$UID domain, e.g. over SSH
ABSENT = (NOT_LOADED, SERVICE_NOT_FOUND)


def _backoff(attempt: int) -> float:
    return min(0.5 * 2.0**attempt, 4.0)


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
        result.steps.append(remove_file(self.path))
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
            state.pid = leading_int(fields.get("pid"))
            state.last_exit = leading_int(fields.get("last exit code"))
            notes.append(f"{domain}: {fields.get('state', 'unknown state')}")
            if signal := fields.get("last terminating signal"):
                notes.append(f"last terminating signal: {signal}")
        elif code in ABSENT:
            notes.append("not loaded" if installed else "not installed")
        else:
            notes.append(f"launchctl print failed ({code}): {one_line(err) or 'no message'}")
        served = served_home(
            definition.get("ProgramArguments", []), definition.get("EnvironmentVariables", {})
        )
        notes.extend(home_mismatch(served, layout))
        state.detail = "; ".join(notes)
        return state


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


def _read_plist(path: Path) -> tuple[dict[str, Any], str]:
    try:
        with path.open("rb") as handle:
            loaded = plistlib.load(handle)
    except (OSError, plistlib.InvalidFileException, ValueError) as exc:
        return {}, f"cannot read {path}: {exc}"
    return (loaded if isinstance(loaded, dict) else {}), ""
