"""What happens after an attempt ends: classify, record the crash, ask the restart policy
(:func:`loractl.supervisor.policy.after_exit`) and apply its action through the store.

The :class:`ExitHandler` is given everything it touches (the store, the queue's timers, the
publisher and the notifier); it never sees a process or a socket, only the facts of an
:class:`~loractl.supervisor.attempt.AttemptExit`.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from pathlib import Path

import structlog

from loractl.checkpoints import completed_in
from loractl.config import ConfigError, JobConfig, load_config
from loractl.protocol import ACTIVE, TRANSITIONS, CrashEvent, ExitCode, JobState
from loractl.supervisor.attempt import AttemptExit
from loractl.supervisor.channels import Publisher
from loractl.supervisor.classify import Cause, ExitEvidence, Verdict, classify, signal_name
from loractl.supervisor.desktop import Notifier
from loractl.supervisor.jobqueue import JobQueue
from loractl.supervisor.ladder import describe_rung
from loractl.supervisor.ladderplan import SKIP_EVENT, next_rung
from loractl.supervisor.memorymodel import StepPlan
from loractl.supervisor.policy import (
    Action,
    Do,
    ExitFacts,
    PolicySettings,
    StopReason,
    after_exit,
    headline,
)
from loractl.supervisor.processes import describe_consumers, other_consumers
from loractl.supervisor.store import Job, Store, disk_space_mb

log = structlog.get_logger("loractl.supervisor")


class ExitHandler:
    """Turn an attempt's exit into the job's next state."""

    def __init__(
        self,
        store: Store,
        queue: JobQueue,
        publisher: Publisher,
        notifier: Notifier,
        policy: PolicySettings,
        *,
        hostname: str | None = None,
        kill_attempt_of: Callable[[str], None] = lambda job_id: None,
    ):
        self.store = store
        self.queue = queue
        self.publisher = publisher
        self.notifier = notifier
        self.policy = policy
        self.hostname = hostname or socket.gethostname()
        # Never leave a trainer behind that nobody watches: the service kills the attempt
        # of a job that fails inside the supervisor.
        self.kill_attempt_of = kill_attempt_of
        # Each distributed job's ranks as its last attempt left them, for `show`.
        self.last_ranks: dict[str, list[dict[str, object]]] = {}

    def on_exit(self, ended: AttemptExit) -> None:
        job = self.store.get(ended.job_id)
        if job.state not in ACTIVE:
            # Handled already, up to a write the disk refused (a retry after a full disk):
            # only the loop's own timer may be missing.
            if job.state == JobState.BACKOFF:
                self.queue.ensure_backoff_timer(job.id)
            return
        if ended.exit_code is None and ended.signum is None and completed_in(self._adapters(job)):
            # Its end is unknown (adopted: its "done" went to a supervisor now gone), but the
            # adapter folder shows the finished run: done, not killed.
            self.store.record(job.id, "completion_found", pid=ended.pid)
            ended.exit_code = int(ExitCode.DONE)
        verdict = classify(evidence_of(ended))
        log.info(
            "trainer exited",
            job=job.id,
            pid=ended.pid,
            exit_code=ended.exit_code,
            signal=signal_name(ended.signum) if ended.signum else None,
            cause=str(verdict.cause),
            rule=verdict.rule,
            rank=ended.culprit.rank if ended.culprit else None,
        )
        if ended.spec.distributed:
            self.last_ranks[job.id] = list(ended.ranks)
        # The attempt's last figures, kept even when the heartbeats' own writes were refused
        # (a full disk): a job never goes back to "0/0 examples, step 0".
        job = self.store.update(
            job.id,
            trainer_pid=None,
            last_checkpoint_step=ended.last_checkpoint_step,
            step=max(job.step, ended.step),
            examples_seen=max(job.examples_seen, ended.examples_seen),
            total_examples=ended.total_examples or job.total_examples,
        )
        if verdict.cause not in (Cause.DONE, Cause.STOPPED):
            job = self._record_crash(job, ended, verdict)
        cfg = load_config(job.config_path)
        free_mb, disk_path = None, ""
        if verdict.cause == Cause.DISK_FULL:
            space = disk_space_mb(Path(cfg.adapter_path))
            if space is not None:
                free_mb, disk_path = space[0], str(space[2])
        plan = self._step_plan(job, ended, cfg) if verdict.step_down else None
        facts = ExitFacts(
            stop_reason=ended.stop_reason,
            # A pre-flight verdict, or the guard's stop, proves the trainer started: what
            # follows is the ladder's business, not a trainer that dies on arrival.
            heartbeat_seen=ended.heartbeat_seen
            or ended.exit_code == ExitCode.DOES_NOT_FIT
            or ended.stop_reason == StopReason.MEMORY,
            checkpoint_step=ended.last_checkpoint_step,
            stderr_tail=ended.stderr_tail,
            disk_free_mb=free_mb,
            disk_path=disk_path,
            next_rung=plan.target if plan else None,
            next_rung_why=plan.reason if plan and plan.skips else "",
            budget_mb=ended.spec.budget_mb,
        )
        action = after_exit(job, facts, verdict, cfg, self.policy)
        resumed = ended.user_wish == "resume" and ended.stop_reason == StopReason.USER_PAUSE
        if resumed and verdict.cause == Cause.STOPPED:
            # The user took the pause back while it was being carried out: the last word
            # was resume, so the job goes on from the checkpoint the stop wrote.
            action = Action(Do.REQUEUE, "resumed by the user while pausing; continues")
        self.carry_out(job, with_user_wish(action, ended.user_wish), cfg)

    def _step_plan(self, job: Job, ended: AttemptExit, cfg: JobConfig) -> StepPlan:
        """Where this memory stop goes: the job's memory model, fitted on its readings so
        far, picks the first rung predicted to fit; each rung it passes over is recorded
        with its prediction and reason (once, even when the exit is handled again)."""
        plan = next_rung(
            job,
            self.store.events(job.id),
            cfg,
            ended.spec.budget_mb,
            policy=self.policy.ladder_policy,
            margin=self.policy.ladder_margin,
        )
        if not ended.plan_recorded:
            for skip in plan.skips:
                self.store.record(
                    job.id,
                    SKIP_EVENT,
                    cause=f"skipped rung {skip.rung} ({describe_rung(cfg, skip.rung)})",
                    rung=skip.rung,
                    predicted_mb=round(skip.predicted_mb or 0.0, 1),
                    reason=skip.reason,
                )
            ended.plan_recorded = True
        return plan

    def _record_crash(self, job: Job, ended: AttemptExit, verdict: Verdict) -> Job:
        culprit = ended.culprit
        crash = CrashEvent(
            job_id=job.id,
            cause=str(verdict.cause),
            rule=verdict.rule,
            explanation=verdict.explanation,
            exit_code=ended.exit_code,
            signal=signal_name(ended.signum) if ended.signum else None,
            step=ended.step if ended.step >= 0 else job.step,
            checkpoint_step=ended.last_checkpoint_step,
            rung=ended.spec.rung,
            attempt=ended.spec.attempt,
            pid=culprit.pid if culprit else ended.pid,
            footprint_mb=ended.recent_footprint_mb,
            rank=culprit.rank if culprit else 0,
            host=culprit.host if culprit else self.hostname,
        )
        if ended.crash_recorded:  # once, even when this exit is handled again
            return job
        job = self.store.add_crash(job.id, crash.record())
        ended.crash_recorded = True
        self.publisher.publish("crash", crash)
        return job

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
            self.fail(job, action.fail_cause, action.reason)
            return
        elif action.do == Do.STEP_DOWN:
            self._step_down(job, action, cfg)
            self.store.transition(
                job.id, JobState.BACKOFF, action.why, rung=action.rung, retries_on_rung=0
            )
            self.queue.arm_backoff(job.id, 0.0)
        elif action.do == Do.BACKOFF:
            self.store.transition(
                job.id, JobState.BACKOFF, action.why, retries_on_rung=action.retries_on_rung
            )
            self.queue.arm_backoff(job.id, action.delay_s)
        else:
            state = {
                Do.PAUSE: JobState.PAUSED,
                Do.CANCEL: JobState.CANCELLED,
                Do.REQUEUE: JobState.QUEUED,
            }[action.do]
            extra: dict[str, object] = {"reason": action.reason} if action.reason else {}
            if action.rung is not None:  # a memory stop the user's pause or cancel ended
                self._step_down(job, action, cfg)
                extra.update(rung=action.rung, retries_on_rung=0)
            self.store.transition(job.id, state, action.why, **extra)
            if action.reason:
                log.warning("job paused", job=job.id, reason=action.reason)
                self.notify(job, f"{job.name} paused", action.reason)
        self.publisher.publish_state(job.id)

    def _step_down(self, job: Job, action: Action, cfg: JobConfig) -> None:
        assert action.rung is not None
        change = describe_rung(cfg, action.rung)
        # What else holds the memory tonight: the user can close it and keep the rung.
        others = describe_consumers(other_consumers({os.getpid()}))
        self.store.record(
            job.id,
            "ladder_step",
            from_rung=job.rung,
            to_rung=action.rung,
            change=change,
            others=others,
        )
        log.warning("ladder step", job=job.id, to_rung=action.rung, change=change, others=others)
        also = f"; also using memory: {others}" if others else ""
        self.notify(
            job,
            f"{job.name}: out of memory",
            f"stepping down to rung {action.rung}: {change}{also}",
        )

    def fail(self, job: Job, cause: str, reason: str) -> None:
        self.store.transition(
            job.id, JobState.FAILED, f"failed: {cause}", outcome=f"failed:{cause}", reason=reason
        )
        self.publisher.publish_state(job.id, reason=reason)
        log.error("job failed", job=job.id, cause=cause, reason=reason)
        self.notify(job, f"{job.name} failed", headline(reason, cause))

    def notify(self, job: Job, title: str, message: str) -> None:
        """A desktop notification, for jobs whose config asks for them."""
        try:
            wanted = load_config(job.config_path).notify
        except ConfigError:
            wanted = False
        if wanted:
            self.notifier.send(title, message)

    def _adapters(self, job: Job) -> str:
        try:
            return str(load_config(job.config_path).adapter_path)
        except ConfigError:
            return job.job_dir

    def job_failed_internally(self, job_id: str, during: str, exc: BaseException) -> None:
        """A supervisor bug or an unexpected OS error hit one job: that job fails with the
        reason and the traceback in its history; the supervisor and every other job go on."""
        log.exception("job failed inside the supervisor", job=job_id, during=during)
        self.kill_attempt_of(job_id)
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
                self.fail(job, "internal", f"supervisor error while {during}: {error}")
        except Exception:
            log.exception("could not record the job's failure", job=job_id)


def with_user_wish(action: Action, wish: str | None) -> Action:
    """The policy's action, with the pause or cancel the user asked for while another stop
    (a hang, memory, a lost rank) was under way folded in: one transition, so a full disk
    between two writes cannot lose the user's word. A memory stop's step down is kept, so
    a later resume or retry starts on the cheaper rung."""
    if wish not in ("pause", "cancel") or action.do not in (Do.STEP_DOWN, Do.BACKOFF, Do.REQUEUE):
        return action
    do = Do.PAUSE if wish == "pause" else Do.CANCEL
    why = f"{wish} by the user (asked while stopping)"
    if action.do == Do.STEP_DOWN:
        why += f"; {action.why}"
    return Action(
        do,
        why,
        rung=action.rung if action.do == Do.STEP_DOWN else None,
        early_deaths=action.early_deaths,
    )


def evidence_of(ended: AttemptExit) -> ExitEvidence:
    """What the classifier is told about an exit."""
    return ExitEvidence(
        exit_code=ended.exit_code,
        signal=ended.signum,
        stderr_tail=ended.stderr_tail,
        last_footprint_mb=ended.recent_footprint_mb,
        budget_mb=ended.spec.budget_mb,
        pressure=ended.pressure_seen,
        cgroup_oom_kills_delta=ended.cgroup_oom_kills_delta,
        hang_detected=ended.stop_reason == StopReason.HANG,
        memory_guard_stop=ended.stop_reason == StopReason.MEMORY,
        user_stop=ended.stop_reason is not None and ended.stop_reason.by_user,
        culprit=ended.culprit.label if ended.culprit is not None else "",
        culprit_lost=ended.culprit_lost,
    )
