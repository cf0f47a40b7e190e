"""What to do after a trainer exits: a pure function from facts to one action.

No processes, no store, no clock: given the job as stored (its crash just recorded), what the
exit looked like, the classifier's verdict, the job's config and the supervisor's settings,
``after_exit`` says whether the job completes, pauses, is cancelled, goes back to the queue,
steps down a rung, backs off before a restart, or fails (and why). The supervisor carries
the action out; the tests walk every cause and state in milliseconds.

Only a stop the user (or the supervisor's own shutdown) asked for ends as that request. Every
other stop the supervisor makes (a hang, the memory guard, a lost rank) is a failure of the
attempt: the classifier reads the exit (for a lost rank, the culprit rank's exit) and the job
is retried, stepped down or failed by that verdict, like any crash.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from loractl.config import JobConfig
from loractl.supervisor.classify import Cause, Verdict
from loractl.supervisor.hostwait import NO_ANSWER, UNREACHABLE
from loractl.supervisor.ladder import describe_rung, rung_count


class StopReason(StrEnum):
    """Why the supervisor asked an attempt to stop (None on an exit it did not ask for)."""

    MEMORY = "memory"  # the guard: over budget, or critical pressure
    HANG = "hang"  # silent or stalled
    RANK_LOST = "rank-lost"  # one rank of a distributed job is gone; the rest must stop
    USER_PAUSE = "user-pause"
    USER_CANCEL = "user-cancel"
    SHUTDOWN = "shutdown"  # the supervisor is stopping; the job resumes when it is back

    @property
    def by_user(self) -> bool:
        """A stop that only ends this attempt: its checkpoint is the point, not a crash."""
        return self in (StopReason.USER_PAUSE, StopReason.USER_CANCEL, StopReason.SHUTDOWN)


@dataclass(frozen=True)
class Backoff:
    """How long to wait before the next attempt: exponential in the failures, with jitter,
    capped."""

    base_s: float = 1.0
    cap_s: float = 60.0
    jitter: float = 0.2

    def delay(self, consecutive_failures: int, rng: random.Random | None = None) -> float:
        """``base_s * 2**(n-1)`` spread by +-``jitter``, never over ``cap_s``; 0 for n <= 0."""
        if consecutive_failures <= 0:
            return 0.0
        raw: float = min(self.cap_s, self.base_s * 2 ** (consecutive_failures - 1))
        spread = (rng or random).uniform(1 - self.jitter, 1 + self.jitter)
        return min(self.cap_s, raw * spread)


class Do(StrEnum):
    COMPLETE = "complete"
    PAUSE = "pause"
    CANCEL = "cancel"
    REQUEUE = "requeue"
    STEP_DOWN = "step_down"
    BACKOFF = "backoff"
    FAIL = "fail"


@dataclass(frozen=True)
class Action:
    do: Do
    why: str = ""  # the event's cause line
    reason: str = ""  # for FAIL and PAUSE: what the user reads in `show`
    fail_cause: str = ""  # for FAIL: the outcome's cause (memory, crash, early_death, ...)
    rung: int | None = None  # for STEP_DOWN: the new rung
    delay_s: float = 0.0  # for BACKOFF
    retries_on_rung: int | None = None
    early_deaths: int | None = None


@dataclass(frozen=True)
class ExitFacts:
    """What the supervisor saw of the trainer, besides what the classifier was told."""

    stop_reason: StopReason | None
    heartbeat_seen: bool
    checkpoint_step: int | None
    stderr_tail: str = ""
    disk_free_mb: float | None = None  # for a disk-full exit: what is left, and where
    disk_path: str = ""
    # For a memory exit: the rung the memory model chose (skipping rungs that would not
    # help); None steps down one rung, as the recipe does.
    next_rung: int | None = None
    next_rung_why: str = ""
    # The budget the guard held the attempt to, in MB: named in a failure for memory.
    budget_mb: float | None = None


@dataclass(frozen=True)
class PolicySettings:
    early_death_limit: int = 3
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 60.0
    ladder_policy: str = "learning"  # or "blind": see supervisor/ladderplan.py
    ladder_margin: float = 0.10


def after_exit(
    job: Any,
    facts: ExitFacts,
    verdict: Verdict,
    cfg: JobConfig,
    settings: PolicySettings,
    rng: random.Random | None = None,
) -> Action:
    """The one decision after every exit. ``job`` is the stored job, with this exit's crash
    record (if it was a crash) already appended to ``job.crashes``."""
    if verdict.cause == Cause.DONE:
        return Action(Do.COMPLETE, "trainer finished")
    asked = facts.stop_reason is not None and facts.stop_reason.by_user
    if verdict.cause == Cause.STOPPED and asked:
        if facts.stop_reason == StopReason.USER_PAUSE:
            return Action(Do.PAUSE, "paused by the user; checkpointed")
        if facts.stop_reason == StopReason.USER_CANCEL:
            return Action(Do.CANCEL, "cancelled by the user")
        return Action(Do.REQUEUE, "supervisor shutting down; will resume")
    if verdict.cause == Cause.DISK_FULL:
        where = facts.disk_path or "the adapter folder"
        free = f"{facts.disk_free_mb:.0f} MB free" if facts.disk_free_mb is not None else "full"
        reason = (
            f"disk full: {free} on {where}; the last checkpoint is kept. Free some space, "
            "then `loractl resume` continues from it"
        )
        return Action(Do.PAUSE, reason, reason=reason)
    if verdict.cause == Cause.HOST_UNREACHABLE:
        return _wait_for_host(job, verdict, cfg, settings, rng)
    # The classifier says STOPPED only for a user's stop. A stopped verdict for any other
    # stop (a lost rank, a hang) would be a failed attempt all the same: it is retried with
    # backoff below, never taken for a pause, a cancel or a shutdown's requeue.
    if not verdict.retry and verdict.cause != Cause.STOPPED:
        return Action(
            Do.FAIL,
            f"failed: {verdict.cause}",
            reason=reason_with_tail(verdict.explanation, facts.stderr_tail),
            fail_cause=str(verdict.cause),
        )
    early_deaths = None
    if not facts.heartbeat_seen:
        early_deaths = job.early_deaths + 1
        if early_deaths >= settings.early_death_limit:
            return Action(
                Do.FAIL,
                "failed: early_death",
                reason=(
                    f"the trainer died before its first heartbeat {early_deaths} times in a "
                    f"row{_last_line(facts.stderr_tail)}\nlast stderr:\n"
                    + last_lines(facts.stderr_tail)
                ),
                fail_cause="early_death",
                early_deaths=early_deaths,
            )
    if verdict.step_down:
        if job.rung + 1 >= rung_count(cfg):
            return Action(
                Do.FAIL,
                "failed: memory",
                reason=ladder_exhausted(job, cfg, facts.budget_mb),
                fail_cause="memory",
                early_deaths=early_deaths,
            )
        rung = facts.next_rung if facts.next_rung is not None else job.rung + 1
        rung = min(max(rung, job.rung + 1), rung_count(cfg) - 1)
        change = describe_rung(cfg, rung)
        because = f"; {facts.next_rung_why}" if facts.next_rung_why else ""
        return Action(
            Do.STEP_DOWN,
            f"memory: stepping down to rung {rung} ({change}){because}",
            rung=rung,
            retries_on_rung=0,
            early_deaths=early_deaths,
        )
    previous = [c for c in job.crashes[:-1] if c.get("rung") == job.rung]
    advanced = not previous or (
        (facts.checkpoint_step or -1) > (previous[-1].get("checkpoint_step") or -1)
    )
    retries = 1 if advanced else job.retries_on_rung + 1
    if retries > cfg.max_retries:
        return Action(
            Do.FAIL,
            f"failed: {verdict.cause}",
            reason=(
                f"{retries - 1} retries on rung {job.rung} without a new checkpoint; last: "
                + reason_with_tail(verdict.explanation, facts.stderr_tail)
            ),
            fail_cause=str(verdict.cause),
            early_deaths=early_deaths,
        )
    delay = Backoff(settings.backoff_base_s, settings.backoff_cap_s).delay(retries, rng)
    return Action(
        Do.BACKOFF,
        f"{verdict.cause}: {verdict.explanation}; restarting in {delay:.1f} s",
        delay_s=delay,
        retries_on_rung=retries,
        early_deaths=early_deaths,
    )


def _wait_for_host(
    job: Any,
    verdict: Verdict,
    cfg: JobConfig,
    settings: PolicySettings,
    rng: random.Random | None,
) -> Action:
    """Another Mac did not answer ssh, so nothing ran: try again with backoff, spending
    neither the rung's retries nor an early death, until the host has been away for
    ``host_unreachable_minutes`` (from the first of these exits in a row); then pause."""
    # Exits of consecutive attempts: an attempt that ran in between ends the streak.
    streak: list[dict[str, Any]] = []
    for crash in reversed(job.crashes):
        follows = not streak or crash.get("attempt") == streak[-1].get("attempt", 0) - 1
        if crash.get("cause") != Cause.HOST_UNREACHABLE or not follows:
            break
        streak.append(crash)
    first, last = (streak[-1], streak[0]) if streak else ({}, {})
    away_s = float(last.get("at") or 0.0) - float(first.get("at") or 0.0)
    quoted = verdict.explanation.partition(UNREACHABLE)[2]
    host = quoted.split(NO_ANSWER, 1)[0] or "a host"
    if away_s >= cfg.host_unreachable_minutes * 60:
        since = time.strftime("%H:%M", time.localtime(float(first.get("at") or 0.0)))
        reason = (
            f"host {host} unreachable since {since} ({away_s / 60:.0f} min, {len(streak)} "
            f"tries): {quoted or verdict.explanation}; `loractl resume {job.id}` tries again"
        )
        return Action(Do.PAUSE, reason, reason=reason)
    delay = Backoff(settings.backoff_base_s, settings.backoff_cap_s).delay(max(1, len(streak)), rng)
    return Action(
        Do.BACKOFF,
        f"{verdict.cause}: {verdict.explanation}; trying again in {delay:.1f} s",
        delay_s=delay,
        retries_on_rung=job.retries_on_rung,
    )


def ladder_exhausted(job: Any, cfg: JobConfig, budget_mb: float | None = None) -> str:
    """Why a job failed with no rung left. Its first line is whole on its own (a notification
    and a piped `watch` show that line alone): every rung's peak, and the budget, e.g.
    "out of memory on every rung: peaks 412/-/301/297 MB over a 250 MB budget"; then one
    line per rung, and what to do."""
    peaks: list[str] = []
    lines: list[str] = []
    for rung in range(rung_count(cfg)):
        peak = job.peak_memory_mb.get(str(rung))
        peaks.append(f"{peak:.0f}" if peak else "-")
        shown = f"peak {peak:.0f} MB" if peak else "not run (skipped, or never reached)"
        lines.append(f"  rung {rung} ({describe_rung(cfg, rung)}): {shown}")
    budget = budget_mb or cfg.memory_budget_mb
    over = f" over a {budget:.0f} MB budget" if budget else ""
    unrun = " (-: not run)" if "-" in peaks else ""
    headline = f"out of memory on every rung: peaks {'/'.join(peaks)} MB{over}{unrun}"
    advice = (
        "add a rung (grad_checkpoint: true, fewer num_layers, smaller batch_size) "
        "or raise memory_budget_mb"
    )
    return "\n".join([headline, *lines, advice])


def headline(reason: str, fallback: str = "") -> str:
    """A reason's first line: the whole first sentence, numbers included, as a notification
    or a piped `watch` shows it. Every reason is built so that this line stands alone."""
    first = reason.strip().splitlines()[0] if reason.strip() else ""
    return first or fallback


def _last_line(tail: str) -> str:
    """The stderr's last line, quoted after a colon, or nothing."""
    lines = last_lines(tail, 1)
    return f": {lines.strip()[:200]}" if lines.strip() else ""


def last_lines(text: str, count: int = 8) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join(lines[-count:])


def reason_with_tail(explanation: str, tail: str) -> str:
    """The verdict's one line, then the stderr lines above it for context.

    The explanation quotes the decisive stderr line, shortened to fit one line; that line is
    put back whole and not repeated below, so a reason neither ends mid-sentence nor says
    the same thing twice.
    """
    lines = last_lines(tail).splitlines()
    headline, _, quoted = explanation.partition(": ")
    quoted = quoted.removesuffix("...").strip()
    if quoted:
        matching = [line for line in lines if quoted in line]
        if matching:
            lines.remove(matching[-1])
            full = matching[-1].strip()
            explanation = f"{headline}: {full[full.index(quoted) :]}"
    return "\n".join([explanation, *lines])
