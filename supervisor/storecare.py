"""The store's care: checked at every start, backed up, and rebuilt from the job folders when
it is damaged or has lost jobs.

The job folders are the durable truth the store summarizes: each ``jobs/<id>/config.yaml`` is
a job, and its adapter folder's checkpoints say how far it got (``completed_in`` tells a
finished run, as it does for an unheard finish). So a damaged store is moved aside, never
patched, and every job comes back from its folder:

- completed, if its adapter folder holds this config's finished run;
- running, if its trainer is still alive (the supervisor then adopts it);
- else paused with :data:`RECOVERED_REASON`, for the user to resume (a job the store lost
  cannot be trusted to have been queued, and must never run twice).

A backup copy (SQLite's online backup, taken at every clean start and daily) brings back
what folders cannot tell (rung, crashes, history, priority, the queue's hold): a job whose
folder has not changed since the backup was taken is restored from it as it was.

It logs nothing itself (``loractl daemon repair`` runs it too): callers report what it did.
Nothing here imports mlx.
"""

from __future__ import annotations

import os
import re
import sqlite3
import sys
import time
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from loractl.checkpoints import CHECKPOINT_DIR, CheckpointReader, completed_in
from loractl.config import ConfigError, JobConfig, load_config
from loractl.paths import Layout
from loractl.protocol import ACTIVE, ExitCode, JobState
from loractl.supervisor.processes import LiveTrainer, live_trainers
from loractl.supervisor.store import (
    BACKUP_TAKEN_AT,
    Job,
    JobExists,
    Store,
    is_corrupt,
)

RECOVERED_REASON = "recovered after the store was damaged; resume it"
BACKUP_SUFFIX = ".backup"
# How often the running supervisor refreshes the backup (LORACTL_BACKUP_INTERVAL_S).
BACKUP_INTERVAL_S = 24 * 3600.0
# Names of job folders: a job id (hidden staging folders and strays are not jobs).
_JOB_FOLDER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_B32HEX = "0123456789abcdefghijklmnopqrstuv"


class StoreUnrecoverable(RuntimeError):
    """The store is damaged and could not be rebuilt; the text is one line: the file and the
    fix."""


def backup_path(layout: Layout) -> Path:
    return layout.database.with_name(layout.database.name + BACKUP_SUFFIX)


def backup_interval_s() -> float:
    raw = os.environ.get("LORACTL_BACKUP_INTERVAL_S")
    try:
        return float(raw) if raw else BACKUP_INTERVAL_S
    except ValueError:
        return BACKUP_INTERVAL_S


# -- checking ---------------------------------------------------------------------------------


def check(path: Path, *, full: bool = False, readonly: bool = False) -> str | None:
    """What is wrong with the database at ``path``, or None if SQLite finds it sound.

    ``PRAGMA quick_check`` (seconds on any size loractl reaches), or with ``full`` the
    integrity check, which also compares every index with its table. Errors that are not
    damage (a permission, a lock) are raised: moving a sound file aside would lose jobs.
    ``readonly``: change nothing (a last connection would otherwise fold the WAL in)."""
    if not path.exists() or path.stat().st_size == 0:
        return None  # nothing yet: the store creates it
    pragma = "integrity_check" if full else "quick_check"
    try:
        target = f"{path.resolve().as_uri()}?mode={'ro' if readonly else 'rw'}"
        with closing(sqlite3.connect(target, uri=True, isolation_level=None)) as conn:
            conn.execute("PRAGMA busy_timeout = 10000")
            rows = conn.execute(f"PRAGMA {pragma}").fetchall()
            if rows == [("ok",)]:
                # Sound pages, but is it ours? A store always has its jobs table.
                conn.execute("SELECT count(*) FROM jobs").fetchone()
    except sqlite3.DatabaseError as exc:
        if is_corrupt(exc):
            return str(exc)
        if "no such table" in str(exc):
            return "it has no jobs table"
        raise
    problems = [str(row[0]) for row in rows if row[0] != "ok"]
    if not problems:
        return None
    return "; ".join(" ".join(problems).split("\n")[:3])[:300]


