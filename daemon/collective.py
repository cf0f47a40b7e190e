"""The ranks of a distributed job: their group, and what keeps them in step.

A distributed job runs one trainer per rank, started by mlx.launch (see
``loractl.distributed.launch_command``). ``init_world`` joins the group (a group of one without
mlx.launch), ``barrier`` waits for every rank, ``PEER_LOST_TEXT`` is how a survivor learns that
a peer went away, and ``CollectiveWatch`` ends a rank that a dead peer left stuck inside a
collective once it is told to stop. The session (``loractl.daemon.trainer``) and its hooks
(``loractl.daemon.hooks``) use them; mlx is imported only when a group is made or used.
"""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING

from loractl.config import ConfigError, JobConfig
from loractl.protocol import ExitCode

if TYPE_CHECKING:
    from loractl.daemon.trainer import TrainingSession

# What MLX's ring backend raises in the survivors when a rank exits or is killed.
PEER_LOST_TEXT = "connection to a peer was lost"


def init_world(cfg: JobConfig):
    """This process's distributed group: mlx.launch's ranks, or a group of one without it.

    Raises ConfigError when the config's layout and the launched one differ: the world size
    is part of the run's identity, and a rank left waiting for a peer that was never started
    would hang instead of failing.
    """
    import mlx.core as mx

    world = mx.distributed.init()
    if world.size() != cfg.world_size:
        raise ConfigError(
            f"the config's 'distributed' section makes {cfg.world_size} rank(s) but this "
            f"process is one of {world.size()}; start the job with the command "
            "loractl.distributed.launch_command builds (mlx.launch)"
        )
    return world


def barrier(world) -> None:
    """Wait for every rank: an all_sum of a scalar returns only once all ranks have sent."""
    if world.size() > 1:
        import mlx.core as mx

        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=world))


class CollectiveWatch:
    """Ends a rank stuck in a collective whose peer is gone, once it is told to stop.

    MLX's ring backend (0.32.4) usually raises "connection to a peer was lost" in the
    survivors, but a rank blocked in a compiled step's collectives can instead wait forever
    (seen on this project's machines). Blocked in C, it never runs its Python SIGTERM handler,
    and mlx.launch, which terminates the other ranks when one dies, waits for it forever. So a
    thread sees the signal through the wakeup fd (written by the C-level handler whatever the
    main thread is doing) and, when the main thread has not come back to a hook for longer
    than it ever took before (three times the longest gap seen, at least ``MIN_GRACE_S``),
    announces the failure and exits. A healthy rank reaches its next hook well within that
    and stops the ordinary way, at a checkpoint.
    """

    MIN_GRACE_S = 10.0

    def __init__(self, session: TrainingSession):
        import socket
        import threading

        self.session = session
        self._last = time.monotonic()
        self._longest = 0.0
        self._reader, writer = socket.socketpair()
        writer.setblocking(False)
        self._writer = writer  # kept referenced: the wakeup fd must stay open
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._run, name="collective-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def touch(self) -> None:
        now = time.monotonic()
        self._longest = max(self._longest, now - self._last)
        self._last = now

    def _run(self) -> None:
        stop_signals = {int(signal.SIGTERM), int(signal.SIGINT)}
        while not any(byte in stop_signals for byte in self._reader.recv(64)):
            pass
        while True:
            grace = max(self.MIN_GRACE_S, 3 * self._longest)
            waited = time.monotonic() - self._last
            if waited > grace:
                break
            time.sleep(min(1.0, grace - waited + 0.05))
        message = (
            f"rank {self.session.rank} was asked to stop but has been inside a collective for "
            f"{waited:.0f} s (longest step so far {self._longest:.1f} s): a peer rank is gone"
        )
        self.session._fail(ExitCode.CRASH, message, peer_lost=True)
        self.session.telemetry.close()
        os._exit(ExitCode.CRASH)
