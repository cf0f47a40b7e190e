"""What happens after a trainer exits: classify, record the crash, ask the restart policy
(:mod:`loractl.supervisor.policy`) and carry out its decision.

A mixin of :class:`loractl.supervisor.service.Supervisor`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import structlog

from loractl.config import ConfigError, JobConfig
from loractl.daemon.checkpoint import completed_in
from loractl.protocol import CrashEvent, ExitCode
from loractl.supervisor.child import Trainer
from loractl.supervisor.classify import Cause, ExitEvidence, classify, signal_name
from loractl.supervisor.ladder import (
    describe_rung,
)
from loractl.supervisor.policy import Action, Do, ExitFacts, after_exit
from loractl.supervisor.pressure import cgroup_oom_kill_count
from loractl.supervisor.store import (
    TRANSITIONS,
    Job,
    JobState,
    StoreFull,
)

log = structlog.get_logger("loractl.supervisor")


def _free_space(folder: Path) -> tuple[float | None, str]:
    """Free MB on the file system holding ``folder`` (or its nearest existing parent)."""
    import shutil

    for candidate in (folder, *folder.parents):
        try:
            return shutil.disk_usage(candidate).free / 2**20, str(candidate)
        except OSError:
            continue
    return None, str(folder)


class ExitHandling:
    """Turn a trainer's exit into the job's next state."""

    def handle_exit(self, trainer: Trainer, exit_code: int | None, signum: int | None) -> None:
        """``on_exit``, guarded: a full disk keeps the exit pending (retried once there is
        space, never lost); any other error fails just this job."""
        try:
            self.on_exit(trainer, exit_code, signum)
            self.pending_exit = None
        except StoreFull as exc:
            self.pending_exit = (trainer, exit_code, signum)
            self.on_store_full(exc)
        except Exception as exc:
            self.pending_exit = None
            self._job_failed_internally(trainer.job_id, "handling its trainer's exit", exc)

    def on_exit(self, trainer: Trainer, exit_code: int | None, signum: int | None) -> None:
        job = self.store.get(trainer.job_id)
        if job.state not in (JobState.STARTING, JobState.RUNNING):
            # Handled already, up to a write the disk refused (a retry after a full disk):
            # only the loop's own timer may be missing.
            if job.state == JobState.BACKOFF:
                self._backoff_until.setdefault(job.id, time.monotonic())
            return
        if exit_code is None and signum is None and completed_in(self._adapter_path(job)):
            # Its end is unknown (adopted: its "done" went to a supervisor now gone), but the
            # adapter folder shows the finished run: done, not killed.
            self.store.record(job.id, "completion_found", pid=trainer.pid)
            exit_code = int(ExitCode.DONE)
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
            rank=trainer.culprit,
        )
        self.last_ranks[job.id] = trainer.describe_ranks()
        job = self.store.update(
            job.id, trainer_pid=None, last_checkpoint_step=trainer.last_checkpoint_step
        )
        culprit = trainer.ranks.get(trainer.culprit) if trainer.culprit is not None else None
        if verdict.cause not in (Cause.DONE, Cause.STOPPED):
            crash = CrashEvent(
                job_id=job.id,
                cause=str(verdict.cause),
                rule=verdict.rule,
                explanation=verdict.explanation,
                exit_code=exit_code,
                signal=signal_name(signum) if signum else None,
                step=trainer.step if trainer.step >= 0 else job.step,
                checkpoint_step=trainer.last_checkpoint_step,
                rung=trainer.rung,
                attempt=trainer.attempt,
                pid=culprit.pid if culprit else trainer.pid,
                footprint_mb=trainer.recent_footprint,
                rank=culprit.rank if culprit else 0,
                host=culprit.host if culprit else self.hostname,
            )
            if not trainer.crash_recorded:  # once, even when this exit is handled again
                job = self.store.add_crash(job.id, crash.record())
                trainer.crash_recorded = True
                self.publish("crash", crash)
        cfg = self._load_job_config(job)
        free_mb, disk_path = None, ""
        if verdict.cause == Cause.DISK_FULL:
            free_mb, disk_path = _free_space(Path(cfg.adapter_path))
        facts = ExitFacts(
            stop_reason=trainer.stop_reason,
            heartbeat_seen=trainer.last_heartbeat is not None,
            checkpoint_step=trainer.last_checkpoint_step,
            stderr_tail=tail,
            disk_free_mb=free_mb,
            disk_path=disk_path,
        )
        self.carry_out(job, after_exit(job, facts, verdict, cfg, self.policy), cfg)
        if trainer.then:
            self._then(job.id, trainer.then)

    def _then(self, job_id: str, wish: str) -> None:
        """The pause or cancel that arrived while another stop was under way."""
        target = JobState.PAUSED if wish == "pause" else JobState.CANCELLED
        if target not in TRANSITIONS[self.store.get(job_id).state]:
            return  # it completed or failed meanwhile: nothing left to pause or cancel
        extra = {"outcome": "cancelled"} if target == JobState.CANCELLED else {}
        self.store.transition(job_id, target, f"{wish} by the user (asked while stopping)", **extra)
        self.publish_state(job_id)

    def carry_out(self, job: Job, action: Action, cfg: JobConfig) -> None:
        """Apply the restart policy's decision to the job."""
        if action.early_deaths is not None:
            job = self.store.update(job.id, early_deaths=action.early_deaths)
        if action.do == Do.COMPLETE:
            self.store.transition(
                job.id, JobState.COMPLETED, action.why, outcome="success", reason=""
            )
            log.info("job completed", job=job.id, name=job.name, attempts=job.attempt)
            self.notify(job, f"{job.name} completed", f"adapters in {cfg.adapter_path}")
        elif action.do == Do.FAIL:
            self._fail(job, action.fail_cause, action.reason)
            return
        elif action.do == Do.STEP_DOWN:
            change = describe_rung(cfg, action.rung)
            self.store.record(
                job.id, "ladder_step", from_rung=job.rung, to_rung=action.rung, change=change
            )
            log.warning("ladder step", job=job.id, to_rung=action.rung, change=change)
            self.notify(
                job, f"{job.name}: out of memory", f"stepping down to rung {action.rung}: {change}"
            )
            self.store.transition(
                job.id, JobState.BACKOFF, action.why, rung=action.rung, retries_on_rung=0
            )
            self._arm_backoff(job.id, 0.0)
        elif action.do == Do.BACKOFF:
            self.store.transition(
                job.id, JobState.BACKOFF, action.why, retries_on_rung=action.retries_on_rung
            )
            self._arm_backoff(job.id, action.delay_s)
        else:
            state = {
                Do.PAUSE: JobState.PAUSED,
                Do.CANCEL: JobState.CANCELLED,
                Do.REQUEUE: JobState.QUEUED,
            }[action.do]
            extra = {"reason": action.reason} if action.reason else {}
            self.store.transition(job.id, state, action.why, **extra)
            if action.reason:
                log.warning("job paused", job=job.id, reason=action.reason)
                self.notify(job, f"{job.name} paused", action.reason)
        self.publish_state(job.id)

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

    def _fail(self, job: Job, cause: str, reason: str) -> None:
        self.store.transition(
            job.id, JobState.FAILED, f"failed: {cause}", outcome=f"failed:{cause}", reason=reason
        )
        self.publish_state(job.id, reason=reason)
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

    def _job_failed_internally(self, job_id: str, during: str, exc: BaseException) -> None:
        """A supervisor bug or an unexpected OS error hit one job: that job fails with the
        reason and the traceback in its history; the supervisor and every other job go on."""
        import traceback

        log.exception("job failed inside the supervisor", job=job_id, during=during)
        # Never leave a trainer behind that nobody watches: one job, at most one trainer.
        self.kill_trainer_of(job_id)
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
