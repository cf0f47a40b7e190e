"""The running attempt, one at a time: launching it, feeding it telemetry, the user's stops,
and handing its exit on.

:class:`Runner` is the loop's one handle on trainers. It builds an attempt's command (the
trainer, or mlx.launch around it), starts or adopts it, routes each telemetry message to it
(or stops a stray trainer of one of our jobs), records what the attempt notices, and passes
the exit to the :class:`~loractl.supervisor.exits.ExitHandler`. It is also the attempt's
:class:`~loractl.supervisor.attempt.AttemptHooks`: the attempt itself never sees the store.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from loractl.config import ConfigError, JobConfig, load_config
from loractl.distributed import (
    free_port_range,
    launch_command,
    rank_hosts,
    remote_hosts,
    remote_ssh_names,
)
from loractl.paths import Layout
from loractl.protocol import Heartbeat as HeartbeatMessage
from loractl.protocol import JobState, Message, TrainerEvent
from loractl.supervisor.attempt import Attempt, AttemptExit, AttemptSpec, AttemptView
from loractl.supervisor.channels import Publisher, TelemetryChannels
from loractl.supervisor.desktop import KeepAwake
from loractl.supervisor.jobview import budget_mb, last_known_progress
from loractl.supervisor.ladder import describe_rung, rung_overrides
from loractl.supervisor.ladderplan import PREFLIGHT_EVENT
from loractl.supervisor.policy import StopReason
from loractl.supervisor.pressure import SystemMemory
from loractl.supervisor.processes import (
    TRAINER_MODULE,
    LiveTrainer,
    is_trainer,
    live_trainers,
    start_time,
)
from loractl.supervisor.settings import Settings
from loractl.supervisor.store import Job, Store
from loractl.supervisor.storecare import finished_run, restore_lost_jobs

log = structlog.get_logger("loractl.supervisor")

# The stops a user asks for, and the job state shown while each is carried out.
USER_STOPS = {
    "pause": (StopReason.USER_PAUSE, JobState.PAUSING),
    "cancel": (StopReason.USER_CANCEL, JobState.CANCELLING),
}


def layout_of(cfg: JobConfig) -> dict[str, Any]:
    """The attempt's timings and, for a distributed job, where each rank runs."""
    distributed = cfg.world_size > 1
    startup = cfg.startup_timeout or (cfg.heartbeat_timeout if distributed else None)
    return {
        "heartbeat_timeout": cfg.heartbeat_timeout,
        "heartbeat_interval": cfg.heartbeat_interval,
        "world_size": cfg.world_size,
        "rank_hosts": tuple(rank_hosts(cfg.distributed)) if distributed else (),
        "startup_timeout": startup,
    }


def host_wait_command(cfg: JobConfig, launch: list[str]) -> list[str]:
    """mlx.launch behind hostwait: the ranks start only once every other Mac answers ssh,
    and a host that does not within heartbeat_timeout ends the attempt naming it."""
    hosts = [arg for name in remote_ssh_names(cfg.distributed) for arg in ("--host", name)]
    return [
        sys.executable,
        "-m",
        "loractl.supervisor.hostwait",
        "--give-up-after",
        f"{cfg.heartbeat_timeout:g}",
        *hosts,
        "--",
        *launch,
    ]


