"""The signals the supervisor answers besides SIGTERM and SIGINT, and what each one does.

Handlers only record that a signal came (uvicorn style; the wake-up fd wakes the loop), and
the loop does the work through :meth:`Signals.take`:

- SIGHUP: started by the service manager, ignored (launchd and systemd never mean it). Run by
  hand (``loractl daemon run``), it is the terminal closing, or a request to reopen the log
  files: both are done, as daemons conventionally do. The supervisor keeps running and keeps
  its trainer; if the terminal is gone, its output goes to /dev/null from then on (the log
  file has everything).
- SIGUSR1: the supervisor's state goes to its log (jobs, the current attempt, timers, the
  queue's hold, counters).
- SIGUSR2: ignored, and logged.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

import structlog

from loractl.protocol import TERMINAL

if TYPE_CHECKING:
    from loractl.supervisor.service import Supervisor

log = structlog.get_logger("loractl.supervisor")

# What the loop is told about; SIGTERM and SIGINT stay the service's stop signals.
ANSWERED = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


class Signals:
    """Which of :data:`ANSWERED` arrived since the loop last looked, and how often."""

    def __init__(self) -> None:
        self.pending: dict[int, int] = {}
        self.received: dict[str, int] = {}

    def install(self) -> None:
        for signum in ANSWERED:
            signal.signal(signum, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.pending[signum] = self.pending.get(signum, 0) + 1

    def take(self) -> dict[int, int]:
        """The signals that arrived (each once, with its count); a storm is one entry."""
        pending, self.pending = self.pending, {}
        for signum, count in pending.items():
            name = signal.Signals(signum).name
            self.received[name] = self.received.get(name, 0) + count
        return pending


def reopen_log_files(logger_name: str = "loractl") -> list[str]:
    """Close and reopen every log file of ``logger_name``'s handlers (after logrotate moved
    them, say); returns their paths."""
    reopened = []
    for handler in logging.getLogger(logger_name).handlers:
        if not isinstance(handler, logging.FileHandler):
            continue
        handler.acquire()
        try:
            if handler.stream is not None:
                handler.stream.close()
            handler.stream = handler._open()
        finally:
            handler.release()
        reopened.append(handler.baseFilename)
    return reopened


class Terminal:
    """The terminal the supervisor was started from, if any: which standard streams were it,
    and whether it has hung up."""

    def __init__(self) -> None:
        self.fds = [fd for fd in (0, 1, 2) if _is_tty(fd)]

    def gone(self) -> bool:
        """Whether the terminal has closed: a hung-up terminal is no longer a terminal to
        its old file descriptors, and the controlling terminal can no longer be opened."""
        if not self.fds:
            return False
        if not all(_is_tty(fd) for fd in self.fds):
            return True
        try:
            fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError as exc:
            return exc.errno in (errno.ENXIO, errno.EIO, errno.ENODEV)
        os.close(fd)
        return False

    def detach(self) -> None:
        """Point the streams that were the (gone) terminal at /dev/null, so nothing the
        supervisor or a library writes there fails from now on."""
        null = os.open(os.devnull, os.O_RDWR)
        try:
            for fd in self.fds:
                os.dup2(null, fd)
        finally:
            os.close(null)
        self.fds = []


def _is_tty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def answer_signals(self: Supervisor) -> None:
    """What the signals that came since the last turn ask for (see signals.py)."""
    for signum in self.signals.take():
        if signum == signal.SIGUSR1:
            log.info("state dump (SIGUSR1)", **state(self))
        elif signum == signal.SIGHUP and not self.under_service:
            reopened = reopen_log_files()
            gone = self.terminal.gone()
            if gone:
                self.terminal.detach()
            log.info(
                "SIGHUP: log files reopened; still running",
                files=reopened,
                terminal="closed: output goes to the log file only" if gone else "open",
            )
        else:
            why = "started by the service manager" if signum == signal.SIGHUP else "unused"
            log.info(f"{signal.Signals(signum).name} ignored ({why})")


def state(self: Supervisor) -> dict[str, Any]:
    """The supervisor's state, for SIGUSR1: jobs, the current attempt, timers, the
    queue's hold, counters."""
    now = time.monotonic()
    view = self.runner.view()
    jobs = [
        {"id": j.id, "name": j.name, "state": str(j.state), "step": j.step, "rung": j.rung}
        for j in self.store.list()
        if j.state not in TERMINAL
    ]
    return {
        "pid": os.getpid(),
        "uptime_s": round(time.time() - self.started_at, 1),
        "under_service": self.under_service,
        "jobs": jobs,
        "jobs_ended": len(self.store.list(set(TERMINAL))),
        "attempt": view.__dict__ if view is not None else None,
        "pending_exit": self.pending_exit.job_id if self.pending_exit else None,
        "timers": {
            "backoff_s": {
                job_id: round(until - now, 1) for job_id, until in self.queue.backoff_until.items()
            },
            "next_backup_s": round(self._next_backup - now, 1),
            "disk_full": str(self.disk_full) if self.disk_full else None,
        },
        "queue_held": self.queue.held or self.settings.hold_queue,
        "shutdown_requested": self.shutdown_requested,
        "counters": {
            "requests_served": self.requests_served,
            "dropped_frames": self.dropped_frames,
            "signals": dict(self.signals.received),
        },
        "inbox_pending": getattr(self.inbox, "pending_count", None),
    }
