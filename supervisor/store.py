"""The durable job queue and job history: one SQLite file shared by every loractl process.

A job's lifecycle ``state`` is kept apart from its ``outcome`` (pueue's TaskStatus versus
TaskResult): the state says where the job is, the outcome says how it ended and exists only
once it has ended. Every state change goes through :meth:`Store.transition`, which checks it
against :data:`TRANSITIONS` and writes the new row and an event in one transaction, so the
events table is the job's complete history.

Several processes may open the same file: the supervisor writes, the client may read it
read-only for a fast ``status``. Writes take the write lock up front (``BEGIN IMMEDIATE``) and
readers use WAL snapshots, so neither side sees "database is locked" under normal contention.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from loractl.protocol import IN_FLIGHT, TERMINAL, TRANSITIONS, JobState

# 2: the pausing and cancelling states (in the jobs table's CHECK), and the settings table.
SCHEMA_VERSION = 2

# Long enough to outlast any checkpoint or a burst of client writes; a writer that holds the
# lock longer than this is a bug worth surfacing as an error.
BUSY_TIMEOUT_MS = 10_000

_MIN_PREFIX = 4
# The setting a backup copy holds: when it was taken (epoch seconds).
BACKUP_TAKEN_AT = "backup_taken_at"
_JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class InvalidState(ValueError):
    """The job is in a state that does not allow the requested operation."""


class InvalidTransition(InvalidState):
    """A state change that :data:`TRANSITIONS` does not allow."""

    def __init__(self, job_id: str, from_state: JobState, to_state: JobState):
        allowed = ", ".join(sorted(TRANSITIONS[from_state])) or "nothing (final state)"
        super().__init__(
            f"job {job_id}: cannot go from {from_state} to {to_state} "
            f"(from {from_state} it may go to {allowed})"
        )
        self.job_id = job_id
        self.from_state = from_state
        self.to_state = to_state


class JobNotFound(KeyError):
    """No job matches the id or reference."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        # KeyError's own __str__ wraps the message in quotes.
        return self.message


class AmbiguousJob(JobNotFound):
    """A short reference matches more than one job; ``candidates`` lists their ids."""

    def __init__(self, ref: str, candidates: list[str]):
        shown = ", ".join(candidates)
        super().__init__(f"{ref!r} matches several jobs ({shown}); type more of the id")
        self.candidates = candidates


class StoreFull(OSError):
    """The disk (or quota) holding the database is full: nothing was written. Reads still
    work; the caller retries the write once there is space."""

    def __init__(self, path: Path):
        free = _free_mb(path)
        shown = f"{free:.0f} MB free" if free is not None else "no space"
        super().__init__(
            errno.ENOSPC, f"disk full: {shown} on {path.parent}; free some space there"
        )
        self.free_mb = free


def disk_space_mb(folder: Path) -> tuple[float, float, Path] | None:
    """Free and total MB on the file system holding ``folder`` (or its nearest existing
    parent), and the folder that was measured; None if none can be read."""
    import shutil

    for candidate in (folder, *folder.parents):
        try:
            usage = shutil.disk_usage(candidate)
        except OSError:
            continue
        return usage.free / 2**20, usage.total / 2**20, candidate
    return None


def _free_mb(path: Path) -> float | None:
    space = disk_space_mb(path.parent)
    return space[0] if space else None


# SQLITE_CORRUPT and SQLITE_NOTADB: the file's pages (or its header) are not SQLite's.
_CORRUPT_CODES = (11, 26)