def move_aside(path: Path, now: float | None = None) -> Path:
    """Rename the database (and its -wal and -shm) to ``<name>.corrupt-YYYYmmdd-HHMMSS``,
    kept for a post-mortem; returns the new name of the database file."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now if now is not None else time.time()))
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}.{n}")
    for suffix in ("-wal", "-shm", ""):
        source = path.with_name(path.name + suffix)
        if source.exists():
            os.replace(source, target.with_name(target.name + suffix))
    _fsync_folder(path.parent)
    return target


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- what the backup and the job folders say ----------------------------------------------------


@dataclass
class Backup:
    """The jobs, their histories and the settings of a backup copy."""

    taken_at: float
    jobs: dict[str, Job] = field(default_factory=dict)
    history: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


def read_backup(layout: Layout) -> Backup | None:
    """The backup copy, if there is one and it is sound."""
    path = backup_path(layout)
    try:
        if not path.is_file() or check(path, full=True) is not None:
            return None
        with Store(path, readonly=True) as copy:
            settings = copy.settings_items()
            taken_at = settings.pop(BACKUP_TAKEN_AT, None)
            jobs = {job.id: job for job in copy.list()}
            history = {job_id: copy.events(job_id) for job_id in jobs}
    except (sqlite3.Error, OSError, RuntimeError, ValueError):
        return None  # a damaged backup is no backup
    if not isinstance(taken_at, int | float):
        taken_at = path.stat().st_mtime
    return Backup(float(taken_at), jobs, history, settings)


@dataclass
class Folder:
    """What one job folder says about its job."""

    path: Path
    job_id: str
    config: JobConfig | None
    config_error: str
    adapter_path: Path
    finished: bool
    step: int | None
    examples_seen: int
    total_examples: int
    attempts: int
    last_activity: float


def job_folders(layout: Layout) -> list[Path]:
    """The folders that are jobs: named as a job id, holding the job's config."""
    try:
        entries = sorted(os.scandir(layout.jobs), key=lambda entry: entry.name)
    except FileNotFoundError:
        return []
    return [
        Path(entry.path)
        for entry in entries
        if _JOB_FOLDER.match(entry.name)
        and entry.is_dir(follow_symlinks=False)
        and (Path(entry.path) / "config.yaml").is_file()
    ]


def finished_run(cfg: JobConfig) -> bool:
    """Whether ``cfg``'s adapter folder holds this very run, finished: the check of an
    unheard finish, and the checkpoint's config identity equal to the job's."""
    adapters = Path(cfg.adapter_path)
    if not completed_in(adapters):
        return False
    newest, _ = CheckpointReader(adapters / CHECKPOINT_DIR).newest_valid()
    return newest is not None and newest.state.get("config_hash") == cfg.identity_hash()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def inspect(path: Path) -> Folder:
    """Read one job folder: its config, its attempts and its adapter folder's checkpoints."""
    config: JobConfig | None = None
    error = ""
    try:
        config = load_config(path / "config.yaml")
        adapters = Path(config.adapter_path)
    except ConfigError as exc:
        error = str(exc)
        adapters = path / "adapters"
    attempts_folder = path / "attempts"
    numbers = [0]
    activity = [_mtime(path), _mtime(path / "config.yaml"), _mtime(attempts_folder)]
    if attempts_folder.is_dir():
        for entry in os.scandir(attempts_folder):
            stem = entry.name.split(".", 1)[0]
            if stem.isdigit():
                numbers.append(int(stem))
                activity.append(_mtime(Path(entry.path)))
    checkpoints = adapters / CHECKPOINT_DIR
    newest, _ = CheckpointReader(checkpoints).newest_valid()
    activity += [_mtime(checkpoints / "latest"), _mtime(adapters / "adapters.safetensors")]
    return Folder(
        path=path,
        job_id=path.name,
        config=config,
        config_error=error,
        adapter_path=adapters,
        finished=config is not None and finished_run(config),
        step=newest.step if newest else None,
        examples_seen=int(newest.state.get("examples_seen", 0)) if newest else 0,
        total_examples=int(newest.state.get("total_examples", 0)) if newest else 0,
        attempts=max(numbers),
        last_activity=max(activity),
    )


