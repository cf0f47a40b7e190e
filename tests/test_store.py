"""Tests for the SQLite job store: the state machine, queue order, history and concurrency."""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import pytest

from loractl.protocol import ACTIVE, IN_FLIGHT, TERMINAL, TRANSITIONS
from loractl.supervisor.store import (
    SCHEMA_VERSION,
    AmbiguousJob,
    InvalidState,
    InvalidTransition,
    Job,
    JobExists,
    JobNotFound,
    JobState,
    Store,
    new_job_id,
)

ALLOWED = [(a, b) for a in JobState for b in sorted(TRANSITIONS[a])]
FORBIDDEN = [(a, b) for a in JobState for b in JobState if b not in TRANSITIONS[a]]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "queue.db"


@pytest.fixture
def store(db: Path):
    with Store(db) as s:
        yield s


def add(store: Store, name: str = "job", **kwargs) -> Job:
    return store.add_job(name=name, config_path=f"/c/{name}.yaml", job_dir=f"/j/{name}", **kwargs)


def path_to(target: JobState) -> list[JobState]:
    """The shortest chain of allowed moves from queued to ``target``."""
    paths = {JobState.QUEUED: []}
    todo = deque([JobState.QUEUED])
    while todo:
        state = todo.popleft()
        for nxt in sorted(TRANSITIONS[state]):
            if nxt not in paths:
                paths[nxt] = [*paths[state], nxt]
                todo.append(nxt)
    return paths[target]


def job_in(store: Store, state: JobState, name: str = "job") -> Job:
    job = add(store, name)
    for step in path_to(state):
        job = store.transition(job.id, step, "setup")
    assert job.state is state
    return job


def raw(db: Path, sql: str, params: tuple = ()) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql, params).fetchall()


# -- the state machine -------------------------------------------------------------------


def test_transition_table_matches_the_design():
    """The table allows exactly the moves the design lists; only completed is a dead end."""
    s = JobState
    assert TRANSITIONS[s.QUEUED] == {s.STARTING, s.PAUSED, s.CANCELLED, s.FAILED}
    assert TRANSITIONS[s.STARTING] == {
        s.RUNNING, s.PAUSING, s.CANCELLING, s.BACKOFF, s.FAILED, s.COMPLETED, s.PAUSED,
        s.CANCELLED, s.QUEUED,
    }  # fmt: skip
    assert TRANSITIONS[s.RUNNING] == {
        s.PAUSING, s.CANCELLING, s.BACKOFF, s.COMPLETED, s.FAILED, s.PAUSED, s.CANCELLED,
        s.QUEUED,
    }  # fmt: skip
    assert TRANSITIONS[s.PAUSING] == {
        s.RUNNING, s.STARTING, s.PAUSED, s.CANCELLING, s.BACKOFF, s.COMPLETED, s.FAILED,
        s.CANCELLED, s.QUEUED,
    }  # fmt: skip
    assert TRANSITIONS[s.CANCELLING] == {s.PAUSING, s.CANCELLED, s.COMPLETED, s.FAILED}
    assert TRANSITIONS[s.BACKOFF] == {s.STARTING, s.FAILED, s.PAUSED, s.CANCELLED, s.QUEUED}
    assert TRANSITIONS[s.PAUSED] == {s.QUEUED, s.CANCELLED}
    assert TRANSITIONS[s.FAILED] == {s.QUEUED}
    assert TRANSITIONS[s.COMPLETED] == frozenset()
    assert TRANSITIONS[s.CANCELLED] == {s.QUEUED}
    assert set(TRANSITIONS) == set(JobState)
    assert TERMINAL == {s.COMPLETED, s.FAILED, s.CANCELLED}
    assert ACTIVE == {s.STARTING, s.RUNNING, s.PAUSING, s.CANCELLING}
    assert IN_FLIGHT == ACTIVE | {s.BACKOFF}