def is_corrupt(exc: BaseException) -> bool:
    """Whether ``exc`` says the database file is damaged (not busy, not missing, not full)."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF in _CORRUPT_CODES:
        return True
    text = str(exc)
    return "malformed" in text or "not a database" in text


def repair_advice(path: Path) -> str:
    """What to do about a damaged job database, in one sentence."""
    return (
        f"restart the supervisor (`loractl daemon restart`, or `loractl daemon run`): it moves "
        f"{path.name} aside and rebuilds it from the job folders; or, with the supervisor "
        "stopped, run `loractl daemon repair`"
    )


class StoreCorrupt(RuntimeError):
    """The database file is damaged (SQLite says malformed, or not a database)."""

    def __init__(self, path: Path, detail: str):
        super().__init__(f"the job database {path} is damaged ({detail}); {repair_advice(path)}")
        self.path = path
        self.detail = detail


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.OperationalError):
        # SQLITE_FULL (13); SQLITE_IOERR (10) is what a failed write of the WAL gives.
        return getattr(exc, "sqlite_errorcode", None) in (13,) or "disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class JobExists(ValueError):
    """``add_job`` was given an id that is already taken."""


@dataclass
class Job:
    """One row of the queue. ``state`` is the lifecycle, ``outcome`` the result once terminal."""

    id: str
    name: str
    state: JobState
    priority: int
    config_path: str
    job_dir: str
    rung: int = 0
    attempt: int = 0
    trainer_pid: int | None = None
    # The process create_time, so a recycled pid is never mistaken for our trainer.
    trainer_started_at: float | None = None
    # "success" | "failed:<cause>" | "cancelled"; None until the job reaches a terminal state.
    outcome: str | None = None
    reason: str = ""
    retries_on_rung: int = 0
    early_deaths: int = 0
    last_checkpoint_step: int | None = None
    examples_seen: int = 0
    total_examples: int = 0
    step: int = 0
    # JSON object keys are strings, so rungs are keyed by str(rung) here as on disk.
    peak_memory_mb: dict[str, float] = field(default_factory=dict)
    crashes: list[dict[str, Any]] = field(default_factory=list)
    created_at: float = 0.0
    updated_at: float = 0.0
    seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = str(self.state)
        return data


_INT = (int,)
_NUM = (int, float)
_FIELD_TYPES: dict[str, tuple[tuple[type, ...], bool]] = {
    # name: (accepted types, None allowed)
    "name": ((str,), False),
    "priority": (_INT, False),
    "config_path": ((str,), False),
    "job_dir": ((str,), False),
    "rung": (_INT, False),
    "attempt": (_INT, False),
    "trainer_pid": (_INT, True),
    "trainer_started_at": (_NUM, True),
    "outcome": ((str,), True),
    "reason": ((str,), False),
    "retries_on_rung": (_INT, False),
    "early_deaths": (_INT, False),
    "last_checkpoint_step": (_INT, True),
    "examples_seen": (_INT, False),
    "total_examples": (_INT, False),
    "step": (_INT, False),
    "peak_memory_mb": ((dict,), False),
    "crashes": ((list,), False),
}
_JSON_FIELDS = frozenset({"peak_memory_mb", "crashes"})
_COLUMNS = [f.name for f in fields(Job)]
assert set(_FIELD_TYPES) == set(_COLUMNS) - {"id", "state", "created_at", "updated_at", "seq"}

_SCHEMA = f"""
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ({", ".join(f"'{s}'" for s in JobState)})),
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
    peak_memory_mb TEXT NOT NULL DEFAULT '{{}}',
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
    detail TEXT NOT NULL DEFAULT '{{}}'
);
CREATE INDEX events_job ON events (job_id, id);
CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# Version 1 -> 2: SQLite cannot alter a CHECK constraint, so the jobs table is rebuilt with
# the new states allowed (the generalized ALTER TABLE procedure of SQLite's documentation).
_JOBS_TABLE = _SCHEMA[_SCHEMA.index("CREATE TABLE jobs") : _SCHEMA.index("CREATE INDEX jobs_queue")]
_MIGRATE_1_TO_2 = [
    _JOBS_TABLE.replace("CREATE TABLE jobs", "CREATE TABLE jobs_v2").rstrip().rstrip(";"),
    "INSERT INTO jobs_v2 SELECT * FROM jobs",
    "DROP TABLE jobs",
    "ALTER TABLE jobs_v2 RENAME TO jobs",
    "CREATE INDEX jobs_queue ON jobs (state, priority DESC, seq)",
    "CREATE INDEX jobs_name ON jobs (name, seq)",
    "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
]


