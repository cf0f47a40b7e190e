"""Where trainers report and hear commands: the telemetry sockets.

One ROUTER on the ipc endpoint in the runtime folder serves every trainer on this machine.
A job with ranks on other Macs also gets a CURVE-secured TCP ROUTER, open only while such a
job runs (a single-machine job opens no TCP port); its endpoint is kept beside the attempt
so that a restarted supervisor can bind it again and the ranks reconnect.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog
import zmq

from loractl.distributed import address_towards
from loractl.paths import Layout
from loractl.protocol import JobEvent, Message, ProtocolError, TrainerCommand
from loractl.supervisor.store import Store
from loractl.wire import drain

log = structlog.get_logger("loractl.supervisor")

# A request or heartbeat is a few hundred bytes; this bounds what one frame may cost us.
MAX_FRAME_BYTES = 1 << 20


def endpoint_path(layout: Layout, job_id: str, attempt: int) -> Path:
    """Where an attempt's TCP telemetry endpoint is kept, for a restarted supervisor."""
    return layout.job_dir(job_id) / "attempts" / f"{attempt:04d}.endpoint"


class TelemetryChannels:
    """The local telemetry socket, and the remote one while a job has ranks elsewhere."""

    def __init__(
        self,
        layout: Layout,
        local: zmq.Socket[Any],
        *,
        on_drop: Callable[[ProtocolError], None],
        poller: zmq.Poller | None = None,
        telemetry_address: str = "",
    ):
        self.layout = layout
        self.local = local
        self.remote: zmq.Socket[Any] | None = None
        self.poller = poller
        self.on_drop = on_drop
        self.telemetry_address = telemetry_address
        self._authenticator: Any = None

    # -- reading and sending ----------------------------------------------------------------

    def sockets(self) -> list[zmq.Socket[Any]]:
        return [self.local] if self.remote is None else [self.local, self.remote]

    def messages(self, ready: dict[Any, int]) -> Iterator[Message]:
        """Every message waiting on the sockets the poller found ready."""
        for sock in self.sockets():
            if sock in ready:
                for _frames, message in drain(sock, self.on_drop):
                    yield message

    def send(self, pid: int, action: str, remote: bool = False) -> bool:
        """A trainer command to the trainer with ``pid``; False when it is not connected
        (yet, or any more): signals still reach a local one."""
        sock = self.remote if remote and self.remote is not None else self.local
        try:
            sock.send_multipart(
                [f"trainer-{pid}".encode(), TrainerCommand(action=action).encode()], zmq.NOBLOCK
            )
            return True
        except zmq.ZMQError:
            return False

    # -- the remote socket ------------------------------------------------------------------

    def endpoint_for(self, job_id: str, attempt: int, remote_hosts: list[str]) -> str:
        """Where this attempt's trainers report: the local ipc socket, or for ranks on other
        Macs the TCP one, bound on this machine's address towards the first remote host."""
        if not remote_hosts:
            return self.layout.telemetry
        address = self.telemetry_address or address_towards(remote_hosts[0])
        endpoint = self.open_remote(address)
        path = endpoint_path(self.layout, job_id, attempt)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(endpoint)
        return endpoint

    def reopen_remote(self, job_id: str, attempt: int) -> bool:
        """After a restart: listen again where an adopted attempt's remote ranks report."""
        try:
            endpoint = endpoint_path(self.layout, job_id, attempt).read_text().strip()
        except OSError:
            return False
        address, _, port = endpoint.removeprefix("tcp://").rpartition(":")
        try:
            self.open_remote(address, int(port))
        except (zmq.ZMQError, OSError, ValueError) as exc:
            # Its ranks then fall silent, are found hung and are killed with the launcher.
            log.warning("cannot listen for remote ranks again", endpoint=endpoint, error=str(exc))
            return False
        return True

    def open_remote(self, address: str, port: int = 0) -> str:
        """Bind the CURVE-secured telemetry socket for ranks on other Macs (once) and return
        the endpoint they connect to. Only clients holding this install's keys get through;
        the keys are made on first use, in ``<home>/keys``."""
        from loractl.keys import ensure_keys, keys_folder, secure_server

        if self.remote is not None:
            return str(self.remote.getsockopt_string(zmq.LAST_ENDPOINT))
        context: zmq.Context[zmq.Socket[Any]] = zmq.Context.instance()
        keys = ensure_keys(keys_folder(self.layout.home))
        sock = context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        authenticator = secure_server(sock, keys, context)
        try:
            sock.bind(f"tcp://{address}:{port or '*'}")
        except zmq.ZMQError:
            authenticator.stop()
            sock.close()
            raise
        self.remote, self._authenticator = sock, authenticator
        if self.poller is not None:
            self.poller.register(sock, zmq.POLLIN)
        endpoint = str(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        log.info("remote telemetry open", endpoint=endpoint)
        return endpoint

    def close_remote(self) -> None:
        if self.remote is None:
            return
        if self.poller is not None:
            self.poller.unregister(self.remote)
        self.remote.close()
        self._authenticator.stop()
        self.remote = self._authenticator = None
        log.info("remote telemetry closed")


class Publisher:
    """The events socket (PUB): what happens, for `watch` and anyone else listening. Nobody
    listening, or a slow listener, loses nothing of ours."""

    def __init__(self, events: zmq.Socket[Any] | None, store: Store):
        self.events = events
        self.store = store

    def publish(self, topic: str, message: Message) -> None:
        if self.events is None:
            return
        try:
            self.events.send_multipart([topic.encode(), message.encode()], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def publish_state(self, job_id: str, **extra: Any) -> None:
        """A job's new state, as stored, on the ``job`` topic."""
        state = str(self.store.get(job_id).state)
        self.publish("job", JobEvent(job_id=job_id, state=state, **extra))
