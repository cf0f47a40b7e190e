"""The memory guard against a trainer that runs away: it is contained in seconds, not after
the full grace period, and the job steps down a rung."""

from __future__ import annotations

import time

import psutil

from conftest import make_job, put_in_state, reconfigure, wait_for
from loractl.supervisor.store import JobState

# Ignores SIGTERM (as a trainer stuck in a read of /dev/zero does: the handler never gets
# to run) and grows by 32 MB every 50 ms.
RUNAWAY = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "hoard = []\n"
    "while len(hoard) < 60:\n"
    "    hoard.append(bytearray(32 << 20))\n"
    "    time.sleep(0.05)\n"
    "time.sleep(120)\n"
)


def test_a_runaway_trainer_is_killed_at_once_and_the_job_steps_down(
    tiny_workspace, tmp_path, inprocess_supervisor
):
    """Over budget and still growing after the stop request, the trainer gets SIGKILL within
    seconds although the grace period is a minute; the exit counts as memory."""
    sup = inprocess_supervisor
    reconfigure(sup, stop_grace_s=60, guard_interval_s=0.05)
    job_id = put_in_state(
        sup, make_job(tiny_workspace, tmp_path), JobState.RUNNING, script=RUNAWAY, budget_mb=300
    )
    started = time.monotonic()
    wait_for(lambda: (sup.tick(), sup.runner.attempt is None)[1], 30, interval=0.05)
    assert time.monotonic() - started < 20
    job = sup.store.get(job_id)
    assert job.state == JobState.BACKOFF and job.rung == 1
    guard = [e["detail"] for e in sup.store.events(job_id) if e["kind"] == "memory_guard"]
    assert [g["action"] for g in guard] == ["stop", "kill"]
    assert job.crashes[-1]["cause"] == "memory"


# Takes 600 MB at once, then sits on it, deaf to SIGTERM.
FAR_OVER = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "hoard = b'x' * (600 << 20)\n"
    "time.sleep(120)\n"
)


def test_far_over_budget_the_grace_shrinks_to_one_checkpoint(
    tiny_workspace, tmp_path, inprocess_supervisor
):
    """At twice the budget the stop's grace is the checkpoint grace, not the full minute."""
    sup = inprocess_supervisor
    reconfigure(sup, stop_grace_s=60, checkpoint_grace_s=1.0, guard_interval_s=0.05)
    job_id = put_in_state(
        sup, make_job(tiny_workspace, tmp_path), JobState.RUNNING, script=FAR_OVER, budget_mb=250
    )
    hoarder = psutil.Process(sup.runner.attempt.pid)
    wait_for(lambda: hoarder.memory_info().rss > 550 << 20, 30)  # the guard sees it at once
    wait_for(lambda: (sup.tick(), sup.runner.attempt is None)[1], 30, interval=0.05)
    guard = [e["detail"] for e in sup.store.events(job_id) if e["kind"] == "memory_guard"]
    assert guard[0]["action"] == "stop" and guard[0]["grace_s"] == 1.0
    assert sup.store.get(job_id).rung == 1
