"""Every job command against a job in every state: refused with a reason or carried out,
and the supervisor always keeps serving with the job in a valid state.

The supervisor runs in-process (its handlers and its loop's tick, no sockets), over a real
SQLite store, with a real child process standing in for the trainer where a state needs one,
so stopping it uses real signals and the real exit classification.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import STAND_IN, make_job, put_in_state, reconfigure, wait_for
from loractl.protocol import (
    TRANSITIONS,
    CancelRequest,
    ErrorCode,
    HistoryRequest,
    JobState,
    LadderRequest,
    PauseRequest,
    PriorityRequest,
    RemoveRequest,
    Reply,
    ResumeRequest,
    RetryRequest,
    ShowRequest,
    StatusRequest,
    decode,
)
from loractl.supervisor.handlers import COMMAND_PHRASES, COMMAND_STATES, STATE_WORDS
from loractl.supervisor.service import Settings, Supervisor

COMMANDS = {
    "cancel": lambda ref: CancelRequest(job=ref),
    "pause": lambda ref: PauseRequest(job=ref),
    "resume": lambda ref: ResumeRequest(job=ref),
    "retry": lambda ref: RetryRequest(job=ref),
    "priority": lambda ref: PriorityRequest(job=ref, priority=5),
    "show": lambda ref: ShowRequest(job=ref),
    "history": lambda ref: HistoryRequest(job=ref),
    "ladder": lambda ref: LadderRequest(job=ref),
    "remove": lambda ref: RemoveRequest(job=ref),
}
READ_ONLY = {"show", "history", "ladder"}


def send(sup: Supervisor, message) -> Reply:
    reply = sup.dispatch(message.encode())
    decoded = decode(reply.encode(), limit=1 << 26)
    assert isinstance(decoded, Reply)
    return decoded


def settle(sup: Supervisor, job_id: str) -> JobState:
    """Run the loop until no trainer is left stopping; the job's state then."""

    def settled() -> bool:
        sup.tick()
        attempt = sup.runner.attempt
        return attempt is None or attempt.stop_reason is None

    wait_for(settled, 30)
    return sup.store.get(job_id).state


def reachable(state: JobState) -> set[JobState]:
    """Every state a job can get to from ``state`` through allowed transitions."""
    seen, todo = {state}, [state]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


# A stop under way ends where the user asked once the trainer has exited.
STOPS_END = {JobState.PAUSING: JobState.PAUSED, JobState.CANCELLING: JobState.CANCELLED}


@pytest.fixture
def supervisor(inprocess_supervisor):
    return inprocess_supervisor


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("state", list(JobState), ids=str)
def test_every_command_in_every_state(tiny_workspace, tmp_path, supervisor, state, command):
    """A command is carried out from the states its table allows and refused with
    INVALID_STATE and a reason from every other; either way the supervisor keeps serving
    and the job ends in a state reachable from where it was."""
    config = make_job(tiny_workspace, tmp_path / "src", iters=8)
    job_id = put_in_state(supervisor, config, state)
    reply = send(supervisor, COMMANDS[command](job_id))
    allowed = command in READ_ONLY or state in COMMAND_STATES[command]
    if allowed:
        assert reply.ok, reply.reason
    else:
        assert not reply.ok and reply.error == ErrorCode.INVALID_STATE
        verb = COMMAND_PHRASES[command][0]
        said = STATE_WORDS.get(state, str(state))
        assert reply.reason.startswith(f"cannot {verb} job {job_id}: it is {said}; only a ")
    final = settle(supervisor, job_id) if command != "remove" or not reply.ok else None
    if final is not None:
        assert final in reachable(state)
        if not allowed or command in READ_ONLY:
            assert final in (state, STOPS_END.get(state))
    else:
        assert not supervisor.queue.known(job_id)
    assert send(supervisor, StatusRequest()).ok