@pytest.mark.parametrize(("old", "new"), ALLOWED, ids=[f"{a}->{b}" for a, b in ALLOWED])
def test_allowed_transition_applies_and_records_an_event(store, old, new):
    """Every allowed move changes the state, applies fields and records one matching event."""
    job = job_in(store, old)
    before = len(store.events(job.id))
    moved = store.transition(job.id, new, "because", rung=2, step=17, reason="why")
    assert moved.state is new
    assert store.get(job.id).state is new
    assert (moved.rung, moved.step, moved.reason) == (2, 17, "why")
    events = store.events(job.id)
    assert len(events) == before + 1
    last = events[-1]
    assert last["kind"] == "transition"
    assert (last["from_state"], last["to_state"], last["cause"]) == (old, new, "because")
    assert (last["rung"], last["step"]) == (2, 17)
    assert last["detail"]["rung"] == 2 and last["detail"]["reason"] == "why"


@pytest.mark.parametrize(("old", "new"), FORBIDDEN, ids=[f"{a}->{b}" for a, b in FORBIDDEN])
def test_forbidden_transition_raises_and_writes_nothing(store, db, old, new):
    """Every move outside the table raises InvalidTransition naming both states, and leaves
    the row and the history untouched."""
    job = job_in(store, old)
    events_before = store.events(job.id)
    with pytest.raises(InvalidTransition) as info:
        store.transition(job.id, new, "nope", rung=9)
    assert f"from {old} to {new}" in str(info.value)
    assert (info.value.from_state, info.value.to_state) == (old, new)
    assert store.get(job.id) == job
    assert store.events(job.id) == events_before


def test_transition_accepts_plain_strings(store):
    """A state given as its string value is the same as the enum member."""
    job = add(store)
    assert store.transition(job.id, "starting", "spawn").state is JobState.STARTING


def test_transition_of_unknown_job_raises_job_not_found(store):
    """A missing job is a JobNotFound, which is a KeyError, with an unquoted message."""
    with pytest.raises(JobNotFound) as info:
        store.transition("nope", JobState.STARTING, "x")
    assert isinstance(info.value, KeyError)
    assert str(info.value) == "no job with id 'nope'"


# -- outcome kept apart from state -------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "outcome"),
    [
        (JobState.COMPLETED, "success"),
        (JobState.CANCELLED, "cancelled"),
        (JobState.FAILED, "failed:ladder_exhausted"),
    ],
)
def test_terminal_states_get_a_default_outcome(store, state, outcome):
    """Entering a final state without an outcome fills in the one that fits it."""
    job = job_in(store, JobState.RUNNING)
    assert store.transition(job.id, state, "ladder_exhausted").outcome == outcome


def test_outcome_must_fit_the_state(store):
    """An outcome on a live job, or one contradicting the final state, is refused unwritten."""
    job = job_in(store, JobState.RUNNING)
    with pytest.raises(ValueError, match="does not fit"):
        store.transition(job.id, JobState.BACKOFF, "memory", outcome="failed:memory")
    with pytest.raises(ValueError, match="does not fit"):
        store.transition(job.id, JobState.COMPLETED, "done", outcome="cancelled")
    with pytest.raises(ValueError, match="does not fit"):
        store.transition(job.id, JobState.FAILED, "x", outcome="failed:")
    with pytest.raises(ValueError, match="does not fit"):
        store.update(job.id, outcome="success")
    assert store.get(job.id) == job


def test_retry_clears_the_old_outcome_but_history_keeps_it(store):
    """failed -> queued resets outcome and reason; the failure stays in the events."""
    job = job_in(store, JobState.RUNNING)
    failed = store.transition(job.id, JobState.FAILED, "memory", reason="no rung left")
    assert (failed.outcome, failed.reason) == ("failed:memory", "no rung left")
    retried = store.transition(job.id, JobState.QUEUED, "retry")
    assert (retried.outcome, retried.reason) == (None, "")
    causes = [e["detail"].get("outcome") for e in store.events(job.id)]
    assert "failed:memory" in causes


# -- field validation --------------------------------------------------------------------


