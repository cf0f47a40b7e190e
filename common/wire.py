"""Reading ZeroMQ sockets into protocol messages, the same way on every side.

libzmq hands a multipart message to the application only once every part has arrived, and
neither ZMQ_MAXMSGSIZE (a limit per frame) nor the receive high-water mark bounds the total:
2,000 frames of 1 MB in one message are 2 GB held by the receiver before it can look. So each
message is read one frame at a time without copying, and one with more frames or more bytes
than the protocol allows is discarded as it is read: no part is ever decoded or kept, each
frame's memory is released as soon as the next one is read, and the allocator is then asked
to hand the freed memory back to the system. Only a runtime folder that we alone own (see
loractl.paths) keeps strangers from sending such a message at all.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable, Iterator
from functools import cache

import zmq

from loractl.protocol import MAX_MESSAGE_BYTES, ErrorCode, Message, ProtocolError, decode

__all__ = ["FRAMES", "ROUTING_ID_BYTES", "drain", "receive"]

# How many frames one well-formed message has, by the kind of socket reading it: a ROUTER
# sees the peer's routing id then the payload, a SUB the topic then the payload, a DEALER
# (the trainer's and the client's side) the payload alone. Anything else is not ours.
FRAMES: dict[int, int] = {zmq.ROUTER: 2, zmq.SUB: 2, zmq.DEALER: 1, zmq.PULL: 1, zmq.PAIR: 1}
# libzmq caps a routing id at 255 bytes; a topic is held to the same.
ROUTING_ID_BYTES = 255
# After dropping less than this, there is nothing worth handing back to the system.
_TRIM_AFTER_BYTES = 1 << 20


def receive(
    sock: zmq.Socket[bytes],
    on_drop: Callable[[ProtocolError], None],
    *,
    max_frames: int | None = None,
    limit: int = MAX_MESSAGE_BYTES,
) -> Iterator[list[bytes]]:
    """Yield the frames of every message waiting on ``sock`` that has the protocol's shape,
    without blocking and without decoding.

    A message of more than ``max_frames`` frames (by default the socket kind's, see FRAMES),
    or of more than ``limit`` payload bytes plus ROUTING_ID_BYTES per leading frame, is read
    away frame by frame, handed to ``on_drop`` as a TOO_LARGE ProtocolError and skipped.
    """
    frames_allowed = max_frames if max_frames is not None else FRAMES.get(int(sock.type), 1)
    bytes_allowed = limit + ROUTING_ID_BYTES * (frames_allowed - 1)
    while True:
        try:
            first = sock.recv(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        kept: list[bytes] | None = []
        count = total = 0
        frame: zmq.Frame | None = first
        del first
        while frame is not None:
            count += 1
            total += len(frame)
            more = frame.more
            if kept is not None:
                if count > frames_allowed or total > bytes_allowed:
                    kept = None  # from here on every frame is only counted
                else:
                    kept.append(frame.bytes)
            # Released before the next part is read: at most one frame of a dropped message
            # is alive here at any time.
            frame = None
            if more:
                # The rest is already queued (delivery is all or nothing): this never waits.
                frame = sock.recv(copy=False)
        if kept is None:
            if total >= _TRIM_AFTER_BYTES:
                release_memory()
            on_drop(
                ProtocolError(
                    ErrorCode.TOO_LARGE,
                    f"dropped a message of {count} frames and {total} bytes unread; the "
                    f"protocol allows {frames_allowed} frames and {bytes_allowed} bytes",
                )
            )
            continue
        yield kept


def drain(
    sock: zmq.Socket[bytes],
    on_drop: Callable[[ProtocolError], None],
    *,
    max_frames: int | None = None,
    limit: int = MAX_MESSAGE_BYTES,
) -> Iterator[tuple[list[bytes], Message]]:
    """Yield (frames, message) for every message waiting on ``sock``, without blocking.

    A message of the wrong shape (see :func:`receive`) or whose last frame does not decode
    is handed to ``on_drop`` and skipped: a peer's garbage must never stop the reader.
    """
    for frames in receive(sock, on_drop, max_frames=max_frames, limit=limit):
        try:
            message = decode(frames[-1], limit=limit)
        except ProtocolError as exc:
            on_drop(exc)
            continue
        yield frames, message


def release_memory() -> None:
    """Ask the C allocator to return freed memory to the system.

    libzmq's I/O thread allocated the dropped frames; glibc keeps small freed chunks in that
    thread's arena, so a 2,000 x 100 kB message leaves the process 200 MB larger until
    malloc_trim (measured: 220 MB -> 20 MB RSS). macOS's allocator has its own call.
    """
    trim = _trimmer()
    if trim is not None:
        trim()


@cache
def _trimmer() -> Callable[[], object] | None:
    try:
        if sys.platform == "darwin":
            libc = ctypes.CDLL(ctypes.util.find_library("c"))
            relief = libc.malloc_zone_pressure_relief
            relief.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            return lambda: relief(None, 0)
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim  # glibc only; musl and others have no such call
        trim.argtypes = [ctypes.c_size_t]
        return lambda: trim(0)
    except (AttributeError, OSError):
        return None
