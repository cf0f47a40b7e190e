"""What the supervisor asks of the desktop: notifications, and keeping the Mac awake.

Both are best-effort side processes: a missing ``osascript`` or ``systemd-inhibit`` is logged
once and never affects a job. Both commands can be replaced through the environment
(``LORACTL_NOTIFY_CMD``, ``LORACTL_KEEP_AWAKE_CMD``), which is how the tests watch them and
how a user can route notifications elsewhere (ntfy, a chat webhook script, ...).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys

import structlog

from loractl.terminal import printable

log = structlog.get_logger("loractl.supervisor.desktop")

# AppleScript gets the title and text as arguments, never pasted into the script, so a job
# name with quotes cannot break (or inject into) it.
_OSASCRIPT = [
    "osascript",
    "-e",
    "on run argv",
    "-e",
    'display notification (item 2 of argv) with title (item 1 of argv) sound name "default"',
    "-e",
    "end run",
]


def default_notify_command(platform: str = sys.platform) -> list[str] | None:
    if platform == "darwin":
        return list(_OSASCRIPT)
    if shutil.which("notify-send"):
        return ["notify-send", "--app-name=loractl"]
    return None


def default_keep_awake_command(pid: int, why: str, platform: str = sys.platform) -> list[str]:
    """A command that holds a power assertion until ``pid`` exits (and can be killed sooner).

    ``caffeinate -i -w PID`` on macOS prevents idle sleep and ends by itself with the
    trainer, so even a SIGKILLed supervisor leaves no assertion behind. On Linux,
    systemd-inhibit holds the inhibitor lock for as long as its child runs; ``tail --pid``
    is that child and ends with the trainer for the same reason.
    """
    if platform == "darwin":
        return ["caffeinate", "-i", "-w", str(pid)]
    return [
        "systemd-inhibit",
        "--what=sleep:idle",
        "--who=loractl",
        f"--why={why}",
        "--mode=block",
        "tail",
        f"--pid={pid}",
        "-f",
        "/dev/null",
    ]


class SideProcesses:
    """Children that are not trainers: started without blocking, reaped on every tick."""

    def __init__(self) -> None:
        self.live: list[subprocess.Popen[bytes]] = []
        self._failed: set[str] = set()

    def start(self, argv: list[str]) -> subprocess.Popen[bytes] | None:
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            if argv[0] not in self._failed:  # say it once, not on every job
                self._failed.add(argv[0])
                log.warning("helper command failed to start", command=argv[0], error=str(exc))
            return None
        self.live.append(proc)
        return proc

    def reap(self) -> None:
        self.live = [proc for proc in self.live if proc.poll() is None]

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.reap()


class Notifier:
    """Desktop notifications for job outcomes; off supervisor-wide with LORACTL_NOTIFICATIONS=0.
    Each job opts in with its ``notify`` key."""

    def __init__(self, processes: SideProcesses, enabled: bool, command: str = ""):
        self.processes = processes
        self.enabled = enabled
        self.command = shlex.split(command) if command else default_notify_command()

    def send(self, title: str, message: str) -> None:
        if not self.enabled or not self.command:
            return
        # A job name or path in the text must not drive a terminal (a user's notify command
        # may well print it) or the notification itself: its control characters are escaped.
        title, message = printable(title), printable(message, multiline=True)
        log.info("notification", title=title, message=message)
        self.processes.start([*self.command, title, message])


class KeepAwake:
    """One power assertion per trainer, held from spawn (or adoption) until it exits."""

    def __init__(self, processes: SideProcesses, enabled: bool, command: str = ""):
        self.processes = processes
        self.enabled = enabled
        self.command = shlex.split(command) if command else None
        self.holding: subprocess.Popen[bytes] | None = None

    def hold(self, pid: int, why: str) -> None:
        self.release()
        if not self.enabled:
            return
        argv = [*self.command, str(pid)] if self.command else default_keep_awake_command(pid, why)
        if not self.command and not shutil.which(argv[0]):
            return  # no caffeinate / systemd-inhibit here: nothing to hold
        self.holding = self.processes.start(argv)

    def release(self) -> None:
        if self.holding is not None:
            self.processes.stop(self.holding)
            self.holding = None