def test_fields_that_are_not_settable_or_mistyped_are_refused(store):
    """state, id and unknown names, or a value of the wrong type, raise TypeError unwritten."""
    job = add(store)
    for bad in ({"state": "running"}, {"id": "x"}, {"seq": 5}, {"nonsense": 1}):
        with pytest.raises(TypeError):
            store.update(job.id, **bad)
    for bad in ({"rung": "1"}, {"rung": True}, {"trainer_pid": 1.5}, {"crashes": {}}):
        with pytest.raises(TypeError):
            store.transition(job.id, JobState.STARTING, "x", **bad)
    assert store.get(job.id) == job
    assert len(store.events(job.id)) == 1


# -- queue order -------------------------------------------------------------------------


def test_queue_order_is_priority_then_fifo(store):
    """Higher priority goes first; equal priorities keep submission order."""
    low1 = add(store, "low1")
    high1 = add(store, "high1", priority=5)
    low2 = add(store, "low2")
    high2 = add(store, "high2", priority=5)
    mid = add(store, "mid", priority=1)
    expected = [high1.id, high2.id, mid.id, low1.id, low2.id]
    assert [j.id for j in store.list()] == expected
    assert store.next_queued().id == high1.id
    store.transition(high1.id, JobState.STARTING, "spawn")
    assert store.next_queued().id == high2.id
    store.set_priority(low2.id, 10)
    assert store.next_queued().id == low2.id
    assert store.events(low2.id)[-1]["detail"] == {"from": 0, "to": 10}


def test_next_queued_is_none_when_nothing_waits(store):
    """An empty queue, or one with only non-queued jobs, has no next job."""
    assert store.next_queued() is None
    job_in(store, JobState.PAUSED)
    assert store.next_queued() is None


def test_list_filters_by_state_and_active_is_in_flight(store):
    """list(states) returns only those states; active() is starting, running and backoff."""
    by_state = {state: job_in(store, state, name=str(state)) for state in JobState}
    assert {j.state for j in store.list({JobState.PAUSED, JobState.FAILED})} == {
        JobState.PAUSED,
        JobState.FAILED,
    }
    assert {j.id for j in store.active()} == {by_state[s].id for s in IN_FLIGHT}
    assert len(store.list()) == len(JobState)
    assert store.list(set()) == []


# -- identity ----------------------------------------------------------------------------


def test_generated_ids_are_short_and_sort_by_creation_time(monkeypatch):
    """Ids are 12 lowercase base32hex characters and a later second sorts after an earlier."""
    import loractl.supervisor.store as store_module

    ids = []
    for now in (1_700_000_000, 1_700_000_001, 1_800_000_000, 4_000_000_000):
        monkeypatch.setattr(store_module.time, "time", lambda now=now: now + 0.5)
        ids.append(new_job_id())
    assert all(re.fullmatch(r"[0-9a-v]{12}", i) for i in ids)
    assert ids == sorted(ids)
    assert len({new_job_id() for _ in range(50)}) > 1


def test_a_colliding_generated_id_is_drawn_again(store, monkeypatch):
    """If a generated id is already taken, add_job draws another instead of failing."""
    import loractl.supervisor.store as store_module

    draws = iter(["sameid000000", "sameid000000", "freshid00000"])
    monkeypatch.setattr(store_module, "new_job_id", lambda: next(draws))
    assert add(store, "a").id == "sameid000000"
    assert add(store, "b").id == "freshid00000"
    assert [e["kind"] for e in store.events("freshid00000")] == ["submitted"]


def test_add_job_with_taken_or_unsafe_id_is_refused(store):
    """A reused caller id raises JobExists; an id unfit for a folder name raises ValueError."""
    add(store, job_id="abc123")
    with pytest.raises(JobExists):
        add(store, job_id="abc123")
    for bad in ("../x", "", ".hidden", "a/b", "abc\n"):
        with pytest.raises(ValueError):
            add(store, job_id=bad)
    assert len(store.list()) == 1