# RFC 4648 "base32hex": its digits sort in the same order as the values they encode.
_B32HEX = "0123456789abcdefghijklmnopqrstuv"


def _b32(value: int, width: int) -> str:
    return "".join(_B32HEX[(value >> (5 * i)) & 31] for i in reversed(range(width)))


def new_job_id() -> str:
    """12 characters: the creation second (7, good until the year 3058) then 25 random bits.

    Ids sort by submission second. Hex would leave only 16 random bits after a 32-bit time,
    and 50 files dropped into the inbox in one second would then collide 2% of the time.
    """
    return _b32(int(time.time()), 7) + _b32(secrets.randbits(25), 5)


def _check_fields(values: dict[str, Any]) -> None:
    for key, value in values.items():
        if key in ("id", "state", "seq", "created_at", "updated_at"):
            hint = " (use transition())" if key == "state" else ""
            raise TypeError(f"job field {key!r} cannot be set{hint}")
        if key not in _FIELD_TYPES:
            raise TypeError(f"unknown job field {key!r}")
        types, nullable = _FIELD_TYPES[key]
        if value is None and nullable:
            continue
        # bool is an int subclass; True as a rung or pid is always a bug.
        if isinstance(value, bool) or not isinstance(value, types):
            raise TypeError(f"job field {key!r} got {type(value).__name__}: {value!r}")


def _check_outcome(job_id: str, state: JobState, outcome: str | None) -> None:
    """The outcome exists exactly when the job has ended, and agrees with how it ended."""
    checks: dict[JobState, Callable[[str | None], bool]] = {
        JobState.COMPLETED: lambda o: o == "success",
        JobState.CANCELLED: lambda o: o == "cancelled",
        JobState.FAILED: lambda o: o is not None and o.startswith("failed:") and len(o) > 7,
    }
    expected: Callable[[str | None], bool] = checks.get(state, lambda o: o is None)
    if not expected(outcome):
        raise ValueError(f"job {job_id}: outcome {outcome!r} does not fit state {state}")


def _json(value: Any) -> str:
    # default=str: a Path or an enum in an event detail is recorded, not a crash.
    return json.dumps(value, default=str, sort_keys=True)


