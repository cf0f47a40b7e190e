"""The inbox folder: job configs dropped into ``<home>/inbox`` become queued jobs.

The supervisor runs one loop, so this module does no work on other threads: watchdog's
observer thread only records which names changed and calls ``wake()``; claiming, validating,
enqueueing and rejecting all happen in :meth:`Inbox.poll`, which the loop calls.

A file goes through these steps, each one leaving the disk in a state a restart can finish:

1. it settles: its (size, mtime) stays the same for ``settle_s`` (writers that do not use
   write-then-rename are still mid-write before that);
2. it is claimed: renamed in place to ``.claim-<jobid>-<name>`` (a hidden name, so nothing
   picks it up twice, in the same folder so the config's relative paths still resolve there);
3. the claim is validated with :func:`loractl.config.load_config` and handed to ``enqueue``;
4. the claim is deleted.

At start every leftover claim is finished: deleted if the queue already knows its job id
(the crash came after step 3), else validated and enqueued again under the same id. A crash
therefore neither loses a job nor queues it twice.
"""

from __future__ import annotations

import os
import re
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from watchdog.events import (
    EVENT_TYPE_ATTRIB,
    EVENT_TYPE_CLOSED,
    EVENT_TYPE_CREATED,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_MOVED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

# _default_name is the rule load_config applies to a file's stem; reusing it (rather than a
# copy) keeps an inbox job named exactly as `loractl submit` of the same file would be.
from loractl.config import MAX_CONFIG_BYTES, ConfigError, JobConfig, _default_name, load_config

__all__ = ["CONFIG_SUFFIXES", "REJECTED", "Accepted", "Inbox", "Rejected"]

log = structlog.get_logger("loractl.supervisor.inbox")

CONFIG_SUFFIXES = (".yaml", ".yml", ".toml", ".json")
# Partial downloads and editors' write-then-rename temporaries; they become real files later.
_IGNORED_SUFFIXES = (".tmp", ".part")
REJECTED = "rejected"
_CLAIM_PREFIX = ".claim-"
# Job ids may not contain '-': it separates the id from the original name in a claim.
_JOB_ID = re.compile(r"[A-Za-z0-9_]{1,64}")
_CLAIM = re.compile(r"\.claim-([A-Za-z0-9_]{1,64})-(.+)", re.S)
# Events that mean "this name has (new) content"; deletions and reads change nothing to do.
_CONTENT_EVENTS = frozenset(
    {
        EVENT_TYPE_CREATED,
        EVENT_TYPE_MODIFIED,
        EVENT_TYPE_MOVED,
        EVENT_TYPE_CLOSED,
        EVENT_TYPE_ATTRIB,
    }
)


@dataclass(frozen=True)
class Accepted:
    """A file that became a queued job: ``name`` is the job's name, ``source`` the file's."""

    job_id: str
    name: str
    source: str


@dataclass(frozen=True)
class Rejected:
    """A file moved to ``rejected/``: ``name`` is the file's name, ``reason`` what is wrong."""

    name: str
    reason: str


@dataclass
class _Seen:
    signature: tuple
    since: float


def _ignored(name: str) -> bool:
    lower = name.lower()
    return name.startswith(".") or lower.endswith(_IGNORED_SUFFIXES) or name == REJECTED


def _signature(path: Path) -> tuple | None:
    """What changes when a file is written to, renamed over or re-pointed; None if gone."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    sig: tuple = (stat.S_IFMT(info.st_mode), info.st_ino, info.st_size, info.st_mtime_ns)
    if stat.S_ISLNK(info.st_mode):
        try:
            target = os.stat(path)
            sig += (os.readlink(path), target.st_ino, target.st_size, target.st_mtime_ns)
        except OSError:
            sig += (None,)
    return sig


def _shown(name: str) -> str:
    """The name as text that can be printed, logged and sent: Linux names need not be UTF-8."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _describe(error: ConfigError, name: str) -> str:
    # load_config names the claim it read; the user knows the file by its own name.
    source = _shown(name)
    return str(
        ConfigError(
            error.message, key=error.key, source=source, line=error.line, column=error.column
        )
    )


class _Recorder(FileSystemEventHandler):
    """Runs on watchdog's thread: remembers names and wakes the loop, nothing else."""

    def __init__(self, inbox: Inbox) -> None:
        self._inbox = inbox

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type not in _CONTENT_EVENTS:
            return
        path = event.dest_path if event.event_type == EVENT_TYPE_MOVED else event.src_path
        # Only the basename: FSEvents reports resolved paths (/private/var/...), so comparing
        # folders would drop events; a name that is not in the inbox is dropped at lstat.
        self._inbox._touch(os.path.basename(os.fsdecode(path)))


class Inbox:
    """Turns config files dropped into ``inbox`` into queued jobs; see the module docstring.

    ``enqueue(job_id, claimed_path, cfg)`` stores the job; the claimed file still exists while
    it runs (relative paths and "did the user set this key" can be read from it). After a
    crash it may be called again for a job id that ``is_known(job_id)`` denies.
    ``new_id()`` makes job ids (without '-'); ``wake()`` is called from watchdog's thread
    when something arrived, and from :meth:`poll` when work is left for the next call.
    """

    def __init__(
        self,
        inbox: Path,
        home: Path,
        *,
        enqueue: Callable[[str, Path, JobConfig], None],
        is_known: Callable[[str], bool],
        new_id: Callable[[], str],
        wake: Callable[[], None] = lambda: None,
        settle_s: float = 0.5,
        rescan_s: float = 2.0,
        budget_s: float = 0.25,
    ) -> None:
        self.inbox = Path(inbox).absolute()
        self.rejected = self.inbox / REJECTED
        self.home = Path(home).resolve()
        self._enqueue = enqueue
        self._is_known = is_known
        self._new_id = new_id
        self._wake = wake
        self.settle_s = settle_s
        self.rescan_s = rescan_s
        # One poll must not stall the loop that also watches heartbeats: 500 files at once
        # are taken in slices, the rest on the next calls.
        self.budget_s = budget_s
        self._lock = threading.Lock()
        self._touched: set[str] = set()  # shared with watchdog's thread, under _lock
        self._seen: dict[str, _Seen | None] = {}
        # Files that could not even be moved to rejected/: retried only once they change, so
        # a read-only folder does not become an error every half second.
        self._stuck: dict[str, tuple | None] = {}
        self._scan_due = True
        self._next_scan = 0.0
        self._observer = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Watch the folder and schedule a full scan (files and claims left from before)."""
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.rejected.mkdir(exist_ok=True)
        if self._observer is None:
            observer = Observer()
            observer.schedule(_Recorder(self), str(self.inbox), recursive=False)
            observer.start()
            self._observer = observer
        self._scan_due = True
        self._call_wake()

    def stop(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(timeout=10)

    @property
    def pending_count(self) -> int:
        """Files seen but not yet taken (still settling, or left for the next poll)."""
        with self._lock:
            touched = {name for name in self._touched if not _ignored(name)}
        return len(touched | set(self._seen))

    # -- the loop's side ---------------------------------------------------------------------

    def poll(self, now: float | None = None) -> list[Accepted | Rejected]:
        """Take every file that is ready; return what happened. Never raises an Exception."""
        now = time.monotonic() if now is None else now
        results: list[Accepted | Rejected] = []
        try:
            with self._lock:
                touched, self._touched = self._touched, set()
            for name in touched:
                if not _ignored(name):
                    # A fresh event restarts the wait even when (size, mtime) look the same:
                    # mtime can be as coarse as a second (HFS+).
                    self._seen[name] = None
            claims: list[tuple[str, str, str]] = []
            if self._scan_due or now >= self._next_scan:
                claims = self._scan(now)
            for claim_name, job_id, name in claims:
                self._keep(results, self._finish_leftover(claim_name, job_id, name))
            started = time.perf_counter()
            ready = self._ready(now)
            for index, name in enumerate(ready):
                if index and time.perf_counter() - started > self.budget_s:
                    self._call_wake()
                    break
                self._seen.pop(name, None)
                self._keep(results, self._take(name))
        except Exception:
            log.exception("inbox_poll_failed", inbox=str(self.inbox))
        return results

    @staticmethod
    def _keep(results: list, result: Accepted | Rejected | None) -> None:
        # Not logged here: the caller reports what poll() returns, once.
        if result is not None:
            results.append(result)

    def _touch(self, name: str) -> None:
        with self._lock:
            self._touched.add(name)
        self._call_wake()

    def _call_wake(self) -> None:
        try:
            self._wake()
        except Exception:
            log.exception("inbox_wake_failed")

    def _scan(self, now: float) -> list[tuple[str, str, str]]:
        """List the folder: new names start settling; returns leftover claims to finish."""
        self._scan_due = False
        self._next_scan = now + self.rescan_s
        claims = []
        present = set()
        try:
            entries = os.scandir(self.inbox)
        except FileNotFoundError:
            # Someone deleted the folder; recreate it so drops work again (scan-only: the
            # observer's watch went with the old folder).
            self.rejected.mkdir(parents=True, exist_ok=True)
            return []
        with entries:
            for entry in entries:
                present.add(entry.name)
                if match := _CLAIM.fullmatch(entry.name):
                    claims.append((entry.name, match.group(1), match.group(2)))
                elif not _ignored(entry.name):
                    self._seen.setdefault(entry.name, None)
        for name in list(self._stuck):
            if name not in present:
                del self._stuck[name]
        return sorted(claims)

    def _ready(self, now: float) -> list[str]:
        """Names whose content has not changed for settle_s, oldest first."""
        ready = []
        for name, seen in list(self._seen.items()):
            path = self.inbox / name
            sig = _signature(path)
            if sig is None or stat.S_ISDIR(sig[0]) or (stat.S_ISLNK(sig[0]) and path.is_dir()):
                del self._seen[name]
                continue
            if name in self._stuck:
                if self._stuck[name] == sig:
                    del self._seen[name]
                    continue
                del self._stuck[name]
            if seen is None or seen.signature != sig:
                self._seen[name] = _Seen(sig, now)
                if self.settle_s > 0:
                    continue
            elif now - seen.since < self.settle_s:
                continue
            ready.append((sig[3], name))
        return [name for _, name in sorted(ready)]

    # -- one file ----------------------------------------------------------------------------

    def _take(self, name: str) -> Accepted | Rejected | None:
        """Claim a settled file and finish it."""
        path = self.inbox / name
        claimed: Path | None = None
        try:
            job_id = self._fresh_id(name)
            claimed = self.inbox / f"{_CLAIM_PREFIX}{job_id}-{name}"
            try:
                os.rename(path, claimed)
            except FileNotFoundError:
                return None  # taken away before we got to it: nothing to do
            return self._finish(claimed, name, job_id)
        except Exception as error:
            where = claimed if claimed is not None and os.path.lexists(claimed) else path
            return self._reject_after(where, name, error)

    def _finish_leftover(self, claim_name: str, job_id: str, name: str):
        claimed = self.inbox / claim_name
        if claim_name in self._stuck and self._stuck[claim_name] == _signature(claimed):
            return None
        try:
            if self._is_known(job_id):
                # The crash came after enqueue: the job is queued, only the claim is left.
                self._drop_claim(claimed)
                return None
            return self._finish(claimed, name, job_id)
        except Exception as error:
            return self._reject_after(claimed, name, error)

    def _fresh_id(self, name: str) -> str:
        for _ in range(5):
            job_id = self._new_id()
            if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
                raise ValueError(f"new_id() gave {job_id!r}; job ids are 1-64 of A-Z a-z 0-9 _")
            # A repeated id would enqueue two files as one job (the second enqueue fails, the
            # id is known, and the second file would count as queued), and a rename onto an
            # existing claim would replace it.
            claimed = self.inbox / f"{_CLAIM_PREFIX}{job_id}-{name}"
            if not self._is_known(job_id) and not os.path.lexists(claimed):
                return job_id
        raise RuntimeError("new_id() kept returning job ids that are already in use")

    def _finish(self, claimed: Path, name: str, job_id: str) -> Accepted | Rejected | None:
        """Validate a claimed file, enqueue it under ``job_id``, then delete the claim."""
        problem = self._check_file(claimed, name)
        if problem:
            return self._reject(claimed, name, problem)
        try:
            cfg = load_config(claimed)
        except ConfigError as error:
            return self._reject(claimed, name, _describe(error, name))
        if cfg.name == _default_name(claimed.stem):
            cfg.name = _default_name(Path(name).stem)
        try:
            self._enqueue(job_id, claimed, cfg)
        except Exception as error:
            # The job may have been stored before the failure; then it is queued, and
            # rejecting the file as well would make it look lost.
            if not self._known_quietly(job_id):
                if isinstance(error, ConfigError):
                    return self._reject(claimed, name, _describe(error, name))
                reason = f"{_shown(name)}: could not queue the job: {error}"
                return self._reject(claimed, name, reason)
            log.warning("inbox_enqueue_raised_after_storing", job_id=job_id, error=str(error))
        self._drop_claim(claimed)
        return Accepted(job_id=job_id, name=cfg.name, source=_shown(name))

    def _known_quietly(self, job_id: str) -> bool:
        try:
            return bool(self._is_known(job_id))
        except Exception:
            log.exception("inbox_is_known_failed", job_id=job_id)
            return False

    def _drop_claim(self, claimed: Path) -> None:
        try:
            os.unlink(claimed)
        except FileNotFoundError:
            pass
        except OSError as error:
            # The job is queued; the next scan sees a known id and deletes the claim then.
            log.warning("inbox_claim_not_deleted", claim=str(claimed), error=str(error))

    def _check_file(self, path: Path, name: str) -> str | None:
        """What makes the file unreadable as a config before reading it, or None."""
        name = _shown(name)
        suffix = Path(name).suffix
        if suffix.lower() not in CONFIG_SUFFIXES:
            shown = f"'{suffix}'" if suffix else "(no suffix)"
            return (
                f"{name}: unsupported file type {shown}; the inbox takes "
                + ", ".join(CONFIG_SUFFIXES[:-1])
                + f" or {CONFIG_SUFFIXES[-1]} files"
            )
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            link = os.readlink(path)
            target = Path(os.path.realpath(path))
            if not target.exists():
                return f"{name}: symlink to {link} cannot be followed (dangling or a loop)"
            if not target.is_relative_to(self.home):
                return (
                    f"{name}: symlink to {link} points outside loractl's home {self.home};"
                    " copy the file into the inbox instead"
                )
            info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            return f"{name}: not a regular file"
        if info.st_size > MAX_CONFIG_BYTES:
            return (
                f"{name}: file is {info.st_size} bytes; configs are limited to"
                f" {MAX_CONFIG_BYTES} bytes (1 MB)"
            )
        return None

    # -- rejecting ---------------------------------------------------------------------------

    def _reject_after(self, path: Path, name: str, error: Exception) -> Rejected | None:
        log.exception("inbox_file_failed", file=_shown(name))
        try:
            reason = f"{_shown(name)}: internal error: {type(error).__name__}: {error}"
            return self._reject(path, name, reason)
        except Exception:
            log.exception("inbox_reject_failed", file=_shown(name))
            self._stuck[path.name] = _signature(path)
            return None

    def _reject(self, path: Path, name: str, reason: str) -> Rejected | None:
        """Move ``path`` (a link itself, never its target) to rejected/ with an error file."""
        self.rejected.mkdir(parents=True, exist_ok=True)
        dest = self._free_name(name)
        error_file = self.rejected / f"{dest.name}.error.txt"
        staging = self.rejected / f".{dest.name}.error.txt.tmp"
        # The explanation lands first: a crash before the move leaves the file to be
        # rejected again (under a new name), never a rejected file with no reason.
        try:
            with open(staging, "w", encoding="utf-8", errors="backslashreplace") as fh:
                fh.write(reason.rstrip("\n") + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(staging, error_file)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
        try:
            # Only this process writes rejected/, so the name checked free is still free.
            os.rename(path, dest)
        except FileNotFoundError:
            error_file.unlink(missing_ok=True)
            return None
        except OSError:
            error_file.unlink(missing_ok=True)
            raise
        return Rejected(name=_shown(name), reason=reason)

    def _free_name(self, name: str) -> Path:
        stem, suffix = os.path.splitext(name)
        candidate = name
        number = 0
        while os.path.lexists(self.rejected / candidate) or os.path.lexists(
            self.rejected / f"{candidate}.error.txt"
        ):
            number += 1
            candidate = f"{stem}-{number}{suffix}"
        return self.rejected / candidate
