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
        # Connection events of the remote socket: a rank's dropped connection is news.
        self._monitor: zmq.Socket[Any] | None = None
        self._peers: dict[int, str] = {}  # a connection's fd -> the address it came from

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
        address = self.telemetry_address or self.job_address(job_id, remote_hosts[0])
        endpoint = self.open_remote(address)
        path = endpoint_path(self.layout, job_id, attempt)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(endpoint)
        return endpoint

    def job_address(self, job_id: str, first_host: str) -> str:
        """The address the job's remote ranks reach us at: the one its first attempt chose,
        while this machine still has it. Chosen afresh on every attempt, a relaunch during a
        partition would take the default route's address (the route to the host is down)
        and no rank could report."""
        kept = self.layout.job_dir(job_id) / "telemetry.address"
        try:
            address = kept.read_text().strip()
        except OSError:
            address = ""
        if address and address in local_addresses():
            return address
        address = address_towards(first_host)
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text(address)
        return address

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
        self._monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._peers = {}
        if self.poller is not None:
            self.poller.register(sock, zmq.POLLIN)
        endpoint = str(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        log.info("remote telemetry open", endpoint=endpoint)
        return endpoint

    def dropped_peers(self) -> list[str]:
        """The addresses whose connection to the remote socket dropped since the last call.

        A ROUTER says nothing when a peer goes; its monitor does, naming the connection by
        its file descriptor, so each accepted connection's peer address is noted when it
        comes (ZeroMQ's own Peer-Address, without the port, would not tell two apart)."""
        if self._monitor is None:
            return []
        from zmq.utils.monitor import recv_monitor_message

        dropped: list[str] = []
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return dropped
            except zmq.ZMQError:
                return dropped
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._peers[fd] = peer_address(fd)
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                address = self._peers.pop(fd, "")
                if address:
                    dropped.append(address)

    def close_remote(self) -> None:
        if self.remote is None:
            return
        if self.poller is not None:
            self.poller.unregister(self.remote)
        if self._monitor is not None:
            self.remote.disable_monitor()
            self._monitor.close()
            self._monitor = None
        self.remote.close()
        self._authenticator.stop()
        self.remote = self._authenticator = None
        log.info("remote telemetry closed")


def peer_address(fd: int) -> str:
    """The address at the other end of a connection ZeroMQ accepted (read through a
    duplicate of its descriptor, which is closed at once; ZeroMQ's own stays open)."""
    import os
    import socket

    try:
        # Given a descriptor, socket() reads its family itself (IPv4 or IPv6).
        with socket.socket(fileno=os.dup(fd)) as dup:
            return str(dup.getpeername()[0])
    except OSError:
        return ""


def local_addresses() -> set[str]:
    """This machine's IPv4 addresses, on every interface, up or down."""
    import psutil

    return {
        entry.address
        for entries in psutil.net_if_addrs().values()
        for entry in entries
        if entry.family.name == "AF_INET"
    }


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
