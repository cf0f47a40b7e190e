"""Where loractl keeps things, per platform, all movable with LORACTL_HOME or --home."""

from __future__ import annotations

import hashlib
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path


def default_home() -> Path:
    if env := os.environ.get("LORACTL_HOME"):
        return Path(env).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "loractl"
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "loractl"


def default_logs(home: Path) -> Path:
    if sys.platform == "darwin" and "LORACTL_HOME" not in os.environ:
        return Path.home() / "Library" / "Logs" / "loractl"
    return home / "logs"


class UnsafeFolder(RuntimeError):
    """A folder loractl uses is not private to the current user, so using it is refused.

    Another local user who owns (or can write) the runtime folder can bind loractl's control
    socket first and answer requests in the daemon's place; one who can write the home can
    replace configs and checkpoints. The message names the folder, its owner and mode, and
    the fix.
    """

    def __init__(self, path: Path, problem: str, fix: str):
        super().__init__(f"refusing to use {path}: {problem}; {fix}")
        self.path = path
        self.problem = problem
        self.fix = fix


def folder_problem(path: Path, *, private: bool, follow: bool = True) -> tuple[str, str] | None:
    """What makes ``path`` unsafe for loractl, as (problem, fix); None when it is fine.

    ``private`` folders (the runtime folders that hold the sockets) must be owned by us with
    no group or world bits; the others (home, jobs, inbox, logs) owned by us and not writable
    by group or world. ``follow=False`` refuses a symlink: in a shared folder such as /tmp,
    anyone can plant one.
    """
    uid = os.getuid()
    info = os.stat(path) if follow else os.lstat(path)
    mode = stat.S_IMODE(info.st_mode)
    shown = f"owned by uid {info.st_uid}, mode {mode:04o}"
    if stat.S_ISLNK(info.st_mode):
        return (
            f"it is a symlink ({shown}), and a link there may point at another user's folder",
            f"remove it (`rm '{path}'`) and let loractl create the folder",
        )
    if not stat.S_ISDIR(info.st_mode):
        return (f"it is not a folder ({shown})", f"remove it (`rm '{path}'`)")
    if info.st_uid != uid:
        problem = f"it is {shown}, not owned by you (uid {uid})"
        fix = (
            f"remove it if you did not create it (`sudo rm -r '{path}'`), or take it back "
            f"with `sudo chown -R {uid} '{path}'`"
        )
        if private:
            problem += ", so that user could answer in loractl's place"
            fix += ", or set LORACTL_RUNTIME_DIR to a folder of your own"
        return problem, fix
    if private and mode & 0o077:
        return (
            f"it is {shown}; other users could reach loractl's sockets",
            f"restrict it with `chmod 700 '{path}'`",
        )
    if not private and mode & 0o022:
        return (
            f"it is {shown}; other users could drop jobs or replace checkpoints",
            f"restrict it with `chmod 700 '{path}'`",
        )
    return None


def verify_folder(path: Path, *, private: bool, follow: bool = True) -> None:
    """Raise UnsafeFolder when ``path`` is not safe for loractl (see :func:`folder_problem`)."""
    try:
        problem = folder_problem(path, private=private, follow=follow)
    except PermissionError:
        where = "set LORACTL_RUNTIME_DIR to" if private else "choose another --home in"
        problem = (
            "you may not even look into it, so it belongs to someone else",
            f"remove it if you did not create it, or {where} a folder of your own",
        )
    except OSError as exc:
        # A dangling link, a loop: nothing loractl could use there.
        problem = (f"it cannot be used: {exc.strerror}", f"remove it (`rm '{path}'`)")
    if problem is not None:
        raise UnsafeFolder(path, *problem)


def verify_runtime(root: Path, folder: Path | None = None) -> None:
    """Refuse a runtime root (and socket folder) that is not ours alone.

    The root usually sits in /tmp, so it must be a real folder (not a link), owned by us,
    mode 0700, inside a parent that nobody else can rename it in: owned by us or root, and
    sticky if others may write it (as /tmp is).
    """
    parent = root.parent
    info = os.stat(parent)
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid not in (0, os.getuid()) or (mode & 0o022 and not mode & stat.S_ISVTX):
        raise UnsafeFolder(
            root,
            f"its parent {parent} is owned by uid {info.st_uid}, mode {mode:04o}, so other "
            "users could replace it",
            "set LORACTL_RUNTIME_DIR to a folder in a parent that only you (or root, with the "
            "sticky bit, like /tmp) control",
        )
    verify_folder(root, private=True, follow=False)
    if folder is not None:
        verify_folder(folder, private=True, follow=False)