class Store:
    """The jobs and events tables in one SQLite file.

    One connection per instance, guarded by a lock so a watcher thread may share it. Open with
    ``readonly=True`` for a reader that never creates, migrates or writes anything.
    """

    def __init__(self, path: Path | str, *, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.RLock()
        self._durable: bool | None = None
        # Told once a read or write finds the file damaged (the supervisor repairs it then).
        self.on_corrupt: Callable[[StoreCorrupt], None] | None = None
        if readonly:
            if not self.path.exists():
                raise FileNotFoundError(f"no job database at {self.path}")
            uri = self.path.resolve().as_uri() + "?mode=ro"
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn: sqlite3.Connection | None = conn
        try:
            conn.row_factory = sqlite3.Row
            # Before anything else, so even the switch to WAL waits for a busy peer.
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA foreign_keys = ON")
            if readonly:
                conn.execute("PRAGMA query_only = ON")
                self._check_version()
            else:
                conn.execute("PRAGMA journal_mode = WAL")
                self._set_durable(False)
                self._migrate()
        except BaseException:
            self.close()
            raise

    # -- connection plumbing --------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"store {self.path} is closed")
        return self._conn

    def _set_durable(self, durable: bool) -> None:
        # Durability per write, not per database. In WAL mode synchronous=NORMAL survives a
        # crash of any process but may drop the last commits on power loss or kernel panic
        # (which memory exhaustion on a Mac can cause). State transitions, submissions and
        # crash records are rare and must not be lost (a lost "cancelled" would re-run a job),
        # so they use FULL plus F_FULLFSYNC on macOS, where plain fsync stops at the drive
        # cache. Progress updates come ~1/s and the checkpoint on disk is the truth for them,
        # so they stay on NORMAL and cost no fsync.
        if self._durable is durable:
            return
        level = "FULL" if durable else "NORMAL"
        self.conn.execute(f"PRAGMA synchronous = {level}")
        self.conn.execute(f"PRAGMA fullfsync = {'ON' if durable else 'OFF'}")
        self._durable = durable

    @contextmanager
    def _write(self, *, durable: bool) -> Iterator[sqlite3.Connection]:
        """One write transaction. IMMEDIATE takes the write lock before the first read: a
        deferred transaction that reads and then writes cannot wait for a concurrent writer in
        WAL mode (SQLITE_BUSY_SNAPSHOT ignores busy_timeout), it fails with "database is
        locked"; and the read-check-write of a transition must see the latest row."""
        with self._lock:
            conn = self.conn
            try:
                self._set_durable(durable)
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except (sqlite3.DatabaseError, OSError) as exc:
                if _is_disk_full(exc):
                    raise StoreFull(self.path) from exc
                self._raise_if_corrupt(exc)
                raise

    def _raise_if_corrupt(self, exc: BaseException) -> None:
        if is_corrupt(exc):
            corrupt = StoreCorrupt(self.path, str(exc))
            if self.on_corrupt is not None:
                self.on_corrupt(corrupt)
            raise corrupt from exc

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """The connection for reads, under the lock; a damaged file raises StoreCorrupt."""
        with self._lock:
            try:
                yield self.conn
            except sqlite3.DatabaseError as exc:
                self._raise_if_corrupt(exc)
                raise

    def _read(
        self, sql: str, params: tuple[Any, ...] | builtins.list[Any] = ()
    ) -> builtins.list[sqlite3.Row]:
        # One statement is one snapshot in WAL mode, so a concurrent writer cannot tear it.
        with self._reading() as conn:
            return conn.execute(sql, params).fetchall()

    def _check_version(self) -> int:
        version: int = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} has schema version {version}; this loractl knows up to "
                f"{SCHEMA_VERSION}. Upgrade loractl."
            )
        return version

    def _migrate(self) -> None:
        if self.conn.execute("PRAGMA user_version").fetchone()[0] == 1:
            # Dropping the old jobs table must not cascade to the events that reference it;
            # the pragma only takes effect outside a transaction.
            self.conn.execute("PRAGMA foreign_keys = OFF")
        try:
            with self._write(durable=True) as conn:
                # Checked inside the write lock: two processes opening a new file at once
                # must not both create the tables.
                version = self._check_version()
                if version == 0:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                elif version == 1:
                    for statement in _MIGRATE_1_TO_2:
                        conn.execute(statement)
                    if conn.execute("PRAGMA foreign_key_check").fetchall():
                        raise RuntimeError(f"{self.path}: events left without their job")
                if version < SCHEMA_VERSION:  # an up-to-date file is not written (a full disk)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        finally:
            self.conn.execute("PRAGMA foreign_keys = ON")

    # -- rows ----------------------------------------------------------------------------

    @staticmethod
    def _job(row: sqlite3.Row) -> Job:
        values = {name: row[name] for name in _COLUMNS}
        values["state"] = JobState(values["state"])
        for name in _JSON_FIELDS:
            values[name] = json.loads(values[name])
        return Job(**values)

    def _fetch(self, conn: sqlite3.Connection, job_id: str) -> Job:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job with id {job_id!r}")
        return self._job(row)

    def _save(self, conn: sqlite3.Connection, job: Job, changed: dict[str, Any]) -> None:
        names = [*changed, "updated_at"]
        values = [_json(v) if k in _JSON_FIELDS else v for k, v in changed.items()]
        values.append(job.updated_at)
        if "state" in names:
            values[names.index("state")] = str(job.state)
        assignments = ", ".join(f"{name} = ?" for name in names)
        conn.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*values, job.id))

    @staticmethod
    def _event(
        conn: sqlite3.Connection,
        job: Job,
        kind: str,
        *,
        at: float,
        cause: str = "",
        from_state: JobState | None = None,
        to_state: JobState | None = None,
        detail: dict[str, Any] | None = None,
        rung: int | None = None,
        step: int | None = None,
    ) -> None:
        conn.execute(
            "INSERT INTO events (job_id, at, kind, from_state, to_state, cause, rung, step, detail)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job.id,
                at,
                kind,
                None if from_state is None else str(from_state),
                None if to_state is None else str(to_state),
                cause,
                job.rung if rung is None else rung,
                job.step if step is None else step,
                _json(detail or {}),
            ),
        )

    # -- queue ---------------------------------------------------------------------------

    def add_job(
        self,
        *,
        job_id: str | None = None,
        name: str,
        config_path: str | Path,
        job_dir: str | Path,
        priority: int = 0,
    ) -> Job:
        """Enqueue a new job in state queued and record a "submitted" event.

        A caller-chosen ``job_id`` that already exists raises :class:`JobExists`, so an inbox
        that derives ids from the file can tell "already enqueued" from a new job.
        """
        if job_id is not None and not _JOB_ID_RE.fullmatch(job_id):
            raise ValueError(f"job id {job_id!r} must be 1-64 of A-Z a-z 0-9 _ - (a folder name)")
        if not name:
            raise ValueError("a job needs a name")
        _check_fields({"name": name, "priority": priority})
        for attempt in range(5):
            job_id_now = job_id or new_job_id()
            now = time.time()
            job = Job(
                id=job_id_now,
                name=name,
                state=JobState.QUEUED,
                priority=priority,
                config_path=str(config_path),
                job_dir=str(job_dir),
                created_at=now,
                updated_at=now,
            )
            try:
                with self._write(durable=True) as conn:
                    cursor = conn.execute(
                        "INSERT INTO jobs (id, name, state, priority, config_path, job_dir,"
                        " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            job.id,
                            name,
                            str(job.state),
                            priority,
                            job.config_path,
                            job.job_dir,
                            now,
                            now,
                        ),
                    )
                    job.seq = cursor.lastrowid or 0
                    self._event(
                        conn,
                        job,
                        "submitted",
                        at=now,
                        to_state=JobState.QUEUED,
                        detail={"name": name, "priority": priority, "config_path": job.config_path},
                    )
                return job
            except sqlite3.IntegrityError as exc:
                if "UNIQUE" not in str(exc):
                    raise
                if job_id is not None:
                    raise JobExists(f"job id {job_id!r} already exists") from None
                # A generated id collided (same second, same 25 random bits): draw again.
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    def get(self, job_id: str) -> Job:
        """The job with exactly this id, or :class:`JobNotFound`."""
        with self._reading() as conn:
            return self._fetch(conn, job_id)

    def resolve(self, ref: str) -> Job:
        """The job a user means by ``ref``: an exact id, else the newest job with that exact
        name, else the one job whose id starts with ``ref`` (at least 4 characters).

        Raises :class:`AmbiguousJob` (a :class:`JobNotFound`) when a prefix matches several.
        """
        with self._lock:
            rows = self._read("SELECT * FROM jobs WHERE id = ?", (ref,))
            if not rows:
                rows = self._read(
                    "SELECT * FROM jobs WHERE name = ? ORDER BY seq DESC LIMIT 1", (ref,)
                )
            if not rows and len(ref) >= _MIN_PREFIX:
                escaped = ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                rows = self._read(
                    "SELECT * FROM jobs WHERE id LIKE ? ESCAPE '\\' ORDER BY seq LIMIT 10",
                    (escaped + "%",),
                )
                # LIKE ignores ASCII case; ids are case-sensitive.
                rows = [row for row in rows if row["id"].startswith(ref)]
                if len(rows) > 1:
                    raise AmbiguousJob(ref, [row["id"] for row in rows])
        if not rows:
            short = (
                f" (a prefix needs at least {_MIN_PREFIX} characters)"
                if len(ref) < _MIN_PREFIX
                else ""
            )
            raise JobNotFound(f"no job with id or name {ref!r}{short}")
        return self._job(rows[0])

    def list(self, states: set[JobState] | frozenset[JobState] | None = None) -> builtins.list[Job]:
        """Jobs in queue order: priority high to low, then submission order."""
        if states is None:
            rows = self._read("SELECT * FROM jobs ORDER BY priority DESC, seq")
        else:
            wanted = [str(JobState(s)) for s in states]
            marks = ", ".join("?" * len(wanted))
            rows = self._read(
                f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY priority DESC, seq", wanted
            )
        return [self._job(row) for row in rows]

    def next_queued(self) -> Job | None:
        """The job to start next: highest priority, first in within a priority."""
        rows = self._read(
            "SELECT * FROM jobs WHERE state = ? ORDER BY priority DESC, seq LIMIT 1",
            (str(JobState.QUEUED),),
        )
        return self._job(rows[0]) if rows else None

    def active(self) -> builtins.list[Job]:
        """Jobs the scheduler owns: starting, running or in backoff (:data:`IN_FLIGHT`)."""
        return self.list(IN_FLIGHT)

    # -- the one way to change state ----------------------------------------------------------

    def transition(self, job_id: str, new_state: JobState, cause: str, **fields: Any) -> Job:
        """Move a job to ``new_state`` and record why, in one transaction.

        ``fields`` are other Job attributes to set at the same time (rung=, attempt=,
        trainer_pid=, outcome=, reason= ...). On entering a terminal state the outcome
        defaults to "success", "cancelled" or "failed:<cause>"; on leaving one (a retry) the
        old outcome and reason are cleared unless given. The outcome must fit the state.
        Raises :class:`InvalidTransition` and writes nothing when the move is not allowed.
        """
        new_state = JobState(new_state)
        _check_fields(fields)
        with self._write(durable=True) as conn:
            job = self._fetch(conn, job_id)
            old_state = job.state
            if new_state not in TRANSITIONS[old_state]:
                raise InvalidTransition(job.id, old_state, new_state)
            changed = dict(fields)
            if new_state in TERMINAL and "outcome" not in changed:
                changed["outcome"] = {
                    JobState.COMPLETED: "success",
                    JobState.CANCELLED: "cancelled",
                    JobState.FAILED: f"failed:{cause or 'unknown'}",
                }[new_state]
            if old_state in TERMINAL and new_state not in TERMINAL:
                changed.setdefault("outcome", None)
                changed.setdefault("reason", "")
            for key, value in changed.items():
                setattr(job, key, value)
            _check_outcome(job.id, new_state, job.outcome)
            job.state = new_state
            job.updated_at = time.time()
            self._save(conn, job, {"state": new_state, **changed})
            self._event(
                conn,
                job,
                "transition",
                at=job.updated_at,
                cause=cause,
                from_state=old_state,
                to_state=new_state,
                detail=changed,
            )
        return job

    # -- everything else ------------------------------------------------------------------

    def update(self, job_id: str, *, record_event: str | None = None, **fields: Any) -> Job:
        """Set non-state fields (progress, pid, counters). Cheap: no fsync and no event,
        unless ``record_event`` names an event kind to record with the fields as detail."""
        _check_fields(fields)
        durable = record_event is not None
        with self._write(durable=durable) as conn:
            job = self._fetch(conn, job_id)
            for key, value in fields.items():
                setattr(job, key, value)
            if "outcome" in fields:
                _check_outcome(job.id, job.state, job.outcome)
            job.updated_at = time.time()
            self._save(conn, job, fields)
            if record_event is not None:
                self._event(conn, job, record_event, at=job.updated_at, detail=fields)
        return job

    def record(self, job_id: str, kind: str, *, cause: str = "", **detail: Any) -> None:
        """Record a non-transition event (crash, ladder_step, adopt, checkpoint, memory_guard).

        ``rung`` and ``step`` in ``detail`` fill those columns; otherwise the job's current
        values do."""
        with self._write(durable=True) as conn:
            job = self._fetch(conn, job_id)
            rung, step = detail.get("rung"), detail.get("step")
            self._event(
                conn,
                job,
                kind,
                at=time.time(),
                cause=cause,
                detail=detail,
                rung=rung if isinstance(rung, int) else None,
                step=step if isinstance(step, int) else None,
            )

    def events(self, job_id: str) -> builtins.list[dict[str, Any]]:
        """The job's history, oldest first. Missing job: JobNotFound."""
        with self._reading() as conn:
            self._fetch(conn, job_id)
            rows = self._read("SELECT * FROM events WHERE job_id = ? ORDER BY id", (job_id,))
        return [
            {
                "id": row["id"],
                "job_id": row["job_id"],
                "at": row["at"],
                "kind": row["kind"],
                "from_state": row["from_state"],
                "to_state": row["to_state"],
                "cause": row["cause"],
                "rung": row["rung"],
                "step": row["step"],
                "detail": json.loads(row["detail"]),
            }
            for row in rows
        ]

    def add_crash(self, job_id: str, crash: dict[str, Any]) -> Job:
        """Append a crash record {cause, exit_code, signal, step, rung, at, rule, explanation}
        and record a "crash" event, atomically: concurrent appends are never lost."""
        crash = dict(crash)
        crash.setdefault("at", time.time())
        with self._write(durable=True) as conn:
            job = self._fetch(conn, job_id)
            job.crashes = [*job.crashes, crash]
            job.updated_at = time.time()
            self._save(conn, job, {"crashes": job.crashes})
            rung, step = crash.get("rung"), crash.get("step")
            self._event(
                conn,
                job,
                "crash",
                at=job.updated_at,
                cause=str(crash.get("cause", "")),
                detail=crash,
                rung=rung if isinstance(rung, int) else None,
                step=step if isinstance(step, int) else None,
            )
        return job

    def note_peak(self, job_id: str, rung: int, footprint_mb: float) -> Job:
        """Remember the highest memory footprint seen on ``rung``; lower readings change
        nothing and write nothing."""
        key = str(int(rung))
        with self._write(durable=False) as conn:
            job = self._fetch(conn, job_id)
            if footprint_mb > job.peak_memory_mb.get(key, float("-inf")):
                job.peak_memory_mb = {**job.peak_memory_mb, key: float(footprint_mb)}
                job.updated_at = time.time()
                self._save(conn, job, {"peak_memory_mb": job.peak_memory_mb})
        return job

    def set_priority(self, job_id: str, priority: int) -> Job:
        """Change where a job sits in the queue; recorded as a "priority" event."""
        _check_fields({"priority": priority})
        with self._write(durable=True) as conn:
            job = self._fetch(conn, job_id)
            old = job.priority
            job.priority = priority
            job.updated_at = time.time()
            self._save(conn, job, {"priority": priority})
            self._event(
                conn, job, "priority", at=job.updated_at, detail={"from": old, "to": priority}
            )
        return job

    def setting(self, key: str, default: Any = None) -> Any:
        """A value kept across restarts (the queue's hold, say), or ``default``."""
        rows = self._read("SELECT value FROM settings WHERE key = ?", (key,))
        return json.loads(rows[0]["value"]) if rows else default

    def set_setting(self, key: str, value: Any) -> None:
        with self._write(durable=True) as conn:
            conn.execute(
                "INSERT INTO settings (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, _json(value)),
            )

    def delete(self, job_id: str) -> None:
        """Forget a finished job and its events. Unfinished jobs raise :class:`InvalidState`:
        deleting one would orphan its trainer or silently drop queued work."""
        with self._write(durable=True) as conn:
            job = self._fetch(conn, job_id)
            if job.state not in TERMINAL:
                raise InvalidState(
                    f"job {job.id} is {job.state}; only completed, failed or cancelled jobs "
                    "can be deleted (cancel it first)"
                )
            # Explicit, not only ON DELETE CASCADE: a connection without foreign_keys = ON
            # (an old sqlite3 shell) must not leave orphaned history behind.
            conn.execute("DELETE FROM events WHERE job_id = ?", (job.id,))
            conn.execute("DELETE FROM jobs WHERE id = ?", (job.id,))

    # -- recovery -------------------------------------------------------------------------

    def ids(self) -> set[str]:
        """Every job id the store holds."""
        return {row["id"] for row in self._read("SELECT id FROM jobs")}

    def settings_items(self) -> dict[str, Any]:
        return {
            row["key"]: json.loads(row["value"])
            for row in self._read("SELECT key, value FROM settings")
        }

    def restore_job(
        self,
        job: Job,
        history: builtins.list[dict[str, Any]],
        cause: str,
        from_state: JobState | None,
    ) -> Job:
        """Put back a job the store lost (rebuilt from its folder, or from the backup), with
        the history it had and one transition that says how it came back. The state is set,
        not reached: there is no row to move from. Raises JobExists if the id is taken."""
        _check_outcome(job.id, job.state, job.outcome)
        values = {name: getattr(job, name) for name in _COLUMNS if name != "seq"}
        values["state"] = str(job.state)
        for name in _JSON_FIELDS:
            values[name] = _json(values[name])
        names = ", ".join(values)
        marks = ", ".join("?" * len(values))
        try:
            with self._write(durable=True) as conn:
                cursor = conn.execute(
                    f"INSERT INTO jobs ({names}) VALUES ({marks})", tuple(values.values())
                )
                job.seq = cursor.lastrowid or 0
                for event in history:
                    conn.execute(
                        "INSERT INTO events (job_id, at, kind, from_state, to_state, cause,"
                        " rung, step, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            job.id,
                            event["at"],
                            event["kind"],
                            event["from_state"],
                            event["to_state"],
                            event["cause"],
                            event["rung"],
                            event["step"],
                            _json(event["detail"]),
                        ),
                    )
                self._event(
                    conn,
                    job,
                    "transition",
                    at=time.time(),
                    cause=cause,
                    from_state=from_state,
                    to_state=job.state,
                    detail={"recovered": True},
                )
        except sqlite3.IntegrityError as exc:
            raise JobExists(f"job id {job.id!r} already exists") from exc
        return job

    def backup_to(self, destination: Path) -> None:
        """A consistent copy of the whole store at ``destination``, made with SQLite's online
        backup (the WAL's commits included), written beside it and renamed into place, so a
        crash leaves the previous backup whole. The copy records when it was taken."""
        staging = destination.with_name(destination.name + ".tmp")
        staging.unlink(missing_ok=True)
        copy = sqlite3.connect(staging, isolation_level=None)
        try:
            with self._reading() as conn:
                conn.backup(copy)
            # A file of its own: no -wal beside it to lose or forget.
            copy.execute("PRAGMA journal_mode = DELETE")
            copy.execute(
                "INSERT INTO settings (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (BACKUP_TAKEN_AT, _json(time.time())),
            )
        except BaseException:
            copy.close()
            staging.unlink(missing_ok=True)
            raise
        copy.close()
        fd = os.open(staging, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(staging, destination)
        folder = os.open(destination.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
