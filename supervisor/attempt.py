"""One attempt of a job: a single trainer, or mlx.launch with one trainer per rank.

An :class:`Attempt` owns the attempt's whole life, as supervisord's ``Subprocess`` owns a
child's: the spawn, the telemetry it takes in, liveness (heartbeats and progress), memory
readings and the guard, the stop and its escalation, and the reaping. The service loop calls
:meth:`Attempt.poll` every tick and gets an :class:`AttemptExit` once the attempt is over; it
never reaches inside.

An attempt knows nothing of the store, the queue or requests. What it notices for the job's
history (a hang, a memory-guard stop, a lost rank, a new peak) goes out through the
:class:`AttemptHooks` it was given, and trainer commands go out through them too, so a unit
test builds an attempt over a real process with a hand-written fake for the hooks.

A distributed attempt's ``pid`` is mlx.launch's. Its exit status says nothing (it exits 0
when a rank is killed), so each rank is followed on its own: by its heartbeats and announced
exit, and for a rank on this machine by the process table (see :mod:`.ranks`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil
import structlog

from loractl.distributed import RankHost
from loractl.memory import footprint_mb
from loractl.protocol import ExitCode, Heartbeat, Message, TrainerEvent
from loractl.supervisor.classify import split_returncode
from loractl.supervisor.hostwait import LAUNCHING
from loractl.supervisor.launcher import (
    LAUNCHER_GRACE_S,
    LINGER_S,
    launcher_stdin,
    signal_if_alive,
)
from loractl.supervisor.policy import StopReason
from loractl.supervisor.pressure import Pressure, SystemMemory, cgroup_oom_kill_count
from loractl.supervisor.processes import (
    biggest_consumer,
    describe_consumers,
    launched_by,
    other_consumers,
    process_alive,
    trainers_under,
)
from loractl.supervisor.ranks import Rank, attempt_exit, launcher_exits, lost_words
from loractl.supervisor.settings import Settings

log = structlog.get_logger("loractl.supervisor")

STDERR_TAIL_BYTES = 8192
# What one tick reads of the launcher's stderr for news of the ranks.
NEWS_READ_BYTES = 256 * 1024

# The phases in which a trainer is expected to make steady progress, step after step.
PROGRESS_PHASES = ("train", "eval")
# The phases a trainer must leave, or show a sign of life in ("loading" trainer events),
# within the stall timeout: a FIFO as a data file or a dead mount blocks it in "loading" for
# ever while its heartbeat thread goes on. "done" is the exit itself, watched by reaping.
PHASES_NOT_WATCHED = ("starting", "done")


class AttemptHooks(Protocol):
    """What an attempt tells the rest of the supervisor, and how it reaches its trainers."""

    def record(self, job_id: str, kind: str, **detail: Any) -> None:
        """An event for the job's history (hang_detected, memory_guard, rank_lost, ...)."""

    def peak(self, job_id: str, rung: int, footprint_mb: float) -> None:
        """A new highest footprint on this rung."""

    def command(self, pid: int, action: str, remote: bool) -> bool:
        """Send a trainer command; False when it cannot be delivered (not connected)."""


@dataclass(frozen=True)
class AttemptSpec:
    """What the service decided for this attempt before it started."""

    job_id: str
    attempt: int
    rung: int
    stderr_path: Path
    budget_mb: float
    heartbeat_timeout: float
    world_size: int = 1
    # Some ranks run on other Macs and report over the CURVE-secured TCP socket.
    remote: bool = False
    # Where each rank runs, in rank order (mlx.launch's layout); empty for one trainer.
    rank_hosts: tuple[RankHost, ...] = ()
    # From launch (for remote ranks: once their hosts answer ssh) until every rank must
    # have reported; None: the supervisor's startup_timeout_s.
    startup_timeout: float | None = None
    heartbeat_interval: float = 1.0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass
class AttemptExit:
    """How an attempt ended: everything the classifier and the restart policy need."""

    spec: AttemptSpec
    pid: int
    exit_code: int | None
    signum: int | None
    stop_reason: StopReason | None
    # A pause, cancel or resume the user asked for while a stop was under way.
    user_wish: str | None
    heartbeat_seen: bool
    step: int
    last_checkpoint_step: int | None
    recent_footprint_mb: float | None
    pressure_seen: str
    cgroup_oom_kills_delta: int
    stderr_tail: str
    # The rank blamed for the end (distributed: the first to fail); None for one process.
    culprit: Rank | None = None
    # How the supervisor learned the culprit was gone, when it could not say it itself.
    culprit_lost: str = ""
    ranks: list[dict[str, Any]] = field(default_factory=list)
    # Set once its crash is stored, so handling the exit again (after a full disk) does not
    # record it twice.
    crash_recorded: bool = False
    plan_recorded: bool = False  # the rungs a step down skipped, likewise
    examples_seen: int = 0
    total_examples: int = 0

    @property
    def job_id(self) -> str:
        return self.spec.job_id


