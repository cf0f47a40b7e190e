"""A distributed attempt as the supervisor runs it: mlx.launch starting one trainer per rank.

A mixin of :class:`loractl.supervisor.child.TrainerChild` for the parts that only a job of
several ranks needs: where its ranks report (ipc, or the CURVE-secured TCP socket when some
run on other Macs), how each rank's liveness and footprint is read, how the ranks are stopped
together, and when a launcher's attempt is over. The bookkeeping itself (which rank failed
first, how the attempt ended) is in :mod:`loractl.supervisor.ranks`.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import structlog
import zmq

from loractl.distributed import address_towards
from loractl.memory import footprint_mb
from loractl.protocol import TrainerEvent
from loractl.supervisor.ranks import Rank, local_rank_processes, process_alive

if TYPE_CHECKING:
    from loractl.supervisor.child import Trainer

log = structlog.get_logger("loractl.supervisor")

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


class LaunchedRanks:
    """Spawning, watching and stopping the ranks of one mlx.launch attempt."""

    def _endpoint_path(self, job_id: str, attempt: int) -> Path:
        return self.layout.job_dir(job_id) / "attempts" / f"{attempt:04d}.endpoint"

    def _telemetry_endpoint(self, job_id: str, attempt: int, remote: list[str]) -> str:
        """Where this attempt's trainers report: the local ipc socket, or for ranks on other
        Macs the TCP one, whose address is kept beside the attempt so that a restarted
        supervisor can rebind it and the ranks reconnect."""
        if not remote:
            return self.layout.telemetry
        address = self.settings.telemetry_address or address_towards(remote[0])
        endpoint = self.open_remote_telemetry(address)
        path = self._endpoint_path(job_id, attempt)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(endpoint)
        return endpoint

    def reopen_remote_telemetry(self, job_id: str, attempt: int) -> bool:
        """After a restart: listen again where an adopted attempt's remote ranks report."""
        try:
            endpoint = self._endpoint_path(job_id, attempt).read_text().strip()
        except OSError:
            return False
        address, _, port = endpoint.removeprefix("tcp://").rpartition(":")
        try:
            self.open_remote_telemetry(address, int(port))
        except (zmq.ZMQError, OSError, ValueError) as exc:
            # Its ranks then fall silent, are found hung and are killed with the launcher.
            log.warning("cannot listen for remote ranks again", endpoint=endpoint, error=str(exc))
            return False
        return True

    def _rank_footprints(self, trainer: Trainer) -> tuple[float | None, int | None]:
        """The largest footprint among the ranks and whose it is. Ranks on this machine are
        read now; others as their last heartbeat said."""
        largest, whose = None, None
        for rank in trainer.live_ranks():
            if rank.local:
                try:
                    reading = footprint_mb(rank.pid)
                except (psutil.Error, ProcessLookupError):
                    continue
                # An exiting rank reads as nothing: keep what it last used.
                rank.footprint_mb = reading or rank.footprint_mb
            if rank.footprint_mb and (largest is None or rank.footprint_mb > largest):
                largest, whose = rank.footprint_mb, rank.rank
        return largest, whose

    def _check_ranks(self, trainer: Trainer, now: float) -> None:
        """A distributed job is alive while every rank heartbeats and the slowest advances."""
        if len(trainer.ranks) < trainer.world_size:
            if now - trainer.spawned_at > self.settings.startup_timeout_s:
                silent = sorted(set(range(trainer.world_size)) - set(trainer.ranks))
                trainer.culprit = silent[0]
                self._hang(
                    trainer,
                    f"rank(s) {', '.join(map(str, silent))} sent no heartbeat "
                    f"{self.settings.startup_timeout_s:.0f} s after start",
                )
            return
        for rank in trainer.live_ranks():
            silent = now - rank.last_heartbeat
            if silent > trainer.heartbeat_timeout:
                trainer.culprit = rank.rank
                self._hang(trainer, f"no heartbeat from rank {rank.rank} for {silent:.1f} s")
                return
        if self._stalled(trainer, now):
            trainer.culprit = min(trainer.ranks.values(), key=lambda r: r.step).rank
            self._hang(trainer, f"no progress for {now - trainer.last_progress:.0f} s")

    def _watch_ranks(self, trainer: Trainer) -> None:
        """Notice a local rank's end from the process table: a SIGKILLed rank says nothing,
        and mlx.launch does not tell anyone."""
        now = time.monotonic()
        for rank in trainer.live_ranks():
            if rank.local and not process_alive(rank.pid, rank.started_at):
                rank.ended_at = now
                if rank.failed:
                    self._rank_failed(trainer, rank)

    def _rank_failed(self, trainer: Trainer, rank: Rank) -> None:
        """One rank is gone for good: the others cannot go on without it. Stop them all at
        the next step (through their stop command) and blame the first to fail."""
        if trainer.stop_reason is not None or rank.peer_lost:
            return  # a stop is already under way, or it only lost its peer
        trainer.culprit = rank.rank
        how = (
            f"announced exit {rank.reported_exit}"
            if rank.reported_exit is not None
            else ("no announced exit")
        )
        self.store.record(
            trainer.job_id,
            "rank_lost",
            rank=rank.rank,
            host=rank.host,
            pid=rank.pid,
            how=how,
            reason=rank.reason,
        )
        log.warning("rank lost; stopping the others", rank=rank.rank, pid=rank.pid, how=how)
        self.stop_trainer("rank-lost", grace=self.settings.hang_grace_s)

    def _stop_ranks(self, trainer: Trainer) -> None:
        """The stop command to every rank: the ranks agree on it at their next step, so all
        stop at the same checkpoint. Not SIGTERM as well: mlx.launch terminates the remaining
        ranks once one has exited, and a second signal means "now, skip the checkpoint". A
        local rank never heard from gets the signal, its only way to hear."""
        self.command_all(trainer, "stop")
        heard = {rank.pid for rank in trainer.ranks.values()}
        for pid in local_rank_processes(trainer.pid):
            if pid not in heard:
                signal_if_alive(pid, signal.SIGTERM)

    def _ranks_linger(self, trainer: Trainer) -> bool:
        """Whether a process of the ended launcher's session (a rank it started) is still
        alive. A rank killed with its launcher can outlive it for a moment; one left behind
        by a launcher that died is killed. Given up on after LINGER_S: never blocks."""
        try:
            os.killpg(trainer.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        now = time.monotonic()
        if trainer.lingering_since is None:
            trainer.lingering_since = now
            try:
                os.killpg(trainer.pid, signal.SIGKILL)
            except ProcessLookupError:
                return False
            log.warning("launcher gone but a rank lingers; killing it", pid=trainer.pid)
        return now - trainer.lingering_since < LINGER_S

    def _rank_announced(self, trainer: Trainer, event: TrainerEvent, announced: int | None) -> None:
        """A rank said how it ends. A failure of its own (not a lost peer) stops the rest
        at once, before mlx.launch or a collective timeout does it less gently."""
        rank = trainer.ranks[event.rank]
        rank.reported_exit = announced
        rank.reason = str(event.detail.get("reason", ""))
        rank.peer_lost = bool(event.detail.get("peer_lost"))
        if not rank.local:
            rank.ended_at = time.monotonic()  # its process is out of our sight
        if event.kind == "error" and not rank.peer_lost:
            rank.ended_at = rank.ended_at or time.monotonic()
            self._rank_failed(trainer, rank)
