"""The restart policy, state by state and cause by cause, with no processes and no store."""

from __future__ import annotations

import random
import signal
from dataclasses import dataclass, field

import pytest

from loractl.config import parse_config
from loractl.protocol import ExitCode
from loractl.supervisor.classify import RULES, Cause, ExitEvidence, Verdict, classify
from loractl.supervisor.policy import (
    Backoff,
    Do,
    ExitFacts,
    PolicySettings,
    StopReason,
    after_exit,
    reason_with_tail,
)

SETTINGS = PolicySettings(early_death_limit=3, backoff_base_s=1.0, backoff_cap_s=60.0)
# Each cause's (retry, step_down), read from the classifier's own table: the policy tests
# cannot disagree with the rules (test_each_cause_has_one_handling checks it is one per cause).
HANDLING = {rule.cause: (rule.retry, rule.step_down) for rule in RULES}
# An unreachable host has a backoff of its own (test_an_unreachable_host_...).
BACKING_OFF = sorted(
    cause
    for cause, (retry, down) in HANDLING.items()
    if retry and not down and cause != Cause.HOST_UNREACHABLE
)
STEPPING_DOWN = sorted(cause for cause, (_, down) in HANDLING.items() if down)
USER_STOPS = sorted(reason for reason in StopReason if reason.by_user)
OTHER_STOPS = sorted(reason for reason in StopReason if not reason.by_user)


@dataclass
class StoredJob:
    """The fields of a stored job the policy reads."""

    id: str = "j1"
    rung: int = 0
    retries_on_rung: int = 0
    early_deaths: int = 0
    crashes: list = field(default_factory=list)
    peak_memory_mb: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    folder = tmp_path_factory.mktemp("policy")
    (folder / "model").mkdir()
    (folder / "model" / "config.json").write_text("{}")
    (folder / "data").mkdir()
    (folder / "data" / "train.jsonl").write_text('{"text": "x"}\n' * 4)
    return parse_config({"model": "model", "data": "data", "max_retries": 3}, base_dir=folder)


def verdict(cause: Cause) -> Verdict:
    """A verdict for ``cause`` with the retry and step-down its rules give it."""
    retry, step_down = HANDLING[cause]
    return Verdict(cause, "test", retry, step_down, f"{cause}: what happened")


def facts(**changes) -> ExitFacts:
    values = {"stop_reason": None, "heartbeat_seen": True, "checkpoint_step": 10}
    return ExitFacts(**{**values, **changes})


def decide(job, cause, cfg, **fact_changes):
    return after_exit(job, facts(**fact_changes), verdict(cause), cfg, SETTINGS, random.Random(0))


def test_each_cause_has_one_handling():
    """All rules of one cause agree on retry and step-down, and every cause has rules."""
    assert set(HANDLING) == set(Cause)
    for cause in Cause:
        handling = {(r.retry, r.step_down) for r in RULES if r.cause == cause}
        assert handling == {HANDLING[cause]}, cause
    assert STEPPING_DOWN == [Cause.MEMORY]
    assert {Cause.HANG, Cause.CRASH} <= set(BACKING_OFF)


def test_done_completes(cfg):
    """A clean finish completes the job."""
    assert decide(StoredJob(), Cause.DONE, cfg).do == Do.COMPLETE


REQUESTED = {
    StopReason.USER_PAUSE: Do.PAUSE,
    StopReason.USER_CANCEL: Do.CANCEL,
    StopReason.SHUTDOWN: Do.REQUEUE,
}


@pytest.mark.parametrize("stop_reason", USER_STOPS)
def test_a_requested_stop_does_what_was_asked(cfg, stop_reason):
    """Each stop the user or a shutdown asks for ends as asked: paused, cancelled, requeued."""
    assert set(REQUESTED) == set(USER_STOPS)
    action = decide(StoredJob(), Cause.STOPPED, cfg, stop_reason=stop_reason)
    assert action.do == REQUESTED[stop_reason]


