"""Talking to the supervisor: one request, one reply, never a hang.

A DEALER socket with LINGER 0 and a polled timeout: if the daemon is down, the caller hears
so within the timeout and is told how to start it.

Before connecting, the runtime folder is verified to be ours and mode 0700: anyone who could
write it could bind the control socket there and answer in the daemon's place (a spoofed
"queued" for a job that never was). A folder that fails raises UnsafeFolder, a RuntimeError
whose one-line message names the folder, its owner and mode, and the fix.
"""

from __future__ import annotations

import os

import zmq

from loractl.paths import Layout, UnsafeFolder
from loractl.protocol import (
    MAX_REPLY_BYTES,
    PROTOCOL_VERSION,
    ErrorCode,
    ProtocolError,
    Reply,
    Request,
    decode,
)
from loractl.terminal import shell_join

DEFAULT_TIMEOUT_S = 5.0

__all__ = ["DaemonNotRunning", "RequestFailed", "UnsafeFolder", "request", "supervisor_alive"]


class DaemonNotRunning(RuntimeError):
    """No supervisor answered. ``running`` is True when one holds the home's lock but did
    not answer in time (busy or hung), False when none is running at all."""

    def __init__(self, layout: Layout, running: bool = False, timeout: float | None = None):
        # Hints are pasted: the home is quoted for a shell (a space or a `;` in it is data).
        home = ""
        if "LORACTL_HOME" not in os.environ:
            home = " " + shell_join(["--home", str(layout.home)])
        if running:
            message = (
                f"the loractl supervisor for {layout.home} is running but did not answer "
                f"within {timeout:g} s; its log: `loractl{home} logs --daemon`"
            )
        else:
            message = (
                f"the loractl daemon is not running for {layout.home}; start it with "
                f"`loractl{home} daemon start` (installed as a service) or "
                f"`loractl{home} daemon run`"
            )
        super().__init__(message)
        self.layout = layout
        self.running = running


class RequestFailed(RuntimeError):
    def __init__(self, reply: Reply):
        super().__init__(reply.reason)
        self.reply = reply
        self.code = ErrorCode(reply.error) if reply.error in ErrorCode._value2member_map_ else None


def supervisor_alive(layout: Layout) -> bool:
    """Whether a supervisor holds the home's pidfile lock (a crashed one leaves its socket
    file behind, so the file alone proves nothing)."""
    import fcntl

    try:
        fd = os.open(layout.pidfile, os.O_RDONLY)
    except OSError:
        return False
    try:
        # Held for microseconds; a supervisor starting in that instant fails its own lock
        # and launchd simply starts it again.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def request(layout: Layout, message: Request, timeout: float = DEFAULT_TIMEOUT_S) -> Reply:
    """Send one request and return the successful reply; raise on anything else.

    Raises UnsafeFolder (before any connection) when the runtime folder is not ours alone.
    """
    layout.check_runtime()
    socket_path = layout.runtime / "control"
    if not socket_path.exists() or not supervisor_alive(layout):
        raise DaemonNotRunning(layout)
    context = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(layout.control)
        sock.send(message.encode())
        if not sock.poll(int(timeout * 1000)):
            raise DaemonNotRunning(layout, running=supervisor_alive(layout), timeout=timeout)
        frame = sock.recv()
    finally:
        sock.close()
    try:
        reply = decode(frame, limit=MAX_REPLY_BYTES)
    except ProtocolError as exc:
        if exc.code == ErrorCode.VERSION_MISMATCH:
            raise RuntimeError(
                f"the daemon speaks another protocol version (this loractl speaks "
                f"{PROTOCOL_VERSION}); restart it with `loractl daemon stop` and "
                "`loractl daemon run`"
            ) from None
        raise
    if not isinstance(reply, Reply):
        raise RuntimeError(f"unexpected answer of type {reply.type}")
    if not reply.ok:
        raise RequestFailed(reply)
    return reply
