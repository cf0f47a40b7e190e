"""The restart policy, state by state and cause by cause, with no processes and no store."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from loractl.config import parse_config
from loractl.supervisor.classify import Cause, Verdict
from loractl.supervisor.policy import (
    Do,
    ExitFacts,
    PolicySettings,
    after_exit,
    reason_with_tail,
)

SETTINGS = PolicySettings(early_death_limit=3, backoff_base_s=1.0, backoff_cap_s=60.0)
RETRYING = {
    Cause.MEMORY: True,
    Cause.RESOURCE_LIMIT: False,
    Cause.HANG: False,
    Cause.CRASH: False,
    Cause.KILLED_EXTERNALLY: False,
    Cause.GPU_WATCHDOG: False,
    Cause.ADAPTER_BUSY: False,
}


@dataclass
class StoredJob:
    """The fields of a stored job the policy reads."""

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
    (folder / "data" / "train.jsonl").write_text('{"text": "x"}\n')
    return parse_config({"model": "model", "data": "data", "max_retries": 3}, base_dir=folder)


def verdict(cause: Cause, retry: bool = True, step_down: bool = False) -> Verdict:
    return Verdict(cause, "test", retry, step_down, f"{cause}: what happened")


def facts(**changes) -> ExitFacts:
    values = {"stop_reason": None, "heartbeat_seen": True, "checkpoint_step": 10}
    return ExitFacts(**{**values, **changes})


def decide(job, cause, cfg, *, retry=True, step_down=False, **fact_changes):
    return after_exit(
        job,
        facts(**fact_changes),
        verdict(cause, retry, step_down),
        cfg,
        SETTINGS,
        random.Random(0),
    )


def test_done_completes(cfg):
    """A clean finish completes the job."""
    assert decide(StoredJob(), Cause.DONE, cfg, retry=False).do == Do.COMPLETE


@pytest.mark.parametrize(
    ("stop_reason", "expected"),
    [("user-pause", Do.PAUSE), ("user-cancel", Do.CANCEL), ("shutdown", Do.REQUEUE)],
)
def test_a_requested_stop_does_what_was_asked(cfg, stop_reason, expected):
    """A stop the supervisor asked for ends as that request: paused, cancelled or requeued."""
    action = decide(StoredJob(), Cause.STOPPED, cfg, retry=False, stop_reason=stop_reason)
    assert action.do == expected


@pytest.mark.parametrize("cause", [Cause.CONFIG_ERROR, Cause.DATA_ERROR])
def test_config_and_data_errors_fail_without_retry(cfg, cause):
    """Bad config or data is never retried; the reason carries the explanation."""
    action = decide(StoredJob(crashes=[{}]), cause, cfg, retry=False)
    assert action.do == Do.FAIL and action.fail_cause == str(cause)
    assert "what happened" in action.reason


def test_disk_full_pauses_with_the_free_space_and_the_path(cfg):
    """A full disk pauses the job (no retry loop) and says how much is free where."""
    action = decide(
        StoredJob(crashes=[{}]),
        Cause.DISK_FULL,
        cfg,
        retry=False,
        disk_free_mb=3.2,
        disk_path="/Volumes/small",
    )
    assert action.do == Do.PAUSE
    assert "disk full: 3 MB free on /Volumes/small" in action.reason
    assert "loractl resume" in action.reason


def test_memory_steps_down_one_rung(cfg):
    """A memory crash moves the job one rung down, with the change described."""
    action = decide(StoredJob(rung=0, crashes=[{}]), Cause.MEMORY, cfg, step_down=True)
    assert action.do == Do.STEP_DOWN and action.rung == 1
    assert "max_seq_length" in action.why  # the default ladder's first rung for this config


def test_memory_on_the_last_rung_fails_listing_every_rung(cfg):
    """With no rung left the job fails, listing each rung and its peak."""
    job = StoredJob(rung=3, crashes=[{}], peak_memory_mb={"0": 900.0, "3": 400.0})
    action = decide(job, Cause.MEMORY, cfg, step_down=True)
    assert action.do == Do.FAIL and action.fail_cause == "memory"
    assert "rung 0 (as submitted): peak 900 MB" in action.reason
    assert "rung 1" in action.reason and "no reading" in action.reason


@pytest.mark.parametrize("cause", sorted(set(RETRYING) - {Cause.MEMORY}))
def test_other_crashes_back_off_with_a_growing_delay(cfg, cause):
    """A crash on the same rung without a new checkpoint counts a retry and backs off longer
    each time; the budget runs out at max_retries."""
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
    """Trainers that die before saying anything are counted; at the limit the job fails with
    the stderr tail."""
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
    """A shortened stderr line in the explanation is replaced by the whole line, which is
    not repeated below it."""
    whole = "data/train.jsonl line 3: Invalid control character at: line 1 column 12 (char 11)"
    tail = f"Traceback (most recent call last):\nValueError: boom\nloractl: {whole}\n"
    reason = reason_with_tail(f"exit 65 (data error): {whole[:40]}...", tail)
    assert reason.splitlines()[0] == f"exit 65 (data error): {whole}"
    assert reason.count("Invalid control character") == 1
