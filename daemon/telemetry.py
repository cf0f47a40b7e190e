"""The trainer's side of the telemetry channel.

A small thread owns one ZeroMQ DEALER socket (sockets are not thread-safe, so nothing else
touches it). About once a second it sends a heartbeat built from the latest ``Progress``
snapshot and a fresh footprint reading; it sends queued one-off events; and it turns incoming
commands (checkpoint-now, clear-cache, stop) into flags the training loop reads between steps.
Because the thread runs while the main thread is inside a long step, a live trainer keeps
heartbeating and the supervisor can tell "slow" from "dead"; the step counter is the separate
signal that tells "working" from "stuck".

Over ipc:// (trainer and supervisor on one Mac) the private socket folder is the security.
Over tcp:// (a distributed job's rank on another Mac) the DEALER is a CURVE client holding
the install's client key (see loractl.keys); a tcp endpoint without keys is refused.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field, replace

import structlog
import zmq

from loractl.keys import CurveKeys, is_tcp, load_keys, secure_client
from loractl.memory import footprint_mb
from loractl.protocol import (
    Heartbeat,
    ProtocolError,
    TrainerCommand,
    TrainerEvent,
    new_id,
)
from loractl.wire import drain

log = structlog.get_logger("loractl.telemetry")

# ZMTP heartbeats on a TCP connection to the supervisor: a ping a second, and a connection
# with no answer for three seconds is dropped (and retried), so a cut route shows.
PING_EVERY_MS = 1000
PING_TIMEOUT_MS = 3000


# The loop's progress is a Heartbeat kept up to date in place (plain attribute writes, read by
# the heartbeat thread), so the fields are declared once, in the protocol.
Progress = Heartbeat


def new_progress(
    job_id: str, attempt: int, rung: int, rank: int = 0, world_size: int = 1
) -> Heartbeat:
    return Heartbeat(
        job_id=job_id,
        attempt=attempt,
        rung=rung,
        phase="loading",
        pid=os.getpid(),
        rank=rank,
        world_size=world_size,
        host=socket.gethostname(),
    )


def fresh_heartbeat(progress: Heartbeat) -> Heartbeat:
    """A copy of the progress to send now, with a new id and a fresh footprint reading."""
    pid = os.getpid()
    try:
        footprint = footprint_mb(pid)
    except Exception:  # a reading must never kill the heartbeat
        footprint = 0.0
    return replace(progress, id=new_id(), pid=pid, footprint_mb=footprint, sent_at=time.time())


@dataclass
class Requests:
    """Asynchronous requests to the loop, from signals or from the supervisor."""

    stop: threading.Event = field(default_factory=threading.Event)
    checkpoint: threading.Event = field(default_factory=threading.Event)
    clear_cache: threading.Event = field(default_factory=threading.Event)

    def apply(self, action: str) -> None:
        {
            "stop": self.stop,
            "checkpoint_now": self.checkpoint,
            "clear_cache": self.clear_cache,
        }[action].set()


class Telemetry:
    """Heartbeats out, commands in. A no-op when no endpoint is given (trainer run alone)."""

    def __init__(
        self,
        endpoint: str | None,
        progress: Progress,
        requests: Requests,
        interval: float = 1.0,
        keys_dir: str | None = None,
        lost_after: float | None = None,
    ):
        self.endpoint = endpoint
        # Over TCP: how long the supervisor may be unreachable before this rank stops itself
        # (None: never). On another Mac, a rank cut off from its supervisor would otherwise
        # train (or sit in a collective) unwatched all night.
        self.lost_after = lost_after
        # Loaded here, in the caller's thread, so missing or open keys fail the start with
        # their message instead of silently killing the heartbeat thread.
        self.keys: CurveKeys | None = None
        if endpoint is not None and is_tcp(endpoint):
            if keys_dir is None:
                raise ValueError(
                    f"telemetry endpoint {endpoint} is TCP, which needs CURVE keys: pass "
                    "keys_dir, the keys folder copied from the supervisor's Mac"
                )
            self.keys = load_keys(keys_dir)
        self.progress = progress
        self.requests = requests
        self.interval = interval
        self.dropped_frames = 0
        self._events: queue.Queue[TrainerEvent] = queue.Queue()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        # Since when the supervisor has been unreachable (None: connected).
        self.unreachable_since: float | None = time.monotonic()
        self.gave_up = False

    def start(self) -> None:
        if self.endpoint is None:
            return
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def event(self, kind: str, **detail) -> None:
        if self.endpoint is None:
            return
        self._events.put(
            TrainerEvent(
                job_id=self.progress.job_id,
                pid=os.getpid(),
                kind=kind,
                step=self.progress.step,
                examples_seen=self.progress.examples_seen,
                detail=detail,
                attempt=self.progress.attempt,
                rank=self.progress.rank,
                world_size=self.progress.world_size,
                host=self.progress.host,
            )
        )

    def close(self, timeout: float = 2.0) -> None:
        """Flush pending events, then stop the thread."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        context = zmq.Context.instance()
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 500)
        sock.setsockopt(zmq.SNDHWM, 100)
        sock.setsockopt(zmq.ROUTING_ID, f"trainer-{os.getpid()}".encode())
        monitor = None
        if self.keys is not None:
            secure_client(sock, self.keys)
            # ZMTP pings find a dead route (a partition sends no FIN); the monitor reports it.
            sock.setsockopt(zmq.HEARTBEAT_IVL, PING_EVERY_MS)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, PING_TIMEOUT_MS)
            monitor = sock.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
            )
        sock.connect(self.endpoint)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        next_beat = 0.0
        try:
            while True:
                self._flush_events(sock)
                now = time.monotonic()
                if monitor is not None:
                    self._watch_connection(monitor, now)
                if now >= next_beat:
                    self._send(sock, fresh_heartbeat(self.progress).encode())
                    next_beat = now + self.interval
                if self._closing.is_set():
                    self._send(sock, fresh_heartbeat(self.progress).encode())
                    self._flush_events(sock)
                    return
                timeout_ms = max(0, int((next_beat - time.monotonic()) * 1000))
                if poller.poll(min(timeout_ms, 100)):
                    self._receive(sock)
        finally:
            if monitor is not None:
                sock.disable_monitor()
                monitor.close()
            sock.close()

    def _watch_connection(self, monitor: zmq.Socket, now: float) -> None:
        """Follow the connection to the supervisor; cut off for ``lost_after`` seconds, stop
        this rank the way a SIGTERM does: at its next step, with a checkpoint, and if a
        collective holds it there (its peers are cut off too), CollectiveWatch ends it."""
        from zmq.utils.monitor import recv_monitor_message

        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.ZMQError:
                break
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.unreachable_since = None
            elif event["event"] == zmq.EVENT_DISCONNECTED and self.unreachable_since is None:
                self.unreachable_since = now
        if self.lost_after is None or self.unreachable_since is None or self.gave_up:
            return
        if now - self.unreachable_since > self.lost_after:
            self.gave_up = True
            log.error(
                "supervisor unreachable; stopping at the next step",
                endpoint=self.endpoint,
                seconds=round(now - self.unreachable_since, 1),
            )
            print(
                f"loractl: the supervisor at {self.endpoint} has been unreachable for "
                f"{now - self.unreachable_since:.0f} s; stopping at the next step so that "
                "nothing trains unwatched",
                file=sys.stderr,
                flush=True,
            )
            os.kill(os.getpid(), signal.SIGTERM)

    def _send(self, sock: zmq.Socket, payload: bytes) -> None:
        try:
            sock.send(payload, zmq.NOBLOCK)
        except zmq.Again:
            # No supervisor reading right now; a heartbeat is only worth its freshness.
            self.dropped_frames += 1

    def _flush_events(self, sock: zmq.Socket) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            self._send(sock, event.encode())

    def _receive(self, sock: zmq.Socket) -> None:
        for _frames, message in drain(sock, self._drop):
            if isinstance(message, TrainerCommand):
                log.info("command received", action=message.action)
                self.requests.apply(message.action)
            else:
                self.dropped_frames += 1

    def _drop(self, error: ProtocolError) -> None:
        self.dropped_frames += 1
        log.warning("dropped frame", reason=error.reason)