def test_resume_of_a_running_job_is_refused_and_the_job_still_completes(
    tiny_workspace, tmp_path, supervisor
):
    """The reproduced crash: `resume` on a running job once queued it under its live
    trainer, and the trainer's exit then killed the loop; now it is refused and the exit is
    handled as usual."""
    config = make_job(tiny_workspace, tmp_path / "src", iters=8)
    job_id = put_in_state(supervisor, config, JobState.RUNNING)
    for message in (ResumeRequest(job=job_id), RetryRequest(job=job_id)):
        reply = send(supervisor, message)
        assert reply.error == ErrorCode.INVALID_STATE
    supervisor.runner.attempt.popen.terminate()  # exits 82: "stopped", but nobody asked
    supervisor.runner.attempt.popen.wait()
    supervisor.tick()
    assert supervisor.store.get(job_id).state == JobState.BACKOFF
    assert send(supervisor, StatusRequest()).ok


def test_an_unloadable_queued_job_fails_and_the_next_one_runs(tiny_workspace, tmp_path, supervisor):
    """A queued job whose stored config was edited into broken YAML fails with the reason;
    the loop goes on to the next job instead of dying on every restart."""
    broken = put_in_state(supervisor, make_job(tiny_workspace, tmp_path / "a"), JobState.QUEUED)
    fine = put_in_state(supervisor, make_job(tiny_workspace, tmp_path / "b"), JobState.QUEUED)
    stored = supervisor.store.get(broken).config_path
    with open(stored, "a") as handle:
        handle.write("lora_parameters: [unclosed\n")
    reconfigure(supervisor, hold_queue=False, keep_awake=False)
    supervisor.tick()
    job = supervisor.store.get(broken)
    assert job.state == JobState.FAILED and "config no longer loads" in job.reason
    supervisor.tick()
    assert supervisor.store.get(fine).state == JobState.STARTING
    assert supervisor.runner.attempt is not None and supervisor.runner.attempt.job_id == fine


def test_an_exception_while_handling_an_exit_fails_only_that_job(
    tiny_workspace, tmp_path, supervisor, monkeypatch
):
    """A bug in exit handling fails the job it hit, with the traceback in its history, and
    the supervisor keeps serving."""
    job_id = put_in_state(supervisor, make_job(tiny_workspace, tmp_path), JobState.RUNNING)

    def broken_on_exit(*args):
        raise RuntimeError("a bug in on_exit")

    monkeypatch.setattr(supervisor.exits, "on_exit", broken_on_exit)
    supervisor.runner.attempt.popen.kill()
    supervisor.runner.attempt.popen.wait()
    supervisor.tick()
    job = supervisor.store.get(job_id)
    assert job.state == JobState.FAILED
    assert "a bug in on_exit" in job.reason
    internal = [e for e in supervisor.store.events(job_id) if e["kind"] == "internal_error"]
    assert internal and "Traceback" in internal[0]["detail"]["traceback"]
    assert send(supervisor, StatusRequest()).ok


def test_a_backoff_deadline_survives_a_supervisor_restart(tiny_workspace, tmp_path, supervisor):
    """recover() re-arms a backoff from its recorded deadline instead of restarting at once,
    and a queued job does not take the backed-off job's turn meanwhile."""
    waiting = put_in_state(supervisor, make_job(tiny_workspace, tmp_path / "a"), JobState.BACKOFF)
    queued = put_in_state(supervisor, make_job(tiny_workspace, tmp_path / "b"), JobState.QUEUED)
    fresh = Supervisor(supervisor.layout.home, Settings())
    fresh.wire(supervisor.store, supervisor.channels.local, supervisor.publisher.events)
    fresh.recover()
    remaining = fresh.queue.backoff_until[waiting] - time.monotonic()
    assert 3500 < remaining <= 3600
    assert fresh.queue.next_job(time.monotonic()) is None
    assert fresh.store.get(queued).state == JobState.QUEUED


def test_a_second_job_on_a_busy_adapter_folder_is_refused(tiny_workspace, tmp_path, supervisor):
    """Two live jobs never share an adapter folder: the second is refused, naming the first."""
    from loractl.config import ConfigError, load_config

    first = make_job(tiny_workspace, tmp_path / "a")
    put_in_state(supervisor, first, JobState.QUEUED)
    second = make_job(tiny_workspace, tmp_path / "b", adapter_path=str(tmp_path / "a" / "adapters"))
    with pytest.raises(ConfigError, match="is already used by job"):
        supervisor.queue.enqueue(second, load_config(second))
    assert len(supervisor.store.list()) == 1


