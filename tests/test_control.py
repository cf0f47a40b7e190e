"""Control requests against a real supervisor running the real trainer, and fuzzing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_job, wait_for
from loractl.client.control import request
from loractl.client.harness import SupervisorProcess
from loractl.protocol import (
    PROTOCOL_VERSION,
    CancelRequest,
    ErrorCode,
    PauseRequest,
    PriorityRequest,
    ResumeRequest,
    RetryRequest,
    StatusRequest,
    decode,
)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    sup = SupervisorProcess(tmp_path_factory.mktemp("control") / "home").start()
    yield sup
    sup.stop()


def kinds(job: dict) -> list[str]:
    return [e["kind"] if not e.get("to_state") else e["to_state"] for e in job["history"]]


def test_pause_then_resume_continues_from_the_checkpoint(tiny_workspace, tmp_path, live):
    """pause checkpoints and stops the real trainer; resume finishes the job from there."""
    job_id = live.submit(make_job(tiny_workspace, tmp_path, iters=400, checkpoint_every=1000))
    wait_for(lambda: live.show(job_id)["progress"]["step"] >= 3, 60)
    request(live.layout, PauseRequest(job=job_id))
    job = live.wait_state(job_id, {"paused"}, timeout=60)
    paused_at = job["last_checkpoint_step"]
    assert paused_at and paused_at >= 3 and job["trainer_pid"] is None
    request(live.layout, ResumeRequest(job=job_id))
    job = live.wait_state(job_id, {"completed"}, timeout=120)
    assert "paused" in kinds(job) and kinds(job).count("starting") == 2
    records = [
        json.loads(x) for x in (tmp_path / "adapters" / "train.log").read_text().splitlines()
    ]
    resumed = [r for r in records if r["event"] == "resumed"]
    assert [r["step"] for r in resumed] == [paused_at]


def test_cancel_stops_a_running_job(tiny_workspace, tmp_path, live):
    """cancel on a running job stops its trainer and ends it cancelled."""
    job_id = live.submit(make_job(tiny_workspace, tmp_path, iters=4000))
    wait_for(lambda: live.show(job_id)["progress"]["step"] >= 2, 60)
    request(live.layout, CancelRequest(job=job_id))
    job = live.wait_state(job_id, {"cancelled"}, timeout=60)
    assert job["outcome"] == "cancelled" and job["trainer_pid"] is None
    assert "cancelled by the user" in [e["cause"] for e in job["history"]]


def test_retry_a_failed_job_from_a_chosen_rung(tiny_workspace, tmp_path, live):
    """A job that exhausted its ladder is retried from rung 2 with a bigger budget and ends
    completed on that rung; a retry of a completed job is refused with INVALID_STATE."""
    config = make_job(tiny_workspace, tmp_path, iters=80, memory_budget_mb=64)
    job_id = live.submit(config)
    live.wait_state(job_id, {"failed"}, timeout=180)
    stored = Path(live.show(job_id)["job_dir"]) / "config.yaml"
    text = stored.read_text().replace("memory_budget_mb: 64", "memory_budget_mb: 100000")
    stored.write_text(text)
    request(live.layout, RetryRequest(job=job_id, from_rung=2))
    job = live.wait_state(job_id, {"completed"}, timeout=120)
    assert job["rung"] == 2
    assert "retried by the user from rung 2" in [e["cause"] for e in job["history"]]
    with pytest.raises(Exception) as info:
        request(live.layout, RetryRequest(job=job_id))
    assert info.value.code == ErrorCode.INVALID_STATE


def test_priority_reorders_the_queue(tiny_workspace, tmp_path, live):
    """With one job running, a later job raised in priority runs before an earlier one."""
    running = live.submit(make_job(tiny_workspace, tmp_path / "a", iters=160))
    first = live.submit(make_job(tiny_workspace, tmp_path / "b", iters=8))
    second = live.submit(make_job(tiny_workspace, tmp_path / "c", iters=8))
    request(live.layout, PriorityRequest(job=second, priority=10))
    for job_id in (running, first, second):
        live.wait_state(job_id, {"completed"}, timeout=180)
    started = {
        job_id: next(e["at"] for e in live.show(job_id)["history"] if e["to_state"] == "starting")
        for job_id in (first, second)
    }
    assert started[second] < started[first]
    assert "priority" in kinds(live.show(second))


def test_history_command_lists_events(tiny_workspace, tmp_path, live):
    """`loractl history --json` returns the job's recorded transitions."""
    job_id = live.submit(make_job(tiny_workspace, tmp_path, iters=8))
    live.wait_state(job_id, {"completed"}, timeout=120)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "loractl.client.cli",
            "--home",
            str(live.home),
            "history",
            "--json",
            job_id,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    states = [e["to_state"] for e in json.loads(result.stdout)["events"]]
    assert states[0] == "queued" and states[-1] == "completed" and "running" in states


frames = st.one_of(
    st.binary(max_size=300),
    st.dictionaries(
        st.text(max_size=8),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=5), inner, max_size=3)
            ),
            max_leaves=10,
        ),
        max_size=6,
    ).map(lambda d: json.dumps(d).encode()),
    st.builds(
        lambda kind, job, version, extra: json.dumps(
            {"type": kind, "id": "x", "v": version, "job": job, **extra}
        ).encode(),
        st.sampled_from(
            [
                "status",
                "show",
                "cancel",
                "pause",
                "retry",
                "priority",
                "submit",
                "list",
                "clean",
                "reply",
                "heartbeat",
                "nope",
            ]
        ),
        st.one_of(st.text(max_size=12), st.integers(), st.none()),
        st.sampled_from([PROTOCOL_VERSION, PROTOCOL_VERSION + 1, "1", None]),
        st.dictionaries(
            st.sampled_from(["from_rung", "priority", "states", "config_path", "adapters"]),
            st.one_of(st.integers(), st.text(max_size=10), st.none()),
            max_size=2,
        ),
    ),
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(frame=frames)
def test_fuzzed_frames_get_an_answer_and_the_daemon_keeps_serving(live, frame):
    """Random frames at the control socket are answered with an error or dropped; the
    supervisor never dies and still serves status afterwards."""
    context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(live.layout.control)
        sock.send(frame)
        if sock.poll(2000):
            reply = decode(sock.recv())
            assert reply.type == "reply"
    finally:
        sock.close()
    assert live.proc.poll() is None
    assert request(live.layout, StatusRequest(), timeout=5).ok


def test_wrong_version_is_refused_by_name_and_counted(live):
    """A request of another protocol version gets a VERSION_MISMATCH reply and is counted."""
    before = request(live.layout, StatusRequest()).data["dropped_frames"]
    context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(live.layout.control)
        sock.send(json.dumps({"type": "status", "id": "old", "v": PROTOCOL_VERSION + 1}).encode())
        assert sock.poll(5000)
        reply = decode(sock.recv())
    finally:
        sock.close()
    assert not reply.ok and reply.error == ErrorCode.VERSION_MISMATCH
    assert "protocol version" in reply.reason
    assert request(live.layout, StatusRequest()).data["dropped_frames"] > before