def _created_at(job_id: str, fallback: float) -> float:
    """The submission second a job id starts with (see ``new_job_id``)."""
    head = job_id[:7]
    if len(job_id) == 12 and all(c in _B32HEX for c in head):
        value = 0
        for char in head:
            value = value * 32 + _B32HEX.index(char)
        return float(value)
    return fallback


# -- rebuilding -----------------------------------------------------------------------------------


@dataclass
class Recovered:
    job_id: str
    name: str
    state: JobState
    how: str


def restore_from_folder(
    store: Store,
    folder: Folder,
    backup: Backup | None,
    trainer: LiveTrainer | None,
) -> Recovered:
    """Put one job the store does not hold back into it, from its folder (and the backup
    when the backup is at least as new as the folder)."""
    old = backup.jobs.get(folder.job_id) if backup else None
    history = backup.history.get(folder.job_id, []) if backup and old else []
    if (
        old is not None
        and backup is not None
        and trainer is None
        and backup.taken_at >= folder.last_activity
        and old.state not in ACTIVE
        and not (folder.finished and old.state != JobState.COMPLETED)
    ):
        # Nothing happened in the folder since the backup: it knows the job best.
        job = replace(old, updated_at=time.time())
        store.restore_job(job, history, "restored from the store's backup", old.state)
        return Recovered(job.id, job.name, job.state, "restored from the backup")
    now = time.time()
    cfg = folder.config
    base = old or Job(
        id=folder.job_id,
        name=cfg.name if cfg else folder.job_id,
        state=JobState.PAUSED,
        priority=cfg.priority if cfg else 0,
        config_path=str(folder.path / "config.yaml"),
        job_dir=str(folder.path),
        created_at=_created_at(folder.job_id, _mtime(folder.path)),
    )
    job = replace(
        base,
        attempt=max(base.attempt, folder.attempts),
        step=max(folder.step or 0, 0),
        last_checkpoint_step=folder.step,
        examples_seen=folder.examples_seen,
        total_examples=folder.total_examples,
        trainer_pid=None,
        trainer_started_at=None,
        outcome=None,
        reason="",
        updated_at=now,
    )
    if folder.finished or (old is not None and old.state == JobState.COMPLETED):
        job = replace(job, state=JobState.COMPLETED, outcome="success")
        how = "its adapter folder holds the finished run"
    elif trainer is not None:
        # Its trainer runs on: the job is running, and the supervisor adopts the trainer.
        job = replace(
            job,
            state=JobState.RUNNING,
            trainer_pid=trainer.pid,
            trainer_started_at=trainer.started_at,
            attempt=trainer.attempt or job.attempt,
            rung=trainer.rung,
        )
        how = f"its trainer (pid {trainer.pid}) is still running; adopting it"
    else:
        reason = RECOVERED_REASON
        if folder.config_error:
            reason += f" (its config no longer loads: {folder.config_error})"
        job = replace(job, state=JobState.PAUSED, reason=reason)
        how = "paused: resume it"
    store.restore_job(
        job, history, f"recovered from its job folder: {how}", old.state if old else None
    )
    return Recovered(job.id, job.name, job.state, how)


def restore_lost_jobs(
    store: Store,
    layout: Layout,
    backup: Backup | None = None,
    trainers: dict[str, LiveTrainer] | None = None,
    only: set[str] | None = None,
    *,
    read_the_backup: bool = False,
) -> list[Recovered]:
    """Every job folder the store does not hold becomes a job again (see the module's
    docstring); ``only`` limits it to those ids. A folder whose inbox claim is still
    pending is left to the inbox, which queues it under the same id. ``read_the_backup``:
    read the backup copy, only if some job is missing."""
    known = store.ids()
    pending_claims = _pending_claims(layout)
    lost = [
        path
        for path in job_folders(layout)
        if path.name not in known
        and path.name not in pending_claims
        and (only is None or path.name in only)
    ]
    if not lost:
        return []
    if trainers is None:
        trainers = live_trainers(layout.jobs)
    if backup is None and read_the_backup:
        backup = read_backup(layout)
    recovered = []
    folders = sorted((inspect(path) for path in lost), key=lambda f: _created_at(f.job_id, 0.0))
    for folder in folders:
        try:
            done = restore_from_folder(store, folder, backup, trainers.get(folder.job_id))
        except JobExists:
            continue
        recovered.append(done)
    return recovered


