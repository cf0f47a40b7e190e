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
    pid: int  # as its own machine numbers it
    host: str  # as the job's config names it (mlx.launch's layout), never its host name
    local: bool  # started on this machine: the process table can confirm it is alive
    started_at: float | None = None  # its create_time, so a reused pid is not taken for it
    # The host name it reports: shown, never trusted (two Macs may share one).
    hostname: str = ""
    address: str = ""  # where it is reached, to match a dropped telemetry connection
    last_heartbeat: float = field(default_factory=time.monotonic)
    step: int = -1
    footprint_mb: float | None = None
    # The exit code it announced (done: 0, stopped: 82, an error: its code), if it did.
    reported_exit: int | None = None
    reason: str = ""
    # It failed only because another rank went away ("connection to a peer was lost").
    peer_lost: bool = False
    ended_at: float | None = None  # when we learned it ended (monotonic)
    # How we learned it was gone, when it could not say so itself ("its ssh session ended
    # (exit 255)"): the words its crash is recorded with.
    lost_how: str = ""
    # The exit mlx.launch logged for it (negative: the signal), once it did.
    launcher_exit: int | None = None
    # When its telemetry connection dropped, until it is heard from again.
    disconnected_at: float | None = None

    def describe(self) -> dict[str, Any]:
        """The rank as ``show --json`` lists it."""
        return {
            "rank": self.rank,
            "host": self.host,
            "hostname": self.hostname,
            "local": self.local,
            "pid": self.pid,
            "step": max(self.step, 0),
            "footprint_mb": round(self.footprint_mb, 1) if self.footprint_mb else None,
        }

    @property
    def label(self) -> str:
        """ "rank 1 (mac2 at 10.0.0.2)": its number, and where it runs in words a user knows."""
        return f"rank {self.rank} ({where(self.host, self.hostname, self.local)})"

    @property
    def failed(self) -> bool:
        """Ended without saying (or mlx.launch seeing) that it finished or stopped."""
        clean = (int(ExitCode.DONE), int(ExitCode.STOPPED))
        if self.reported_exit is not None:
            return self.ended_at is not None and self.reported_exit not in clean
        return self.ended_at is not None and self.launcher_exit not in clean


def where(host: str, hostname: str, local: bool) -> str:
    """A rank's place in words: this Mac's name for a local one; a remote one's host name
    and its address from the config, since host names alone may repeat."""
    if local:
        return hostname or "this machine"
    if hostname and hostname != host:
        return f"{hostname} at {host}"
    return host


def lost_words(code: int | None, local: bool) -> str:
    """How a rank ended, from the exit mlx.launch logged for it (negative: the signal; None:
    mlx.launch terminated it), for a rank that could not say it itself."""
    import signal as signals

    if code is None:
        return "mlx.launch terminated it"
    if code < 0:
        try:
            name = signals.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}" if local else f"its ssh client was ended by {name}"
    if local:
        return f"it exited with code {code}"
    if code == 255:
        # ssh's own status: the connection or the remote side went, signal or not.
        return "its ssh session ended (exit 255)"
    return f"its ssh session ended with its exit code {code}"


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