class Runner:
    """Owns the current attempt, if any."""

    def __init__(
        self,
        store: Store,
        layout: Layout,
        settings: Settings,
        channels: TelemetryChannels,
        publisher: Publisher,
        keep_awake: KeepAwake,
        read_system: Callable[[], SystemMemory],
        *,
        is_known_job: Callable[[str], bool],
    ):
        self.store = store
        self.layout = layout
        self.settings = settings
        self.channels = channels
        self.publisher = publisher
        self.keep_awake = keep_awake
        self.read_system = read_system
        self.is_known_job = is_known_job
        self.attempt: Attempt | None = None
        # Until recovery has run, a trainer of ours talking is not a stray but unadopted.
        self.recovered = False
        self.dropped_frames = 0
        # Trainers of jobs the store did not know, already settled (adopted or stopped).
        self._unknown_settled: set[int] = set()

    # -- AttemptHooks -------------------------------------------------------------------

    def record(self, job_id: str, kind: str, **detail: Any) -> None:
        self.store.record(job_id, kind, **detail)

    def peak(self, job_id: str, rung: int, footprint_mb: float) -> None:
        self.store.note_peak(job_id, rung, footprint_mb)

    def command(self, pid: int, action: str, remote: bool) -> bool:
        return self.channels.send(pid, action, remote)

    # -- starting -------------------------------------------------------------------------

    def stderr_path(self, job_id: str, attempt: int) -> Path:
        return self.layout.job_dir(job_id) / "attempts" / f"{attempt:04d}.stderr"

    def fresh_start_requested(self, job_id: str, attempt: int) -> bool:
        return any(
            event["kind"] == "fresh_start_requested" and event["detail"].get("attempt") == attempt
            for event in self.store.events(job_id)
        )

    def attempt_command(self, job: Job, cfg: JobConfig, attempt: int) -> tuple[list[str], bool]:
        """The argv of one attempt, and whether some of its ranks run on other Macs: the
        trainer, or for a distributed job mlx.launch running the trainer on every rank."""
        remote = remote_hosts(cfg.distributed) if cfg.world_size > 1 else []
        endpoint = self.channels.endpoint_for(job.id, attempt, remote)
        command = [
            sys.executable,
            "-m",
            TRAINER_MODULE,
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
        # The pre-flight holds the longest batch to the same budget the guard does.
        budget = budget_mb(cfg, self.settings.default_budget_fraction)
        command += ["--budget-mb", f"{budget:.0f}"]
        if self.fresh_start_requested(job.id, attempt):
            command.append("--fresh")
        if remote:
            from loractl.keys import keys_folder

            command += ["--keys-dir", str(keys_folder(self.layout.home))]
        if cfg.world_size > 1:
            section = cfg.distributed
            assert section is not None  # more than one rank only with a distributed section
            port = None if section.get("starting_port") else free_port_range(cfg.world_size)
            command = launch_command(section, command, starting_port=port)
        if remote:
            command = host_wait_command(cfg, command)
        return command, bool(remote)

    def spawn(self, job: Job, cfg: JobConfig) -> Attempt:
        """Start the job's next attempt and record it as starting."""
        number = job.attempt + 1
        command, remote = self.attempt_command(job, cfg, number)
        spec = AttemptSpec(
            job_id=job.id,
            attempt=number,
            rung=job.rung,
            stderr_path=self.stderr_path(job.id, number),
            budget_mb=budget_mb(cfg, self.settings.default_budget_fraction),
            remote=remote,
            **layout_of(cfg),
        )
        try:
            attempt = Attempt.launch(
                spec,
                command,
                self.layout.job_dir(job.id),
                settings=self.settings,
                hooks=self,
                read_system=self.read_system,
                last_checkpoint_step=job.last_checkpoint_step,
            )
        except BaseException:
            if remote:
                self.channels.close_remote()
            raise
        self.attempt = attempt
        self.store.transition(
            job.id,
            JobState.STARTING,
            f"attempt {number} on rung {job.rung} ({describe_rung(cfg, job.rung)})",
            attempt=number,
            trainer_pid=attempt.pid,
            trainer_started_at=start_time(attempt.pid),
        )
        self.keep_awake.hold(attempt.pid, f"loractl is training {job.name}")
        self.publisher.publish_state(job.id, pid=attempt.pid)
        log.info(
            "spawned trainer",
            job=job.id,
            pid=attempt.pid,
            attempt=number,
            rung=job.rung,
            ranks=cfg.world_size,
        )
        return attempt

    def start(self, job: Job, cfg: JobConfig) -> Attempt | None:
        """Start the job's next attempt, unless that would run it twice: a live trainer of
        the job (left by a supervisor whose store then lost it) is adopted instead, and a
        job whose adapter folder already holds its finished run is completed, not rerun.
        Both can happen only after the store was rolled back or rebuilt."""
        trainer = live_trainers(self.layout.jobs).get(job.id)
        if trainer is not None:
            log.warning("a trainer of this job already runs; adopting it", job=job.id)
            return self.adopt_live(job, trainer, "its trainer was already running")
        if self.complete_if_finished(job, cfg):
            return None
        return self.spawn(job, cfg)

    def complete_if_finished(self, job: Job, cfg: JobConfig) -> bool:
        """Complete a job that is not running but whose adapter folder holds its finished
        run (its "done" lost with a rolled-back store): it must not run again."""
        if self.fresh_start_requested(job.id, job.attempt + 1) or not finished_run(cfg):
            return False
        log.warning("the job's finished run is in its adapter folder", job=job.id)
        self.store.record(job.id, "completion_found", before_start=True)
        self.store.transition(
            job.id,
            JobState.STARTING,
            "its adapter folder already holds its finished run; not run again",
            trainer_pid=None,
        )
        self.store.transition(
            job.id,
            JobState.COMPLETED,
            "completed: the finished run was found in its adapter folder",
            outcome="success",
            reason="",
        )
        self.publisher.publish_state(job.id)
        return True

    def settle_finished(self, jobs: list[Job]) -> None:
        """After an unclean stop: complete the waiting jobs whose runs had finished."""
        for job in jobs:
            try:
                self.complete_if_finished(job, load_config(job.config_path))
            except ConfigError:
                continue  # the start fails it with the reason

    def adopt_live(self, job: Job, trainer: LiveTrainer, why: str) -> Attempt:
        """Adopt a live trainer of ``job`` that the store does not record as its trainer."""
        job = self.store.transition(
            job.id,
            JobState.STARTING,
            f"{why} (pid {trainer.pid}); adopted, not started twice",
            trainer_pid=trainer.pid,
            trainer_started_at=trainer.started_at,
            attempt=trainer.attempt or job.attempt,
            rung=trainer.rung,
        )
        return self.adopt(job)

    def stop_second(self, job: Job) -> None:
        """A rolled-back store can leave two jobs running: one is adopted, the other's
        trainer stops at its next checkpoint and the job waits its turn (if it is still
        exiting then, the start adopts it rather than run it twice)."""
        assert job.trainer_pid is not None
        log.warning("a second live trainer; stopping it", job=job.id, pid=job.trainer_pid)
        self.channels.send(job.trainer_pid, "stop")
        try:
            os.kill(job.trainer_pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        self.store.transition(
            job.id,
            JobState.QUEUED,
            "supervisor restarted; another job's trainer was adopted, this one was stopped "
            "at its checkpoint",
            trainer_pid=None,
        )

    def adoptable(self, job: Job) -> bool:
        """Whether the job's recorded trainer still runs: the same process, not a reuse."""
        if not job.trainer_pid:
            return False
        return is_trainer(job.trainer_pid, job.id, job.trainer_started_at)

    def adopt(self, job: Job) -> Attempt:
        """Take over the live trainer a previous supervisor left running."""
        assert job.trainer_pid is not None
        cfg = load_config(job.config_path)
        known = last_known_progress(job, cfg.adapter_path)
        spec = AttemptSpec(
            job_id=job.id,
            attempt=job.attempt,
            rung=job.rung,
            stderr_path=self.stderr_path(job.id, job.attempt),
            budget_mb=budget_mb(cfg, self.settings.default_budget_fraction),
            **layout_of(cfg),
        )
        if spec.distributed:
            remote = self.channels.reopen_remote(job.id, job.attempt)
            spec = AttemptSpec(**{**spec.__dict__, "remote": remote})
        attempt = Attempt(
            spec,
            pid=job.trainer_pid,
            popen=None,
            settings=self.settings,
            hooks=self,
            read_system=self.read_system,
            last_checkpoint_step=job.last_checkpoint_step,
            step=job.step,
            heard=True,
            started_at=job.trainer_started_at,
        )
        # Recorded before it is ours: if the disk refuses, recovery runs again later. The
        # step is the furthest anything recorded: the store's last heartbeat, or a newer
        # checkpoint the trainer wrote while no supervisor was there to hear it.
        self.store.record(
            job.id, "adopted", pid=job.trainer_pid, attempt=job.attempt, step=int(known["step"])
        )
        self.attempt = attempt
        self.keep_awake.hold(job.trainer_pid, f"loractl is training {job.name}")
        log.info("re-adopted trainer", job=job.id, pid=job.trainer_pid)
        return attempt

    # -- the loop's calls -----------------------------------------------------------------

    def poll(self, now: float) -> AttemptExit | None:
        """Advance the current attempt; its exit, once, with the attempt forgotten."""
        attempt = self.attempt
        if attempt is None:
            return None
        for address in self.channels.dropped_peers():
            attempt.peer_disconnected(address, now)
        ended = attempt.poll(now)
        if ended is not None:
            self._forget(attempt)
        return ended

    def reap_only(self) -> AttemptExit | None:
        """Reap without guarding or judging: while the disk is full nothing is written, but
        a trainer that ended must not linger as a zombie."""
        attempt = self.attempt
        if attempt is None:
            return None
        ended = attempt.reap()
        if ended is not None:
            self._forget(attempt)
        return ended

    def _forget(self, attempt: Attempt) -> None:
        self.attempt = None
        self.keep_awake.release()
        if attempt.spec.remote:
            self.channels.close_remote()

    def kill_attempt_of(self, job_id: str) -> None:
        """SIGKILL and reap ``job_id``'s attempt, if it is the one we run; forget it."""
        attempt = self.attempt
        if attempt is None or attempt.job_id != job_id:
            return
        attempt.kill()
        self._forget(attempt)

    def view(self) -> AttemptView | None:
        """The current attempt, read-only, for `show` and `status`."""
        return self.attempt.view() if self.attempt is not None else None

    def running(self, job_id: str) -> bool:
        return self.attempt is not None and self.attempt.job_id == job_id

    # -- stops ----------------------------------------------------------------------------

    def user_stop(self, job: Job, wish: str) -> JobState:
        """Pause or cancel the running attempt; returns the state the job now shows.

        The last word wins: a cancel while pausing cancels, a pause while cancelling pauses.
        A stop the supervisor itself started (a hang, memory, a lost rank) keeps its reason
        and grace, and the user's wish is carried out once the attempt has exited."""
        attempt = self.attempt
        assert attempt is not None and attempt.job_id == job.id
        reason, showing = USER_STOPS[wish]
        # Recorded first: a store that refuses (a full disk) must leave the attempt as it was.
        self.store.transition(job.id, showing, f"{wish} asked by the user; checkpointing")
        if attempt.stop_reason is None:
            attempt.stop(reason, self.settings.stop_grace_s)
        elif attempt.stop_reason.by_user:
            attempt.change_stop_reason(reason)
        attempt.user_wish = wish
        self.publisher.publish_state(job.id)
        return showing

    def take_back_pause(self, job: Job) -> JobState:
        """`resume` while a pause is carried out: the job runs on. A stop that was sent
        cannot be unsent, so the attempt still checkpoints and exits; its exit then goes
        straight back to the queue instead of to paused."""
        attempt = self.attempt
        assert attempt is not None and attempt.job_id == job.id
        # Back to where it was: running once every rank has reported, else still starting.
        back = JobState.RUNNING if attempt.heartbeat_seen and attempt.all_joined else None
        self.store.transition(
            job.id, back or JobState.STARTING, "resumed by the user while pausing; it continues"
        )
        attempt.user_wish = "resume"
        self.publisher.publish_state(job.id)
        return back or JobState.STARTING

    def shut_down(self) -> None:
        """The supervisor is stopping: checkpoint the running attempt, unless a stop is
        already under way."""
        attempt = self.attempt
        if attempt is not None and attempt.stop_reason is None:
            attempt.stop(StopReason.SHUTDOWN, self.settings.exit_timeout_s)

    # -- telemetry ------------------------------------------------------------------------

    def take(self, message: Message) -> None:
        """One telemetry message: to the attempt it belongs to, or a stray's."""
        attempt = self.attempt
        if attempt is None or not attempt.accepts(message):
            self._stray(message)
            return
        if isinstance(message, HeartbeatMessage):
            attempt.on_heartbeat(message)
            self._heartbeat_recorded(attempt, message)
        elif isinstance(message, TrainerEvent):
            attempt.on_trainer_event(message)
            self._event_recorded(attempt, message)

    def _heartbeat_recorded(self, attempt: Attempt, beat: HeartbeatMessage) -> None:
        job = self.store.get(attempt.job_id)
        # On the stored state, not "the first heartbeat": if that write failed (a full disk),
        # the next heartbeat makes it again.
        if job.state == JobState.STARTING and attempt.all_joined:
            world = attempt.spec.world_size
            why = f"all {world} ranks heartbeat" if attempt.distributed else "first heartbeat"
            self.store.transition(job.id, JobState.RUNNING, why, early_deaths=0)
            self.publisher.publish_state(job.id)
        elif job.early_deaths:
            # It reported while being paused: no longer a trainer that dies on arrival.
            self.store.update(job.id, early_deaths=0)
        self.store.update(
            job.id,
            step=max(attempt.step, 0),
            examples_seen=beat.examples_seen,
            total_examples=beat.total_examples,
            last_checkpoint_step=attempt.last_checkpoint_step,
        )
        self.publisher.publish("heartbeat", beat)

    def _event_recorded(self, attempt: Attempt, event: TrainerEvent) -> None:
        if event.kind == "checkpoint":
            self.store.update(attempt.job_id, last_checkpoint_step=event.step)
        elif event.kind == PREFLIGHT_EVENT and (event.rank == 0 or not attempt.distributed):
            # A reading for the job's memory model, on the rung it was taken on.
            self.store.record(
                attempt.job_id, PREFLIGHT_EVENT, **{**event.detail, "rung": attempt.spec.rung}
            )
            peak = event.detail.get("peak_mb")
            if isinstance(peak, int | float) and peak > 0:
                self.store.note_peak(attempt.job_id, attempt.spec.rung, float(peak))
        elif event.kind == "started_over":
            # Every checkpoint failed its checksums: the history must not say "continues".
            self.store.record(attempt.job_id, "started_over", cause=event.detail.get("reason", ""))
        elif event.kind in ("oom_retry", "error"):
            where: dict[str, Any] = {"rank": event.rank} if attempt.distributed else {}
            self.store.record(attempt.job_id, f"trainer_{event.kind}", **event.detail, **where)
        self.publisher.publish("trainer_event", event)

    def _stray(self, message: Message) -> None:
        """A trainer we do not own is talking. If it is an orphan of one of our jobs, stop it:
        one job must never have two trainers."""
        pid = getattr(message, "pid", 0)
        job_id = getattr(message, "job_id", "")
        if not pid or not job_id:
            self.dropped_frames += 1
            return
        if not self.recovered:
            return
        if not is_trainer(pid, job_id):
            self.dropped_frames += 1  # a stranger, or a lie about the pid: never signal it
            return
        if not self.is_known_job(job_id):
            self._unknown_trainer(job_id, pid)
            return
        log.warning("stray trainer of one of our jobs; stopping it", pid=pid, job=job_id)
        self.store.record(job_id, "stray_trainer_stopped", pid=pid)
        self.channels.send(pid, "stop")
        try:
            os.kill(pid, signal.SIGTERM)  # checkpoints and exits, like any stop
        except ProcessLookupError:
            pass

    def _unknown_trainer(self, job_id: str, pid: int) -> None:
        """A trainer of this home whose job the store does not know (a store rolled back or
        rebuilt under it): its job comes back from its folder and the trainer is adopted;
        when no job can be rebuilt, or another attempt runs, it is stopped at its next
        checkpoint. Either way it never trains beside another unwatched."""
        if pid in self._unknown_settled:
            self.dropped_frames += 1
            return
        self._unknown_settled.add(pid)
        trainer = live_trainers(self.layout.jobs).get(job_id)
        if trainer is not None and self.attempt is None:
            found = restore_lost_jobs(
                self.store,
                self.layout,
                trainers={job_id: trainer},
                only={job_id},
                read_the_backup=True,
            )
            if found and found[0].state == JobState.RUNNING:
                self.adopt(self.store.get(job_id))
                return
        if trainer is not None:
            # Another attempt runs: the job comes back paused, for a later resume.
            restore_lost_jobs(self.store, self.layout, trainers={}, only={job_id})
        log.warning(
            "trainer of an unknown job; stopping it at its next checkpoint",
            pid=pid,
            job=job_id,
            rebuilt=self.is_known_job(job_id),
        )
        if self.is_known_job(job_id):
            self.store.record(job_id, "stray_trainer_stopped", pid=pid)
        self.channels.send(pid, "stop")
        try:
            os.kill(trainer.pid if trainer else pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
