"""The supervisor: one loop that owns the sockets, the queue and the trainer child.

Uvicorn-style: signal handlers only set flags (and poke a wake-up pipe); request handlers only
change the store or queue an action; one loop reaps the child, reads heartbeats, runs the
watchdog (heartbeats, progress, memory) and fires timers. Nothing here imports mlx.

Safety rules it keeps:
- the pidfile flock is taken before any socket is bound (binding a live ipc:// endpoint
  silently steals it);
- a job never has two trainers: on start it re-adopts a live, heartbeating trainer of a job
  it was running (same pid and start time), and only otherwise resumes from the checkpoint;
- a handler never takes the loop down: every exception becomes an error reply.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import structlog
import yaml
import zmq

from loractl import __version__
from loractl.config import ConfigError, JobConfig, load_config
from loractl.memory import footprint_mb, total_mb
from loractl.paths import Layout, UnsafeFolder
from loractl.protocol import (
    CancelRequest,
    CleanRequest,
    ErrorCode,
    ExitCode,
    Heartbeat,
    HistoryRequest,
    LadderRequest,
    ListRequest,
    Message,
    PauseRequest,
    PriorityRequest,
    ProtocolError,
    Reply,
    ResumeRequest,
    RetryRequest,
    ShowRequest,
    ShutdownRequest,
    StatusRequest,
    SubmitRequest,
    TrainerCommand,
    TrainerEvent,
    decode,
)
from loractl.supervisor.classify import Cause, ExitEvidence, classify, signal_name
from loractl.supervisor.desktop import KeepAwake, Notifier, SideProcesses
from loractl.supervisor.ladder import (
    RestartPolicy,
    describe_rung,
    effective_config,
    rung_count,
    rung_overrides,
)
from loractl.supervisor.pressure import Pressure, cgroup_oom_kill_count, read_system_memory
from loractl.supervisor.store import (
    TERMINAL,
    TRANSITIONS,
    InvalidState,
    Job,
    JobNotFound,
    JobState,
    Store,
    new_job_id,
)
from loractl.wire import drain

log = structlog.get_logger("loractl.supervisor")

STDERR_TAIL_BYTES = 8192

_LIVE = frozenset({JobState.QUEUED, JobState.STARTING, JobState.RUNNING, JobState.BACKOFF})
# The states each job command may be sent from; anything else is refused with a reason
# before the handler touches the job, so no command can leave a job in an impossible state
# (a `resume` of a running job once queued it under its live trainer).
COMMAND_STATES: dict[str, frozenset[JobState]] = {
    "pause": _LIVE,
    "cancel": _LIVE | {JobState.PAUSED},
    "resume": frozenset({JobState.PAUSED}),
    "retry": frozenset({JobState.FAILED, JobState.CANCELLED}),
    "priority": _LIVE | {JobState.PAUSED},
}


def require_state(job: Job, command: str) -> None:
    """Refuse ``command`` unless ``job`` is in a state the command is allowed from."""
    allowed = COMMAND_STATES[command]
    if job.state not in allowed:
        names = " or ".join(sorted(str(state) for state in allowed))
        raise InvalidState(f"cannot {command} job {job.id}: it is {job.state}, not {names}")


class AlreadyRunning(RuntimeError):
    pass


@dataclass(frozen=True)
class Settings:
    """Supervisor tunables. Each can be set with LORACTL_<NAME> (tests shorten the timers)."""

    backoff_base_s: float = 1.0
    backoff_cap_s: float = 60.0
    early_death_limit: int = 3
    stop_grace_s: float = 60.0  # SIGTERM -> SIGKILL when the trainer should checkpoint first
    # Far over budget (this many times it) or at critical pressure, the Mac is at risk: the
    # grace shrinks to what one checkpoint needs.
    runaway_factor: float = 1.5
    checkpoint_grace_s: float = 10.0
    # A trainer asked to stop that still grows by this much is not checkpointing; kill it.
    still_growing_mb: float = 256.0
    hang_grace_s: float = 5.0  # a hung trainer will not checkpoint; do not wait long
    startup_timeout_s: float = 300.0  # spawn -> first heartbeat
    stall_min_s: float = 120.0
    stall_factor: float = 10.0
    tick_s: float = 0.1
    guard_interval_s: float = 0.2
    pressure_interval_s: float = 1.0
    warn_action_interval_s: float = 30.0
    default_budget_fraction: float = 0.7
    exit_timeout_s: float = 90.0
    # A file holding a kern.memorystatus_vm_pressure_level value (1, 2 or 4): a stand-in for
    # sysctl, which cannot exist off macOS, so tests can drive the memory guard.
    pressure_level_file: str = ""
    # Accept and queue jobs but start none (maintenance, or testing the intake on its own).
    hold_queue: bool = False
    # Desktop notifications for jobs that set ``notify: true``; 0 turns them off for all.
    notifications: bool = True
    # Replaces osascript / notify-send; gets the title and the message as two arguments.
    notify_cmd: str = ""
    # Hold a power assertion (caffeinate, systemd-inhibit) while a trainer runs.
    keep_awake: bool = True
    # Replaces caffeinate / systemd-inhibit; gets the trainer's pid as its argument.
    keep_awake_cmd: str = ""

    @classmethod
    def from_env(cls) -> Settings:
        values = {}
        for name, spec in cls.__dataclass_fields__.items():
            raw = os.environ.get(f"LORACTL_{name.upper()}")
            if raw is None:
                continue
            if isinstance(spec.default, bool):
                values[name] = raw.strip().lower() in ("1", "true", "yes", "on")
            else:
                values[name] = type(spec.default)(raw)
        return cls(**values)


@dataclass
class Trainer:
    """The live trainer of the running job, as the watchdog sees it."""

    job_id: str
    pid: int
    attempt: int
    rung: int
    popen: subprocess.Popen | None  # None when adopted from a previous supervisor
    stderr_path: Path
    budget_mb: float
    heartbeat_timeout: float
    spawned_at: float = field(default_factory=time.monotonic)
    last_heartbeat: float | None = None
    last_progress: float = field(default_factory=time.monotonic)
    step: int = -1
    examples_seen: int = 0
    last_checkpoint_step: int | None = None
    max_step_seconds: float = 0.0
    max_eval_seconds: float = 0.0
    phase: str = "starting"
    footprints: deque = field(default_factory=lambda: deque(maxlen=50))
    peak_mb: float = 0.0
    stop_reason: str | None = None  # memory | hang | user-pause | user-cancel | shutdown
    stop_sent_at: float | None = None
    footprint_at_stop: float | None = None
    kill_at: float | None = None
    done_event: bool = False
    cgroup_oom_at_start: int | None = None
    pressure_seen: str = "normal"

    @property
    def recent_footprint(self) -> float | None:
        return max(self.footprints) if self.footprints else None


class Supervisor:
    def __init__(self, home: str | Path | None = None, settings: Settings | None = None):
        self.layout = Layout.at(home)
        self.settings = settings or Settings.from_env()
        self.policy = RestartPolicy(self.settings.backoff_base_s, self.settings.backoff_cap_s)
        self.trainer: Trainer | None = None
        self.shutdown_requested = False
        self.dropped_frames = 0
        self.started_at = time.time()
        self._lock_fd: int | None = None
        self._next_guard = 0.0
        self._next_pressure = 0.0
        self._last_warn_action = 0.0
        self._system = None
        self._backoff_until: dict[str, float] = {}
        self._adapter_paths: dict[str, Path] = {}
        self.side_processes = SideProcesses()
        self.notifier = Notifier(
            self.side_processes, self.settings.notifications, self.settings.notify_cmd
        )
        self.keep_awake = KeepAwake(
            self.side_processes, self.settings.keep_awake, self.settings.keep_awake_cmd
        )
        self.handlers = {
            StatusRequest: self.handle_status,
            ListRequest: self.handle_list,
            SubmitRequest: self.handle_submit,
            ShowRequest: self.handle_show,
            ShutdownRequest: self.handle_shutdown,
            CancelRequest: self.handle_cancel,
            PauseRequest: self.handle_pause,
            ResumeRequest: self.handle_resume,
            RetryRequest: self.handle_retry,
            PriorityRequest: self.handle_priority,
            HistoryRequest: self.handle_history,
            LadderRequest: self.handle_ladder,
            CleanRequest: self.handle_clean,
        }

    # -- lifecycle -----------------------------------------------------------------------

    def acquire_lock(self, wait: bool = False) -> None:
        """Take the pidfile lock, or raise AlreadyRunning; with ``wait``, block until the
        supervisor holding it exits. A service manager starts us with ``wait``: exiting
        non-zero instead would have launchd restart us every ThrottleInterval, forever."""
        self.layout.ensure()
        while True:
            fd = os.open(self.layout.pidfile, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = self.layout.pidfile.read_text().strip() or "?"
                if not wait:
                    os.close(fd)
                    raise AlreadyRunning(
                        f"a supervisor (pid {owner}) is already running for {self.layout.home}"
                    ) from None
                log.warning("waiting for the running supervisor to exit", pid=owner)
                fcntl.flock(fd, fcntl.LOCK_EX)
            # A supervisor that stops cleanly unlinks the pidfile: a lock won on that old
            # file locks nothing anyone else can see, so try again on the current one.
            try:
                current = os.stat(self.layout.pidfile).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def run(self, wait_for_lock: bool = False) -> int:
        self.acquire_lock(wait=wait_for_lock)
        self.store = Store(self.layout.database)
        context = zmq.Context.instance()
        self.control = context.socket(zmq.ROUTER)
        self.telemetry = context.socket(zmq.ROUTER)
        self.telemetry.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.events = context.socket(zmq.PUB)
        for sock in (self.control, self.telemetry, self.events):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
        self.control.bind(self.layout.control)
        self.telemetry.bind(self.layout.telemetry)
        self.events.bind(self.layout.events)
        wake_read, wake_write = socket.socketpair()
        wake_read.setblocking(False)
        wake_write.setblocking(False)
        signal.set_wakeup_fd(wake_write.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGCHLD, self._on_child)
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.telemetry, zmq.POLLIN)
        poller.register(wake_read, zmq.POLLIN)
        log.info(
            "supervisor started",
            version=__version__,
            pid=os.getpid(),
            home=str(self.layout.home),
            inbox=str(self.layout.inbox),
        )
        from loractl.supervisor.inbox import Inbox

        def wake() -> None:
            try:
                wake_write.send(b"\0")
            except BlockingIOError:
                pass  # the loop is already due to wake up

        self.inbox = Inbox(
            self.layout.inbox,
            self.layout.home,
            enqueue=self.enqueue_claimed,
            is_known=self._known_job,
            new_id=new_job_id,
            wake=wake,
        )
        try:
            self.recover()
            self.inbox.start()
            while not self._finished_shutdown():
                ready = dict(poller.poll(int(self.settings.tick_s * 1000)))
                if wake_read in ready or wake_read.fileno() in ready:
                    try:
                        wake_read.recv(4096)
                    except BlockingIOError:
                        pass
                if self.telemetry in ready:
                    self._survive("reading telemetry", self.drain_telemetry)
                if self.control in ready:
                    self._survive("serving requests", self.drain_control)
                self._survive("the loop's periodic work", self.tick)
        finally:
            self.keep_awake.release()
            self.inbox.stop()
            signal.set_wakeup_fd(-1)
            wake_read.close()
            wake_write.close()
            for sock in (self.control, self.telemetry, self.events):
                sock.close()
            self.store.close()
            self._remove_runtime_files()
            # A clean stop leaves no pidfile: one that is left means a crash (doctor says so).
            self.layout.pidfile.unlink(missing_ok=True)
            os.close(self._lock_fd)
        log.info("supervisor stopped")
        return 0

    def _remove_runtime_files(self) -> None:
        """Take our socket files and their folder away; we still hold the lock, so no other
        supervisor of this home can have bound them since."""
        for name in ("control", "events", "telemetry"):
            (self.layout.runtime / name).unlink(missing_ok=True)
        try:
            self.layout.runtime.rmdir()
        except OSError:
            pass  # something else lives there: leave it

    def _on_stop_signal(self, signum, frame) -> None:
        self.shutdown_requested = True

    def _on_child(self, signum, frame) -> None:
        # Nothing to record: installing a handler is what makes SIGCHLD reach the wake-up fd,
        # and the loop reaps on every wake.
        pass

    def _finished_shutdown(self) -> bool:
        if not self.shutdown_requested:
            return False
        if self.trainer is None:
            return True
        if self.trainer.stop_reason is None:
            self.stop_trainer("shutdown", grace=self.settings.exit_timeout_s)
        return False

    # -- recovery after a restart ----------------------------------------------------------

    def recover(self) -> None:
        """Resolve every job a previous supervisor left active: adopt its trainer or resume."""
        for job in self.store.active():
            if job.state == JobState.BACKOFF:
                self._rearm_backoff(job)
                continue
            if job.trainer_pid and self._is_our_trainer(job):
                cfg = self._load_job_config(job)
                self.trainer = Trainer(
                    job_id=job.id,
                    pid=job.trainer_pid,
                    attempt=job.attempt,
                    rung=job.rung,
                    popen=None,
                    stderr_path=self._stderr_path(job.id, job.attempt),
                    budget_mb=self._budget(cfg),
                    heartbeat_timeout=cfg.heartbeat_timeout,
                    last_heartbeat=time.monotonic(),  # give it one timeout to speak up
                    step=job.step,
                    last_checkpoint_step=job.last_checkpoint_step,
                )
                self.store.record(job.id, "adopted", pid=job.trainer_pid, attempt=job.attempt)
                self.keep_awake.hold(job.trainer_pid, f"loractl is training {job.name}")
                log.info("re-adopted trainer", job=job.id, pid=job.trainer_pid)
            else:
                self.store.transition(
                    job.id,
                    JobState.QUEUED,
                    "supervisor restarted; trainer gone, resuming from checkpoint",
                    trainer_pid=None,
                )

    def _is_our_trainer(self, job: Job) -> bool:
        try:
            proc = psutil.Process(job.trainer_pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False
            if job.trainer_started_at and abs(proc.create_time() - job.trainer_started_at) > 1:
                return False  # the pid was reused
            cmdline = " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False
        return "loractl.daemon.trainer" in cmdline and job.id in cmdline

    # -- the loop's periodic work -----------------------------------------------------------

    def _survive(self, during: str, work, *args) -> None:
        """Run one piece of the loop's work; an exception is logged, never fatal. Errors
        that belong to one job are caught closer to it (see ``_job_failed_internally``)."""
        try:
            work(*args)
        except Exception:
            log.exception("supervisor error; still serving", during=during)

    def tick(self) -> None:
        now = time.monotonic()
        self._survive("reaping the trainer", self.reap)
        self.side_processes.reap()
        for result in self.inbox.poll():
            self._report_intake(result)
        if self.trainer is not None:
            if now >= self._next_guard:
                self._next_guard = now + self.settings.guard_interval_s
                self._survive("guarding memory", self.guard_memory)
            if self.trainer is not None:
                self._survive("checking liveness", self.check_liveness)
                self._survive("stopping the trainer", self.escalate_stop)
        if self.shutdown_requested or self.settings.hold_queue:
            return
        if self.trainer is None:
            job = self._next_job(now)
            if job is not None:
                self._spawn_guarded(job)

    def _next_job(self, now: float) -> Job | None:
        """A job in backoff had its turn and keeps it: the queue waits out its delay."""
        waiting = self.store.list({JobState.BACKOFF})
        if waiting:
            job = min(waiting, key=lambda j: self._backoff_until.get(j.id, 0.0))
            return job if now >= self._backoff_until.get(job.id, 0.0) else None
        return self.store.next_queued()

    def _spawn_guarded(self, job: Job) -> None:
        try:
            self.spawn(job)
        except Exception as exc:
            self._job_failed_internally(job.id, "starting its trainer", exc)

    def _job_failed_internally(self, job_id: str, during: str, exc: BaseException) -> None:
        """A supervisor bug or an unexpected OS error hit one job: that job fails with the
        reason and the traceback in its history; the supervisor and every other job go on."""
        import traceback

        log.exception("job failed inside the supervisor", job=job_id, during=during)
        trainer = self.trainer
        if trainer is not None and trainer.job_id == job_id:
            # Never leave a trainer behind that nobody watches: one job, at most one trainer.
            try:
                os.kill(trainer.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if trainer.popen is not None:
                trainer.popen.wait()
            self.trainer = None
            self.keep_awake.release()
        error = f"{type(exc).__name__}: {exc}"
        try:
            self.store.record(
                job_id,
                "internal_error",
                during=during,
                error=error,
                traceback=traceback.format_exc()[-4000:],
            )
            job = self.store.get(job_id)
            if JobState.FAILED in TRANSITIONS[job.state]:
                self._fail(job, "internal", f"supervisor error while {during}: {error}")
        except Exception:
            log.exception("could not record the job's failure", job=job_id)

    def system_memory(self):
        now = time.monotonic()
        if self._system is None or now >= self._next_pressure:
            self._next_pressure = now + self.settings.pressure_interval_s
            self._system = read_system_memory()
            if self.settings.pressure_level_file:
                self._system = self._with_fake_level(self._system)
        return self._system

    def _with_fake_level(self, system):
        from dataclasses import replace

        from loractl.supervisor.pressure import pressure_from_macos_level

        try:
            level = int(Path(self.settings.pressure_level_file).read_text().strip())
        except (OSError, ValueError):
            return system
        return replace(system, pressure=pressure_from_macos_level(level), source="level-file")

    # -- spawning ---------------------------------------------------------------------------

    def _load_job_config(self, job: Job) -> JobConfig:
        return load_config(job.config_path)

    def _budget(self, cfg: JobConfig) -> float:
        if cfg.memory_budget_mb:
            return float(cfg.memory_budget_mb)
        return total_mb() * self.settings.default_budget_fraction

    def _fresh_start_requested(self, job_id: str, attempt: int) -> bool:
        return any(
            event["kind"] == "fresh_start_requested" and event["detail"].get("attempt") == attempt
            for event in self.store.events(job_id)
        )

    def _stderr_path(self, job_id: str, attempt: int) -> Path:
        return self.layout.job_dir(job_id) / "attempts" / f"{attempt:04d}.stderr"

    def spawn(self, job: Job) -> None:
        try:
            cfg = self._load_job_config(job)
        except ConfigError as exc:
            self._fail(job, "config_error", f"config no longer loads: {exc}")
            return
        attempt = job.attempt + 1
        stderr_path = self._stderr_path(job.id, attempt)
        stderr_path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "loractl.daemon.trainer",
            job.config_path,
            "--telemetry",
            self.layout.telemetry,
            "--job-id",
            job.id,
            "--attempt",
            str(attempt),
            "--rung",
            str(job.rung),
            "--overrides",
            json.dumps(rung_overrides(cfg, job.rung)),
        ]
        if self._fresh_start_requested(job.id, attempt):
            command.append("--fresh")
        with stderr_path.open("ab") as stderr:
            # A new session: a signal aimed at the supervisor's process group (Ctrl-C, launchd
            # stopping the agent) must not kill the trainer before it can checkpoint.
            popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
                cwd=self.layout.job_dir(job.id),
            )
        try:
            started_at = psutil.Process(popen.pid).create_time()
        except psutil.NoSuchProcess:
            started_at = None
        self.trainer = Trainer(
            job_id=job.id,
            pid=popen.pid,
            attempt=attempt,
            rung=job.rung,
            popen=popen,
            stderr_path=stderr_path,
            budget_mb=self._budget(cfg),
            heartbeat_timeout=cfg.heartbeat_timeout,
            last_checkpoint_step=job.last_checkpoint_step,
            # The trainer shares our cgroup, and our pid outlives it for the exit check.
            cgroup_oom_at_start=cgroup_oom_kill_count(os.getpid()),
        )
        self.store.transition(
            job.id,
            JobState.STARTING,
            f"attempt {attempt} on rung {job.rung} ({describe_rung(cfg, job.rung)})",
            attempt=attempt,
            trainer_pid=popen.pid,
            trainer_started_at=started_at,
        )
        self.keep_awake.hold(popen.pid, f"loractl is training {job.name}")
        self.publish("job", job_id=job.id, state="starting", pid=popen.pid)
        log.info("spawned trainer", job=job.id, pid=popen.pid, attempt=attempt, rung=job.rung)

    # -- telemetry ------------------------------------------------------------------------

    def _drop(self, error: ProtocolError) -> None:
        self.dropped_frames += 1
        log.warning("dropped telemetry frame", reason=error.reason)

    def drain_telemetry(self) -> None:
        for _frames, message in drain(self.telemetry, self._drop):
            trainer = self.trainer
            if trainer is None or getattr(message, "pid", None) != trainer.pid:
                self._stray(message)
                continue
            if isinstance(message, Heartbeat):
                self.on_heartbeat(trainer, message)
            elif isinstance(message, TrainerEvent):
                self.on_trainer_event(trainer, message)

    def _stray(self, message: Message) -> None:
        """A trainer we do not own is talking. If it is an orphan of one of our jobs, stop it:
        one job must never have two trainers."""
        pid = getattr(message, "pid", 0)
        job_id = getattr(message, "job_id", "")
        if not pid or not job_id:
            self.dropped_frames += 1
            return
        if not self._known_job(job_id) or not _is_trainer_of(pid, job_id):
            self.dropped_frames += 1  # a stranger, or a lie about the pid: never signal it
            return
        log.warning("stray trainer of one of our jobs; stopping it", pid=pid, job=job_id)
        self.store.record(job_id, "stray_trainer_stopped", pid=pid)
        self.send_command(pid, "stop")
        try:
            os.kill(pid, signal.SIGTERM)  # checkpoints and exits, like any stop
        except ProcessLookupError:
            pass

    def on_heartbeat(self, trainer: Trainer, beat: Heartbeat) -> None:
        now = time.monotonic()
        first = trainer.last_heartbeat is None or trainer.phase == "starting"
        trainer.last_heartbeat = now
        if beat.step != trainer.step:
            trainer.step = beat.step
            trainer.last_progress = now
        trainer.phase = beat.phase
        trainer.examples_seen = beat.examples_seen
        if beat.step_seconds:
            trainer.max_step_seconds = max(trainer.max_step_seconds, beat.step_seconds)
        if beat.eval_seconds:
            trainer.max_eval_seconds = max(trainer.max_eval_seconds, beat.eval_seconds)
        if beat.footprint_mb:
            trainer.footprints.append(beat.footprint_mb)
            self._note_peak(trainer, beat.footprint_mb)
        if beat.last_checkpoint_step is not None:
            trainer.last_checkpoint_step = beat.last_checkpoint_step
        job = self.store.get(trainer.job_id)
        if job.state == JobState.STARTING and first:
            self.store.transition(job.id, JobState.RUNNING, "first heartbeat", early_deaths=0)
            self.publish("job", job_id=job.id, state="running")
        self.store.update(
            job.id,
            step=beat.step,
            examples_seen=beat.examples_seen,
            total_examples=beat.total_examples,
            last_checkpoint_step=trainer.last_checkpoint_step,
        )
        self.publish("heartbeat", **beat.to_dict())

    def on_trainer_event(self, trainer: Trainer, event: TrainerEvent) -> None:
        if event.kind == "checkpoint":
            trainer.last_checkpoint_step = event.step
            trainer.last_progress = time.monotonic()
            self.store.update(trainer.job_id, last_checkpoint_step=event.step)
        elif event.kind == "done":
            trainer.done_event = True
        elif event.kind in ("oom_retry", "error"):
            self.store.record(trainer.job_id, f"trainer_{event.kind}", **event.detail)
        self.publish("trainer_event", **event.to_dict())

    def _note_peak(self, trainer: Trainer, footprint: float) -> None:
        if footprint > trainer.peak_mb * 1.01:
            trainer.peak_mb = footprint
            self.store.note_peak(trainer.job_id, trainer.rung, footprint)

    def send_command(self, pid: int, action: str) -> bool:
        try:
            self.telemetry.send_multipart(
                [f"trainer-{pid}".encode(), TrainerCommand(action=action).encode()], zmq.NOBLOCK
            )
            return True
        except zmq.ZMQError:
            return False  # not connected (yet, or any more): signals still work

    # -- watchdog ---------------------------------------------------------------------------

    def guard_memory(self) -> None:
        trainer = self.trainer
        try:
            footprint = footprint_mb(trainer.pid)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, ProcessLookupError):
            return
        except psutil.AccessDenied:
            footprint = None
        if footprint:
            trainer.footprints.append(footprint)
            self._note_peak(trainer, footprint)
        system = self.system_memory()
        if system.pressure != Pressure.NORMAL:
            trainer.pressure_seen = str(system.pressure)
        if trainer.stop_reason is not None:
            self._kill_if_still_growing(trainer, footprint)
            return
        critical = system.pressure == Pressure.CRITICAL
        if footprint and footprint > trainer.budget_mb:
            runaway = critical or footprint > trainer.budget_mb * self.settings.runaway_factor
            grace = self.settings.checkpoint_grace_s if runaway else self.settings.stop_grace_s
            grace = min(grace, self.settings.stop_grace_s)
            self.store.record(
                trainer.job_id,
                "memory_guard",
                action="stop",
                footprint_mb=round(footprint, 1),
                budget_mb=round(trainer.budget_mb, 1),
                grace_s=grace,
            )
            log.warning(
                "over budget; stopping trainer",
                footprint=footprint,
                budget=trainer.budget_mb,
                grace_s=grace,
            )
            self.stop_trainer("memory", grace=grace)
            trainer.footprint_at_stop = footprint
            return
        if critical and self._biggest_consumer(trainer.pid):
            grace = min(self.settings.checkpoint_grace_s, self.settings.stop_grace_s)
            self.store.record(
                trainer.job_id, "memory_guard", action="stop", pressure="critical", grace_s=grace
            )
            self.stop_trainer("memory", grace=grace)
            trainer.footprint_at_stop = footprint
            return
        if system.pressure == Pressure.WARN:
            now = time.monotonic()
            if now - self._last_warn_action >= self.settings.warn_action_interval_s:
                self._last_warn_action = now
                self.send_command(trainer.pid, "checkpoint_now")
                self.send_command(trainer.pid, "clear_cache")
                self.store.record(
                    trainer.job_id,
                    "memory_guard",
                    action="checkpoint+clear_cache",
                    pressure="warn",
                )

    def _kill_if_still_growing(self, trainer: Trainer, footprint: float | None) -> None:
        """A trainer stopped for memory that keeps growing is not checkpointing (stuck in a
        read of /dev/zero, say, where SIGTERM waits): waiting out its grace risks the Mac."""
        if trainer.stop_reason != "memory" or trainer.kill_at is None:
            return
        if not footprint or trainer.footprint_at_stop is None:
            return
        if footprint - trainer.footprint_at_stop < self.settings.still_growing_mb:
            return
        self.store.record(
            trainer.job_id,
            "memory_guard",
            action="kill",
            footprint_mb=round(footprint, 1),
            at_stop_mb=round(trainer.footprint_at_stop, 1),
        )
        log.warning("still growing after stop; SIGKILL", pid=trainer.pid, footprint=footprint)
        trainer.kill_at = time.monotonic()
        self.escalate_stop()

    @staticmethod
    def _biggest_consumer(pid: int) -> bool:
        biggest = max(
            psutil.process_iter(["pid", "memory_info"]),
            key=lambda p: p.info["memory_info"].rss if p.info["memory_info"] else 0,
            default=None,
        )
        return biggest is not None and biggest.info["pid"] == pid

    def check_liveness(self) -> None:
        trainer = self.trainer
        if trainer.stop_reason is not None:
            return
        now = time.monotonic()
        if trainer.last_heartbeat is None:
            if now - trainer.spawned_at > self.settings.startup_timeout_s:
                self._hang(
                    trainer, f"no heartbeat {self.settings.startup_timeout_s:.0f} s after start"
                )
            return
        silent = now - trainer.last_heartbeat
        if silent > trainer.heartbeat_timeout:
            self._hang(trainer, f"no heartbeat for {silent:.1f} s")
            return
        if trainer.phase in ("train", "eval") and trainer.step >= 0:
            stall = max(
                self.settings.stall_min_s,
                self.settings.stall_factor * (trainer.max_step_seconds + trainer.max_eval_seconds),
            )
            if now - trainer.last_progress > stall:
                self._hang(trainer, f"no progress for {now - trainer.last_progress:.0f} s")

    def _hang(self, trainer: Trainer, why: str) -> None:
        self.store.record(trainer.job_id, "hang_detected", reason=why, pid=trainer.pid)
        log.warning("trainer hung", why=why, pid=trainer.pid)
        self.stop_trainer("hang", grace=self.settings.hang_grace_s)

    def stop_trainer(self, reason: str, grace: float) -> None:
        trainer = self.trainer
        trainer.stop_reason = reason
        trainer.stop_sent_at = time.monotonic()
        trainer.kill_at = trainer.stop_sent_at + grace
        self.send_command(trainer.pid, "stop")
        try:
            os.kill(trainer.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def escalate_stop(self) -> None:
        trainer = self.trainer
        if trainer is None or trainer.kill_at is None or time.monotonic() < trainer.kill_at:
            return
        log.warning("grace period over; SIGKILL", pid=trainer.pid, reason=trainer.stop_reason)
        trainer.kill_at = None
        try:
            os.kill(trainer.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    # -- exits ------------------------------------------------------------------------------

    def reap(self) -> None:
        trainer = self.trainer
        if trainer is None:
            return
        if trainer.popen is not None:
            code = trainer.popen.poll()
            if code is None:
                return
            exit_code, signum = (code, None) if code >= 0 else (None, -code)
        else:
            try:
                proc = psutil.Process(trainer.pid)
                if proc.status() != psutil.STATUS_ZOMBIE:
                    return
            except psutil.NoSuchProcess:
                pass
            # Not our child: its exit status is lost. A "done" event says it finished.
            exit_code, signum = (0, None) if trainer.done_event else (None, None)
        self.trainer = None
        self.keep_awake.release()
        try:
            self.on_exit(trainer, exit_code, signum)
        except Exception as exc:
            self._job_failed_internally(trainer.job_id, "handling its trainer's exit", exc)

    def _stderr_tail(self, trainer: Trainer) -> str:
        try:
            with trainer.stderr_path.open("rb") as handle:
                handle.seek(0, os.SEEK_END)
                size = handle.tell()
                handle.seek(max(0, size - STDERR_TAIL_BYTES))
                return handle.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def on_exit(self, trainer: Trainer, exit_code: int | None, signum: int | None) -> None:
        job = self.store.get(trainer.job_id)
        tail = self._stderr_tail(trainer)
        oom_kills = cgroup_oom_kill_count(os.getpid())
        oom_delta = (
            oom_kills - trainer.cgroup_oom_at_start
            if oom_kills is not None and trainer.cgroup_oom_at_start is not None
            else 0
        )
        evidence = ExitEvidence(
            exit_code=exit_code,
            signal=signum,
            stderr_tail=tail,
            last_footprint_mb=trainer.recent_footprint,
            budget_mb=trainer.budget_mb,
            pressure=trainer.pressure_seen,
            cgroup_oom_kills_delta=oom_delta,
            hang_detected=trainer.stop_reason == "hang",
            memory_guard_stop=trainer.stop_reason == "memory",
            user_stop=trainer.stop_reason in ("shutdown", "user-pause", "user-cancel"),
        )
        verdict = classify(evidence)
        log.info(
            "trainer exited",
            job=job.id,
            pid=trainer.pid,
            exit_code=exit_code,
            signal=signal_name(signum) if signum else None,
            cause=str(verdict.cause),
            rule=verdict.rule,
        )
        self.store.update(
            job.id, trainer_pid=None, last_checkpoint_step=trainer.last_checkpoint_step
        )
        if verdict.cause == Cause.DONE:
            self.store.transition(
                job.id, JobState.COMPLETED, "trainer finished", outcome="success", reason=""
            )
            self.publish("job", job_id=job.id, state="completed")
            log.info("job completed", job=job.id, name=job.name, attempts=job.attempt)
            self.notify(job, f"{job.name} completed", f"adapters in {self._adapter_path(job)}")
            return
        if verdict.cause == Cause.STOPPED:
            if trainer.stop_reason == "user-pause":
                self.store.transition(job.id, JobState.PAUSED, "paused by the user; checkpointed")
            elif trainer.stop_reason == "user-cancel":
                self.store.transition(
                    job.id, JobState.CANCELLED, "cancelled by the user", outcome="cancelled"
                )
            else:
                self.store.transition(
                    job.id, JobState.QUEUED, "supervisor shutting down; will resume"
                )
            self.publish("job", job_id=job.id, state=str(self.store.get(job.id).state))
            return
        crash = {
            "cause": str(verdict.cause),
            "rule": verdict.rule,
            "explanation": verdict.explanation,
            "exit_code": exit_code,
            "signal": signal_name(signum) if signum else None,
            "step": trainer.step if trainer.step >= 0 else job.step,
            "checkpoint_step": trainer.last_checkpoint_step,
            "rung": trainer.rung,
            "attempt": trainer.attempt,
            "pid": trainer.pid,
            "footprint_mb": trainer.recent_footprint,
            "at": time.time(),
        }
        job = self.store.add_crash(job.id, crash)
        self.publish("crash", job_id=job.id, **crash)
        if not verdict.retry:
            self._fail(job, str(verdict.cause), _reason_with_tail(verdict.explanation, tail))
            return
        if trainer.last_heartbeat is None:
            early = job.early_deaths + 1
            if early >= self.settings.early_death_limit:
                self._fail(
                    job,
                    "early_death",
                    f"the trainer died before its first heartbeat {early} times in a row; "
                    f"last stderr:\n{_last_lines(tail)}",
                )
                return
            job = self.store.update(job.id, early_deaths=early)
        cfg = self._load_job_config(job)
        if verdict.step_down:
            if job.rung + 1 >= rung_count(cfg):
                self._fail(job, "memory", self._ladder_exhausted(job, cfg))
                return
            new_rung = job.rung + 1
            self.store.record(
                job.id,
                "ladder_step",
                from_rung=job.rung,
                to_rung=new_rung,
                change=describe_rung(cfg, new_rung),
                cause=verdict.explanation,
            )
            log.warning(
                "ladder step", job=job.id, to_rung=new_rung, change=describe_rung(cfg, new_rung)
            )
            self.notify(
                job,
                f"{job.name}: out of memory",
                f"stepping down to rung {new_rung}: {describe_rung(cfg, new_rung)}",
            )
            self.store.transition(
                job.id,
                JobState.BACKOFF,
                f"memory: stepping down to rung {new_rung} ({describe_rung(cfg, new_rung)})",
                rung=new_rung,
                retries_on_rung=0,
            )
            self._arm_backoff(job.id, 0.0)
            return
        previous = [c for c in job.crashes[:-1] if c.get("rung") == job.rung]
        advanced = not previous or (
            (trainer.last_checkpoint_step or -1) > (previous[-1].get("checkpoint_step") or -1)
        )
        retries = 1 if advanced else job.retries_on_rung + 1
        if retries > cfg.max_retries:
            self._fail(
                job,
                str(verdict.cause),
                f"{retries - 1} retries on rung {job.rung} without a new checkpoint; last: "
                + _reason_with_tail(verdict.explanation, tail),
            )
            return
        delay = self.policy.delay(retries)
        self.store.transition(
            job.id,
            JobState.BACKOFF,
            f"{verdict.cause}: {verdict.explanation}; restarting in {delay:.1f} s",
            retries_on_rung=retries,
        )
        self._arm_backoff(job.id, delay)

    def _arm_backoff(self, job_id: str, delay: float) -> None:
        """Set the restart time, in memory for the loop and in the history (wall clock) so a
        restarted supervisor keeps the same deadline instead of restarting at once."""
        self._backoff_until[job_id] = time.monotonic() + delay
        self.store.record(job_id, "backoff", resume_at=time.time() + delay, delay_s=delay)

    def _rearm_backoff(self, job: Job) -> None:
        recorded = [e for e in self.store.events(job.id) if e["kind"] == "backoff"]
        resume_at = recorded[-1]["detail"].get("resume_at") if recorded else None
        remaining = max(0.0, resume_at - time.time()) if isinstance(resume_at, float) else 0.0
        self._backoff_until[job.id] = time.monotonic() + remaining

    def _ladder_exhausted(self, job: Job, cfg: JobConfig) -> str:
        lines = ["out of memory on every rung of the ladder:"]
        for rung in range(rung_count(cfg)):
            peak = job.peak_memory_mb.get(str(rung))
            shown = f"peak {peak:.0f} MB" if peak else "no reading"
            lines.append(f"  rung {rung} ({describe_rung(cfg, rung)}): {shown}")
        lines.append(
            "add a rung (grad_checkpoint: true, fewer num_layers, smaller batch_size) "
            "or raise memory_budget_mb"
        )
        return "\n".join(lines)

    def _fail(self, job: Job, cause: str, reason: str) -> None:
        self.store.transition(
            job.id, JobState.FAILED, f"failed: {cause}", outcome=f"failed:{cause}", reason=reason
        )
        self.publish("job", job_id=job.id, state="failed", reason=reason)
        log.error("job failed", job=job.id, cause=cause, reason=reason)
        self.notify(job, f"{job.name} failed", reason.splitlines()[0] if reason else cause)

    def notify(self, job: Job, title: str, message: str) -> None:
        """A desktop notification, for jobs whose config asks for them."""
        try:
            wanted = self._load_job_config(job).notify
        except ConfigError:
            wanted = False
        if wanted:
            self.notifier.send(title, message)

    def _adapter_path(self, job: Job) -> str:
        try:
            return str(self._load_job_config(job).adapter_path)
        except ConfigError:
            return job.job_dir

    # -- control channel --------------------------------------------------------------------

    def drain_control(self) -> None:
        while True:
            try:
                frames = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 2:
                self.dropped_frames += 1
                continue
            envelope, payload = frames[:-1], frames[-1]
            reply = self.dispatch(payload)
            try:
                self.control.send_multipart([*envelope, reply.encode()], zmq.NOBLOCK)
            except zmq.ZMQError:
                self.dropped_frames += 1

    def dispatch(self, payload: bytes) -> Reply:
        """The one place a request becomes a reply; no exception escapes it."""
        try:
            request = decode(payload)
        except ProtocolError as exc:
            self.dropped_frames += 1
            return Reply.failure("", exc.code, exc.reason)
        handler = self.handlers.get(type(request))
        if handler is None:
            return Reply.failure(
                request.id, ErrorCode.UNKNOWN_TYPE, f"{request.type} is not a request"
            )
        try:
            return handler(request)
        except JobNotFound as exc:
            return Reply.failure(request.id, ErrorCode.NOT_FOUND, str(exc))
        except InvalidState as exc:
            return Reply.failure(request.id, ErrorCode.INVALID_STATE, str(exc))
        except (ConfigError, ValueError) as exc:
            return Reply.failure(request.id, ErrorCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # a handler bug must not take the daemon down
            log.exception("handler failed", request=request.type)
            return Reply.failure(request.id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    def handle_status(self, request: StatusRequest) -> Reply:
        jobs = self.store.list()
        counts: dict[str, int] = {}
        for job in jobs:
            counts[str(job.state)] = counts.get(str(job.state), 0) + 1
        running = self.trainer.job_id if self.trainer else None
        return Reply.success(
            request.id,
            version=__version__,
            pid=os.getpid(),
            home=str(self.layout.home),
            uptime_s=round(time.time() - self.started_at, 1),
            jobs=counts,
            running=running,
            trainer_pid=self.trainer.pid if self.trainer else None,
            dropped_frames=self.dropped_frames,
            pressure=str(self.system_memory().pressure),
            inbox=str(self.layout.inbox),
            logs=str(self.layout.logs),
            rejected=recent_rejections(self.layout.inbox, limit=5),
        )

    def handle_list(self, request: ListRequest) -> Reply:
        states = {JobState(s) for s in request.states} if request.states else None
        extra = {}
        if request.rejected:
            extra["rejected"] = recent_rejections(self.layout.inbox, limit=None)
        return Reply.success(
            request.id, jobs=[self._summary(job) for job in self.store.list(states)], **extra
        )

    def handle_submit(self, request: SubmitRequest) -> Reply:
        source = Path(request.config_path)
        cfg = load_config(source)
        job = self.enqueue(source, cfg, priority=request.priority)
        return Reply.success(request.id, id=job.id, name=job.name, state=str(job.state))

    def _known_job(self, job_id: str) -> bool:
        try:
            self.store.get(job_id)
            return True
        except JobNotFound:
            return False

    def enqueue_claimed(self, job_id: str, claimed: Path, cfg: JobConfig) -> None:
        """The inbox's way in: idempotent per job id, so a crash mid-intake never doubles."""
        if not self._known_job(job_id):
            self.enqueue(claimed, cfg, job_id=job_id)

    def _report_intake(self, result) -> None:
        from loractl.supervisor.inbox import Accepted

        if isinstance(result, Accepted):
            log.info("inbox: queued", job=result.job_id, source=result.source)
            self.publish("job", job_id=result.job_id, state="queued", source=result.source)
        else:
            log.warning("inbox: rejected", name=result.name, reason=result.reason)
            self.publish("rejected", name=result.name, reason=result.reason)

    def enqueue(
        self, source: Path, cfg: JobConfig, priority: int | None = None, job_id: str | None = None
    ) -> Job:
        """Store a normalized copy of the config in a job folder, then queue the job.

        Paths in the copy are absolute (the loader resolved them against the source's folder),
        so the job no longer depends on where its file came from.
        """
        import shutil

        job_id = job_id or new_job_id()
        folder = self.layout.job_dir(job_id)
        staging = folder.with_name(f".{job_id}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        if folder.exists():
            shutil.rmtree(folder)  # left by a crash before the row was written: no job yet
        data = cfg.to_dict()
        if not _sets_key(source, "adapter_path"):
            data["adapter_path"] = str(folder / "adapters")
        self._check_adapter_folder_free(Path(data["adapter_path"]), source)
        staging.mkdir(parents=True)
        (staging / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        os.replace(staging, folder)
        return self.store.add_job(
            job_id=job_id,
            name=cfg.name,
            config_path=str(folder / "config.yaml"),
            job_dir=str(folder),
            priority=cfg.priority if priority is None else priority,
        )

    def _check_adapter_folder_free(self, adapter_path: Path, source: Path) -> None:
        """Refuse a job whose adapter folder belongs to a job that has not ended: the second
        would train on (or "complete" with) the first's checkpoints."""
        wanted = adapter_path.resolve()
        for job in self.store.list(set(JobState) - TERMINAL):
            if job.id not in self._adapter_paths:  # a job's stored config never moves it
                try:
                    path = Path(self._load_job_config(job).adapter_path).resolve()
                except (ConfigError, OSError):
                    continue
                self._adapter_paths[job.id] = path
            if self._adapter_paths[job.id] == wanted:
                raise ConfigError(
                    f"adapter_path {wanted} is already used by job {job.id} ({job.name}, "
                    f"{job.state}); give this job its own adapter_path",
                    key="adapter_path",
                    source=str(source),
                )

    def handle_show(self, request: ShowRequest) -> Reply:
        job = self.store.resolve(request.job)
        return Reply.success(request.id, job=self.describe(job))

    def _running(self, job: Job) -> bool:
        return self.trainer is not None and self.trainer.job_id == job.id

    def handle_cancel(self, request: CancelRequest) -> Reply:
        job = self.store.resolve(request.job)
        require_state(job, "cancel")
        if self._running(job):
            self.stop_trainer("user-cancel", grace=self.settings.stop_grace_s)
            return Reply.success(request.id, id=job.id, state="stopping")
        job = self.store.transition(
            job.id, JobState.CANCELLED, "cancelled by the user", outcome="cancelled"
        )
        self.publish("job", job_id=job.id, state="cancelled")
        return Reply.success(request.id, id=job.id, state=str(job.state))

    def handle_pause(self, request: PauseRequest) -> Reply:
        job = self.store.resolve(request.job)
        require_state(job, "pause")
        if self._running(job):
            self.stop_trainer("user-pause", grace=self.settings.stop_grace_s)
            return Reply.success(request.id, id=job.id, state="stopping")
        job = self.store.transition(job.id, JobState.PAUSED, "paused by the user")
        return Reply.success(request.id, id=job.id, state=str(job.state))

    def handle_resume(self, request: ResumeRequest) -> Reply:
        job = self.store.resolve(request.job)
        require_state(job, "resume")
        job = self.store.transition(
            job.id, JobState.QUEUED, "resumed by the user; continues from its checkpoint"
        )
        return Reply.success(request.id, id=job.id, state=str(job.state))

    def handle_retry(self, request: RetryRequest) -> Reply:
        job = self.store.resolve(request.job)
        require_state(job, "retry")
        rung = job.rung if request.from_rung is None else request.from_rung
        cfg = self._load_job_config(job)
        if not 0 <= rung < rung_count(cfg):
            raise ValueError(
                f"rung {rung} does not exist; this job has rungs 0-{rung_count(cfg) - 1}"
            )
        if request.fresh:
            # Read by spawn(): this attempt's trainer discards the checkpoints and starts over.
            self.store.record(job.id, "fresh_start_requested", attempt=job.attempt + 1)
        job = self.store.transition(
            job.id,
            JobState.QUEUED,
            f"retried by the user from rung {rung}" + (", from the start" if request.fresh else ""),
            rung=rung,
            retries_on_rung=0,
            early_deaths=0,
            outcome=None,
            reason="",
        )
        return Reply.success(request.id, id=job.id, state=str(job.state), rung=rung)

    def handle_priority(self, request: PriorityRequest) -> Reply:
        job = self.store.resolve(request.job)
        require_state(job, "priority")
        job = self.store.set_priority(job.id, request.priority)
        return Reply.success(request.id, id=job.id, priority=job.priority)

    def handle_history(self, request: HistoryRequest) -> Reply:
        job = self.store.resolve(request.job)
        return Reply.success(request.id, id=job.id, events=self.store.events(job.id))

    def handle_ladder(self, request: LadderRequest) -> Reply:
        job = self.store.resolve(request.job)
        described = self.describe(job)
        return Reply.success(request.id, id=job.id, rung=job.rung, ladder=described["ladder"])

    def handle_clean(self, request: CleanRequest) -> Reply:
        import shutil

        removed = []
        for job in self.store.list(set(TERMINAL)):
            folder = Path(job.job_dir)
            if folder.is_dir() and folder.parent == self.layout.jobs:
                for entry in folder.iterdir():
                    if entry.name == "adapters" and not request.adapters:
                        continue  # the adapters are what the user trained for
                    if entry.is_dir():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
                if request.adapters or not any(folder.iterdir()):
                    shutil.rmtree(folder, ignore_errors=True)
            self.store.delete(job.id)
            removed.append(job.id)
        return Reply.success(request.id, removed=removed, adapters_removed=request.adapters)

    def handle_shutdown(self, request: ShutdownRequest) -> Reply:
        self.shutdown_requested = True
        running = self.trainer.job_id if self.trainer else None
        return Reply.success(request.id, pid=os.getpid(), checkpointing=running)

    def _summary(self, job: Job) -> dict[str, Any]:
        return {
            "id": job.id,
            "name": job.name,
            "state": str(job.state),
            "outcome": job.outcome,
            "priority": job.priority,
            "rung": job.rung,
            "attempts": job.attempt,
            "progress": {
                "examples_seen": job.examples_seen,
                "total_examples": job.total_examples,
                "step": job.step,
            },
        }

    def describe(self, job: Job) -> dict[str, Any]:
        try:
            cfg = self._load_job_config(job)
            effective = effective_config(cfg, job.rung).to_dict()
            ladder = [
                {
                    "rung": rung,
                    "change": describe_rung(cfg, rung),
                    "peak_memory_mb": job.peak_memory_mb.get(str(rung)),
                }
                for rung in range(rung_count(cfg))
            ]
        except ConfigError as exc:
            effective, ladder = {"error": str(exc)}, []
        adapter_path = effective.get("adapter_path")
        return {
            **self._summary(job),
            "reason": job.reason,
            "effective_config": effective,
            "trainer_pid": self.trainer.pid
            if self.trainer and self.trainer.job_id == job.id
            else None,
            "crashes": job.crashes,
            "peak_memory_mb": job.peak_memory_mb,
            "ladder": ladder,
            "adapter_path": adapter_path,
            "use_with": _use_with(effective.get("model"), adapter_path),
            "job_dir": job.job_dir,
            "budget_mb": round(self._budget(cfg), 1) if "error" not in effective else None,
            "last_checkpoint_step": job.last_checkpoint_step,
            "history": self.store.events(job.id),
        }

    def publish(self, topic: str, **data: Any) -> None:
        try:
            self.events.send_multipart(
                [topic.encode(), json.dumps(data, default=str).encode()], zmq.NOBLOCK
            )
        except zmq.ZMQError:
            pass


def _is_trainer_of(pid: int, job_id: str) -> bool:
    """Whether ``pid`` really is a loractl trainer of ``job_id`` (a heartbeat can claim any
    pid; only the process table is proof)."""
    try:
        cmdline = psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return "loractl.daemon.trainer" in cmdline and job_id in cmdline


def recent_rejections(inbox: Path, limit: int | None) -> list[dict[str, Any]]:
    """Files the inbox turned away, newest first, each with the reason it wrote for it."""
    from loractl.supervisor.inbox import REJECTED

    found = []
    try:
        entries = list(os.scandir(inbox / REJECTED))
    except OSError:
        return []
    for entry in entries:
        if not entry.name.endswith(".error.txt") or entry.name.startswith("."):
            continue
        try:
            at = entry.stat().st_mtime
            with open(entry.path, encoding="utf-8", errors="replace") as handle:
                reason = handle.read(4096).strip()
        except OSError:
            continue
        found.append({"name": entry.name.removesuffix(".error.txt"), "reason": reason, "at": at})
    found.sort(key=lambda item: item["at"], reverse=True)
    return found if limit is None else found[:limit]


def _use_with(model: str | None, adapter_path: str | None) -> str | None:
    """How to try the adapters, once there are any, with a command that exists: the bare
    name when it is on PATH, else the one installed beside this interpreter."""
    import shutil

    if not model or not adapter_path:
        return None
    if not (Path(adapter_path) / "adapters.safetensors").is_file():
        return None
    command = "mlx_lm.generate"
    if shutil.which(command) is None:
        beside = Path(sys.executable).parent / command
        command = str(beside) if beside.is_file() else f"{sys.executable} -m mlx_lm generate"
    return f"{command} --model {model} --adapter-path {adapter_path} --prompt 'Hello'"


def _sets_key(path: Path, key: str) -> bool:
    """Whether the user's file names ``key`` itself (rather than taking its default)."""
    import tomllib

    try:
        text = path.read_text()
        if path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and key in data


def _last_lines(text: str, count: int = 8) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join(lines[-count:])


def _reason_with_tail(explanation: str, tail: str) -> str:
    """The verdict's one line, then the stderr lines above it for context.

    The explanation quotes the decisive stderr line, shortened to fit one line; that line is
    put back whole and not repeated below, so a reason neither ends mid-sentence nor says
    the same thing twice.
    """
    lines = _last_lines(tail).splitlines()
    headline, _, quoted = explanation.partition(": ")
    quoted = quoted.removesuffix("...").strip()
    if quoted:
        matching = [line for line in lines if quoted in line]
        if matching:
            lines.remove(matching[-1])
            full = matching[-1].strip()
            explanation = f"{headline}: {full[full.index(quoted) :]}"
    return "\n".join([explanation, *lines])


def main(home: str | None = None, wait_for_lock: bool = False) -> int:
    """The supervisor's entry point. Exit codes suit a keep-alive service manager: 0 only for
    a requested stop (SIGTERM, ``loractl daemon stop``), 3 when another supervisor holds the
    home and ``wait_for_lock`` is off, anything else is a crash worth a restart."""
    from loractl.supervisor.logfile import configure_logging

    # Everything we create (database, job configs, logs, checkpoints' folders) is the
    # user's alone: training data and configs can be private.
    os.umask(0o077)
    supervisor = Supervisor(home)
    configure_logging(supervisor.layout.logs)
    try:
        return supervisor.run(wait_for_lock=wait_for_lock)
    except AlreadyRunning as exc:
        print(f"loractl: {exc}", file=sys.stderr)
        return 3
    except UnsafeFolder as exc:
        # Someone else's (or an open) folder where our sockets or state would go: binding
        # there would let them answer for us. Only the user can fix it.
        log.error("refusing to start", reason=str(exc))
        return int(ExitCode.CONFIG_ERROR)
