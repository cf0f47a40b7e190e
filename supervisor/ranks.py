"""The ranks of a distributed attempt, as the supervisor sees them.

One attempt of a distributed job is one mlx.launch process (the launcher) that starts one
trainer per rank. The launcher's own exit status says nothing (mlx 0.32.4 exits 0 even when a
rank was killed), so the supervisor learns about each rank from what it says (heartbeats and
its announced exit, over telemetry) and, for ranks on this machine, from the process table.
When the launcher has exited, :func:`attempt_exit` turns all of that into the one exit the
classifier reads: the first rank to fail, not the survivors that then lost their peer.

Pure bookkeeping and parsing: no sockets, no signals.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from loractl.protocol import ExitCode
from loractl.supervisor.classify import split_returncode

# What mlx.launch (mlx/_distributed_utils/launch.py, 0.32.4) logs as each rank ends: a
# negative code is the signal that ended it; "was killed" means the launcher terminated it
# because another rank had failed.
_LAUNCHER_EXIT = re.compile(r"Node with rank (\d+) exited with code (-?\d+)")
_LAUNCHER_KILLED = re.compile(r"Node with rank (\d+) was killed")


@dataclass
class Rank:
    """One rank of the running attempt."""

    rank: int
    pid: int
    host: str
    local: bool  # on this machine: the process table can confirm it is alive
    started_at: float | None = None  # its create_time, so a reused pid is not taken for it
    last_heartbeat: float = field(default_factory=time.monotonic)
    step: int = -1
    footprint_mb: float | None = None
    # The exit code it announced (done: 0, stopped: 82, an error: its code), if it did.
    reported_exit: int | None = None
    reason: str = ""
    # It failed only because another rank went away ("connection to a peer was lost").
    peer_lost: bool = False
    ended_at: float | None = None  # when we learned it ended (monotonic)

    def describe(self) -> dict[str, Any]:
        """The rank as ``show --json`` lists it."""
        return {
            "rank": self.rank,
            "host": self.host,
            "pid": self.pid,
            "step": max(self.step, 0),
            "footprint_mb": round(self.footprint_mb, 1) if self.footprint_mb else None,
        }

    @property
    def failed(self) -> bool:
        """Ended without saying it finished or stopped."""
        return self.ended_at is not None and self.reported_exit not in (
            int(ExitCode.DONE),
            int(ExitCode.STOPPED),
        )


def launcher_exits(text: str) -> dict[int, int | None]:
    """Each rank's end as the launcher logged it: its exit code (negative: the signal), or
    None when the launcher itself terminated it."""
    ends: dict[int, int | None] = {}
    for line in text.splitlines():
        if match := _LAUNCHER_EXIT.search(line):
            ends[int(match[1])] = int(match[2])
        elif match := _LAUNCHER_KILLED.search(line):
            ends[int(match[1])] = None
    return ends


def first_failed(ranks: dict[int, Rank]) -> Rank | None:
    """The rank whose failure ended the attempt: the earliest to fail for a reason of its
    own, before any that only lost their peer."""
    failed = [rank for rank in ranks.values() if rank.failed]
    if not failed:
        return None
    return min(failed, key=lambda r: (r.peer_lost, r.ended_at, r.rank))


def attempt_exit(
    ranks: dict[int, Rank], world_size: int, launcher_log: str, culprit: int | None
) -> tuple[int | None, int | None, int | None]:
    """The attempt's end as one trainer's: ``(exit_code, signal, rank)``.

    ``culprit`` is the rank the supervisor already blamed (the first to die, or the one that
    hung or outgrew its budget). Otherwise: every rank done is done; a rank that failed on its
    own account speaks for the attempt; every rank stopped is stopped. A rank's exit is what it
    announced, else what the launcher logged for it.
    """
    logged = launcher_exits(launcher_log)

    def end_of(number: int) -> tuple[int | None, int | None]:
        rank = ranks.get(number)
        if rank is not None and rank.reported_exit is not None:
            return rank.reported_exit, None
        code = logged.get(number)
        if code is None:
            return None, None
        return split_returncode(code)

    if culprit is not None:
        code = logged.get(culprit)
        blamed = ranks.get(culprit)
        if code == -15 and (blamed is None or blamed.reported_exit is None):
            # Ended by the launcher's SIGTERM, unannounced: mlx.launch terminates the others
            # once one rank fails, so the rank that failed first (perhaps before it ever
            # spoke, at start-up) is the one to blame.
            for number, other in sorted(logged.items()):
                peer = ranks.get(number)
                lost_peer = peer is not None and peer.peer_lost
                if number != culprit and other not in (None, 0, -15, 82) and not lost_peer:
                    return (*end_of(number), number)
        return (*end_of(culprit), culprit)
    reported = {n: r.reported_exit for n, r in ranks.items()}
    if len(reported) == world_size and all(c == ExitCode.DONE for c in reported.values()):
        return int(ExitCode.DONE), None, None
    failed = first_failed(ranks)
    if failed is not None and not failed.peer_lost and failed.reported_exit is not None:
        return (*end_of(failed.rank), failed.rank)  # it said it failed, and why
    if any(c == ExitCode.STOPPED for c in reported.values()):
        # The ranks agree on a stop at a step; one that exits first makes the launcher
        # terminate the rest, so a rank killed after the shared checkpoint is stopped too.
        return int(ExitCode.STOPPED), None, None
    # A rank that died without a word before anyone noticed: the launcher saw how.
    for number, code in sorted(logged.items()):
        if code is not None and code not in (ExitCode.DONE, ExitCode.STOPPED):
            rank = ranks.get(number)
            if rank is None or not rank.peer_lost:
                return (*end_of(number), number)
    if failed is not None:
        return (*end_of(failed.rank), failed.rank)
    return None, None, None
