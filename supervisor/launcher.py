"""mlx.launch as the supervisor runs it: its stdin, its timings, and signals to its ranks.

The attempt itself (:mod:`.attempt`) follows the ranks; the bookkeeping of which rank failed
first is in :mod:`.ranks`.
"""

from __future__ import annotations

import os
import socket

# How long an ended launcher's killed ranks may take to go before the attempt counts as over.
LINGER_S = 10.0
# How long mlx.launch has to log its killed ranks' ends and exit before it is killed too.
LAUNCHER_GRACE_S = 5.0

# What mlx.launch's stdin is primed with: more than a rank's stdin pipe holds (64 KiB).
LAUNCHER_STDIN_BYTES = 256 * 1024


def launcher_stdin() -> tuple[socket.socket, socket.socket]:
    """A stdin for mlx.launch that keeps it from spinning, as ``(ours, its)``.

    mlx.launch (0.32.4) relays its stdin to every rank, and each rank's relay thread selects
    on that rank's stdin pipe for writing: while the pipe has room the select returns at
    once and the thread spins, costing a core on a small Mac and slowing every collective.
    Priming the stream with more than a pipe holds fills each rank's pipe, and the threads
    then sleep in select (ranks never read stdin). Its main loop spins at EOF too, so the
    launcher also inherits our end: the stream never ends, even after we die.
    """
    ours, its = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LAUNCHER_STDIN_BYTES)
    its.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LAUNCHER_STDIN_BYTES)
    ours.setblocking(False)
    try:
        ours.send(b"\n" * LAUNCHER_STDIN_BYTES)  # what fits is enough; never block on it
    except BlockingIOError:
        pass
    return ours, its


def signal_if_alive(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