def test_retry_fresh_starts_the_next_trainer_with_fresh(tiny_workspace, tmp_path, supervisor):
    """`retry --fresh` is how a supervised job starts over: its next trainer gets --fresh,
    and only that one."""
    job_id = put_in_state(supervisor, make_job(tiny_workspace, tmp_path), JobState.FAILED)
    assert send(supervisor, RetryRequest(job=job_id, fresh=True)).ok
    reconfigure(supervisor, hold_queue=False, keep_awake=False)
    supervisor.tick()
    attempt = supervisor.runner.attempt
    assert "--fresh" in attempt.popen.args
    assert not supervisor.runner.fresh_start_requested(job_id, attempt.spec.attempt + 1)


def test_a_stray_trainer_of_our_job_is_stopped_and_a_false_pid_is_not(
    tiny_workspace, tmp_path, supervisor
):
    """A heartbeat from an orphaned trainer of one of our jobs gets it stopped; a heartbeat
    naming some other process's pid signals nobody."""
    from loractl.protocol import Heartbeat

    job_id = put_in_state(supervisor, make_job(tiny_workspace, tmp_path), JobState.QUEUED)
    orphan = subprocess.Popen(
        [sys.executable, "-c", STAND_IN, "-m", "loractl.daemon.trainer", "--job-id", job_id]
    )
    try:
        supervisor.runner.take(Heartbeat(job_id=job_id, pid=orphan.pid))
        assert orphan.wait(timeout=10) in (82, -signal.SIGTERM)  # before or after its handler
        bystander = subprocess.Popen([sys.executable, "-c", STAND_IN])
        dropped = supervisor.dropped_frames
        supervisor.runner.take(Heartbeat(job_id=job_id, pid=bystander.pid))
        assert supervisor.dropped_frames == dropped + 1
        assert bystander.poll() is None
        bystander.kill()
        bystander.wait()
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
    kinds = [e["kind"] for e in supervisor.store.events(job_id)]
    assert kinds.count("stray_trainer_stopped") == 1


def test_a_cancel_during_a_hang_stop_keeps_the_hang_grace_then_cancels(
    tiny_workspace, tmp_path, supervisor
):
    """A cancel that arrives while a hung trainer is being stopped neither stretches its
    short hang grace nor hides the hang: the crash is recorded as a hang, then the job is
    cancelled as asked."""
    reconfigure(supervisor, hang_grace_s=1.0, stop_grace_s=60)
    job_id = put_in_state(supervisor, make_job(tiny_workspace, tmp_path), JobState.RUNNING)
    attempt = supervisor.runner.attempt
    attempt.popen.send_signal(signal.SIGSTOP)  # deaf to SIGTERM: a real hang
    attempt.hang("no heartbeat for 99 s")
    kill_at = attempt.kill_at
    assert send(supervisor, CancelRequest(job=job_id)).ok
    assert attempt.kill_at == kill_at and attempt.stop_reason == "hang"
    assert supervisor.store.get(job_id).state == JobState.CANCELLING
    started = time.monotonic()
    wait_for(lambda: (supervisor.tick(), supervisor.runner.attempt is None)[1], 20)
    assert time.monotonic() - started < 10
    job = supervisor.store.get(job_id)
    assert [c["cause"] for c in job.crashes] == ["hang"]
    assert job.state == JobState.CANCELLED and job.outcome == "cancelled"


