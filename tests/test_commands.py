"""Every job command against a job in every state: refused with a reason or carried out,
and the supervisor always keeps serving with the job in a valid state.

The supervisor runs in-process (its handlers and its loop's tick, no sockets), over a real
SQLite store, with a real child process standing in for the trainer where a state needs one,
so stopping it uses real signals and the real exit classification.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import zmq

from conftest import make_job, wait_for
from loractl.config import load_config
from loractl.protocol import (
    CancelRequest,
    ErrorCode,
    HistoryRequest,
    LadderRequest,
    PauseRequest,
    PriorityRequest,
    Reply,
    ResumeRequest,
    RetryRequest,
    ShowRequest,
    StatusRequest,
    decode,
)
from loractl.supervisor.service import COMMAND_STATES, Settings, Supervisor, Trainer
from loractl.supervisor.store import TRANSITIONS, JobState, Store

COMMANDS = {
    "cancel": lambda ref: CancelRequest(job=ref),
    "pause": lambda ref: PauseRequest(job=ref),
    "resume": lambda ref: ResumeRequest(job=ref),
    "retry": lambda ref: RetryRequest(job=ref),
    "priority": lambda ref: PriorityRequest(job=ref, priority=5),
    "show": lambda ref: ShowRequest(job=ref),
    "history": lambda ref: HistoryRequest(job=ref),
    "ladder": lambda ref: LadderRequest(job=ref),
}
READ_ONLY = {"show", "history", "ladder"}
# A stand-in trainer: a real process that exits 82 on SIGTERM, as the trainer does after
# its final checkpoint.
STAND_IN = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(82))\n"
    "time.sleep(120)\n"
)


class NoInbox:
    """The matrix is about commands; the inbox has its own tests."""

    def poll(self):
        return []


@pytest.fixture
def supervisor(tmp_path):
    sup = Supervisor(tmp_path / "home", Settings(hold_queue=True, stop_grace_s=10))
    sup.keep_awake.enabled = False
    sup.layout.ensure()
    sup.store = Store(sup.layout.database)
    sup.events = zmq.Context.instance().socket(zmq.PUB)
    sup.telemetry = zmq.Context.instance().socket(zmq.ROUTER)
    sup.telemetry.setsockopt(zmq.ROUTER_MANDATORY, 1)  # as bound: unknown peers raise
    for sock in (sup.events, sup.telemetry):
        sock.setsockopt(zmq.LINGER, 0)
    sup.inbox = NoInbox()
    yield sup
    if sup.trainer is not None and sup.trainer.popen is not None:
        sup.trainer.popen.kill()
        sup.trainer.popen.wait()
    sup.events.close()
    sup.telemetry.close()
    sup.store.close()


def put_in_state(sup: Supervisor, config, state: JobState) -> str:
    """A job in ``state``, reached through allowed transitions only."""
    job = sup.enqueue(config, load_config(config))
    store = sup.store
    if state in (JobState.STARTING, JobState.RUNNING, JobState.COMPLETED, JobState.BACKOFF):
        popen = subprocess.Popen([sys.executable, "-c", STAND_IN])
        store.transition(job.id, JobState.STARTING, "test", trainer_pid=popen.pid, attempt=1)
        if state in (JobState.COMPLETED, JobState.BACKOFF):
            popen.kill()
            popen.wait()
            store.transition(job.id, state, "test", trainer_pid=None)
            if state == JobState.BACKOFF:
                sup._arm_backoff(job.id, 3600.0)
        else:
            sup.trainer = Trainer(
                job_id=job.id,
                pid=popen.pid,
                attempt=1,
                rung=0,
                popen=popen,
                stderr_path=sup._stderr_path(job.id, 1),
                budget_mb=1e9,
                heartbeat_timeout=600,
                last_heartbeat=time.monotonic(),
                step=0,
            )
            if state == JobState.RUNNING:
                store.transition(job.id, JobState.RUNNING, "test")
    elif state != JobState.QUEUED:
        store.transition(job.id, state, "test")
    assert store.get(job.id).state == state
    return job.id


def send(sup: Supervisor, message) -> Reply:
    reply = sup.dispatch(message.encode())
    decoded = decode(reply.encode(), limit=1 << 26)
    assert isinstance(decoded, Reply)
    return decoded


def settle(sup: Supervisor, job_id: str) -> JobState:
    """Run the loop until no trainer is left stopping; the job's state then."""
    wait_for(lambda: (sup.tick(), sup.trainer is None or sup.trainer.stop_reason is None)[1], 30)
    return sup.store.get(job_id).state


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
        assert f"cannot {command} job {job_id}: it is {state}" in reply.reason
    final = settle(supervisor, job_id)
    assert (
        final == state
        or final in TRANSITIONS[state]
        or (
            # A stop passes through the trainer's exit: running -> paused / cancelled.
            state in (JobState.STARTING, JobState.RUNNING)
            and final in (JobState.PAUSED, JobState.CANCELLED)
        )
    )
    if not allowed or command in READ_ONLY:
        assert final == state
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
    supervisor.trainer.done_event = True
    supervisor.trainer.popen.terminate()  # exits 82: "stopped", but nobody asked
    supervisor.trainer.popen.wait()
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
    supervisor.settings = Settings(hold_queue=False, keep_awake=False)
    supervisor.tick()
    job = supervisor.store.get(broken)
    assert job.state == JobState.FAILED and "config no longer loads" in job.reason
    supervisor.tick()
    assert supervisor.store.get(fine).state == JobState.STARTING
    assert supervisor.trainer is not None and supervisor.trainer.job_id == fine


def test_an_exception_while_handling_an_exit_fails_only_that_job(
    tiny_workspace, tmp_path, supervisor, monkeypatch
):
    """A bug in exit handling fails the job it hit, with the traceback in its history, and
    the supervisor keeps serving."""
    job_id = put_in_state(supervisor, make_job(tiny_workspace, tmp_path), JobState.RUNNING)

    def broken_on_exit(*args):
        raise RuntimeError("a bug in on_exit")

    monkeypatch.setattr(supervisor, "on_exit", broken_on_exit)
    supervisor.trainer.popen.kill()
    supervisor.trainer.popen.wait()
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
    fresh.store, fresh.events = supervisor.store, supervisor.events
    fresh.recover()
    remaining = fresh._backoff_until[waiting] - time.monotonic()
    assert 3500 < remaining <= 3600
    assert fresh._next_job(time.monotonic()) is None
    assert fresh.store.get(queued).state == JobState.QUEUED
