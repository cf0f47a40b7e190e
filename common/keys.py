"""CURVE keys for the telemetry channel when it crosses the network (tcp://).

On one Mac the supervisor and its trainers talk over ipc:// sockets in a private folder, and
the folder's permissions are the security. A distributed job's ranks on other Macs reach the
supervisor's telemetry ROUTER over TCP instead, where anyone on the network could send forged
heartbeats or read "stop" commands; there the socket is CURVE-encrypted and only clients
holding this install's client key get through.

Each install has one folder, ``<home>/keys`` (mode 0700), made with pyzmq's
``zmq.auth.create_certificates``::

    server.key  server.key_secret      the supervisor's pair
    client.key  client.key_secret      the pair every trainer uses
    authorized/client.key              the public keys the supervisor accepts

The supervisor calls :func:`ensure_keys` and :func:`secure_server`; a trainer calls
:func:`load_keys` and :func:`secure_client`, with the folder copied from the supervisor's Mac.
Nothing here may import mlx.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import zmq
import zmq.auth

from loractl.atomic import fsync_path
from loractl.paths import UnsafeFolder, verify_folder

if TYPE_CHECKING:
    from zmq.auth.thread import ThreadAuthenticator

KEYS_DIR_NAME = "keys"
AUTHORIZED_DIR_NAME = "authorized"
SERVER = "server"
CLIENT = "client"

# What a trainer on another Mac needs: its own pair (the secret file holds both halves) and
# the supervisor's public key. Never the server's secret.
TRAINER_FILES = (f"{CLIENT}.key_secret", f"{SERVER}.key")
# Everything the supervisor's folder holds, relative to it.
ALL_FILES = (
    f"{SERVER}.key",
    f"{SERVER}.key_secret",
    f"{CLIENT}.key",
    f"{CLIENT}.key_secret",
    f"{AUTHORIZED_DIR_NAME}/{CLIENT}.key",
)


class UnsafeKeys(UnsafeFolder, ValueError):
    """A keys folder or key file that another user owns or may read; using it is refused.

    An UnsafeFolder, so the supervisor's existing refusal path (exit 78 with the message)
    covers it, and a ValueError for callers that only know about bad input.
    """


class MissingKeys(FileNotFoundError):
    """A key file that should be there is not; the message names it and the fix."""


@dataclass(frozen=True)
class CurveKeys:
    """One install's keys, as Z85 bytes. ``server_secret`` is None on a trainer's Mac."""

    folder: Path
    server_public: bytes
    client_public: bytes
    client_secret: bytes = field(repr=False)
    server_secret: bytes | None = field(default=None, repr=False)

    @property
    def authorized(self) -> Path:
        """The folder of client public keys the authenticator accepts (and nothing else)."""
        return self.folder / AUTHORIZED_DIR_NAME


def is_tcp(endpoint: str) -> bool:
    """True for a tcp:// endpoint, the one transport here that leaves the machine."""
    return endpoint.strip().lower().startswith("tcp://")


def keys_folder(home: str | os.PathLike[str]) -> Path:
    return Path(home) / KEYS_DIR_NAME