@dataclass(frozen=True)
class AttemptView:
    """The running attempt, read-only, as `show` and `status` see it."""

    job_id: str
    attempt: int
    rung: int
    pid: int
    phase: str
    step: int
    stop_reason: str | None
    ranks: list[dict[str, Any]]


def start_process(command: list[str], spec: AttemptSpec, cwd: Path) -> subprocess.Popen[bytes]:
    """Start the attempt's process in a session of its own: a signal aimed at the supervisor's
    process group (Ctrl-C, launchd stopping the agent) must not kill the trainer before it can
    checkpoint. For a distributed job the session holds the launcher and its local ranks, so
    one killpg reaches them all."""
    stdin: int = subprocess.DEVNULL
    keep_open: tuple[int, ...] = ()
    ends: tuple[Any, ...] = ()
    if spec.distributed:
        ends = launcher_stdin()
        stdin, keep_open = ends[1].fileno(), (ends[0].fileno(),)
    spec.stderr_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with spec.stderr_path.open("ab") as stderr:
            return subprocess.Popen(
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


class Attempt:
    """One launch of a job, from spawn to reaping."""

    def __init__(
        self,
        spec: AttemptSpec,
        *,
        pid: int,
        popen: subprocess.Popen[bytes] | None,
        settings: Settings,
        hooks: AttemptHooks,
        read_system: Callable[[], SystemMemory],
        last_checkpoint_step: int | None = None,
        step: int = -1,
        heard: bool = False,
        started_at: float | None = None,
    ):
        self.spec = spec
        self.pid = pid
        # None when adopted from a previous supervisor: not our child, its status is lost.
        self.popen = popen
        self.settings = settings
        self.hooks = hooks
        self.read_system = read_system
        now = time.monotonic()
        self.spawned_at = now
        # An adopted trainer gets one heartbeat timeout to speak up.
        self.last_heartbeat: float | None = now if heard else None
        self.last_progress = now
        self.step = step
        self.examples_seen = 0
        self.total_examples = 0
        self.last_checkpoint_step = last_checkpoint_step
        self.max_step_seconds = 0.0
        self.max_eval_seconds = 0.0
        self.max_checkpoint_seconds = 0.0
        self.phase = "starting"
        # What a loading trainer said it was doing last ("reading and tokenizing the data").
        self.loading_stage = ""
        self.footprints: deque[float] = deque(maxlen=50)
        self.peak_mb = 0.0
        self.pressure_seen = str(Pressure.NORMAL)
        # Our child shares our cgroup, and our pid outlives it for the exit check. An adopted
        # trainer may sit in another cgroup: its kills are not ours to count.
        self.cgroup_oom_at_start = cgroup_oom_kill_count(os.getpid()) if popen is not None else None
        # When the process started: an adopted trainer's pid may be reused once it is gone,
        # and another process must never be taken for it (or signalled).
        self.started_at = started_at
        # The exit code the trainer announced (done: 0, stopped: 82, error: its code): the
        # only word on how an adopted trainer, not our child, ended.
        self.reported_exit: int | None = None
        self.stop_reason: StopReason | None = None
        self.stop_sent_at: float | None = None
        self.footprint_at_stop: float | None = None
        self.kill_at: float | None = None
        self.user_wish: str | None = None
        self.ranks: dict[int, Rank] = {}
        # The rank blamed for this attempt's end: the first to die, hang or outgrow its budget.
        self.culprit: int | None = None
        self.lingering_since: float | None = None
        self.ranks_killed = False  # SIGKILL went to the local ranks; the launcher is next
        # When the ranks were launched: at once, or once hostwait found every host answering
        # ssh (its LAUNCHING line). The start-up allowance counts from here.
        self.launched_at: float | None = None if spec.remote else now
        # How far the launcher's stderr has been read for news of the ranks.
        self._news_offset = 0
        self._news_partial = b""
        # The culprit's end in words, when the supervisor had to work it out.
        self.culprit_lost = ""
        self._next_guard = 0.0
        self._last_warn_action = 0.0

    @classmethod
    def launch(
        cls,
        spec: AttemptSpec,
        command: list[str],
        cwd: Path,
        *,
        settings: Settings,
        hooks: AttemptHooks,
        read_system: Callable[[], SystemMemory],
        last_checkpoint_step: int | None = None,
    ) -> Attempt:
        popen = start_process(command, spec, cwd)
        return cls(
            spec,
            pid=popen.pid,
            popen=popen,
            settings=settings,
            hooks=hooks,
            read_system=read_system,
            last_checkpoint_step=last_checkpoint_step,
        )

    # -- what others may read ------------------------------------------------------------

    @property
    def job_id(self) -> str:
        return self.spec.job_id

    @property
    def distributed(self) -> bool:
        return self.spec.distributed

    @property
    def heartbeat_seen(self) -> bool:
        return self.last_heartbeat is not None

    @property
    def all_joined(self) -> bool:
        """Every rank (or the one trainer) has reported."""
        return not self.distributed or len(self.ranks) == self.spec.world_size

    @property
    def recent_footprint(self) -> float | None:
        if self.culprit is not None and self.culprit in self.ranks:
            return self.ranks[self.culprit].footprint_mb
        return max(self.footprints) if self.footprints else None

    def live_ranks(self) -> list[Rank]:
        return [rank for rank in self.ranks.values() if rank.ended_at is None]

    def describe_ranks(self) -> list[dict[str, Any]]:
        """The ranks as ``show --json`` lists them, rank 0 first."""
        return [self.ranks[number].describe() for number in sorted(self.ranks)]

    def view(self) -> AttemptView:
        return AttemptView(
            job_id=self.job_id,
            attempt=self.spec.attempt,
            rung=self.spec.rung,
            pid=self.pid,
            phase=self.phase,
            step=self.step,
            stop_reason=str(self.stop_reason) if self.stop_reason else None,
            ranks=self.describe_ranks() if self.distributed else [],
        )

    # -- telemetry ------------------------------------------------------------------------

    def accepts(self, message: Message) -> bool:
        """Whether a message comes from this attempt: its trainer, or for a distributed job
        one of its ranks, known by job, attempt and rank number, a local one also by the
        launcher's process tree. A new rank joins here. Host names play no part: two Macs
        may share one, and a rank must never train unwatched because of it."""
        pid = getattr(message, "pid", None)
        if not self.distributed:
            return pid == self.pid
        if getattr(message, "job_id", None) != self.job_id:
            return False
        attempt = getattr(message, "attempt", 0)
        if attempt and attempt != self.spec.attempt:
            return False  # a rank of an earlier attempt, still on its way out
        rank_number = getattr(message, "rank", None)
        if not isinstance(rank_number, int) or not isinstance(pid, int):
            return False
        known = self.ranks.get(rank_number)
        if known is not None:
            return known.pid == pid
        if not 0 <= rank_number < self.spec.world_size:
            return False
        place = self.rank_host(rank_number)
        started_at: float | None = None
        if place.local:
            started_at = launched_by(pid, self.pid)
            if started_at is None:
                return False  # claims a rank this machine runs, but the launcher did not start it
        elif not self.spec.remote:
            return False
        self.ranks[rank_number] = Rank(
            rank=rank_number,
            pid=pid,
            host=place.name,
            local=place.local,
            started_at=started_at,
            hostname=str(getattr(message, "host", "") or "")[:255],
            address=place.address,
        )
        log.info("rank joined", job=self.job_id, rank=rank_number, pid=pid, host=place.name)
        return True

    def rank_host(self, rank_number: int) -> RankHost:
        """Where a rank runs; a spec without the layout (an older record) means this Mac."""
        if rank_number < len(self.spec.rank_hosts):
            return self.spec.rank_hosts[rank_number]
        return RankHost("127.0.0.1", "127.0.0.1", True)

    def on_heartbeat(self, beat: Heartbeat) -> None:
        now = time.monotonic()
        self.last_heartbeat = now
        step = beat.step
        if self.distributed:
            rank = self.ranks[beat.rank]
            rank.last_heartbeat, rank.step = now, beat.step
            rank.disconnected_at = None  # heard again: a dropped connection came back
            if beat.footprint_mb:
                rank.footprint_mb = beat.footprint_mb
            # The job is as far as its slowest rank, and alive once every rank has spoken.
            step = min(r.step for r in self.ranks.values())
        if step != self.step or (beat.phase != self.phase and not self.distributed):
            # A new step, or a new phase (loading -> preflight -> train): it moved on. (Ranks
            # may sit in different phases at once; for them only steps and events count.)
            self.step = step
            self.last_progress = now
        self.phase = beat.phase
        self.examples_seen = beat.examples_seen
        self.total_examples = beat.total_examples
        if beat.step_seconds:
            self.max_step_seconds = max(self.max_step_seconds, beat.step_seconds)
        if beat.eval_seconds:
            self.max_eval_seconds = max(self.max_eval_seconds, beat.eval_seconds)
        if beat.footprint_mb:
            self._note_footprint(beat.footprint_mb)
        if beat.last_checkpoint_step is not None:
            self.last_checkpoint_step = beat.last_checkpoint_step

    def on_trainer_event(self, event: TrainerEvent) -> None:
        # Events come from the trainer's work, never from its heartbeat thread: each is
        # progress (a "loading" event is a sign of life from a long load or tokenization).
        self.last_progress = time.monotonic()
        if event.kind == "loading" and isinstance(event.detail.get("stage"), str):
            self.loading_stage = event.detail["stage"][:200]
        if event.kind == "checkpoint":
            self.last_checkpoint_step = event.step
            seconds = event.detail.get("seconds")
            if isinstance(seconds, int | float) and seconds > self.max_checkpoint_seconds:
                self.max_checkpoint_seconds = float(seconds)
        if event.kind not in ("done", "stopped", "error"):
            return
        announced = {"done": int(ExitCode.DONE), "stopped": int(ExitCode.STOPPED)}.get(
            event.kind, event.detail.get("exit_code")
        )
        code = announced if isinstance(announced, int) else None
        if self.distributed:
            self._rank_announced(event, code)
        elif code is not None:
            self.reported_exit = code

    def _note_footprint(self, footprint: float) -> None:
        self.footprints.append(footprint)
        if footprint > self.peak_mb * 1.01:
            self.peak_mb = footprint
            self.hooks.peak(self.job_id, self.spec.rung, footprint)

    # -- the loop's call ------------------------------------------------------------------

    def poll(self, now: float | None = None) -> AttemptExit | None:
        """One tick: reap if it is over, else guard memory, check liveness and escalate a
        stop whose grace ran out. Returns the exit once, when the attempt is over."""
        now = time.monotonic() if now is None else now
        ended = self.reap()
        if ended is not None:
            return ended
        if now >= self._next_guard:
            self._next_guard = now + self.settings.guard_interval_s
            self.guard_memory()
        self.check_liveness(now)
        self.escalate(now)
        return None

    # -- memory ---------------------------------------------------------------------------

    def guard_memory(self) -> None:
        rank = None
        footprint: float | None
        if self.distributed:
            footprint, rank = self._rank_footprints()
        else:
            try:
                footprint = footprint_mb(self.pid)
            except (psutil.NoSuchProcess, psutil.ZombieProcess, ProcessLookupError):
                return
            except psutil.AccessDenied:
                footprint = None
        if footprint:
            self._note_footprint(footprint)
        system = self.read_system()
        if system.pressure != Pressure.NORMAL:
            self.pressure_seen = str(system.pressure)
        if self.stop_reason is not None:
            self._kill_if_still_growing(footprint)
            return
        critical = system.pressure == Pressure.CRITICAL
        settings = self.settings
        budget = self.spec.budget_mb
        runaway = critical or bool(footprint and footprint > budget * settings.runaway_factor)
        if footprint and footprint > budget and self.phase == "preflight" and not runaway:
            # The pre-flight is measuring exactly this peak and stops itself in seconds,
            # with the reading the memory model needs; only a runaway is stopped first.
            return
        if footprint and footprint > budget:
            grace = settings.checkpoint_grace_s if runaway else settings.stop_grace_s
            grace = min(grace, settings.stop_grace_s)
            where: dict[str, Any] = {"rank": rank} if rank is not None else {}
            others = describe_consumers(other_consumers(self._local_pids() | {os.getpid()}))
            self.hooks.record(
                self.job_id,
                "memory_guard",
                action="stop",
                footprint_mb=round(footprint, 1),
                budget_mb=round(budget, 1),
                grace_s=grace,
                others=others,
                **where,
            )
            log.warning(
                "over budget; stopping trainer",
                footprint=footprint,
                budget=budget,
                grace_s=grace,
                **where,
            )
            self.culprit = rank
            self.stop(StopReason.MEMORY, grace)
            self.footprint_at_stop = footprint
            return
        if critical and biggest_consumer(self._local_pids()):
            grace = min(settings.checkpoint_grace_s, settings.stop_grace_s)
            self.hooks.record(
                self.job_id, "memory_guard", action="stop", pressure="critical", grace_s=grace
            )
            self.stop(StopReason.MEMORY, grace)
            self.footprint_at_stop = footprint
            return
        if system.pressure == Pressure.WARN:
            now = time.monotonic()
            if now - self._last_warn_action >= settings.warn_action_interval_s:
                self._last_warn_action = now
                self.command_all("checkpoint_now")
                self.command_all("clear_cache")
                self.hooks.record(
                    self.job_id, "memory_guard", action="checkpoint+clear_cache", pressure="warn"
                )

    def _kill_if_still_growing(self, footprint: float | None) -> None:
        """A trainer stopped for memory that keeps growing is not checkpointing (stuck in a
        read of /dev/zero, say, where SIGTERM waits): waiting out its grace risks the Mac."""
        if self.stop_reason != StopReason.MEMORY or self.kill_at is None:
            return
        if not footprint or self.footprint_at_stop is None:
            return
        if footprint - self.footprint_at_stop < self.settings.still_growing_mb:
            return
        self.hooks.record(
            self.job_id,
            "memory_guard",
            action="kill",
            footprint_mb=round(footprint, 1),
            at_stop_mb=round(self.footprint_at_stop, 1),
        )
        log.warning("still growing after stop; SIGKILL", pid=self.pid, footprint=footprint)
        self.kill_at = time.monotonic()
        self.escalate(self.kill_at)

    def _rank_footprints(self) -> tuple[float | None, int | None]:
        """The largest footprint among the ranks and whose it is. Ranks on this machine are
        read now; others as their last heartbeat said."""
        largest, whose = None, None
        for rank in self.live_ranks():
            if rank.local:
                try:
                    reading = footprint_mb(rank.pid)
                except (psutil.Error, ProcessLookupError):
                    continue
                # An exiting rank reads as nothing: keep what it last used.
                rank.footprint_mb = reading or rank.footprint_mb
            if rank.footprint_mb and (largest is None or rank.footprint_mb > largest):
                largest, whose = rank.footprint_mb, rank.rank
        return largest, whose

    def _local_pids(self) -> set[int]:
        if self.distributed:
            return {rank.pid for rank in self.live_ranks() if rank.local}
        return {self.pid}

    # -- liveness -------------------------------------------------------------------------

    def check_liveness(self, now: float) -> None:
        if self.distributed:
            self._watch_ranks(now)
        if self.stop_reason is not None:
            return
        if self.distributed:
            self._check_ranks(now)
            return
        if self.last_heartbeat is None:
            startup = self.startup_allowance()
            if now - self.spawned_at > startup:
                self.hang(f"no heartbeat {startup:.0f} s after start")
            return
        silent = now - self.last_heartbeat
        if silent > self.spec.heartbeat_timeout:
            self.hang(f"no heartbeat for {silent:.1f} s")
            return
        if self._stalled(now):
            self.hang(self._stall_words(now))

    def stall_timeout(self) -> float:
        """How long the trainer may show no progress: at least ``stall_min_s``, and far
        longer than its slowest step, evaluation and checkpoint so far."""
        slowest = self.max_step_seconds + self.max_eval_seconds + self.max_checkpoint_seconds
        return max(self.settings.stall_min_s, self.settings.stall_factor * slowest)

    def _stalled(self, now: float) -> bool:
        """No new step, phase or sign of life for longer than the stall timeout, in any phase
        from loading to the last step."""
        if self.phase in PHASES_NOT_WATCHED:
            return False
        if self.phase in PROGRESS_PHASES and self.step < 0:
            return False
        return now - self.last_progress > self.stall_timeout()

    def _stall_words(self, now: float) -> str:
        where = f" in {self.phase}" if self.phase not in PROGRESS_PHASES else ""
        if self.phase == "loading" and self.loading_stage:
            where += f" ({self.loading_stage})"
        return f"no progress for {now - self.last_progress:.0f} s{where}"

    def startup_allowance(self) -> float:
        return self.spec.startup_timeout or self.settings.startup_timeout_s

    def _check_ranks(self, now: float) -> None:
        """A distributed job is alive while every rank heartbeats and the slowest advances;
        one that has not reported within the start-up allowance of the launch fails it."""
        if len(self.ranks) < self.spec.world_size:
            if self.launched_at is None:
                return  # hostwait is still waiting for a host to answer ssh
            allowance = self.startup_allowance()
            silent = set(range(self.spec.world_size)) - set(self.ranks)
            if all(self.rank_host(number).local for number in silent):
                # The process table watches those: a local rank slow to start (a loaded Mac)
                # has the trainer's own start-up allowance, like a single trainer.
                allowance = max(allowance, self.settings.startup_timeout_s)
            if now - self.launched_at > allowance:
                self._never_reported(allowance)
            return
        for rank in self.live_ranks():
            quiet_s = now - rank.last_heartbeat
            if quiet_s > self.spec.heartbeat_timeout:
                self.culprit = rank.rank
                self.hang(f"no heartbeat from {rank.label} for {quiet_s:.1f} s")
                return
        if self._stalled(now):
            self.culprit = min(self.ranks.values(), key=lambda r: r.step).rank
            self.hang(self._stall_words(now))

    def _never_reported(self, allowance: float) -> None:
        """Ranks launched but silent past the allowance: a start-up failure, blamed on a rank
        on another Mac first (a local rank waits for its peers before it can report)."""
        silent = sorted(set(range(self.spec.world_size)) - set(self.ranks))
        remote = [n for n in silent if not self.rank_host(n).local]
        number = (remote or silent)[0]
        place = self.rank_host(number)
        hint = (
            ": check that the keys are copied and the port is reachable" if not place.local else ""
        )
        self.culprit = number
        self.culprit_lost = (
            f"rank {number} on {place.name} never reported in the {allowance:.0f} s after "
            f"launch{hint}"
        )
        self.hooks.record(
            self.job_id,
            "rank_lost",
            rank=number,
            host=place.name,
            how=self.culprit_lost,
            silent=silent,
        )
        log.warning("rank never reported", rank=number, host=place.name, silent=silent)
        self.stop(StopReason.RANK_LOST, self.settings.hang_grace_s)

    def _watch_ranks(self, now: float) -> None:
        """Notice a rank's end as soon as anything shows it: a local rank's from the process
        table (a SIGKILLed rank says nothing), any rank's from mlx.launch's own log (a
        remote rank's ssh session ends at once), and a rank whose telemetry connection
        dropped and which then fell silent."""
        self._read_launcher_news(now)
        for rank in self.live_ranks():
            if rank.local and not process_alive(rank.pid, rank.started_at):
                rank.ended_at = now
                if rank.launcher_exit is not None and not rank.lost_how:
                    rank.lost_how = lost_words(rank.launcher_exit, True)
                if rank.failed:
                    self._rank_failed(rank)
            elif rank.disconnected_at is not None and rank.last_heartbeat < rank.disconnected_at:
                # A lossy link may drop and redo a connection: give it time to speak again.
                allowed = max(3.0, 3 * self.spec.heartbeat_interval)
                if now - rank.disconnected_at > allowed:
                    rank.ended_at = now
                    rank.lost_how = (
                        f"its telemetry connection closed and it has been silent for "
                        f"{now - rank.last_heartbeat:.1f} s"
                    )
                    self._rank_failed(rank)

    def peer_disconnected(self, address: str, now: float) -> None:
        """A telemetry connection from ``address`` (another Mac) dropped: its ranks must be
        heard from again soon, or they are gone."""
        for rank in self.live_ranks():
            if not rank.local and address in (rank.address, rank.host):
                rank.disconnected_at = now

    def _read_launcher_news(self, now: float) -> None:
        """The lines mlx.launch (and hostwait before it) added to the attempt's stderr: when
        the ranks were launched, and how each rank ended, as soon as it logs it."""
        try:
            with self.spec.stderr_path.open("rb") as handle:
                handle.seek(self._news_offset)
                chunk = handle.read(NEWS_READ_BYTES)
        except OSError:
            return
        if not chunk:
            return
        self._news_offset += len(chunk)
        text = self._news_partial + chunk
        complete, _, self._news_partial = text.rpartition(b"\n")
        if len(self._news_partial) > NEWS_READ_BYTES:
            self._news_partial = b""  # one endless line: not news
        lines = complete.decode("utf-8", "replace")
        if self.launched_at is None and LAUNCHING in lines:
            self.launched_at = now
        for number, code in launcher_exits(lines).items():
            self._launcher_logged_end(number, code, now)

    def _launcher_logged_end(self, number: int, code: int | None, now: float) -> None:
        rank = self.ranks.get(number)
        if rank is None:
            if code not in (None, 0, int(ExitCode.STOPPED)) and self.stop_reason is None:
                place = self.rank_host(number)
                self.culprit = number
                self.culprit_lost = f"{lost_words(code, place.local)} before it reported"
                self.hooks.record(
                    self.job_id, "rank_lost", rank=number, host=place.name, how=self.culprit_lost
                )
                self.stop(StopReason.RANK_LOST, self.settings.hang_grace_s)
            return
        rank.launcher_exit = code
        if rank.ended_at is not None:
            return
        if rank.local:
            return  # the process table confirms it, with its pid's own end
        rank.ended_at = now
        if rank.reported_exit is None:
            rank.lost_how = lost_words(code, False)
        if rank.failed:
            self._rank_failed(rank)

    def _rank_announced(self, event: TrainerEvent, announced: int | None) -> None:
        """A rank said how it ends. A failure of its own (not a lost peer) stops the rest
        at once, before mlx.launch or a collective timeout does it less gently."""
        rank = self.ranks[event.rank]
        rank.reported_exit = announced
        rank.reason = str(event.detail.get("reason", ""))
        rank.peer_lost = bool(event.detail.get("peer_lost"))
        if not rank.local:
            rank.ended_at = time.monotonic()  # its process is out of our sight
        if event.kind == "error" and not rank.peer_lost:
            rank.ended_at = rank.ended_at or time.monotonic()
            self._rank_failed(rank)

    def _rank_failed(self, rank: Rank) -> None:
        """One rank is gone for good: the others cannot go on without it. Stop them all at
        the next step (through their stop command) and blame the first to fail."""
        if self.stop_reason is not None or rank.peer_lost:
            return  # a stop is already under way, or it only lost its peer
        self.culprit = rank.rank
        if rank.reported_exit is not None:
            how = f"announced exit {rank.reported_exit}"
        else:
            how = rank.lost_how or "no announced exit"
            self.culprit_lost = how if not rank.local else ""
        self.hooks.record(
            self.job_id,
            "rank_lost",
            rank=rank.rank,
            host=rank.host,
            hostname=rank.hostname,
            pid=rank.pid,
            how=how,
            reason=rank.reason,
            words=f"{rank.label} lost: {rank.reason or how}",
        )
        log.warning("rank lost; stopping the others", rank=rank.rank, pid=rank.pid, how=how)
        self.stop(StopReason.RANK_LOST, self.settings.hang_grace_s)

    def hang(self, why: str) -> None:
        where = {"rank": self.culprit} if self.distributed else {}
        self.hooks.record(self.job_id, "hang_detected", reason=why, pid=self.pid, **where)
        log.warning("trainer hung", why=why, pid=self.pid, **where)
        self.stop(StopReason.HANG, self.settings.hang_grace_s)

    # -- stopping -------------------------------------------------------------------------

    def command_all(self, action: str) -> None:
        """Send ``action`` to the trainer, or to every rank still running."""
        if not self.distributed:
            self.hooks.command(self.pid, action, self.spec.remote)
            return
        for rank in self.live_ranks():
            self.hooks.command(rank.pid, action, self.spec.remote)

    def stop(self, reason: StopReason, grace: float) -> None:
        """Ask the trainer (every rank) to checkpoint and exit; SIGKILL once ``grace`` is
        over. The stop command and SIGTERM for one trainer. For ranks only the command: they
        agree on it at their next step, so all stop at the same checkpoint; mlx.launch
        terminates the rest once one has exited, and a second signal means "now, skip the
        checkpoint". A local rank never heard from gets the signal, its only way to hear."""
        self.stop_reason = reason
        self.stop_sent_at = time.monotonic()
        self.kill_at = self.stop_sent_at + grace
        self.command_all("stop")
        if self.distributed:
            self._read_launcher_news(self.stop_sent_at)
            if self.launched_at is None:
                # Still hostwait, waiting for a host: nothing to checkpoint, nothing to wait for.
                self._signal_trainer(signal.SIGTERM)
                return
            heard = {rank.pid for rank in self.ranks.values()}
            for pid in trainers_under(self.pid):
                if pid not in heard:
                    signal_if_alive(pid, signal.SIGTERM)
            return
        self._signal_trainer(signal.SIGTERM)

    def rearm_stop(self, reason: StopReason, grace: float) -> None:
        """Carry on a stop a previous supervisor had sent (found after a restart): the
        trainer is already stopping, and a second signal would make it skip its checkpoint,
        so only the stop command goes out again, and the grace starts over."""
        self.stop_reason = reason
        self.stop_sent_at = time.monotonic()
        self.kill_at = self.stop_sent_at + grace
        self.command_all("stop")

    def change_stop_reason(self, reason: StopReason) -> None:
        """A user stop turned into the other one (cancel while pausing, or pause while
        cancelling): the same checkpoint and grace, another outcome."""
        self.stop_reason = reason

    def escalate(self, now: float) -> None:
        if self.kill_at is None or now < self.kill_at:
            return
        log.warning("grace period over; SIGKILL", pid=self.pid, reason=self.stop_reason)
        self.kill_at = None
        if self.distributed and not self.spec.remote and not self.ranks_killed:
            # The ranks first, the launcher left to log how each ended (the only record of a
            # rank killed from outside) and exit; its session goes only if it lingers.
            self.ranks_killed = True
            self.kill_at = time.monotonic() + LAUNCHER_GRACE_S
            for pid in {r.pid for r in self.live_ranks()} | set(trainers_under(self.pid)):
                signal_if_alive(pid, signal.SIGKILL)
            return
        self._kill_all()

    def _kill_all(self) -> None:
        """SIGKILL the trainer; for a distributed job, its launcher's whole session: every
        local rank and every ssh that carries a remote one (which then gets SIGHUP)."""
        if self.distributed:
            try:
                if os.getpgid(self.pid) == self.pid:
                    os.killpg(self.pid, signal.SIGKILL)
                    return
            except ProcessLookupError:
                return
        self._signal_trainer(signal.SIGKILL)

    def _signal_trainer(self, signum: int) -> None:
        """Signal the attempt's process, unless an adopted one's pid now belongs to another."""
        if self.popen is None and not process_alive(self.pid, self.started_at):
            return
        signal_if_alive(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL everything of this attempt and wait for our child: used where a trainer
        must not be left unwatched (the job failed inside the supervisor, say)."""
        self._kill_all()
        if self.popen is not None:
            self.popen.wait()

    # -- reaping --------------------------------------------------------------------------

    def reap(self) -> AttemptExit | None:
        if self.popen is not None:
            code = self.popen.poll()
            if code is None:
                return None
            exit_code, signum = split_returncode(code)
        else:
            if process_alive(self.pid, self.started_at):
                return None
            # Not our child: its exit status is lost; what it announced is what we know.
            exit_code, signum = self.reported_exit, None
        if self.distributed and self._ranks_linger():
            return None  # the next attempt must not overlap this one's last rank
        tail = self.stderr_tail()
        if self.distributed:
            self._watch_ranks(time.monotonic())
        if self.distributed and self.launched_at is not None:
            # The launcher's own status says nothing; the ranks' ends do. (Before the launch,
            # the process was hostwait, whose status is its verdict on the hosts.)
            exit_code, signum, self.culprit = attempt_exit(
                self.ranks, self.spec.world_size, tail, self.culprit
            )
        oom_kills = cgroup_oom_kill_count(os.getpid())
        oom_delta = (
            oom_kills - self.cgroup_oom_at_start
            if oom_kills is not None and self.cgroup_oom_at_start is not None
            else 0
        )
        return AttemptExit(
            spec=self.spec,
            pid=self.pid,
            exit_code=exit_code,
            signum=signum,
            stop_reason=self.stop_reason,
            user_wish=self.user_wish,
            heartbeat_seen=self.heartbeat_seen,
            step=self.step,
            last_checkpoint_step=self.last_checkpoint_step,
            recent_footprint_mb=self.recent_footprint,
            pressure_seen=self.pressure_seen,
            cgroup_oom_kills_delta=oom_delta,
            stderr_tail=tail,
            culprit=self.culprit_rank(),
            culprit_lost=self.culprit_lost,
            ranks=self.describe_ranks(),
            examples_seen=self.examples_seen,
            total_examples=self.total_examples,
        )

    def culprit_rank(self) -> Rank | None:
        """The blamed rank; one that never reported is known by its place alone."""
        if self.culprit is None:
            return None
        if self.culprit in self.ranks:
            return self.ranks[self.culprit]
        place = self.rank_host(self.culprit)
        return Rank(
            rank=self.culprit, pid=0, host=place.name, local=place.local, address=place.address
        )

    def _ranks_linger(self) -> bool:
        """Whether a process of the ended launcher's session (a rank it started) is still
        alive. A rank killed with its launcher can outlive it for a moment; one left behind
        by a launcher that died is killed. Given up on after LINGER_S: never blocks."""
        try:
            os.killpg(self.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        now = time.monotonic()
        if self.lingering_since is None:
            self.lingering_since = now
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                return False
            log.warning("launcher gone but a rank lingers; killing it", pid=self.pid)
        return now - self.lingering_since < LINGER_S

    def stderr_tail(self) -> str:
        try:
            with self.spec.stderr_path.open("rb") as handle:
                handle.seek(0, os.SEEK_END)
                size = handle.tell()
                handle.seek(max(0, size - STDERR_TAIL_BYTES))
                return handle.read().decode("utf-8", "replace")
        except OSError:
            return ""