def _pending_claims(layout: Layout) -> set[str]:
    try:
        names = os.listdir(layout.inbox)
    except OSError:
        return set()
    return {name[len(".claim-") :].split("-", 1)[0] for name in names if name.startswith(".claim-")}


@dataclass
class Repair:
    """What a rebuild did."""

    moved_to: Path | None
    problem: str
    recovered: list[Recovered]
    backup_used: bool

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for job in self.recovered:
            counts[str(job.state)] = counts.get(str(job.state), 0) + 1
        shown = ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no jobs"
        return f"{len(self.recovered)} job(s) recovered ({shown})"


def rebuild(layout: Layout, problem: str, now: float | None = None) -> Repair:
    """Move the damaged store aside and build a new one from the backup and the job folders.

    Raises :class:`StoreUnrecoverable` when no new store can be written; the damaged file is
    then put back, so the next start (once the user made room) repairs it again."""
    database = layout.database
    moved = None
    try:
        moved = move_aside(database, now) if database.exists() else None
        backup = read_backup(layout)
        with Store(database) as store:
            if backup is not None:
                for key, value in backup.settings.items():
                    store.set_setting(key, value)
            recovered = restore_lost_jobs(store, layout, backup)
    except (OSError, sqlite3.Error) as exc:
        _put_back(database, moved)
        raise StoreUnrecoverable(
            f"the job database {database} is damaged ({problem}) and could not be rebuilt: "
            f"{exc}; free space or fix permissions in {database.parent}, then run "
            "`loractl daemon repair`"
        ) from exc
    try:
        with Store(database) as store:
            store.backup_to(backup_path(layout))
    except (OSError, sqlite3.Error):
        pass  # the rebuilt store stands; the running supervisor backs it up later
    return Repair(moved, problem, recovered, backup is not None)


def _put_back(database: Path, moved: Path | None) -> None:
    """Undo a rebuild that failed halfway: the partial new store goes, the damaged one
    (kept aside) comes back to its name."""
    for suffix in ("-wal", "-shm", ""):
        database.with_name(database.name + suffix).unlink(missing_ok=True)
        if moved is not None:
            aside = moved.with_name(moved.name + suffix)
            if aside.exists():
                os.replace(aside, database.with_name(database.name + suffix))


def ensure_sound(layout: Layout, *, full: bool, forced: str = "") -> Repair | None:
    """The start-up check: None when the store is sound, else the rebuild that replaced it.
    ``forced`` names damage the previous supervisor saw while running. A file SQLite cannot
    even open (a folder in its place, no permission) is reported, never moved."""
    try:
        problem = forced or check(layout.database, full=full)
    except sqlite3.Error as exc:
        raise StoreUnrecoverable(
            f"cannot open the job database {layout.database}: {exc}; fix its owner and mode, "
            "or move it away, then start the supervisor again"
        ) from exc
    return None if problem is None else rebuild(layout, problem)


def unfixable_exit(under_service: bool) -> int:
    """The exit code for a problem only the user can fix (a folder someone else owns, a
    store that cannot be rebuilt): 78 (EX_CONFIG) by hand. A service manager restarts every
    exit but 0 (launchd's KeepAlive, systemd's Restart=on-failure), so started by one it is
    0: the one-line reason is in the log, and a restart could only repeat it."""
    if under_service:
        return 0
    return int(ExitCode.CONFIG_ERROR)


def restart_to_repair(home: Path, wait_for_lock: bool, problem: str, env: str) -> None:
    """Start the supervisor afresh in this very process (same pid, so a service manager and
    a terminal both keep it); the new one repairs the store and adopts the trainer."""
    argv = [sys.executable, "-m", "loractl.supervisor", "--home", str(home)]
    if wait_for_lock:
        argv.append("--wait-for-lock")
    os.environ[env] = problem or "damaged"
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execv(sys.executable, argv)
