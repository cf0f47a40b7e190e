"""One attempt on its own: built over a real process with hand-written hooks, no supervisor,
no store and no sockets. It notices hangs and memory, stops with real signals, escalates to
SIGKILL, and hands back one exit with the facts the policy needs."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import STAND_IN, wait_for
from loractl.protocol import ExitCode, Heartbeat, TrainerEvent
from loractl.supervisor.attempt import Attempt, AttemptSpec
from loractl.supervisor.policy import StopReason
from loractl.supervisor.pressure import Pressure, SystemMemory
from loractl.supervisor.settings import Settings


class RecordingHooks:
    """What the attempt tells the rest of the supervisor, kept for the test to read."""

    def __init__(self, deliver: bool = False):
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.peaks: list[float] = []
        self.commands: list[tuple[int, str]] = []
        self.deliver = deliver

    def record(self, job_id: str, kind: str, **detail: Any) -> None:
        self.events.append((kind, detail))

    def peak(self, job_id: str, rung: int, footprint_mb: float) -> None:
        self.peaks.append(footprint_mb)

    def command(self, pid: int, action: str, remote: bool) -> bool:
        self.commands.append((pid, action))
        return self.deliver

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]


def calm() -> SystemMemory:
    return SystemMemory(pressure=Pressure.NORMAL, available_mb=8000, total_mb=16000, source="test")


@pytest.fixture
def processes():
    started: list[subprocess.Popen[bytes]] = []

    def start(script: str = STAND_IN) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-c", script])
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def make_attempt(
    tmp_path: Path,
    popen: subprocess.Popen[bytes],
    hooks: RecordingHooks,
    *,
    budget_mb: float = 1e9,
    heartbeat_timeout: float = 600,
    **settings: Any,
) -> Attempt:
    spec = AttemptSpec(
        job_id="job-1",
        attempt=1,
        rung=0,
        stderr_path=tmp_path / "0001.stderr",
        budget_mb=budget_mb,
        heartbeat_timeout=heartbeat_timeout,
    )
    return Attempt(
        spec,
        pid=popen.pid,
        popen=popen,
        settings=Settings(**settings),
        hooks=hooks,
        read_system=calm,
    )


def poll_until_over(attempt: Attempt, timeout: float = 20):
    ended: list[Any] = []
    wait_for(lambda: ended.append(attempt.poll()) or ended[-1] is not None, timeout)
    return ended[-1]


def test_a_finished_trainer_is_reaped_once_with_its_exit(tmp_path, processes):
    """A trainer that exits 0 after heartbeating is one exit: done, heartbeat seen."""
    proc = processes("import sys; sys.exit(0)")
    hooks = RecordingHooks()
    attempt = make_attempt(tmp_path, proc, hooks)
    attempt.on_heartbeat(Heartbeat(job_id="job-1", pid=proc.pid, step=3, footprint_mb=120.0))
    ended = poll_until_over(attempt)
    assert ended.exit_code == 0 and ended.signum is None and ended.heartbeat_seen
    assert ended.step == 3 and ended.stop_reason is None
    assert hooks.peaks == [120.0]


def test_a_silent_trainer_is_a_hang_stopped_with_the_short_grace(tmp_path, processes):
    """No heartbeat past the timeout: recorded as a hang, asked to stop, and its stop says
    hang; the stand-in exits on SIGTERM as a trainer does after its checkpoint."""
    proc = processes()
    hooks = RecordingHooks()
    attempt = make_attempt(tmp_path, proc, hooks, heartbeat_timeout=0.2, hang_grace_s=3.0)
    attempt.on_heartbeat(Heartbeat(job_id="job-1", pid=proc.pid, step=1))
    time.sleep(0.3)  # the silence itself is what is tested
    ended = poll_until_over(attempt)
    assert hooks.kinds() == ["hang_detected"]
    assert (proc.pid, "stop") in hooks.commands
    assert ended.stop_reason == StopReason.HANG
    assert ended.exit_code == int(ExitCode.STOPPED)


def test_a_trainer_deaf_to_sigterm_gets_sigkill_when_the_grace_is_over(tmp_path, processes):
    """A stop the trainer ignores ends in SIGKILL after its grace, and the exit says so."""
    proc = processes("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                     "time.sleep(120)\n")  # fmt: skip
    attempt = make_attempt(tmp_path, proc, RecordingHooks())
    time.sleep(0.2)  # let the stand-in install its handler before the signal comes
    attempt.stop(StopReason.USER_PAUSE, grace=0.5)
    started = time.monotonic()
    ended = poll_until_over(attempt)
    assert ended.signum == signal.SIGKILL and ended.stop_reason == StopReason.USER_PAUSE
    assert 0.4 < time.monotonic() - started < 10


def test_over_budget_the_guard_stops_the_attempt_for_memory(tmp_path, processes):
    """A footprint over the budget is recorded and stops the attempt as a memory stop."""
    hoarder = "hoard = b'x' * (200 << 20)\nimport time\ntime.sleep(120)\n"
    proc = processes(hoarder)
    hooks = RecordingHooks()
    attempt = make_attempt(tmp_path, proc, hooks, budget_mb=100, guard_interval_s=0.05)
    ended = poll_until_over(attempt, timeout=30)
    guard = [detail for kind, detail in hooks.events if kind == "memory_guard"]
    assert guard and guard[0]["action"] == "stop" and guard[0]["footprint_mb"] > 100
    assert ended.stop_reason == StopReason.MEMORY
    assert ended.recent_footprint_mb and ended.recent_footprint_mb > 100


def test_an_adopted_trainer_is_judged_by_what_it_announced(tmp_path, processes):
    """Not our child (no exit status): the exit code it announced is the attempt's end."""
    proc = processes()
    attempt = make_attempt(tmp_path, proc, RecordingHooks())
    attempt.popen = None
    attempt.on_trainer_event(
        TrainerEvent(job_id="job-1", pid=proc.pid, kind="error", detail={"exit_code": 74})
    )
    proc.kill()
    proc.wait()
    ended = poll_until_over(attempt)
    assert ended.exit_code == 74 and ended.signum is None


def test_a_message_from_another_pid_is_not_the_attempts(tmp_path, processes):
    """Only the attempt's own trainer speaks for it."""
    proc = processes()
    attempt = make_attempt(tmp_path, proc, RecordingHooks())
    assert attempt.accepts(Heartbeat(job_id="job-1", pid=proc.pid))
    assert not attempt.accepts(Heartbeat(job_id="job-1", pid=proc.pid + 1))


def test_the_view_shows_the_attempt_without_exposing_it(tmp_path, processes):
    """`show` reads a frozen view: pid, step, phase and why it is stopping."""
    proc = processes()
    attempt = make_attempt(tmp_path, proc, RecordingHooks())
    attempt.on_heartbeat(Heartbeat(job_id="job-1", pid=proc.pid, step=7, phase="train"))
    attempt.stop(StopReason.USER_CANCEL, grace=30)
    view = attempt.view()
    assert (view.pid, view.step, view.phase, view.stop_reason) == (
        proc.pid,
        7,
        "train",
        "user-cancel",
    )
    with pytest.raises(AttributeError):
        view.step = 8  # type: ignore[misc]
