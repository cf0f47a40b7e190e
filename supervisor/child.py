"""The trainer child, as the supervisor sees it: spawning it, its telemetry, the watchdog
(heartbeats, progress, memory), stopping it with signals, and reaping it.

A mixin of :class:`loractl.supervisor.service.Supervisor`: it uses the supervisor's store,
settings, layout and sockets, and keeps the one live :class:`Trainer` in ``self.trainer``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import structlog
import zmq

from loractl.config import ConfigError, JobConfig, load_config
from loractl.distributed import free_port_range, launch_command, remote_hosts
from loractl.memory import footprint_mb, total_mb
from loractl.protocol import (
    ExitCode,
    Heartbeat,
    Message,
    ProtocolError,
    TrainerCommand,
    TrainerEvent,
)
from loractl.supervisor.ladder import (
    describe_rung,
    rung_overrides,
)
from loractl.supervisor.launcher import (
    LAUNCHER_GRACE_S,
    LaunchedRanks,
    launcher_stdin,
    signal_if_alive,
)
from loractl.supervisor.pressure import Pressure, cgroup_oom_kill_count, read_system_memory
from loractl.supervisor.ranks import (
    Rank,
    attempt_exit,
    launched_by,
    local_rank_processes,
)
from loractl.supervisor.store import (
    Job,
    JobState,
)
from loractl.wire import drain

log = structlog.get_logger("loractl.supervisor")

STDERR_TAIL_BYTES = 8192


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
    # The exit code the trainer announced (done: 0, stopped: 82, error: its code): the only
    # word on how an adopted trainer, not our child, ended.
    reported_exit: int | None = None
    # A pause or cancel asked for while a hang or memory stop was already under way: carried
    # out after the exit, so that stop keeps its own reason and grace.
    then: str | None = None
    crash_recorded: bool = False
    cgroup_oom_at_start: int | None = None
    pressure_seen: str = "normal"
    # A distributed attempt: ``pid`` is mlx.launch's, and each rank reports on its own.
    world_size: int = 1
    ranks: dict[int, Rank] = field(default_factory=dict)
    # The rank blamed for this attempt's end: the first to die, hang or outgrow its budget.
    culprit: int | None = None
    # Some ranks run on other Macs: they report over the CURVE-secured TCP socket.
    remote: bool = False
    lingering_since: float | None = None
    ranks_killed: bool = False  # SIGKILL went to the local ranks; the launcher is next

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def recent_footprint(self) -> float | None:
        if self.culprit is not None and self.culprit in self.ranks:
            return self.ranks[self.culprit].footprint_mb
        return max(self.footprints) if self.footprints else None

    def live_ranks(self) -> list[Rank]:
        return [rank for rank in self.ranks.values() if rank.ended_at is None]

    def describe_ranks(self) -> list[dict]:
        """The ranks as ``show --json`` lists them, rank 0 first."""
        return [self.ranks[number].describe() for number in sorted(self.ranks)]


def _is_trainer_of(pid: int, job_id: str) -> bool:
    """Whether ``pid`` really is a loractl trainer of ``job_id`` (a heartbeat can claim any
    pid; only the process table is proof)."""
    try:
        cmdline = psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return "loractl.daemon.trainer" in cmdline and job_id in cmdline


class TrainerChild(LaunchedRanks):
    """Spawn, watch, stop and reap the one trainer (for a distributed job: its launcher)."""

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

    def attempt_command(self, job: Job, cfg: JobConfig, attempt: int) -> tuple[list[str], bool]:
        """The argv of one attempt, and whether some of its ranks run on other Macs: the
        trainer, or for a distributed job mlx.launch running the trainer on every rank."""
        remote = remote_hosts(cfg.distributed) if cfg.world_size > 1 else []
        endpoint = self._telemetry_endpoint(job.id, attempt, remote)
        command = [
            sys.executable,
            "-m",
            "loractl.daemon.trainer",
            job.config_path,
            "--telemetry",
            endpoint,
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
        if remote:
            from loractl.keys import keys_folder

            command += ["--keys-dir", str(keys_folder(self.layout.home))]
        if cfg.world_size > 1:
            section = cfg.distributed
            port = None if section.get("starting_port") else free_port_range(cfg.world_size)
            command = launch_command(section, command, starting_port=port)
        return command, bool(remote)

    @staticmethod
    def _start(command: list[str], cfg: JobConfig, stderr_path: Path, cwd: Path):
        stdin, keep_open, ends = subprocess.DEVNULL, (), ()
        if cfg.world_size > 1:
            ends = launcher_stdin()
            stdin, keep_open = ends[1].fileno(), (ends[0].fileno(),)
        try:
            with stderr_path.open("ab") as stderr:
                # A new session: a signal aimed at the supervisor's process group (Ctrl-C,
                # launchd stopping the agent) must not kill the trainer before it can
                # checkpoint. For a distributed job the session holds the launcher and its
                # local ranks, so one killpg reaches them all.
                popen = subprocess.Popen(
                    command,
                    stdin=stdin,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    start_new_session=True,
                    cwd=cwd,
                    pass_fds=keep_open,
                )
        finally:
            for end in ends:
                end.close()
        return popen

    def spawn(self, job: Job) -> None:
        try:
            cfg = self._load_job_config(job)
        except ConfigError as exc:
            self._fail(job, "config_error", f"config no longer loads: {exc}")
            return
        attempt = job.attempt + 1
        stderr_path = self._stderr_path(job.id, attempt)
        stderr_path.parent.mkdir(parents=True, exist_ok=True)
        command, remote = self.attempt_command(job, cfg, attempt)
        try:
            popen = self._start(command, cfg, stderr_path, self.layout.job_dir(job.id))
        except BaseException:
            if remote:
                self.close_remote_telemetry()
            raise
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
            world_size=cfg.world_size,
            remote=bool(remote),
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
        self.publish_state(job.id, pid=popen.pid)
        log.info(
            "spawned trainer",
            job=job.id,
            pid=popen.pid,
            attempt=attempt,
            rung=job.rung,
            ranks=cfg.world_size,
        )

    def _note_peak(self, trainer: Trainer, footprint: float) -> None:
        if footprint > trainer.peak_mb * 1.01:
            trainer.peak_mb = footprint
            self.store.note_peak(trainer.job_id, trainer.rung, footprint)

    def send_command(self, pid: int, action: str) -> bool:
        trainer = self.trainer
        remote = trainer is not None and trainer.remote and self.remote_telemetry is not None
        sock = self.remote_telemetry if remote else self.telemetry
        try:
            sock.send_multipart(
                [f"trainer-{pid}".encode(), TrainerCommand(action=action).encode()], zmq.NOBLOCK
            )
            return True
        except zmq.ZMQError:
            return False  # not connected (yet, or any more): signals still work

    def command_all(self, trainer: Trainer, action: str) -> None:
        """Send ``action`` to the trainer, or to every rank still running."""
        if not trainer.distributed:
            self.send_command(trainer.pid, action)
            return
        for rank in trainer.live_ranks():
            self.send_command(rank.pid, action)

    def guard_memory(self) -> None:
        trainer = self.trainer
        rank = None
        if trainer.distributed:
            footprint, rank = self._rank_footprints(trainer)
        else:
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
            where = {"rank": rank} if rank is not None else {}
            self.store.record(
                trainer.job_id,
                "memory_guard",
                action="stop",
                footprint_mb=round(footprint, 1),
                budget_mb=round(trainer.budget_mb, 1),
                grace_s=grace,
                **where,
            )
            log.warning(
                "over budget; stopping trainer",
                footprint=footprint,
                budget=trainer.budget_mb,
                grace_s=grace,
                **where,
            )
            trainer.culprit = rank
            self.stop_trainer("memory", grace=grace)
            trainer.footprint_at_stop = footprint
            return
        if critical and self._biggest_consumer(self._trainer_pids(trainer)):
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
                self.command_all(trainer, "checkpoint_now")
                self.command_all(trainer, "clear_cache")
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
    def _trainer_pids(trainer: Trainer) -> set[int]:
        if trainer.distributed:
            return {rank.pid for rank in trainer.live_ranks() if rank.local}
        return {trainer.pid}

    @staticmethod
    def _biggest_consumer(pids: set[int]) -> bool:
        biggest = max(
            psutil.process_iter(["pid", "memory_info"]),
            key=lambda p: p.info["memory_info"].rss if p.info["memory_info"] else 0,
            default=None,
        )
        return biggest is not None and biggest.info["pid"] in pids

    def check_liveness(self) -> None:
        trainer = self.trainer
        if trainer.distributed:
            self._watch_ranks(trainer)
        if trainer.stop_reason is not None:
            return
        now = time.monotonic()
        if trainer.distributed:
            self._check_ranks(trainer, now)
            return
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
        if self._stalled(trainer, now):
            self._hang(trainer, f"no progress for {now - trainer.last_progress:.0f} s")

    def _stalled(self, trainer: Trainer, now: float) -> bool:
        """Training, yet no new step for far longer than the slowest step and eval so far."""
        if trainer.phase not in ("train", "eval") or trainer.step < 0:
            return False
        stall = max(
            self.settings.stall_min_s,
            self.settings.stall_factor * (trainer.max_step_seconds + trainer.max_eval_seconds),
        )
        return now - trainer.last_progress > stall

    def _hang(self, trainer: Trainer, why: str) -> None:
        where = {"rank": trainer.culprit} if trainer.distributed else {}
        self.store.record(trainer.job_id, "hang_detected", reason=why, pid=trainer.pid, **where)
        log.warning("trainer hung", why=why, pid=trainer.pid, **where)
        self.stop_trainer("hang", grace=self.settings.hang_grace_s)

    def user_stop(self, wish: str) -> None:
        """Pause or cancel the running trainer. A stop already under way keeps its reason
        and grace (a hung trainer still gets the short one, a memory stop still steps down);
        the user's wish is carried out once it has exited."""
        trainer = self.trainer
        if trainer.stop_reason is None:
            self.stop_trainer(f"user-{wish}", grace=self.settings.stop_grace_s)
        elif trainer.stop_reason in ("user-pause", "user-cancel", "shutdown"):
            if wish == "cancel":
                trainer.stop_reason = "user-cancel"  # cancel wins over pause; same grace
        else:
            trainer.then = wish

    def stop_trainer(self, reason: str, grace: float) -> None:
        trainer = self.trainer
        trainer.stop_reason = reason
        trainer.stop_sent_at = time.monotonic()
        trainer.kill_at = trainer.stop_sent_at + grace
        if trainer.distributed:
            self._stop_ranks(trainer)
            return
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
        if trainer.distributed and not trainer.remote and not trainer.ranks_killed:
            # The ranks first, the launcher left to log how each ended (the only record of a
            # rank killed from outside) and exit; its session goes only if it lingers.
            trainer.ranks_killed = True
            trainer.kill_at = time.monotonic() + LAUNCHER_GRACE_S
            for pid in {r.pid for r in trainer.live_ranks()} | set(
                local_rank_processes(trainer.pid)
            ):
                signal_if_alive(pid, signal.SIGKILL)
            return
        self._kill_all(trainer)

    @staticmethod
    def _kill_all(trainer: Trainer) -> None:
        """SIGKILL the trainer; for a distributed job, its launcher's whole session: every
        local rank and every ssh that carries a remote one (which then gets SIGHUP)."""
        if trainer.distributed:
            try:
                if os.getpgid(trainer.pid) == trainer.pid:
                    os.killpg(trainer.pid, signal.SIGKILL)
                    return
            except ProcessLookupError:
                return
        signal_if_alive(trainer.pid, signal.SIGKILL)

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
            # Not our child: its exit status is lost; what it announced is what we know.
            exit_code, signum = trainer.reported_exit, None
        if trainer.distributed:
            if self._ranks_linger(trainer):
                return  # the next attempt must not overlap this one's last rank
            # The launcher's own status says nothing; the ranks' ends do.
            self._watch_ranks(trainer)
            exit_code, signum, rank = attempt_exit(
                trainer.ranks, trainer.world_size, self._stderr_tail(trainer), trainer.culprit
            )
            trainer.culprit = rank
        self.trainer = None
        self.keep_awake.release()
        if trainer.remote:
            self.close_remote_telemetry()
        self.handle_exit(trainer, exit_code, signum)

    def kill_trainer_of(self, job_id: str) -> None:
        """SIGKILL and reap ``job_id``'s trainer, if it is the one we run; forget it."""
        trainer = self.trainer
        if trainer is None or trainer.job_id != job_id:
            return
        self._kill_all(trainer)
        if trainer.popen is not None:
            trainer.popen.wait()
        self.trainer = None
        self.keep_awake.release()
        if trainer.remote:
            self.close_remote_telemetry()

    def _stderr_tail(self, trainer: Trainer) -> str:
        try:
            with trainer.stderr_path.open("rb") as handle:
                handle.seek(0, os.SEEK_END)
                size = handle.tell()
                handle.seek(max(0, size - STDERR_TAIL_BYTES))
                return handle.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _drop(self, error: ProtocolError) -> None:
        self.dropped_frames += 1
        log.warning("dropped telemetry frame", reason=error.reason)

    def drain_telemetry(self, sock: zmq.Socket | None = None) -> None:
        for _frames, message in drain(sock or self.telemetry, self._drop):
            trainer = self.trainer
            if trainer is None or not self._from_trainer(trainer, message):
                self._stray(message)
                continue
            if isinstance(message, Heartbeat):
                self.on_heartbeat(trainer, message)
            elif isinstance(message, TrainerEvent):
                self.on_trainer_event(trainer, message)

    def _from_trainer(self, trainer: Trainer, message: Message) -> bool:
        """Whether a message comes from the running attempt: its trainer, or for a
        distributed job one of its ranks (a local one proven by the process table)."""
        pid = getattr(message, "pid", None)
        if not trainer.distributed:
            return pid == trainer.pid
        if getattr(message, "job_id", None) != trainer.job_id:
            return False
        rank_number = getattr(message, "rank", None)
        known = trainer.ranks.get(rank_number)
        if known is not None:
            return known.pid == pid
        if not isinstance(rank_number, int) or not 0 <= rank_number < trainer.world_size:
            return False
        started_at = launched_by(pid, trainer.pid) if isinstance(pid, int) else None
        host = getattr(message, "host", "")
        local = started_at is not None
        if not local and (not trainer.remote or not host or host == self.hostname):
            # Claims this machine but the launcher did not start it, or another Mac for a
            # job that has no ranks there.
            return False
        trainer.ranks[rank_number] = Rank(
            rank=rank_number, pid=pid, host=host, local=local, started_at=started_at
        )
        log.info("rank joined", job=trainer.job_id, rank=rank_number, pid=pid, host=host)
        return True

    def _stray(self, message: Message) -> None:
        """A trainer we do not own is talking. If it is an orphan of one of our jobs, stop it:
        one job must never have two trainers."""
        pid = getattr(message, "pid", 0)
        job_id = getattr(message, "job_id", "")
        if not pid or not job_id:
            self.dropped_frames += 1
            return
        if not self.recovered:
            return  # until recovery has run, a trainer of ours is not a stray but unadopted
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
        trainer.last_heartbeat = now
        step = beat.step
        if trainer.distributed:
            rank = trainer.ranks[beat.rank]
            rank.last_heartbeat, rank.step = now, beat.step
            if beat.footprint_mb:
                rank.footprint_mb = beat.footprint_mb
            # The job is as far as its slowest rank, and alive once every rank has spoken.
            step = min(r.step for r in trainer.ranks.values())
        if step != trainer.step:
            trainer.step = step
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
        everyone = len(trainer.ranks) == trainer.world_size or not trainer.distributed
        # On the stored state, not "the first heartbeat": if that write failed (a full disk),
        # the next heartbeat makes it again.
        if job.state == JobState.STARTING and everyone:
            why = f"all {trainer.world_size} ranks heartbeat" if trainer.distributed else ""
            self.store.transition(
                job.id, JobState.RUNNING, why or "first heartbeat", early_deaths=0
            )
            self.publish_state(job.id)
        self.store.update(
            job.id,
            step=max(trainer.step, 0),
            examples_seen=beat.examples_seen,
            total_examples=beat.total_examples,
            last_checkpoint_step=trainer.last_checkpoint_step,
        )
        self.publish("heartbeat", beat)

    def on_trainer_event(self, trainer: Trainer, event: TrainerEvent) -> None:
        if event.kind == "checkpoint":
            trainer.last_checkpoint_step = event.step
            trainer.last_progress = time.monotonic()
            self.store.update(trainer.job_id, last_checkpoint_step=event.step)
        elif event.kind in ("oom_retry", "error"):
            where = {"rank": event.rank} if trainer.distributed else {}
            self.store.record(trainer.job_id, f"trainer_{event.kind}", **event.detail, **where)
        if event.kind in ("done", "stopped", "error"):
            announced = {"done": int(ExitCode.DONE), "stopped": int(ExitCode.STOPPED)}.get(
                event.kind, event.detail.get("exit_code")
            )
            announced = announced if isinstance(announced, int) else None
            if trainer.distributed:
                self._rank_announced(trainer, event, announced)  # one rank's word
            elif announced is not None:
                trainer.reported_exit = announced
        self.publish("trainer_event", event)
