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

Every entry of the inbox ends one of three ways: accepted (queued), rejected (moved to
``rejected/`` beside a ``<name>.error.txt`` that says what is wrong), or deliberately ignored:
hidden names, ``*.tmp`` and ``*.part`` (still being written), and folders whose names do not
look like configs (relative model and data paths may point into them). A folder named like a
config is rejected; so is a name too long to claim, which is stored in ``rejected/`` under a
shortened unique name (its error file must fit the file system's name limit too) and named in
full in the error text.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

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
from loractl.config import (
    MAX_CONFIG_BYTES,
    ConfigError,
    JobConfig,
    _default_name,
    load_config,
)
from loractl.supervisor.jobqueue import sets_key

if TYPE_CHECKING:
    from watchdog.observers.api import BaseObserver

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
# Most file systems' limit on one name, in bytes, when pathconf cannot say.
_NAME_MAX = 255
_ERROR_SUFFIX = ".error.txt"
# A suffix longer than this is not kept when a name is shortened for rejected/.
_KEPT_SUFFIX_BYTES = 16
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
    """A file moved to ``rejected/``: ``name`` is the file's name, ``reason`` what is wrong,
    ``stored`` the name it has in ``rejected/`` (numbered on a clash, shortened if long)."""

    name: str
    reason: str
    stored: str = ""


# A file's (type, inode, size, mtime), and for a symlink what it points at.
_Signature = tuple[int, int, int, int, *tuple[object, ...]]


@dataclass
class _Seen:
    signature: _Signature
    since: float


@dataclass
class _Stuck:
    """A file or claim that could not be finished (a full disk, a read-only folder): tried
    again when it changes, or when ``retry_at`` comes (the delay doubling up to a cap), so
    a claim left by a failed write is queued or rejected once there is space, never left
    hidden until a restart."""

    signature: _Signature | None
    retry_at: float
    delay: float
    reason: str


def _is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def _ignored(name: str) -> bool:
    lower = name.lower()
    return name.startswith(".") or lower.endswith(_IGNORED_SUFFIXES) or name == REJECTED


def _config_named(name: str) -> bool:
    """Whether a name says "config": such a folder is a mistake, any other one a data folder."""
    return name.lower().endswith(CONFIG_SUFFIXES)


def _name_bytes(name: str) -> int:
    return len(os.fsencode(name))


def _fit(stem: str, tail: str, limit: int) -> str:
    """``stem + tail`` cut inside ``stem`` (on a character boundary) to fit ``limit`` bytes."""
    room = limit - _name_bytes(tail)
    while stem and _name_bytes(stem) > room:
        stem = stem[: max(0, len(stem) - max(1, (_name_bytes(stem) - room) // 4))]
    return stem + tail


def _signature(path: Path) -> _Signature | None:
    """What changes when a file is written to, renamed over or re-pointed; None if gone."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    sig: _Signature = (stat.S_IFMT(info.st_mode), info.st_ino, info.st_size, info.st_mtime_ns)
    if stat.S_ISLNK(info.st_mode):
        try:
            target = os.stat(path)
            sig += (os.readlink(path), target.st_ino, target.st_size, target.st_mtime_ns)
        except OSError:
            sig += (None,)
    return sig


def _shown(name: str) -> str:
    """Text that can be printed, logged and sent: Linux names (and link targets) need not be
    UTF-8, and a JSON config may spell a lone surrogate ("\\ud800") that an error repeats."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


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
        if event.event_type not in _CONTENT_EVENTS:
            return
        path = event.dest_path if event.event_type == EVENT_TYPE_MOVED else event.src_path
        # Only the basename: FSEvents reports resolved paths (/private/var/...), so comparing
        # folders would drop events; a name that is not in the inbox is dropped at lstat.
        name = os.path.basename(os.fsdecode(path))
        if event.is_directory and not _config_named(name):
            return  # a data folder: never taken, so nothing to wake up for
        self._inbox._touch(name)


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
        retry_s: float = 2.0,
        retry_cap_s: float = 60.0,
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
        # Files and claims that could not be finished (not even moved to rejected/): retried
        # when they change or their backoff ends, so a read-only folder does not become an
        # error every half second, and a full disk holds a file only until there is space.
        self._stuck: dict[str, _Stuck] = {}
        self.retry_s = retry_s
        self.retry_cap_s = retry_cap_s
        self._now = 0.0
        self._scan_due = True
        self._next_scan = 0.0
        self._observer: BaseObserver | None = None
        self._name_max = _NAME_MAX

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Watch the folder and schedule a full scan (files and claims left from before)."""
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.rejected.mkdir(exist_ok=True)
        try:
            self._name_max = os.pathconf(self.inbox, "PC_NAME_MAX")
        except (OSError, ValueError):
            self._name_max = _NAME_MAX
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
        """Files seen but not yet taken (still settling, left for the next poll, or waiting
        to be retried after a failure such as a full disk)."""
        with self._lock:
            touched = {name for name in self._touched if not _ignored(name)}
        return len(touched | set(self._seen) | set(self._stuck))

    def waiting(self) -> list[tuple[str, str]]:
        """(file name, why) of each file held for a retry: what `status` can show, so that
        a claim waiting for disk space is never invisible."""
        out = []
        for name, stuck in sorted(self._stuck.items()):
            match = _CLAIM.fullmatch(name)
            out.append((_shown(match.group(2) if match else name), stuck.reason))
        return out

    # -- the loop's side ---------------------------------------------------------------------

    def poll(self, now: float | None = None) -> list[Accepted | Rejected]:
        """Take every file that is ready; return what happened. Never raises an Exception."""
        now = time.monotonic() if now is None else now
        self._now = now
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
            if self._scan_due or now >= self._next_scan or self._retry_due(now):
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
    def _keep(results: list[Accepted | Rejected], result: Accepted | Rejected | None) -> None:
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

    def _retry_due(self, now: float) -> bool:
        return any(stuck.retry_at <= now for stuck in self._stuck.values())

    def _held(self, name: str, signature: _Signature | None) -> bool:
        """Whether a stuck file is still waiting: unchanged, and its retry not yet due."""
        stuck = self._stuck.get(name)
        if stuck is None:
            return False
        return stuck.signature == signature and self._now < stuck.retry_at

    def _hold(self, path: Path, reason: str) -> None:
        """Keep ``path`` for a retry after a failure, backing off while it keeps failing."""
        previous = self._stuck.get(path.name)
        delay = min(previous.delay * 2, self.retry_cap_s) if previous else self.retry_s
        self._stuck[path.name] = _Stuck(_signature(path), self._now + delay, delay, reason)
        if previous is None:
            log.warning("inbox_file_held", file=_shown(path.name), reason=reason, retry_s=delay)
        self._call_wake()

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
            folder = sig is not None and (
                stat.S_ISDIR(sig[0]) or (stat.S_ISLNK(sig[0]) and path.is_dir())
            )
            if sig is None or (folder and not _config_named(name)):
                del self._seen[name]
                continue
            if name in self._stuck:
                if self._held(name, sig):
                    del self._seen[name]
                    continue
                if self._stuck[name].signature != sig:
                    del self._stuck[name]  # changed: a new file, tried afresh
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
            claim_name = f"{_CLAIM_PREFIX}{job_id}-{name}"
            if _name_bytes(claim_name) > self._name_max:
                limit = self._name_max - (_name_bytes(claim_name) - _name_bytes(name))
                return self._reject_long(path, name, limit)
            claimed = self.inbox / claim_name
            try:
                os.rename(path, claimed)
            except FileNotFoundError:
                return None  # taken away before we got to it: nothing to do
            return self._finish(claimed, name, job_id)
        except Exception as error:
            where = claimed if claimed is not None and os.path.lexists(claimed) else path
            return self._reject_after(where, name, error)

    def _finish_leftover(
        self, claim_name: str, job_id: str, name: str
    ) -> Accepted | Rejected | None:
        claimed = self.inbox / claim_name
        if self._held(claim_name, _signature(claimed)):
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

    def _reject_long(self, path: Path, name: str, limit: int) -> Rejected | None:
        """Reject a name too long to claim; the type's problem too, if it has one."""
        reason = (
            f"{_shown(name)}: the name is {_name_bytes(name)} bytes long; the inbox takes names"
            f" of at most {limit} bytes (it renames a file to .claim-<job id>-<name> while"
            f" reading it, and this file system allows {self._name_max} bytes per name);"
            " rename the file and drop it in again"
        )
        problem = self._check_file(path, name)
        if problem:
            reason += f"; it is also rejected because {problem}"
        return self._reject(path, name, reason)

    def _finish(self, claimed: Path, name: str, job_id: str) -> Accepted | Rejected | None:
        """Validate a claimed file, enqueue it under ``job_id``, then delete the claim."""
        problem = self._check_file(claimed, name)
        if problem:
            return self._reject(claimed, name, f"{_shown(name)}: {problem}")
        try:
            cfg = load_config(claimed)
        except ConfigError as error:
            return self._reject(claimed, name, _describe(error, name))
        if not sets_key(claimed, "name"):
            cfg.name = _default_name(Path(name).stem)
        try:
            self._enqueue(job_id, claimed, cfg)
        except Exception as error:
            # The job may have been stored before the failure; then it is queued, and
            # rejecting the file as well would make it look lost.
            if not self._known_quietly(job_id):
                if _is_disk_full(error):
                    # A valid config is not rejected for want of space: the claim waits, and
                    # is queued once there is room (see _Stuck).
                    self._hold(claimed, f"waiting for disk space to queue it: {error}")
                    return None
                if isinstance(error, ConfigError):
                    return self._reject(claimed, name, _describe(error, name))
                reason = f"{_shown(name)}: could not queue the job: {error}"
                return self._reject(claimed, name, reason)
            log.warning("inbox_enqueue_raised_after_storing", job_id=job_id, error=str(error))
        self._stuck.pop(claimed.name, None)
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
        """What makes the file unreadable as a config before reading it (without the name in
        front), or None."""
        suffix = Path(_shown(name)).suffix
        if suffix.lower() not in CONFIG_SUFFIXES:
            shown = f"'{suffix}'" if suffix else "(no suffix)"
            return (
                f"unsupported file type {shown}; the inbox takes "
                + ", ".join(CONFIG_SUFFIXES[:-1])
                + f" or {CONFIG_SUFFIXES[-1]} files"
            )
        info = os.lstat(path)
        linked = ""
        if stat.S_ISLNK(info.st_mode):
            link = os.readlink(path)
            target = Path(os.path.realpath(path))
            if not target.exists():
                return f"symlink to {link} cannot be followed (dangling or a loop)"
            if not target.is_relative_to(self.home):
                return (
                    f"symlink to {link} points outside loractl's home {self.home};"
                    " copy the file into the inbox instead"
                )
            info = os.stat(path)
            linked = f"symlink to {link}: "
        if stat.S_ISDIR(info.st_mode):
            return (
                f"{linked}a folder, not a config file; the inbox takes one config file per job"
                " (put the config itself here, and its model and data in a folder named"
                " without a config suffix)"
            )
        if not stat.S_ISREG(info.st_mode):
            return f"{linked}not a regular file"
        if info.st_size > MAX_CONFIG_BYTES:
            return (
                f"{linked}file is {info.st_size} bytes; configs are limited to"
                f" {MAX_CONFIG_BYTES} bytes (1 MB)"
            )
        return None

    # -- rejecting ---------------------------------------------------------------------------

    def _reject_after(self, path: Path, name: str, error: Exception) -> Rejected | None:
        log.exception("inbox_file_failed", file=_shown(name))
        try:
            reason = f"{_shown(name)}: internal error: {type(error).__name__}: {error}"
            return self._reject(path, name, reason)
        except Exception as failure:
            log.exception("inbox_reject_failed", file=_shown(name))
            self._hold(path, f"could not be rejected: {failure}")
            return None

    def _reject(self, path: Path, name: str, reason: str) -> Rejected | None:
        """Move ``path`` (a link itself, never its target) to rejected/ with an error file."""
        # The reason quotes names, link targets and config values: make it one printable
        # text, the same in the error file as in what is returned (and logged, and sent).
        reason = _shown(reason)
        self.rejected.mkdir(parents=True, exist_ok=True)
        dest = self._free_name(name)
        error_file = self.rejected / f"{dest.name}{_ERROR_SUFFIX}"
        # A short fixed name: "<dest>.error.txt.tmp" would not fit NAME_MAX for long names.
        # Only this process writes rejected/, so one staging name is enough.
        staging = self.rejected / ".staging.error.txt.tmp"
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
        return Rejected(name=_shown(name), reason=reason, stored=_shown(dest.name))

    def _free_name(self, name: str) -> Path:
        """A name in rejected/ that is free, and whose error file is free, for ``name``.

        A clash is numbered (bad-1.yaml). A name whose error file would not fit the name limit
        is shortened, keeping its suffix and adding a hash of the full name, so two long
        names that share a beginning stay apart.
        """
        limit = self._name_max - len(_ERROR_SUFFIX)
        stem, suffix = os.path.splitext(name)
        if _name_bytes(suffix) > _KEPT_SUFFIX_BYTES:
            stem, suffix = name, ""
        mark = ""
        if _name_bytes(name) > limit:
            mark = "~" + hashlib.sha256(os.fsencode(name)).hexdigest()[:8]
        number = 0
        while True:
            candidate = _fit(stem, mark + (f"-{number}" if number else "") + suffix, limit)
            if not (
                os.path.lexists(self.rejected / candidate)
                or os.path.lexists(self.rejected / f"{candidate}{_ERROR_SUFFIX}")
            ):
                return self.rejected / candidate
            number += 1