@pytest.mark.parametrize("stop_reason", [*OTHER_STOPS, None])
def test_a_stopped_exit_nobody_asked_for_backs_off(cfg, stop_reason):
    """A clean stop no user asked for (hang, memory, lost rank) backs off as a failed attempt."""
    # The classifier never says STOPPED for these; should it, the stop is still no request.
    job = StoredJob(crashes=[{"rung": 0, "checkpoint_step": 10}])
    action = decide(job, Cause.STOPPED, cfg, stop_reason=stop_reason)
    assert action.do == Do.BACKOFF and action.retries_on_rung == 1 and action.delay_s > 0


@pytest.mark.parametrize("cause", [Cause.CONFIG_ERROR, Cause.DATA_ERROR])
def test_config_and_data_errors_fail_without_retry(cfg, cause):
    """Bad config or data is never retried; the reason carries the explanation."""
    action = decide(StoredJob(crashes=[{}]), cause, cfg)
    assert action.do == Do.FAIL and action.fail_cause == str(cause)
    assert "what happened" in action.reason


def test_disk_full_pauses_with_the_free_space_and_the_path(cfg):
    """A full disk pauses the job (no retry loop) and says how much is free where."""
    action = decide(
        StoredJob(crashes=[{}]),
        Cause.DISK_FULL,
        cfg,
        disk_free_mb=3.2,
        disk_path="/Volumes/small",
    )
    assert action.do == Do.PAUSE
    assert "disk full: 3 MB free on /Volumes/small" in action.reason
    assert "loractl resume" in action.reason


def test_memory_steps_down_one_rung(cfg):
    """A memory crash moves the job one rung down, with the change described."""
    action = decide(StoredJob(rung=0, crashes=[{}]), Cause.MEMORY, cfg)
    assert action.do == Do.STEP_DOWN and action.rung == 1
    assert "max_seq_length" in action.why  # the default ladder's first rung for this config


def test_memory_on_the_last_rung_fails_listing_every_rung(cfg):
    """With no rung left the job fails, listing each rung and its peak."""
    job = StoredJob(rung=3, crashes=[{}], peak_memory_mb={"0": 900.0, "3": 400.0})
    action = decide(job, Cause.MEMORY, cfg)
    assert action.do == Do.FAIL and action.fail_cause == "memory"
    assert "rung 0 (as submitted): peak 900 MB" in action.reason
    assert "rung 1" in action.reason and "not run" in action.reason


@pytest.mark.parametrize("cause", BACKING_OFF)
def test_other_crashes_back_off_with_a_growing_delay(cfg, cause):
    """Each retrying cause backs off longer per retry and fails at max_retries."""
    first = decide(StoredJob(crashes=[{"rung": 0, "checkpoint_step": 10}]), cause, cfg)
    assert first.do == Do.BACKOFF and first.retries_on_rung == 1
    stuck = StoredJob(
        retries_on_rung=2,
        crashes=[{"rung": 0, "checkpoint_step": 10}, {"rung": 0, "checkpoint_step": 10}],
    )
    third = decide(stuck, cause, cfg, checkpoint_step=10)
    assert third.do == Do.BACKOFF and third.retries_on_rung == 3
    assert third.delay_s > first.delay_s
    exhausted = StoredJob(
        retries_on_rung=3,
        crashes=[{"rung": 0, "checkpoint_step": 10}, {"rung": 0, "checkpoint_step": 10}],
    )
    last = decide(exhausted, cause, cfg, checkpoint_step=10)
    assert last.do == Do.FAIL and "3 retries on rung 0 without a new checkpoint" in last.reason


def test_a_new_checkpoint_resets_the_retry_budget(cfg):
    """A crash after the checkpoint advanced starts the count again at one."""
    job = StoredJob(
        retries_on_rung=3,
        crashes=[{"rung": 0, "checkpoint_step": 10}, {"rung": 0, "checkpoint_step": 14}],
    )
    action = decide(job, Cause.KILLED_EXTERNALLY, cfg, checkpoint_step=14)
    assert action.do == Do.BACKOFF and action.retries_on_rung == 1


