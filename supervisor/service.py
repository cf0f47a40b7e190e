"""The supervisor: one loop that owns the sockets, the lock and the wiring.

Uvicorn-style: signal handlers only set flags (and poke a wake-up pipe); request handlers
(:mod:`.handlers`) only change the store or ask the runner to stop an attempt; one loop reaps,
reads heartbeats, runs the watchdog and fires timers. The work itself is done by collaborators
this module builds and wires together:

- :class:`~.runner.Runner` owns the current :class:`~.attempt.Attempt` (spawn, telemetry,
  liveness, memory, stops, reaping);
- :class:`~.exits.ExitHandler` turns an attempt's exit into the job's next state, through the
  pure :func:`~.policy.after_exit`;
- :class:`~.jobqueue.JobQueue` takes jobs in and says which runs next;
- :class:`~.handlers.RequestHandlers` answers the control requests.

Safety rules it keeps:
- the pidfile flock is taken before any socket is bound (binding a live ipc:// endpoint
  silently steals it);
- a job never has two trainers: on start it re-adopts a live trainer of a job it was running
  (same pid and start time), and only otherwise resumes from the checkpoint;
- nothing one job or one request does takes the loop down.

Nothing here imports mlx.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import zmq

from loractl import __version__
from loractl.config import ConfigError, DataFileError, load_config
from loractl.paths import Layout, UnsafeFolder
from loractl.protocol import JobState, ProtocolError
from loractl.supervisor import storecare
from loractl.supervisor.attempt import AttemptExit
from loractl.supervisor.channels import MAX_FRAME_BYTES, Publisher, TelemetryChannels
from loractl.supervisor.desktop import KeepAwake, Notifier, SideProcesses
from loractl.supervisor.exits import ExitHandler
from loractl.supervisor.handlers import HandlerContext, RequestHandlers, dispatch
from loractl.supervisor.jobqueue import JobQueue
from loractl.supervisor.policy import PolicySettings, StopReason
from loractl.supervisor.runner import Runner
from loractl.supervisor.settings import Settings
from loractl.supervisor.signals import Signals, Terminal, answer_signals
from loractl.supervisor.store import Job, Store, StoreCorrupt, StoreFull, disk_space_mb
from loractl.supervisor.system import SystemMemoryReader
from loractl.wire import receive

log = structlog.get_logger("loractl.supervisor")

# How a job left mid-stop by a supervisor that died is settled when its trainer is gone.
STOPPED_BY_USER = {JobState.PAUSING: JobState.PAUSED, JobState.CANCELLING: JobState.CANCELLED}
# How a job left mid-stop is stopped again when its trainer is adopted.
RESTOPPED = {JobState.PAUSING: "pause", JobState.CANCELLING: "cancel"}
# Control requests read and answered per turn of the loop: a flood of clients must not keep
# it from reaping, its timers and recording progress.
CONTROL_BATCH = 64
# run()'s answer when the store was found damaged while running: main() starts the
# supervisor afresh in this process, which repairs the store and adopts the trainer.
RESTART_TO_REPAIR = -1
# How the damage the running supervisor saw reaches the one that repairs it.
DAMAGE_ENV = "LORACTL_STORE_DAMAGED"


class AlreadyRunning(RuntimeError):
    pass


class Supervisor:
    """The loop and its wiring; see the module's docstring for who does what."""

    def __init__(self, home: str | Path | None = None, settings: Settings | None = None):
        self.layout = Layout.at(home)
        self.settings = settings or Settings.from_env()
        self.hostname = socket.gethostname()
        self.read_system = SystemMemoryReader(
            self.settings.pressure_interval_s, self.settings.pressure_level_file
        )
        self.side_processes = SideProcesses()
        self.notifier = Notifier(
            self.side_processes, self.settings.notifications, self.settings.notify_cmd
        )
        self.keep_awake = KeepAwake(
            self.side_processes, self.settings.keep_awake, self.settings.keep_awake_cmd
        )
        self.shutdown_requested = False
        self.started_at = time.time()
        self._dropped = 0  # control and telemetry frames we could not read
        self.disk_full: StoreFull | None = None
        self._next_disk_check = 0.0
        self.pending_exit: AttemptExit | None = None
        self._lock_fd: int | None = None
        # Started by launchd or systemd (which pass --wait-for-lock), not from a terminal.
        self.under_service = False
        self.signals = Signals()
        self.terminal = Terminal()
        # The previous supervisor of this home left its pidfile behind: it did not stop
        # cleanly, so the store gets the full integrity check.
        self.unclean_stop = False
        self.store_damaged: StoreCorrupt | None = None
        self.repair: storecare.Repair | None = None
        self._next_backup = time.monotonic() + storecare.backup_interval_s()
        self.requests_served = 0

    def wire(
        self,
        store: Store,
        telemetry: zmq.Socket[Any],
        events: zmq.Socket[Any] | None,
        poller: zmq.Poller | None = None,
    ) -> None:
        """Build the collaborators over an open store and bound sockets."""
        self.store = store
        self.publisher = Publisher(events, store)
        self.channels = TelemetryChannels(
            self.layout,
            telemetry,
            on_drop=self._drop_frame,
            poller=poller,
            telemetry_address=self.settings.telemetry_address,
        )
        self.queue = JobQueue(store, self.layout)
        self.runner = Runner(
            store,
            self.layout,
            self.settings,
            self.channels,
            self.publisher,
            self.keep_awake,
            self.read_system,
            is_known_job=self.queue.known,
        )
        self.exits = ExitHandler(
            store,
            self.queue,
            self.publisher,
            self.notifier,
            PolicySettings(
                early_death_limit=self.settings.early_death_limit,
                backoff_base_s=self.settings.backoff_base_s,
                backoff_cap_s=self.settings.backoff_cap_s,
                ladder_policy=self.settings.ladder_policy,
                ladder_margin=self.settings.ladder_margin,
            ),
            hostname=self.hostname,
            kill_attempt_of=self.runner.kill_attempt_of,
        )
        self.handlers = RequestHandlers(
            HandlerContext(
                store=store,
                layout=self.layout,
                settings=self.settings,
                queue=self.queue,
                runner=self.runner,
                read_system=self.read_system,
                publish_state=self.publisher.publish_state,
                request_shutdown=self.request_shutdown,
                started_at=self.started_at,
                dropped_frames=lambda: self.dropped_frames,
                last_ranks=self.exits.last_ranks,
            )
        )

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
                current: int | None = os.stat(self.layout.pidfile).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)
        if wait:
            self.layout.ensure()  # the supervisor we waited for took its socket folder away
        try:
            self.unclean_stop = bool(os.pread(fd, 64, 0).strip())
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as exc:  # a full disk: the lock is what counts, the pid is a courtesy
            log.warning("could not write the pidfile", error=str(exc))
        self._lock_fd = fd

    def run(self, wait_for_lock: bool = False) -> int:
        self.under_service = wait_for_lock
        self.acquire_lock(wait=wait_for_lock)
        # Before the store is opened: a damaged one is moved aside and rebuilt (or this
        # raises StoreUnrecoverable, which main() reports in one line).
        self.repair = storecare.ensure_sound(
            self.layout, full=self.unclean_stop, forced=os.environ.pop(DAMAGE_ENV, "")
        )
        if self.repair is not None:
            log.error(
                "the job database was damaged; rebuilt it",
                problem=self.repair.problem,
                moved_to=str(self.repair.moved_to),
                backup_used=self.repair.backup_used,
                recovered=self.repair.summary(),
            )
        context: zmq.Context[zmq.Socket[Any]] = zmq.Context.instance()
        control = context.socket(zmq.ROUTER)
        telemetry = context.socket(zmq.ROUTER)
        telemetry.setsockopt(zmq.ROUTER_MANDATORY, 1)
        events = context.socket(zmq.PUB)
        sockets = (control, telemetry, events)
        for sock in sockets:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        control.bind(self.layout.control)
        telemetry.bind(self.layout.telemetry)
        events.bind(self.layout.events)
        self.control = control
        wake_read, wake_write = socket.socketpair()
        wake_read.setblocking(False)
        wake_write.setblocking(False)
        signal.set_wakeup_fd(wake_write.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        # Installing a handler is what makes SIGCHLD reach the wake-up fd; the loop reaps on
        # every wake.
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        self.signals.install()
        poller = zmq.Poller()
        poller.register(control, zmq.POLLIN)
        poller.register(telemetry, zmq.POLLIN)
        poller.register(wake_read, zmq.POLLIN)
        self.wire(Store(self.layout.database), telemetry, events, poller)
        self.store.on_corrupt = self.on_store_corrupt
        log.info(
            "supervisor started",
            version=__version__,
            pid=os.getpid(),
            home=str(self.layout.home),
            inbox=str(self.layout.inbox),
            clean_start=not self.unclean_stop,
            under_service=self.under_service,
        )
        # A clean start's store is the one worth keeping a copy of; after a crash it may
        # have lost its last commits, and the backup taken before them knows more.
        self._next_backup = (
            0.0
            if self.repair is None and not self.unclean_stop
            else (time.monotonic() + storecare.backup_interval_s())
        )
        self.inbox = self._make_inbox(wake_write)
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
                self._survive("answering signals", answer_signals, self)
                self._survive("reading telemetry", self.drain_telemetry, ready)
                # Reaping and timers first; then at most one batch of requests, the rest
                # wait for the next turn (the poller finds them at once).
                self._survive("the loop's periodic work", self.tick)
                if control in ready:
                    self._survive("serving requests", self.drain_control)
        finally:
            self.keep_awake.release()
            self.inbox.stop()
            signal.set_wakeup_fd(-1)
            wake_read.close()
            wake_write.close()
            for sock in sockets:
                sock.close()
            self.channels.close_remote()
            self.store.close()
            self._remove_runtime_files()
            # A clean stop leaves no pidfile: one that is left means a crash (doctor says so).
            self.layout.pidfile.unlink(missing_ok=True)
            if self._lock_fd is not None:
                os.close(self._lock_fd)
        if self.store_damaged is not None:
            log.error("restarting to repair the job database", problem=self.store_damaged.detail)
            return RESTART_TO_REPAIR
        log.info("supervisor stopped")
        return 0

    def _make_inbox(self, wake_write: socket.socket) -> Any:
        from loractl.supervisor.inbox import Inbox
        from loractl.supervisor.store import new_job_id

        def wake() -> None:
            try:
                wake_write.send(b"\0")
            except BlockingIOError:
                pass  # the loop is already due to wake up

        return Inbox(
            self.layout.inbox,
            self.layout.home,
            enqueue=self.queue.enqueue_claimed,
            is_known=self.queue.known,
            new_id=new_job_id,
            wake=wake,
        )

    def _remove_runtime_files(self) -> None:
        """Take our socket files and their folder away; we still hold the lock, so no other
        supervisor of this home can have bound them since."""
        for name in ("control", "events", "telemetry"):
            (self.layout.runtime / name).unlink(missing_ok=True)
        try:
            self.layout.runtime.rmdir()
        except OSError:
            pass  # something else lives there: leave it

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        self.shutdown_requested = True

    def request_shutdown(self) -> None:
        self.shutdown_requested = True

    def on_store_corrupt(self, exc: StoreCorrupt) -> None:
        """The store was found damaged while running: stop serving (the trainer runs on)
        and start again, repairing it; the trainer is then adopted."""
        self.store_damaged = self.store_damaged or exc

    def _finished_shutdown(self) -> bool:
        if self.store_damaged is not None:
            return True
        if not self.shutdown_requested:
            return False
        if self.runner.attempt is None:
            return True
        self.runner.shut_down()
        return False

    # -- recovery after a restart ----------------------------------------------------------

    def recover(self) -> None:
        """Resolve every job a previous supervisor left active: adopt its trainer or resume.
        Job folders the store lost (rolled back, or rebuilt) come back first, adopting
        their live trainers. Safe to run again after a write failed midway (a full disk)."""
        for found in storecare.restore_lost_jobs(self.store, self.layout, read_the_backup=True):
            log.warning("job recovered", job=found.job_id, state=str(found.state), how=found.how)
        for job in self.store.active():
            if job.state == JobState.BACKOFF:
                self.queue.rearm_backoff(job)
            elif self.runner.running(job.id):
                continue  # adopted, and recorded, on an earlier try
            elif self.runner.attempt is not None and self.runner.adoptable(job):
                self.runner.stop_second(job)
            elif self.runner.adoptable(job):
                attempt = self.runner.adopt(job)
                if job.state in RESTOPPED:  # the stop it was carrying out goes on
                    wish = RESTOPPED[job.state]
                    attempt.user_wish = wish
                    reason = StopReason.USER_PAUSE if wish == "pause" else StopReason.USER_CANCEL
                    attempt.rearm_stop(reason, self.settings.stop_grace_s)
            elif job.state in STOPPED_BY_USER:
                self.store.transition(
                    job.id,
                    STOPPED_BY_USER[job.state],
                    "supervisor restarted; trainer gone, stopped as the user asked",
                    trainer_pid=None,
                )
            else:
                self.store.transition(
                    job.id,
                    JobState.QUEUED,
                    "supervisor restarted; trainer gone, resuming from checkpoint",
                    trainer_pid=None,
                )
        if self.unclean_stop or self.repair is not None:  # the store may have been rolled back
            self.runner.settle_finished(self.store.list({JobState.QUEUED, JobState.BACKOFF}))
        self.runner.recovered = True

    # -- the loop's periodic work -----------------------------------------------------------

    def _survive(self, during: str, work: Callable[..., object], *args: Any) -> None:
        """Run one piece of the loop's work; an exception is logged, never fatal. Errors
        that belong to one job are caught closer to it (see ``job_failed_internally``)."""
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
        space = disk_space_mb(self.layout.home)
        if space is None:
            return True
        free_mb, total_mb, _ = space
        # A small volume never gets the full margin back; a quarter of it will do.
        if free_mb < min(self.settings.disk_resume_mb, total_mb / 4):
            return True
        log.info("disk space is back; resuming writes", free_mb=round(free_mb, 1))
        self.disk_full = None
        return False

    def tick(self) -> None:
        now = time.monotonic()
        self.handlers.relief.settle(now)
        if self._disk_still_full(now):
            # Reads and requests are still served; nothing else writes until there is room,
            # but an ended trainer is reaped and its exit kept for then.
            ended = self.runner.reap_only()
            if ended is not None:
                self.pending_exit = ended
            return
        if not self.runner.recovered:
            self._survive("recovering", self.recover)
        if self.pending_exit is not None:
            self.handle_exit(self.pending_exit)
        if self.pending_exit is None:
            self._survive("watching the trainer", self._watch_attempt, now)
        self.side_processes.reap()
        if now >= self._next_backup:
            self._survive("backing up the store", self.back_up, now)
        for result in self.inbox.poll():
            self._report_intake(result)
        if self.shutdown_requested or self.settings.hold_queue or not self.runner.recovered:
            return
        if self.runner.attempt is None and self.pending_exit is None:
            job = self.queue.next_job(now)
            if job is not None:
                self.start(job)

    def back_up(self, now: float) -> None:
        """Refresh the store's backup copy (at a clean start, then daily); a failure is
        tried again in an hour."""
        self._next_backup = now + 3600.0
        self.store.backup_to(storecare.backup_path(self.layout))
        self._next_backup = now + storecare.backup_interval_s()
        log.info("store backed up", path=str(storecare.backup_path(self.layout)))

    def _watch_attempt(self, now: float) -> None:
        ended = self.runner.poll(now)
        if ended is not None:
            self.handle_exit(ended)

    def handle_exit(self, ended: AttemptExit) -> None:
        """The exit handler, guarded: a full disk keeps the exit pending (retried once there
        is space, never lost); any other error fails just this job."""
        try:
            self.exits.on_exit(ended)
            self.pending_exit = None
        except StoreFull as exc:
            self.pending_exit = ended
            self.on_store_full(exc)
        except Exception as exc:
            self.pending_exit = None
            self.exits.job_failed_internally(ended.job_id, "handling its trainer's exit", exc)

    def start(self, job: Job) -> None:
        """The job's next attempt; a job that cannot start fails with the reason, and the
        queue goes on."""
        try:
            cfg = load_config(job.config_path)
        except ConfigError as exc:
            bad_data = isinstance(exc, DataFileError)  # a data file turned device or FIFO
            what = "its data can no longer be read" if bad_data else "config no longer loads"
            self.exits.fail(job, "data_error" if bad_data else "config_error", f"{what}: {exc}")
            return
        try:
            self.runner.start(job, cfg)
        except StoreFull as exc:
            # The job stays queued; a trainer we could not record must not run unwatched.
            self.runner.kill_attempt_of(job.id)
            self.on_store_full(exc)
        except Exception as exc:
            self.exits.job_failed_internally(job.id, "starting its trainer", exc)

    def _report_intake(self, result: Any) -> None:
        from loractl.protocol import RejectedEvent
        from loractl.supervisor.inbox import Accepted

        if isinstance(result, Accepted):
            log.info("inbox: queued", job=result.job_id, source=result.source)
            self.publisher.publish_state(result.job_id, source=result.source)
        else:
            log.warning("inbox: rejected", name=result.name, reason=result.reason)
            self.publisher.publish(
                "rejected", RejectedEvent(name=result.name, reason=result.reason)
            )

    # -- sockets ----------------------------------------------------------------------------

    @property
    def dropped_frames(self) -> int:
        """Frames dropped unread, and telemetry from strangers, since the start."""
        return self._dropped + self.runner.dropped_frames

    def _drop_frame(self, error: ProtocolError) -> None:
        self._dropped += 1
        log.warning("dropped frame", reason=error.reason)

    def drain_telemetry(self, ready: dict[Any, int]) -> None:
        for message in self.channels.messages(ready):
            self.runner.take(message)

    def drain_control(self) -> None:
        # Frame by frame: a flood of frames is dropped unread, never echoed as an envelope.
        # One batch per turn: what is left waits for the next (after reaping and timers).
        for frames in itertools.islice(receive(self.control, self._drop_frame), CONTROL_BATCH):
            self.requests_served += 1
            envelope, payload = frames[:-1], frames[-1]
            reply = self.dispatch(payload)  # still answers malformed or wrong-version requests
            try:
                self.control.send_multipart([*envelope, reply.encode()], zmq.NOBLOCK)
            except zmq.ZMQError:
                self._dropped += 1

    def dispatch(self, payload: bytes) -> Any:
        return dispatch(self.handlers, payload, self._count_malformed)

    def _count_malformed(self) -> None:
        self._dropped += 1


def main(home: str | None = None, wait_for_lock: bool = False) -> int:
    """The supervisor's entry point. Exit codes suit a keep-alive service manager: 0 only for
    a requested stop (SIGTERM, ``loractl daemon stop``), 3 when another supervisor holds the
    home and ``wait_for_lock`` is off, 78 (see ``storecare.unfixable_exit``) for what only the user
    can fix, anything else is a crash worth a restart."""
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
        return storecare.unfixable_exit(wait_for_lock)
    configure_logging(supervisor.layout.logs)
    try:
        code = supervisor.run(wait_for_lock=wait_for_lock)
    except AlreadyRunning as exc:
        print(f"loractl: {exc}", file=sys.stderr)
        return 3
    except UnsafeFolder as exc:
        # Someone else's (or an open) folder where our sockets or state would go: binding
        # there would let them answer for us. Only the user can fix it.
        log.error("refusing to start", reason=str(exc))
        return storecare.unfixable_exit(wait_for_lock)
    except storecare.StoreUnrecoverable as exc:
        log.error("refusing to start", reason=str(exc))
        print(f"loractl: {exc}", file=sys.stderr)
        return storecare.unfixable_exit(wait_for_lock)
    if code == RESTART_TO_REPAIR:
        damaged = supervisor.store_damaged
        storecare.restart_to_repair(
            supervisor.layout.home, wait_for_lock, damaged.detail if damaged else "", DAMAGE_ENV
        )
    return code
