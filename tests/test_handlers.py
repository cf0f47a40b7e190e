"""The request handlers over an explicit context, built without a supervisor: a real store,
queue and runner, no loop and no sockets bound. Refusals read as English, the queue can be
held and released as a whole, one finished job can be forgotten, and a request that changes
nothing records nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq

from conftest import make_job
from loractl.config import load_config
from loractl.paths import Layout
from loractl.protocol import (
    ErrorCode,
    JobState,
    PauseRequest,
    PriorityRequest,
    RemoveRequest,
    Reply,
    ResumeRequest,
    StatusRequest,
)
from loractl.supervisor.channels import Publisher, TelemetryChannels
from loractl.supervisor.desktop import KeepAwake, SideProcesses
from loractl.supervisor.handlers import HandlerContext, RequestHandlers, dispatch, english_list
from loractl.supervisor.jobqueue import JobQueue
from loractl.supervisor.pressure import Pressure, SystemMemory
from loractl.supervisor.runner import Runner
from loractl.supervisor.settings import Settings
from loractl.supervisor.store import Store


def calm() -> SystemMemory:
    return SystemMemory(pressure=Pressure.NORMAL, available_mb=8000, total_mb=16000, source="test")


@pytest.fixture
def handlers(tmp_path):
    layout = Layout.at(tmp_path / "home")
    layout.ensure()
    store = Store(layout.database)
    queue = JobQueue(store, layout)
    publisher = Publisher(None, store)
    telemetry = zmq.Context.instance().socket(zmq.ROUTER)
    telemetry.setsockopt(zmq.LINGER, 0)
    channels = TelemetryChannels(layout, telemetry, on_drop=lambda error: None)
    settings = Settings(keep_awake=False)
    runner = Runner(
        store,
        layout,
        settings,
        channels,
        publisher,
        KeepAwake(SideProcesses(), enabled=False),
        calm,
        is_known_job=queue.known,
    )
    context = HandlerContext(
        store=store,
        layout=layout,
        settings=settings,
        queue=queue,
        runner=runner,
        read_system=calm,
        publish_state=publisher.publish_state,
    )
    yield RequestHandlers(context)
    telemetry.close()
    store.close()


def ask(handlers: RequestHandlers, request) -> Reply:
    return dispatch(handlers, request.encode(), on_malformed=lambda: None)


def queued_job(handlers: RequestHandlers, workspace: Path, folder: Path) -> str:
    config = make_job(workspace, folder, iters=4)
    return handlers.ctx.queue.enqueue(config, load_config(config)).id


def test_a_refusal_says_what_was_asked_and_from_which_states_it_can_be(
    handlers, tiny_workspace, tmp_path
):
    """A command in the wrong state is refused in a sentence: what, why, and what would do."""
    job_id = queued_job(handlers, tiny_workspace, tmp_path / "a")
    handlers.ctx.store.transition(job_id, JobState.CANCELLED, "test")
    reply = ask(handlers, PriorityRequest(job=job_id, priority=3))
    assert reply.error == ErrorCode.INVALID_STATE
    assert reply.reason == (
        f"cannot change the priority of job {job_id}: it is cancelled; only a queued, "
        "starting, running, pausing, backed-off or paused job can be reprioritized"
    )
    reply = ask(handlers, ResumeRequest(job=job_id))
    assert reply.reason.endswith("only a pausing or paused job can be resumed")


def test_english_lists_join_with_or():
    """One, two and several words read as a person would write them."""
    assert english_list(["paused"]) == "paused"
    assert english_list(["a", "b"]) == "a or b"
    assert english_list(["a", "b", "c"]) == "a, b or c"


def test_pause_all_holds_the_queue_and_resume_all_releases_it(handlers, tiny_workspace, tmp_path):
    """`pause --all` starts nothing new and pauses a backed-off job; `resume --all` lets the
    queue run and resumes what the hold paused, but not a job paused on its own."""
    ctx = handlers.ctx
    waiting = queued_job(handlers, tiny_workspace, tmp_path / "a")
    backed_off = queued_job(handlers, tiny_workspace, tmp_path / "b")
    own_pause = queued_job(handlers, tiny_workspace, tmp_path / "c")
    ctx.store.transition(backed_off, JobState.STARTING, "test", attempt=1)
    ctx.store.transition(backed_off, JobState.BACKOFF, "test")
    ctx.store.transition(own_pause, JobState.PAUSED, "test")
    reply = ask(handlers, PauseRequest(all=True))
    assert reply.ok and reply.data["paused"] == [backed_off] and reply.data["held"]
    assert ctx.queue.next_job(now=1e12) is None
    assert ctx.store.get(backed_off).state == JobState.PAUSED
    assert ask(handlers, StatusRequest()).data["queue_held"] is True
    reply = ask(handlers, ResumeRequest(all=True))
    assert reply.ok and reply.data["resumed"] == [backed_off] and reply.data["was_held"]
    assert ctx.store.get(own_pause).state == JobState.PAUSED
    assert ctx.queue.next_job(now=1e12).id == waiting


def test_pause_with_a_job_and_all_is_refused(handlers, tiny_workspace, tmp_path):
    """Either one job or the whole queue, never both."""
    job_id = queued_job(handlers, tiny_workspace, tmp_path / "a")
    reply = ask(handlers, PauseRequest(job=job_id, all=True))
    assert reply.error == ErrorCode.INVALID_ARGUMENT and "not both" in reply.reason


def test_remove_forgets_one_finished_job_and_keeps_its_adapters(handlers, tiny_workspace, tmp_path):
    """The job's row, history and folder go; the adapters stay where they were."""
    ctx = handlers.ctx
    job_id = queued_job(handlers, tiny_workspace, tmp_path / "a")
    adapters = Path(load_config(ctx.store.get(job_id).config_path).adapter_path)
    adapters.mkdir(parents=True)
    (adapters / "adapters.safetensors").write_bytes(b"weights")
    reply = ask(handlers, RemoveRequest(job=job_id))
    assert reply.error == ErrorCode.INVALID_STATE  # queued: not finished
    ctx.store.transition(job_id, JobState.CANCELLED, "test")
    reply = ask(handlers, RemoveRequest(job=job_id))
    assert reply.ok and reply.data["adapter_path"] == str(adapters)
    assert not ctx.queue.known(job_id)
    assert (adapters / "adapters.safetensors").read_bytes() == b"weights"


def test_a_priority_that_changes_nothing_records_nothing(handlers, tiny_workspace, tmp_path):
    """Setting the priority a job already has writes no history row."""
    ctx = handlers.ctx
    job_id = queued_job(handlers, tiny_workspace, tmp_path / "a")
    before = len(ctx.store.events(job_id))
    assert ask(handlers, PriorityRequest(job=job_id, priority=0)).ok
    assert len(ctx.store.events(job_id)) == before
    assert ask(handlers, PriorityRequest(job=job_id, priority=2)).ok
    assert len(ctx.store.events(job_id)) == before + 1