def test_deaths_before_the_first_heartbeat_fail_at_the_limit(cfg):
    """Deaths before the first heartbeat fail the job at the limit, with the stderr tail."""
    action = decide(
        StoredJob(early_deaths=1, crashes=[{}]),
        Cause.CRASH,
        cfg,
        heartbeat_seen=False,
        stderr_tail="ImportError: no module named x\n",
    )
    assert action.do == Do.BACKOFF and action.early_deaths == 2
    action = decide(
        StoredJob(early_deaths=2, crashes=[{}]),
        Cause.CRASH,
        cfg,
        heartbeat_seen=False,
        stderr_tail="ImportError: no module named x\n",
    )
    assert action.do == Do.FAIL and action.fail_cause == "early_death"
    assert "ImportError" in action.reason


def test_reason_puts_the_quoted_line_back_whole_and_only_once():
    """A shortened stderr line in the reason is put back whole and not repeated below."""
    whole = "data/train.jsonl line 3: Invalid control character at: line 1 column 12 (char 11)"
    tail = f"Traceback (most recent call last):\nValueError: boom\nloractl: {whole}\n"
    reason = reason_with_tail(f"exit 65 (data error): {whole[:40]}...", tail)
    assert reason.splitlines()[0] == f"exit 65 (data error): {whole}"
    assert reason.count("Invalid control character") == 1


def rank_lost(returncode: int | None, **evidence) -> tuple[ExitFacts, Verdict]:
    """A distributed attempt stopped because a rank was lost: the classifier reads the
    culprit rank's exit (``returncode`` as Popen gives it), with no stop flag of its own."""
    reason = StopReason.RANK_LOST
    verdict = classify(
        ExitEvidence.from_returncode(returncode, user_stop=reason.by_user, **evidence)
    )
    return facts(stop_reason=reason), verdict


def test_a_lost_rank_is_not_a_user_stop():
    """RANK_LOST is not one of the stops that end as the user's request."""
    assert not StopReason.RANK_LOST.by_user
    assert StopReason("rank-lost") is StopReason.RANK_LOST


@pytest.mark.parametrize(
    ("returncode", "evidence", "cause"),
    [
        (-signal.SIGKILL, {}, Cause.KILLED_EXTERNALLY),
        (None, {}, Cause.KILLED_EXTERNALLY),  # a remote rank gone without a word
        (int(ExitCode.STOPPED), {}, Cause.KILLED_EXTERNALLY),
        (1, {"stderr_tail": "ValueError: bad shape\n"}, Cause.CRASH),
        (-signal.SIGSEGV, {}, Cause.CRASH),
    ],
    ids=["sigkill", "vanished", "exit-82", "exit-1", "sigsegv"],
)
def test_a_lost_rank_backs_off_on_its_culprits_cause(cfg, returncode, evidence, cause):
    """A rank-lost stop takes the culprit rank's cause and backs off; never a user stop."""
    rank_facts, rank_verdict = rank_lost(returncode, **evidence)
    assert rank_verdict.cause == cause and rank_verdict.retry
    job = StoredJob(crashes=[{"rung": 0, "checkpoint_step": 10}])
    action = after_exit(job, rank_facts, rank_verdict, cfg, SETTINGS, random.Random(0))
    assert action.do == Do.BACKOFF and action.retries_on_rung == 1 and action.delay_s > 0
    assert str(cause) in action.why


def test_a_lost_rank_that_ran_out_of_memory_steps_down(cfg):
    """A culprit rank that exited 75 (out of memory) steps the job down, as one trainer's would."""
    rank_facts, rank_verdict = rank_lost(int(ExitCode.OUT_OF_MEMORY))
    action = after_exit(StoredJob(crashes=[{}]), rank_facts, rank_verdict, cfg, SETTINGS)
    assert (rank_verdict.cause, action.do, action.rung) == (Cause.MEMORY, Do.STEP_DOWN, 1)


