"""Reading ZeroMQ sockets into protocol messages, the same way on every side."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import zmq

from loractl.protocol import Message, ProtocolError, decode


def drain(
    sock: zmq.Socket, on_drop: Callable[[ProtocolError], None]
) -> Iterator[tuple[list[bytes], Message]]:
    """Yield (frames, message) for every frame waiting on ``sock``, without blocking.

    A frame that does not decode is handed to ``on_drop`` and skipped: a peer's garbage must
    never stop the reader.
    """
    while True:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        try:
            message = decode(frames[-1])
        except ProtocolError as exc:
            on_drop(exc)
            continue
        yield frames, message