def runtime_root() -> Path:
    # Not $TMPDIR: on macOS it is a long /var/folders/... path, and a Unix socket path must
    # fit in 104 bytes there.
    base = os.environ.get("LORACTL_RUNTIME_DIR") or f"/tmp/loractl-{os.getuid()}"
    return Path(base)


@dataclass(frozen=True)
class Layout:
    """Every path of one loractl home."""

    home: Path

    @classmethod
    def at(cls, home: str | Path | None = None) -> Layout:
        return cls(Path(home).expanduser().resolve() if home else default_home().resolve())

    @property
    def jobs(self) -> Path:
        return self.home / "jobs"

    @property
    def inbox(self) -> Path:
        return self.home / "inbox"

    @property
    def database(self) -> Path:
        return self.home / "loractl.db"

    @property
    def pidfile(self) -> Path:
        return self.home / "supervisor.pid"

    @property
    def logs(self) -> Path:
        return default_logs(self.home)

    @property
    def runtime(self) -> Path:
        # One short folder per home, so several homes (tests) never share sockets.
        digest = hashlib.sha256(str(self.home).encode()).hexdigest()[:10]
        return runtime_root() / digest

    def endpoint(self, name: str) -> str:
        return f"ipc://{self.runtime / name}"

    @property
    def control(self) -> str:
        return self.endpoint("control")

    @property
    def events(self) -> str:
        return self.endpoint("events")

    @property
    def telemetry(self) -> str:
        return self.endpoint("telemetry")

    def job_dir(self, job_id: str) -> Path:
        return self.jobs / job_id

    @property
    def folders(self) -> tuple[Path, ...]:
        """The folders of the home that hold state: private to the user, mode 0700."""
        return (self.home, self.jobs, self.inbox, self.logs)

    def ensure(self) -> None:
        """Create every folder private (0700) and verify them all; raise UnsafeFolder if one
        is not ours alone.

        A folder that already exists and is ours is tightened to 0700 (older versions made
        them world-readable); one that belongs to someone else is refused, never changed.
        """
        for folder in self.folders:
            _make_private(folder, follow=True)
        root = runtime_root()
        _make_private(root, follow=False)
        # Verified before anything is made inside it: in /tmp, another user may have
        # created it first.
        verify_runtime(root)
        _make_private(self.runtime, follow=False)
        self.check_private()

    def check_private(self) -> None:
        """Raise UnsafeFolder unless every folder loractl uses is ours and closed to others.

        The supervisor calls this (through :meth:`ensure`) before it binds a socket; the
        client calls :meth:`check_runtime` before it connects to one.
        """
        for folder in self.folders:
            verify_folder(folder, private=False)
        self.check_runtime()

    def check_runtime(self) -> None:
        """Raise UnsafeFolder unless the runtime root and this home's socket folder are ours,
        mode 0700 (each checked only if it exists: a missing one means no daemon)."""
        root = runtime_root()
        if not os.path.lexists(root):
            return
        verify_runtime(root)
        if os.path.lexists(self.runtime):
            verify_folder(self.runtime, private=True, follow=False)


def _make_private(folder: Path, *, follow: bool) -> None:
    """mkdir 0700 (parents as the umask says); tighten an existing folder of ours to 0700.

    Anything odd in the way (a file, a link, a stranger's folder) is left alone for the
    verification that follows to name.
    """
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        return  # a file (or a link to one) in the way
    try:
        info = os.stat(folder) if follow else os.lstat(folder)
    except OSError:
        return  # a dangling link, or a stranger's folder we may not look into
    if (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.getuid()
        and stat.S_IMODE(info.st_mode) & 0o077
    ):
        os.chmod(folder, 0o700)