def test_a_lost_rank_with_a_data_error_fails(cfg):
    """A culprit rank's data error fails the job: a retry would meet the same data."""
    rank_facts, rank_verdict = rank_lost(int(ExitCode.DATA_ERROR))
    action = after_exit(StoredJob(crashes=[{}]), rank_facts, rank_verdict, cfg, SETTINGS)
    assert action.do == Do.FAIL and action.fail_cause == str(Cause.DATA_ERROR)


def test_lost_ranks_without_a_new_checkpoint_use_up_the_retries(cfg):
    """Ranks lost again and again at the same checkpoint fail the job at max_retries."""
    rank_facts, rank_verdict = rank_lost(-signal.SIGKILL)
    stuck = StoredJob(
        retries_on_rung=3,
        crashes=[{"rung": 0, "checkpoint_step": 10}, {"rung": 0, "checkpoint_step": 10}],
    )
    action = after_exit(stuck, rank_facts, rank_verdict, cfg, SETTINGS)
    assert action.do == Do.FAIL and "3 retries on rung 0" in action.reason


def test_backoff_doubles_with_jitter_and_stops_at_the_cap():
    """The delay is 0 at first, then base * 2**(n-1) within the jitter, never over the cap."""
    backoff = Backoff(base_s=1.0, cap_s=60.0, jitter=0.2)
    rng = random.Random(7)
    assert backoff.delay(0, rng) == 0.0 and backoff.delay(-1, rng) == 0.0
    for n in range(1, 7):
        raw = 2.0 ** (n - 1)
        assert 0.8 * raw <= backoff.delay(n, rng) <= 1.2 * raw
    assert all(48.0 <= backoff.delay(n, rng) <= 60.0 for n in (7, 12, 200))
    assert Backoff(jitter=0.0).delay(3) == 4.0


def test_backoff_is_the_policy_delay(cfg):
    """after_exit's delay is Backoff's for the settings and the retry count, same rng."""
    job = StoredJob(
        retries_on_rung=1,
        crashes=[{"rung": 0, "checkpoint_step": 10}, {"rung": 0, "checkpoint_step": 10}],
    )
    action = decide(job, Cause.CRASH, cfg)
    expected = Backoff(SETTINGS.backoff_base_s, SETTINGS.backoff_cap_s).delay(2, random.Random(0))
    assert action.retries_on_rung == 2 and action.delay_s == expected


def unreachable(attempt: int, at: float) -> dict:
    return {"cause": "host_unreachable", "attempt": attempt, "at": at, "rung": 0}


def test_an_unreachable_host_backs_off_without_spending_retries_then_pauses(cfg):
    """Tries against a host that does not answer ssh cost neither retries nor early deaths;
    once it has been away host_unreachable_minutes, the job pauses naming it and since when."""
    why = "exit 84: loractl: host unreachable: mac2 did not answer ssh within 30 s (refused)"
    host_down = Verdict(Cause.HOST_UNREACHABLE, "host_unreachable", True, False, why)
    job = StoredJob(retries_on_rung=2, early_deaths=1, crashes=[unreachable(5, 1000.0)])
    action = after_exit(job, facts(heartbeat_seen=False), host_down, cfg, SETTINGS)
    assert action.do == Do.BACKOFF and action.retries_on_rung == 2 and action.early_deaths is None
    away = cfg.host_unreachable_minutes * 60
    job.crashes = [unreachable(n, 1000.0 + (n - 5) * away / 3) for n in range(5, 9)]
    action = after_exit(job, facts(heartbeat_seen=False), host_down, cfg, SETTINGS)
    assert action.do == Do.PAUSE, action
    assert action.reason.startswith("host mac2 unreachable since ") and "4 tries" in action.reason
    # An attempt that ran in between starts the count again.
    job.crashes = [
        unreachable(1, 0.0),
        unreachable(7, 1000.0 + away),
        unreachable(8, 1001.0 + away),
    ]
    action = after_exit(job, facts(heartbeat_seen=False), host_down, cfg, SETTINGS)
    assert action.do == Do.BACKOFF
