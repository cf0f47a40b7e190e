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

import errno
import fcntl
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import zmq

from loractl import __version__
from loractl.config import ConfigError
from loractl.paths import Layout, UnsafeFolder
from loractl.protocol import (
    CancelRequest,
    CleanRequest,
    ErrorCode,
    ExitCode,
    HistoryRequest,
    JobEvent,
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
    decode,
)
from loractl.supervisor.child import Trainer, TrainerChild
from loractl.supervisor.desktop import KeepAwake, Notifier, SideProcesses
from loractl.supervisor.exits import ExitHandling
from loractl.supervisor.handlers import RequestHandlers
from loractl.supervisor.policy import PolicySettings
from loractl.supervisor.store import (
    InvalidState,
    Job,
    JobNotFound,
    JobState,
    Store,
    StoreFull,
    new_job_id,
)
from loractl.wire import receive

log = structlog.get_logger("loractl.supervisor")


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
    # After the database's disk filled up, writes resume once this much is free again.
    disk_resume_mb: float = 8.0
    # The address ranks on other Macs reach this supervisor at (default: this machine's
    # address on the route to the job's first remote host).
    telemetry_address: str = ""

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


class Supervisor(TrainerChild, ExitHandling, RequestHandlers):
    def __init__(self, home: str | Path | None = None, settings: Settings | None = None):
        self.layout = Layout.at(home)
        self.settings = settings or Settings.from_env()
        self.policy = PolicySettings(
            early_death_limit=self.settings.early_death_limit,
            backoff_base_s=self.settings.backoff_base_s,
            backoff_cap_s=self.settings.backoff_cap_s,
        )
        self.trainer: Trainer | None = None
        # Each distributed job's ranks as its last attempt left them, for `show`.
        self.last_ranks: dict[str, list[dict[str, Any]]] = {}
        self.hostname = socket.gethostname()
        # Telemetry over TCP for ranks on other Macs: CURVE-secured, open only while a job
        # with remote ranks runs (a single-machine job opens no TCP port).
        self.remote_telemetry: zmq.Socket | None = None
        self._authenticator = None
        self.poller: zmq.Poller | None = None
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
        self.disk_full: StoreFull | None = None
        self._next_disk_check = 0.0
        self.pending_exit: tuple | None = None
        self.recovered = False
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
        if wait:
            self.layout.ensure()  # the supervisor we waited for took its socket folder away
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as exc:  # a full disk: the lock is what counts, the pid is a courtesy
            log.warning("could not write the pidfile", error=str(exc))
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
        poller = self.poller = zmq.Poller()
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
            self._survive("recovering", self.recover)
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
                if self.remote_telemetry is not None and self.remote_telemetry in ready:
                    self._survive(
                        "reading remote telemetry", self.drain_telemetry, self.remote_telemetry
                    )
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
            self.close_remote_telemetry()
            self.store.close()
            self._remove_runtime_files()
            # A clean stop leaves no pidfile: one that is left means a crash (doctor says so).
            self.layout.pidfile.unlink(missing_ok=True)
            os.close(self._lock_fd)
        log.info("supervisor stopped")
        return 0

    def open_remote_telemetry(self, address: str, port: int = 0) -> str:
        """Bind the CURVE-secured telemetry socket for ranks on other Macs (once) and return
        the endpoint they connect to. Only clients holding this install's keys get through;
        the keys are made on first use, in ``<home>/keys``."""
        from loractl.keys import ensure_keys, keys_folder, secure_server

        if self.remote_telemetry is not None:
            return self.remote_telemetry.getsockopt_string(zmq.LAST_ENDPOINT)
        context = zmq.Context.instance()
        keys = ensure_keys(keys_folder(self.layout.home))
        sock = context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        authenticator = secure_server(sock, keys, context)
        try:
            sock.bind(f"tcp://{address}:{port or '*'}")
        except zmq.ZMQError:
            authenticator.stop()
            sock.close()
            raise
        self.remote_telemetry, self._authenticator = sock, authenticator
        if self.poller is not None:
            self.poller.register(sock, zmq.POLLIN)
        endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("remote telemetry open", endpoint=endpoint)
        return endpoint

    def close_remote_telemetry(self) -> None:
        if self.remote_telemetry is None:
            return
        if self.poller is not None:
            self.poller.unregister(self.remote_telemetry)
        self.remote_telemetry.close()
        self._authenticator.stop()
        self.remote_telemetry = self._authenticator = None
        log.info("remote telemetry closed")

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
        """Resolve every job a previous supervisor left active: adopt its trainer or resume.
        Safe to run again after a write failed midway (a full disk)."""
        for job in self.store.active():
            if job.state == JobState.BACKOFF:
                self._rearm_backoff(job)
                continue
            if self.trainer is not None and self.trainer.job_id == job.id:
                continue  # adopted, and recorded, on an earlier try
            if job.trainer_pid and self._is_our_trainer(job):
                cfg = self._load_job_config(job)
                adopted = Trainer(
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
                    world_size=cfg.world_size,
                )
                adopted.remote = adopted.distributed and self.reopen_remote_telemetry(
                    job.id, job.attempt
                )
                # Recorded before it is ours: if the disk refuses, recovery runs again later.
                self.store.record(job.id, "adopted", pid=job.trainer_pid, attempt=job.attempt)
                self.trainer = adopted
                self.keep_awake.hold(job.trainer_pid, f"loractl is training {job.name}")
                log.info("re-adopted trainer", job=job.id, pid=job.trainer_pid)
            else:
                self.store.transition(
                    job.id,
                    JobState.QUEUED,
                    "supervisor restarted; trainer gone, resuming from checkpoint",
                    trainer_pid=None,
                )
        self.recovered = True

    # -- the loop's periodic work -----------------------------------------------------------

    def _survive(self, during: str, work, *args) -> None:
        """Run one piece of the loop's work; an exception is logged, never fatal. Errors
        that belong to one job are caught closer to it (see ``_job_failed_internally``)."""
        try:
            work(*args)
        except StoreFull as exc:
            self.on_store_full(exc)
        except Exception:
            log.exception("supervisor error; still serving", during=during)

    def on_store_full(self, exc: StoreFull) -> None:
        """The database's disk is full. Reads go on; no trainer is started and a pending exit
        or recovery waits until there is space again (checked once a second)."""
        if self.disk_full is None:
            log.warning("disk full; serving reads, writes wait for space", why=str(exc))
        self.disk_full = exc
        self._next_disk_check = time.monotonic() + 1.0

    def _disk_still_full(self, now: float) -> bool:
        if self.disk_full is None:
            return False
        if now < self._next_disk_check:
            return True
        self._next_disk_check = now + 1.0
        import shutil

        try:
            usage = shutil.disk_usage(self.layout.home)
        except OSError:
            return True
        free_mb = usage.free / 2**20
        # A small volume never gets the full margin back; a quarter of it will do.
        if free_mb < min(self.settings.disk_resume_mb, usage.total / 2**20 / 4):
            return True
        log.info("disk space is back; resuming writes", free_mb=round(free_mb, 1))
        self.disk_full = None
        return False

    def tick(self) -> None:
        now = time.monotonic()
        if self._disk_still_full(now):
            self._survive("reaping the trainer", self.reap)
            return  # reads and requests still served; nothing else writes until there is room
        if not self.recovered:
            self._survive("recovering", self.recover)
        if self.pending_exit is not None:
            self.handle_exit(*self.pending_exit)
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
        if self.shutdown_requested or self.settings.hold_queue or not self.recovered:
            return
        if self.trainer is None and self.pending_exit is None:
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
        except StoreFull as exc:
            # The job stays queued; a trainer we could not record must not run unwatched.
            self.kill_trainer_of(job.id)
            self.on_store_full(exc)
        except Exception as exc:
            self._job_failed_internally(job.id, "starting its trainer", exc)

    # -- spawning ---------------------------------------------------------------------------

    # -- telemetry ------------------------------------------------------------------------

    # -- watchdog ---------------------------------------------------------------------------

    # -- exits ------------------------------------------------------------------------------

    # -- control channel --------------------------------------------------------------------

    def _drop_request(self, error: ProtocolError) -> None:
        self.dropped_frames += 1
        log.warning("dropped control message", reason=error.reason)

    def drain_control(self) -> None:
        # Frame by frame: a flood of frames is dropped unread, never echoed as an envelope.
        for frames in receive(self.control, self._drop_request):
            envelope, payload = frames[:-1], frames[-1]
            reply = self.dispatch(payload)  # still answers malformed or wrong-version requests
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
        except StoreFull as exc:
            return Reply.failure(request.id, ErrorCode.DISK_FULL, str(exc))
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return Reply.failure(
                    request.id, ErrorCode.DISK_FULL, f"disk full: {exc}; free some space"
                )
            log.exception("handler failed", request=request.type)
            return Reply.failure(request.id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        except JobNotFound as exc:
            return Reply.failure(request.id, ErrorCode.NOT_FOUND, str(exc))
        except InvalidState as exc:
            return Reply.failure(request.id, ErrorCode.INVALID_STATE, str(exc))
        except (ConfigError, ValueError) as exc:
            return Reply.failure(request.id, ErrorCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # a handler bug must not take the daemon down
            log.exception("handler failed", request=request.type)
            return Reply.failure(request.id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    def publish(self, topic: str, message: Message) -> None:
        """One event on the events socket; nobody listening (or a slow one) loses nothing."""
        try:
            self.events.send_multipart([topic.encode(), message.encode()], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def publish_state(self, job_id: str, **extra: Any) -> None:
        """A job's new state, as stored, on the ``job`` topic."""
        state = str(self.store.get(job_id).state)
        self.publish("job", JobEvent(job_id=job_id, state=state, **extra))


def main(home: str | None = None, wait_for_lock: bool = False) -> int:
    """The supervisor's entry point. Exit codes suit a keep-alive service manager: 0 only for
    a requested stop (SIGTERM, ``loractl daemon stop``), 3 when another supervisor holds the
    home and ``wait_for_lock`` is off, anything else is a crash worth a restart."""
    from loractl.supervisor.logfile import configure_logging

    # Everything we create (database, job configs, logs, checkpoints' folders) is the
    # user's alone: training data and configs can be private.
    os.umask(0o077)
    supervisor = Supervisor(home)
    try:
        # Before the log file is opened: never write into a folder someone else owns.
        supervisor.layout.ensure()
    except UnsafeFolder as exc:
        print(f"loractl: {exc}", file=sys.stderr)
        return int(ExitCode.CONFIG_ERROR)
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