def test_an_adopted_trainer_is_judged_by_the_exit_it_announced(
    tiny_workspace, tmp_path, supervisor
):
    """A trainer a restarted supervisor adopted is not its child, so its exit status is lost;
    the exit code it announced (here: disk full) decides, not "vanished"."""
    from loractl.protocol import TrainerEvent

    job_id = put_in_state(supervisor, make_job(tiny_workspace, tmp_path), JobState.RUNNING)
    attempt = supervisor.runner.attempt
    popen, attempt.popen = attempt.popen, None  # as adopted: not ours to wait for
    attempt.on_trainer_event(
        TrainerEvent(
            job_id=job_id,
            pid=attempt.pid,
            kind="error",
            detail={"exit_code": 74, "reason": "disk full: 0 MB free on /x"},
        ),
    )
    popen.kill()
    popen.wait()
    wait_for(lambda: (supervisor.tick(), supervisor.runner.attempt is None)[1], 20)
    job = supervisor.store.get(job_id)
    assert job.crashes[-1]["cause"] == "disk_full" and job.crashes[-1]["rule"] == "disk_full"
    assert job.state == JobState.PAUSED


def test_a_pause_during_a_memory_stop_keeps_the_step_down_and_pauses(
    tiny_workspace, tmp_path, supervisor
):
    """A pause asked while the guard stops a trainer for memory: the job shows pausing, and
    once the trainer is out it is paused on the cheaper rung, the step recorded."""
    from loractl.supervisor.policy import StopReason

    job_id = put_in_state(supervisor, make_job(tiny_workspace, tmp_path), JobState.RUNNING)
    supervisor.runner.attempt.stop(StopReason.MEMORY, grace=10)
    assert send(supervisor, PauseRequest(job=job_id)).data["state"] == "pausing"
    wait_for(lambda: (supervisor.tick(), supervisor.runner.attempt is None)[1], 20)
    job = supervisor.store.get(job_id)
    assert job.state == JobState.PAUSED and job.rung == 1
    assert [c["cause"] for c in job.crashes] == ["memory"]
    assert [e for e in supervisor.store.events(job_id) if e["kind"] == "ladder_step"]


# Stops on the first SIGTERM after a moment (its checkpoint); a second SIGTERM means "skip
# the checkpoint", as it does for the real trainer, and exits 1.
TWO_SIGNALS = (
    "import os, signal, sys, time\n"
    "seen = []\n"
    "def on_term(*_):\n"
    "    seen.append(1)\n"
    "    if len(seen) > 1:\n"
    "        sys.exit(1)\n"
    "signal.signal(signal.SIGTERM, on_term)\n"
    "open(os.environ['STAND_IN_READY'], 'w').close()\n"
    "while not seen:\n"
    "    time.sleep(0.05)\n"
    "time.sleep(1.5)\n"
    "sys.exit(82)\n"
)


def test_a_restart_while_pausing_carries_the_pause_on_without_a_second_signal(
    tiny_workspace, tmp_path, supervisor, monkeypatch
):
    """A supervisor that died while a pause was carried out adopts the stopping trainer and
    lets it finish its checkpoint (no second SIGTERM); the job ends paused, no crash."""
    ready = tmp_path / "ready"
    monkeypatch.setenv("STAND_IN_READY", str(ready))
    job_id = put_in_state(
        supervisor, make_job(tiny_workspace, tmp_path), JobState.RUNNING, script=TWO_SIGNALS
    )
    wait_for(ready.exists, 10)
    assert send(supervisor, PauseRequest(job=job_id)).data["state"] == "pausing"
    attempt = supervisor.runner.attempt
    popen = attempt.popen
    supervisor.store.update(job_id, trainer_started_at=psutil.Process(popen.pid).create_time())
    supervisor.runner.attempt = None  # the old supervisor is gone; its child lives on
    fresh = Supervisor(supervisor.layout.home, Settings(hold_queue=True, keep_awake=False))
    fresh.wire(supervisor.store, supervisor.channels.local, supervisor.publisher.events)
    fresh.inbox = supervisor.inbox
    fresh.recover()
    adopted = fresh.runner.attempt
    assert adopted is not None and adopted.stop_reason == "user-pause"
    wait_for(lambda: popen.poll() is not None, 20)
    assert popen.returncode == 82, "a second SIGTERM made it skip its checkpoint"
    wait_for(lambda: (fresh.tick(), fresh.runner.attempt is None)[1], 20)
    job = fresh.store.get(job_id)
    assert job.state == JobState.PAUSED and job.crashes == []