def ensure_keys(folder: str | os.PathLike[str]) -> CurveKeys:
    """The install's keys in ``folder``, made first if it does not exist (or is empty).

    The pairs are made in a private temporary folder next to ``folder`` and renamed into
    place in one step, so a crash midway leaves either no keys folder or a complete one,
    never half a pair that a trainer could copy. A folder that exists is reused as it is: it
    must be ours, closed to group and others, and complete (UnsafeKeys, MissingKeys).
    """
    folder = Path(folder)
    if os.path.lexists(folder):
        _verify_folder(folder)
        if any(folder.iterdir()):
            return _load(folder, ALL_FILES, _fix_incomplete_server(folder))
    folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        _make_keys(staging)
        try:
            # Atomic, and it replaces only an empty folder: if another process won the race,
            # its complete folder stays and ours is thrown away.
            os.rename(staging, folder)
        except OSError:
            if not os.path.isdir(folder):
                raise
        else:
            fsync_path(folder.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _verify_folder(folder)
    return _load(folder, ALL_FILES, _fix_incomplete_server(folder))


def load_keys(folder: str | os.PathLike[str]) -> CurveKeys:
    """A trainer's keys: the client pair and the server's public key, from ``folder``.

    On another Mac the folder is a copy of ``<home>/keys`` from the supervisor's Mac; only
    ``client.key_secret`` and ``server.key`` are read. Raises MissingKeys naming the missing
    file, UnsafeKeys when the folder or a file is open to others.
    """
    folder = Path(folder)
    fix = (
        f"copy the keys folder ({KEYS_DIR_NAME}/ in the loractl home) from the supervisor's "
        f"Mac to {folder}, at least {' and '.join(TRAINER_FILES)}, then "
        f"`chmod 700 '{folder}'` and `chmod 600` the files"
    )
    if not os.path.lexists(folder):
        raise MissingKeys(f"no CURVE keys folder at {folder}; {fix}")
    _verify_folder(folder)
    return _load(folder, TRAINER_FILES, fix)


def secure_server(
    socket: zmq.Socket[bytes],
    keys: CurveKeys,
    context: zmq.Context[zmq.Socket[bytes]] | None = None,
) -> ThreadAuthenticator:
    """Make ``socket`` (before it binds) a CURVE server that lets in only this install's
    client key(s); returns the running authenticator, which the caller stops on close.

    The authenticator answers ZAP requests for its whole context, so it must run in the
    socket's own context, and one context holds at most one.
    """
    from zmq.auth.thread import ThreadAuthenticator

    if keys.server_secret is None:
        raise MissingKeys(
            f"{keys.folder / (SERVER + '.key_secret')} is missing: the server's secret key "
            "lives only on the supervisor's Mac; call ensure_keys there"
        )
    context = context or socket.context
    if context.underlying != socket.context.underlying:
        raise ValueError(
            "the authenticator must run in the socket's own context: ZeroMQ asks the "
            "ZAP handler of the context the socket belongs to"
        )
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    try:
        authenticator.configure_curve(domain="*", location=str(keys.authorized))
        # configure_curve logs (and swallows) a folder it cannot read; an empty allow-list
        # would refuse every trainer without a word, so say so here.
        if keys.client_public not in authenticator.certs.get("*", {}):
            raise MissingKeys(
                f"{keys.authorized / (CLIENT + '.key')} does not hold this install's client "
                f"public key; copy {keys.folder / (CLIENT + '.key')} there"
            )
        socket.curve_secretkey = keys.server_secret
        socket.curve_publickey = keys.server_public
        socket.curve_server = True
    except BaseException:
        authenticator.stop()
        raise
    return authenticator


def secure_client(socket: zmq.Socket[bytes], keys: CurveKeys) -> None:
    """Make ``socket`` (before it connects) a CURVE client of this install's server."""
    socket.curve_secretkey = keys.client_secret
    socket.curve_publickey = keys.client_public
    socket.curve_serverkey = keys.server_public


# -- internals ------------------------------------------------------------------------------


def _fix_incomplete_server(folder: Path) -> str:
    return (
        f"remove {folder} to make a new install pair (then copy it to every trainer Mac "
        "again), or restore the missing file from a copy"
    )


def _verify_folder(folder: Path) -> None:
    """The project's private-folder check (ours, a real folder, no group/other bits), raised
    as UnsafeKeys."""
    try:
        verify_folder(folder, private=True, follow=False)
    except UnsafeFolder as exc:
        raise UnsafeKeys(exc.path, exc.problem, exc.fix) from None


def _verify_key_file(path: Path) -> None:
    """A key file must be a regular file of ours that group and others cannot touch."""
    info = os.lstat(path)
    mode = stat.S_IMODE(info.st_mode)
    shown = f"owned by uid {info.st_uid}, mode {mode:04o}"
    uid = os.getuid()
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeKeys(
            path, f"it is not a plain file ({shown})", "replace it with the key file itself"
        )
    if info.st_uid != uid:
        raise UnsafeKeys(
            path,
            f"it is {shown}, not owned by you (uid {uid})",
            f"take it back with `sudo chown {uid} '{path}'` if it is yours, or make new keys",
        )
    if mode & 0o077:
        raise UnsafeKeys(
            path,
            f"it is {shown}; other users could read or replace the CURVE keys",
            f"restrict it with `chmod 600 '{path}'` (and make new keys if others read it)",
        )


def _load(folder: Path, names: tuple[str, ...], fix: str) -> CurveKeys:
    for name in names:
        path = folder / name
        if not os.path.lexists(path):
            raise MissingKeys(f"CURVE key file {path} is missing; {fix}")
        _verify_key_file(path)
    if f"{AUTHORIZED_DIR_NAME}/{CLIENT}.key" in names:
        _verify_folder(folder / AUTHORIZED_DIR_NAME)
    server_public, _ = _certificate(folder / f"{SERVER}.key")
    server_secret = None
    if f"{SERVER}.key_secret" in names:
        _, server_secret = _certificate(folder / f"{SERVER}.key_secret")
        if server_secret is None:
            raise MissingKeys(f"{folder / (SERVER + '.key_secret')} holds no secret key; {fix}")
    client_public, client_secret = _certificate(folder / f"{CLIENT}.key_secret")
    if client_secret is None:
        raise MissingKeys(f"{folder / (CLIENT + '.key_secret')} holds no secret key; {fix}")
    return CurveKeys(
        folder=folder,
        server_public=server_public,
        client_public=client_public,
        client_secret=client_secret,
        server_secret=server_secret,
    )


def _certificate(path: Path) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except ValueError as exc:
        raise MissingKeys(f"{path} is not a ZeroMQ certificate ({exc}); make new keys") from None


def _make_keys(staging: Path) -> None:
    """Both pairs and the allow-list in ``staging``, every file 0600 and on disk."""
    with _private_umask():
        zmq.auth.create_certificates(staging, SERVER)
        zmq.auth.create_certificates(staging, CLIENT)
        authorized = staging / AUTHORIZED_DIR_NAME
        authorized.mkdir(mode=0o700)
        shutil.copyfile(staging / f"{CLIENT}.key", authorized / f"{CLIENT}.key")
    for name in ALL_FILES:
        path = staging / name
        os.chmod(path, 0o600)  # whatever umask the files were written under
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    os.chmod(staging, 0o700)
    fsync_path(authorized)
    fsync_path(staging)


@contextmanager
def _private_umask() -> Iterator[None]:
    # create_certificates opens its files with the default mode, so the umask decides who
    # may read a secret key in the moment before the chmod.
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)