def test_resolve_by_id_prefix_and_name(store):
    """resolve takes an exact id, a unique prefix of 4+ chars, or the newest job of a name."""
    first = add(store, "sweep", job_id="abcd1111")
    second = add(store, "sweep", job_id="abcd2222")
    other = add(store, "other", job_id="ffee0000")
    assert store.resolve("abcd1111").id == first.id
    assert store.resolve("abcd2").id == second.id
    assert store.resolve("ffee").id == other.id
    assert store.resolve("sweep").id == second.id
    with pytest.raises(AmbiguousJob) as info:
        store.resolve("abcd")
    assert info.value.candidates == ["abcd1111", "abcd2222"]
    assert isinstance(info.value, JobNotFound)
    with pytest.raises(JobNotFound, match="at least 4"):
        store.resolve("ffe")
    with pytest.raises(JobNotFound):
        store.resolve("ABCD1")
    with pytest.raises(JobNotFound):
        store.resolve("abc%")


def test_exact_name_wins_over_id_prefix(store):
    """A name that happens to be a prefix of another job's id means the named job."""
    add(store, "x", job_id="beef0001")
    named = add(store, "beef", job_id="c0ffee01")
    assert store.resolve("beef").id == named.id


# -- progress, memory, crashes, events ----------------------------------------------------


def test_update_writes_fields_without_an_event_unless_asked(store):
    """update() changes progress silently; record_event= adds one event with the fields."""
    job = add(store)
    updated = store.update(job.id, step=40, examples_seen=160, total_examples=1000)
    assert (updated.step, updated.examples_seen) == (40, 160)
    assert store.get(job.id) == updated
    assert updated.updated_at >= job.updated_at
    assert [e["kind"] for e in store.events(job.id)] == ["submitted"]
    store.update(job.id, record_event="checkpoint", last_checkpoint_step=40)
    last = store.events(job.id)[-1]
    assert (last["kind"], last["detail"], last["step"]) == (
        "checkpoint",
        {"last_checkpoint_step": 40},
        40,
    )
    assert last["from_state"] is None and last["to_state"] is None


def test_note_peak_keeps_the_maximum_per_rung(store):
    """Each rung remembers its highest footprint; lower readings never lower it."""
    job = add(store)
    store.note_peak(job.id, 0, 9000.0)
    store.note_peak(job.id, 0, 8000.0)
    store.note_peak(job.id, 1, 7000)
    store.note_peak(job.id, 0, 9500.5)
    store.note_peak(job.id, 1, 6500.0)
    assert store.get(job.id).peak_memory_mb == {"0": 9500.5, "1": 7000.0}


def test_crashes_append_and_are_recorded(store):
    """add_crash appends in order and records a crash event with the crash's rung and step."""
    job = add(store)
    first = {"cause": "memory", "exit_code": 75, "signal": None, "step": 10, "rung": 0}
    second = {"cause": "hang", "exit_code": None, "signal": 9, "step": 12, "rung": 1}
    store.add_crash(job.id, first)
    after = store.add_crash(job.id, second)
    assert [c["cause"] for c in after.crashes] == ["memory", "hang"]
    assert all("at" in c for c in after.crashes)
    assert store.get(job.id).crashes == after.crashes
    crash_events = [e for e in store.events(job.id) if e["kind"] == "crash"]
    assert [(e["cause"], e["rung"], e["step"]) for e in crash_events] == [
        ("memory", 0, 10),
        ("hang", 1, 12),
    ]


