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


def test_holding_a_held_queue_or_releasing_a_free_one_writes_nothing(
    handlers, tiny_workspace, tmp_path
):
    """`pause --all` twice and `resume --all` with no hold answer as before and write no
    setting: a flood of them costs the store nothing."""
    ctx = handlers.ctx
    queued_job(handlers, tiny_workspace, tmp_path / "a")
    writes: list[str] = []
    original = ctx.store.set_setting
    ctx.store.set_setting = lambda key, value: (writes.append(key), original(key, value))[1]
    reply = ask(handlers, ResumeRequest(all=True))
    assert reply.ok and reply.data == {"held": False, "was_held": False, "resumed": []}
    assert writes == []
    assert ask(handlers, PauseRequest(all=True)).data["already_held"] is False
    count = len(writes)
    reply = ask(handlers, PauseRequest(all=True))
    assert reply.ok and reply.data["already_held"] is True and reply.data["held"] is True
    assert len(writes) == count and ctx.queue.held


def test_a_priority_outside_32_bits_is_refused_with_the_range_not_a_traceback(
    handlers, tiny_workspace, tmp_path
):
    """A 20-digit priority (from any client) is INVALID_ARGUMENT naming the range; the job
    and its history are untouched and the refusal is not counted as a dropped frame."""
    ctx = handlers.ctx
    job_id = queued_job(handlers, tiny_workspace, tmp_path / "a")
    before = len(ctx.store.events(job_id))
    dropped: list[int] = []
    for value in (99999999999999999999, 2**31, -(2**31) - 1):
        frame = (
            f'{{"type":"priority","id":"p1","v":1,"job":"{job_id}","priority":{value}}}'
        ).encode()
        reply = dispatch(handlers, frame, on_malformed=lambda: dropped.append(1))
        assert reply.error == ErrorCode.INVALID_ARGUMENT, reply
        assert "between -2147483648 and 2147483647" in reply.reason
    assert dropped == []
    assert ctx.store.get(job_id).priority == 0 and len(ctx.store.events(job_id)) == before
    assert ask(handlers, PriorityRequest(job=job_id, priority=2**31 - 1)).ok


def test_a_duplicate_name_gets_a_suffix_and_a_shared_name_warns(handlers, tiny_workspace, tmp_path):
    """A second job with a taken name is stored as name-2 (said in the submit reply and its
    history); a JOB reference that several stored jobs share acts on the newest and says so."""
    from loractl.protocol import ShowRequest, SubmitRequest

    ctx = handlers.ctx
    first = make_job(tiny_workspace, tmp_path / "a", name="rf")
    second = make_job(tiny_workspace, tmp_path / "b", name="rf")
    one = ask(handlers, SubmitRequest(config_path=str(first)))
    two = ask(handlers, SubmitRequest(config_path=str(second)))
    assert one.data["name"] == "rf" and "warnings" not in one.data
    assert two.data["name"] == "rf-2"
    assert two.data["warnings"] == [
        f"another job is already named 'rf': this one is named 'rf-2' (id {two.data['id']}); "
        "use either to name it"
    ]
    assert [e["kind"] for e in ctx.store.events(two.data["id"])][-1] == "renamed"
    assert load_config(ctx.store.get(two.data["id"]).config_path).name == "rf-2"
    assert ask(handlers, ShowRequest(job="rf-2")).data["job"]["id"] == two.data["id"]
    # A store from before names were unique: both rows named "rf".
    ctx.store.add_job(job_id="old-rf", name="rf", config_path=first, job_dir=tmp_path / "a")
    reply = ask(handlers, PriorityRequest(job="rf", priority=5))
    assert reply.ok and reply.data["id"] == "old-rf"
    (warning,) = reply.data["warnings"]
    assert warning.startswith("2 jobs are named 'rf': this is the newest, old-rf (queued)")
    assert one.data["id"] in warning and "name a job by its id" in warning
    assert "warnings" not in ask(handlers, PriorityRequest(job=one.data["id"], priority=1)).data


def test_an_adapter_path_in_the_home_or_nested_in_another_jobs_is_refused(
    handlers, tiny_workspace, tmp_path
):
    """adapter_path inside loractl's home (its inbox, say), inside another job's adapter
    folder, or above it, is refused at submit with the reason; nothing is queued."""
    from loractl.protocol import SubmitRequest

    ctx = handlers.ctx
    first = make_job(tiny_workspace, tmp_path / "a", adapter_path=str(tmp_path / "runs" / "a"))
    assert ask(handlers, SubmitRequest(config_path=str(first))).ok
    cases = {
        "home": (ctx.layout.inbox, "is inside loractl's home"),
        "inside": (tmp_path / "runs" / "a" / "checkpoints", "is inside job"),
        "above": (tmp_path / "runs", "holds job"),
    }
    for name, (adapter_path, words) in cases.items():
        config = make_job(tiny_workspace, tmp_path / name, adapter_path=str(adapter_path))
        reply = ask(handlers, SubmitRequest(config_path=str(config)))
        assert not reply.ok and reply.error == ErrorCode.INVALID_ARGUMENT, (name, reply)
        assert words in reply.reason and "adapter_path" in reply.reason, (name, reply.reason)
    assert len(ctx.store.list()) == 1
    # Unset, the queue's own folder inside the home is fine.
    unset = make_job(tiny_workspace, tmp_path / "unset")
    data = unset.read_text().splitlines()
    unset.write_text("\n".join(line for line in data if not line.startswith("adapter_path")))
    assert ask(handlers, SubmitRequest(config_path=str(unset))).ok