def test_events_are_ordered_and_record_takes_free_form_detail(store):
    """The history lists submission, transitions and recorded events in the order they
    happened, with strictly increasing ids."""
    job = add(store)
    store.transition(job.id, JobState.STARTING, "spawn", attempt=1)
    store.record(job.id, "adopt", cause="restart", pid=123, path=Path("/x"))
    store.transition(job.id, JobState.RUNNING, "heartbeat")
    store.record(job.id, "ladder_step", rung=1, step=50, change="seq 128")
    events = store.events(job.id)
    assert [e["kind"] for e in events] == [
        "submitted",
        "transition",
        "adopt",
        "transition",
        "ladder_step",
    ]
    ids = [e["id"] for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert [e["at"] for e in events] == sorted(e["at"] for e in events)
    assert events[2]["detail"] == {"pid": 123, "path": "/x"} and events[2]["cause"] == "restart"
    assert (events[4]["rung"], events[4]["step"]) == (1, 50)
    with pytest.raises(JobNotFound):
        store.record("missing", "adopt")
    with pytest.raises(JobNotFound):
        store.events("missing")


def test_job_to_dict_is_json_safe(store):
    """to_dict round-trips through JSON with the state as its plain string."""
    job = store.add_crash(add(store).id, {"cause": "crash", "signal": 11})
    data = json.loads(json.dumps(job.to_dict()))
    assert data["state"] == "queued"
    assert data["crashes"][0]["signal"] == 11
    assert Job(**{**data, "state": JobState(data["state"])}) == job


def test_delete_only_finished_jobs_and_their_events(store, db):
    """Deleting a live job raises InvalidState; a finished one goes with its whole history."""
    live = job_in(store, JobState.RUNNING)
    with pytest.raises(InvalidState, match="cancel it first"):
        store.delete(live.id)
    assert store.get(live.id) == live
    done = job_in(store, JobState.COMPLETED, name="done")
    store.delete(done.id)
    with pytest.raises(JobNotFound):
        store.get(done.id)
    assert raw(db, "SELECT count(*) FROM events WHERE job_id = ?", (done.id,)) == [(0,)]
    assert raw(db, "SELECT count(*) FROM events WHERE job_id = ?", (live.id,))[0][0] > 0


# -- the file ----------------------------------------------------------------------------


def test_database_uses_wal_foreign_keys_and_a_schema_version(store, db):
    """The file is in WAL mode with user_version set, and the connection enforces FKs."""
    assert raw(db, "PRAGMA journal_mode") == [("wal",)]
    assert raw(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert store.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert store.conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
    with pytest.raises(sqlite3.IntegrityError):
        store.conn.execute(
            "INSERT INTO events (job_id, at, kind) VALUES ('ghost', 0, 'x')"
        )  # fmt: skip


def test_newer_schema_is_refused(db):
    """A file written by a newer loractl is not touched by an older one."""
    Store(db).close()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(RuntimeError, match="Upgrade loractl"):
        Store(db)


def test_state_persists_across_close_and_reopen(db):
    """Everything written is there after the store is closed and opened again."""
    with Store(db) as s:
        job = job_in(s, JobState.RUNNING)
        s.update(job.id, step=5)
        s.note_peak(job.id, 0, 1234.0)
        s.add_crash(job.id, {"cause": "memory"})
        events = s.events(job.id)
        job = s.get(job.id)
    with Store(db) as s:
        assert s.get(job.id) == job
        assert s.events(job.id) == events
        assert s.list() == [job]
    with pytest.raises(RuntimeError, match="closed"):
        s.get(job.id)


def test_second_connection_sees_committed_changes(db):
    """Two stores on one file, open at once, each see the other's writes immediately."""
    with Store(db) as writer, Store(db) as other, Store(db, readonly=True) as reader:
        job = add(writer)
        assert other.get(job.id) == job
        assert reader.get(job.id) == job
        other.transition(job.id, JobState.STARTING, "spawn", trainer_pid=99)
        assert writer.get(job.id).trainer_pid == 99
        assert reader.get(job.id).state is JobState.STARTING


def test_readonly_store_cannot_write_or_create(db, tmp_path):
    """A read-only store refuses writes and does not create a missing file."""
    with pytest.raises(FileNotFoundError):
        Store(tmp_path / "absent.db", readonly=True)
    assert not (tmp_path / "absent.db").exists()
    Store(db).close()
    with Store(db, readonly=True) as reader, pytest.raises(sqlite3.OperationalError):
        add(reader)


CHILD = """
import sys, time
from loractl.supervisor.store import Store
db, job_id, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
deadline = time.monotonic() + 30
with Store(db) as s:
    i, saw_parent = 0, False
    while (i < n or not saw_parent) and time.monotonic() < deadline:
        job = s.add_crash(job_id, {"cause": "child", "n": i})
        s.update(job_id, step=i)
        saw_parent = any(c["cause"] == "parent" for c in job.crashes)
        i += 1
print(i)
"""


def test_concurrent_writer_in_another_process_never_locks(db):
    """A second process appending crashes while this one appends and reads gets no
    "database is locked", and no append from either side is lost."""
    n = 150
    with Store(db) as store, Store(db, readonly=True) as reader:
        job = add(store)
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(db), job.id, str(n)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 30
            # Start only once the child writes, and go on until we have seen its writes
            # interleave with ours, so the two writers certainly overlapped.
            while not store.get(job.id).crashes:
                assert child.poll() is None, child.communicate()
                assert time.monotonic() < deadline
            mine, saw_child_after_me = 0, False
            while mine < n or (not saw_child_after_me and child.poll() is None):
                current = store.add_crash(job.id, {"cause": "parent", "n": mine})
                mine += 1
                assert reader.get(job.id).state is JobState.QUEUED
                reader.list()
                saw_child_after_me |= current.crashes[-2]["cause"] == "child" and mine > 1
                assert time.monotonic() < deadline
            out, err = child.communicate(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
                child.communicate()
        assert child.returncode == 0, err
        assert err == ""
        theirs = int(out)
        crashes = store.get(job.id).crashes
        assert sum(c["cause"] == "child" for c in crashes) == theirs >= n
        assert sum(c["cause"] == "parent" for c in crashes) == mine >= n
        crash_events = [e for e in store.events(job.id) if e["kind"] == "crash"]
        assert len(crash_events) == theirs + mine


# The jobs table as schema version 1 made it, before pausing and cancelling existed.
_V1_JOBS = """
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'starting', 'running', 'backoff', 'paused',
        'completed', 'failed', 'cancelled')),
    priority INTEGER NOT NULL DEFAULT 0,
    config_path TEXT NOT NULL,
    job_dir TEXT NOT NULL,
    rung INTEGER NOT NULL DEFAULT 0,
    attempt INTEGER NOT NULL DEFAULT 0,
    trainer_pid INTEGER,
    trainer_started_at REAL,
    outcome TEXT,
    reason TEXT NOT NULL DEFAULT '',
    retries_on_rung INTEGER NOT NULL DEFAULT 0,
    early_deaths INTEGER NOT NULL DEFAULT 0,
    last_checkpoint_step INTEGER,
    examples_seen INTEGER NOT NULL DEFAULT 0,
    total_examples INTEGER NOT NULL DEFAULT 0,
    step INTEGER NOT NULL DEFAULT 0,
    peak_memory_mb TEXT NOT NULL DEFAULT '{}',
    crashes TEXT NOT NULL DEFAULT '[]',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX jobs_queue ON jobs (state, priority DESC, seq);
CREATE INDEX jobs_name ON jobs (name, seq);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    from_state TEXT,
    to_state TEXT,
    cause TEXT NOT NULL DEFAULT '',
    rung INTEGER,
    step INTEGER,
    detail TEXT NOT NULL DEFAULT '{}'
);
INSERT INTO jobs (id, name, state, config_path, job_dir, created_at, updated_at)
    VALUES ('job-1', 'old', 'running', '/c.yaml', '/j', 1.0, 1.0);
INSERT INTO events (job_id, at, kind) VALUES ('job-1', 1.0, 'transition');
PRAGMA user_version = 1;
"""


def test_a_version_1_database_is_migrated_keeping_its_jobs_and_history(db):
    """A database from before the pausing and cancelling states opens, keeps every job and
    event, and then accepts the new states."""
    conn = sqlite3.connect(db)
    conn.executescript(_V1_JOBS)
    conn.close()
    with Store(db) as store:
        assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert store.get("job-1").state == JobState.RUNNING
        assert [e["kind"] for e in store.events("job-1")] == ["transition"]
        store.transition("job-1", JobState.PAUSING, "pause asked")
        assert store.get("job-1").state == JobState.PAUSING
        assert store.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_a_setting_survives_reopening_the_store(db):
    """Settings (the queue's hold) are kept in the database, not in the process."""
    with Store(db) as store:
        assert store.setting("queue_held", False) is False
        store.set_setting("queue_held", True)
        store.set_setting("paused_by_hold", ["a", "b"])
    with Store(db) as store:
        assert store.setting("queue_held") is True
        assert store.setting("paused_by_hold") == ["a", "b"]
