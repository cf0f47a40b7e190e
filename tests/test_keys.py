"""CURVE keys for telemetry over TCP: made private, reused, refused when open, and enforced by
real ZeroMQ sockets on 127.0.0.1 (keyed clients in, keyless and foreign ones out)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from conftest import wait_for
from loractl.daemon.telemetry import Requests, Telemetry, new_progress
from loractl.keys import (
    ALL_FILES,
    KEYS_DIR_NAME,
    CurveKeys,
    MissingKeys,
    UnsafeKeys,
    ensure_keys,
    is_tcp,
    load_keys,
    secure_client,
    secure_server,
)
from loractl.paths import UnsafeFolder
from loractl.protocol import Heartbeat, TrainerCommand, decode

# Long enough for a handshake on loopback many times over, short enough to keep the file fast.
ARRIVAL_S = 5.0
SILENCE_S = 1.5


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def keys_dir(tmp_path) -> Path:
    return tmp_path / "home" / KEYS_DIR_NAME


@pytest.fixture
def keys(keys_dir) -> CurveKeys:
    return ensure_keys(keys_dir)


@pytest.fixture
def context():
    # Its own context per test: the authenticator owns the context's one ZAP endpoint.
    context = zmq.Context()
    yield context
    context.term()


@pytest.fixture
def secured_router(context, keys):
    """A CURVE ROUTER bound on an ephemeral loopback port, as the supervisor would bind it."""
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    authenticator = secure_server(router, keys, context)
    router.bind("tcp://127.0.0.1:*")
    yield router, router.last_endpoint.decode()
    router.close()
    authenticator.stop()


@pytest.fixture
def dealers(context):
    """Makes DEALERs in the test's context and closes them (and their monitors) afterwards."""
    made: list[tuple[zmq.Socket, zmq.Socket | None]] = []

    def make(configure=None, monitor: bool = False) -> tuple[zmq.Socket, zmq.Socket | None]:
        dealer = context.socket(zmq.DEALER)
        dealer.linger = 0
        if configure is not None:
            configure(dealer)
        watcher = dealer.get_monitor_socket() if monitor else None
        made.append((dealer, watcher))
        return dealer, watcher

    yield make
    for dealer, watcher in made:
        if watcher is not None:
            dealer.disable_monitor()
            watcher.close(linger=0)
        dealer.close()


def heartbeat(job_id: str) -> bytes:
    return Heartbeat(job_id=job_id, attempt=1, pid=os.getpid()).encode()


def receive(sock: zmq.Socket, timeout_s: float = ARRIVAL_S) -> list[bytes]:
    assert sock.poll(int(timeout_s * 1000)), f"nothing arrived within {timeout_s}s"
    return sock.recv_multipart()


def job_ids_arriving(router: zmq.Socket, within_s: float) -> list[str]:
    """Every heartbeat's job_id that reaches ``router`` until it stays quiet for ``within_s``."""
    seen = []
    while router.poll(int(within_s * 1000)):
        _identity, payload = router.recv_multipart()
        seen.append(decode(payload).job_id)
    return seen


def wait_for_event(watcher: zmq.Socket, wanted: set[int], timeout_s: float = ARRIVAL_S) -> int:
    """The first monitor event in ``wanted``; fails after ``timeout_s``."""
    seen = []

    def arrived():
        while watcher.poll(0):
            event = recv_monitor_message(watcher)["event"]
            seen.append(event)
            if event in wanted:
                return event
        return None

    try:
        return wait_for(arrived, timeout_s)
    except AssertionError:
        raise AssertionError(f"no event in {wanted}; saw {seen}") from None


# -- the keys folder -------------------------------------------------------------------------


def test_keys_are_made_private_and_reused(keys_dir):
    """ensure_keys makes every key file 0600 in 0700 folders and returns the same keys later."""
    first = ensure_keys(keys_dir)
    assert mode_of(keys_dir) == 0o700
    assert mode_of(first.authorized) == 0o700
    for name in ALL_FILES:
        assert mode_of(keys_dir / name) == 0o600, name
    # Only the client's public key is accepted; the server's pair stays out of the allow-list.
    assert os.listdir(first.authorized) == ["client.key"]
    assert first.server_public != first.client_public
    assert first.server_secret is not None

    again = ensure_keys(keys_dir)
    assert again == first
    assert [p.name for p in keys_dir.parent.iterdir()] == [KEYS_DIR_NAME]  # no staging left

    trainer = load_keys(keys_dir)
    assert trainer.server_secret is None
    assert (trainer.client_public, trainer.client_secret) == (
        first.client_public,
        first.client_secret,
    )
    assert trainer.server_public == first.server_public
    assert trainer.client_secret.decode() not in repr(trainer)


def test_a_crash_midway_leaves_no_half_pair(keys_dir, monkeypatch):
    """A failure after the server pair is written leaves no keys folder, and the next call
    makes a complete one."""
    real_create = zmq.auth.create_certificates

    def crash_on_client(folder, name, *args, **kwargs):
        if name == "client":
            raise OSError("disk full (simulated)")
        return real_create(folder, name, *args, **kwargs)

    monkeypatch.setattr(zmq.auth, "create_certificates", crash_on_client)
    with pytest.raises(OSError, match="simulated"):
        ensure_keys(keys_dir)
    assert not keys_dir.exists()
    assert list(keys_dir.parent.iterdir()) == []

    monkeypatch.setattr(zmq.auth, "create_certificates", real_create)
    keys = ensure_keys(keys_dir)
    assert load_keys(keys_dir).client_public == keys.client_public


def test_a_group_readable_key_file_is_refused(keys, keys_dir):
    """A key file others may read is refused by both sides, with the path and the chmod."""
    secret = keys_dir / "client.key_secret"
    os.chmod(secret, 0o640)
    for read in (ensure_keys, load_keys):
        with pytest.raises(UnsafeKeys) as refused:
            read(keys_dir)
        assert str(secret) in str(refused.value)
        assert "mode 0640" in str(refused.value)
        assert f"chmod 600 '{secret}'" in str(refused.value)
    # Both kinds of caller catch it: the supervisor's UnsafeFolder path and plain ValueError.
    assert isinstance(refused.value, UnsafeFolder)
    assert isinstance(refused.value, ValueError)


def test_an_open_keys_folder_is_refused(keys, keys_dir):
    """A keys folder readable by group is refused with the chmod that fixes it."""
    os.chmod(keys_dir, 0o750)
    with pytest.raises(UnsafeKeys, match=f"chmod 700 '{keys_dir}'"):
        load_keys(keys_dir)


def test_a_foreign_owned_keys_folder_is_refused(keys, keys_dir, monkeypatch):
    """A keys folder owned by another user is refused, naming its owner, never changed."""
    # Seen from another uid the folder is a stranger's; no root needed to set that up.
    monkeypatch.setattr(os, "getuid", lambda: os.stat(keys_dir).st_uid + 1)
    with pytest.raises(UnsafeKeys, match="not owned by you") as refused:
        ensure_keys(keys_dir)
    assert str(keys_dir) in str(refused.value)
    assert mode_of(keys_dir) == 0o700


def test_missing_trainer_keys_name_the_file_and_the_copy(keys, keys_dir, tmp_path):
    """load_keys names the missing file and says to copy the folder from the supervisor's Mac."""
    (keys_dir / "server.key").unlink()
    with pytest.raises(MissingKeys, match="server.key is missing") as missing:
        load_keys(keys_dir)
    assert "supervisor's Mac" in str(missing.value)
    with pytest.raises(MissingKeys, match="supervisor's Mac"):
        load_keys(tmp_path / "nowhere")
    # The supervisor never silently replaces an incomplete folder: trainers may hold copies.
    with pytest.raises(MissingKeys, match=f"remove {keys_dir}"):
        ensure_keys(keys_dir)


def test_a_trainer_copy_cannot_serve(keys, keys_dir, context):
    """secure_server refuses keys without the server's secret (a trainer Mac's copy)."""
    (keys_dir / "server.key_secret").unlink()
    router = context.socket(zmq.ROUTER)
    try:
        with pytest.raises(MissingKeys, match="server.key_secret"):
            secure_server(router, load_keys(keys_dir), context)
    finally:
        router.close(linger=0)


def test_is_tcp():
    """Only tcp:// endpoints need keys; ipc:// and inproc:// stay keyless."""
    assert is_tcp("tcp://10.0.0.2:5555")
    assert is_tcp("TCP://host:1")
    assert not is_tcp("ipc:///tmp/loractl-0/abc/telemetry")
    assert not is_tcp("inproc://telemetry")


# -- real sockets ----------------------------------------------------------------------------


def test_keyed_client_reaches_the_router_and_gets_commands(secured_router, dealers, keys):
    """A DEALER with the install's keys delivers a heartbeat and receives a TrainerCommand."""
    router, endpoint = secured_router
    dealer, _ = dealers(lambda sock: secure_client(sock, keys))
    dealer.connect(endpoint)
    dealer.send(heartbeat("keyed-job"))

    identity, payload = receive(router)
    message = decode(payload)
    assert isinstance(message, Heartbeat) and message.job_id == "keyed-job"

    router.send_multipart([identity, TrainerCommand(action="checkpoint_now").encode()])
    (reply,) = receive(dealer)
    command = decode(reply)
    assert isinstance(command, TrainerCommand) and command.action == "checkpoint_now"


def test_keyless_and_foreign_clients_are_refused(secured_router, dealers, keys):
    """A NULL-mechanism DEALER and one with a foreign key pair fail the handshake and deliver
    nothing, while the keyed client beside them gets through."""
    router, endpoint = secured_router

    keyless, keyless_watch = dealers(monitor=True)

    def foreign_keys(sock: zmq.Socket) -> None:
        public, secret = zmq.curve_keypair()
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_serverkey = keys.server_public  # knows the server, is not known by it

    foreign, foreign_watch = dealers(foreign_keys, monitor=True)
    for dealer, job_id in ((keyless, "keyless-job"), (foreign, "foreign-job")):
        dealer.connect(endpoint)
        dealer.send(heartbeat(job_id))

    # The refusal is visible on the client: the mechanisms differ (NULL vs CURVE), and the
    # authenticator answers 400 to the unknown key.
    assert (
        wait_for_event(keyless_watch, {zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL})
        == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    )
    assert (
        wait_for_event(foreign_watch, {zmq.EVENT_HANDSHAKE_FAILED_AUTH})
        == zmq.EVENT_HANDSHAKE_FAILED_AUTH
    )

    keyed, _ = dealers(lambda sock: secure_client(sock, keys))
    keyed.connect(endpoint)
    keyed.send(heartbeat("keyed-job"))
    assert job_ids_arriving(router, SILENCE_S) == ["keyed-job"]


def test_ipc_stays_keyless_beside_the_authenticator(secured_router, dealers, context, tmp_path):
    """An ipc:// pair in the secured context still works with no keys (single-Mac jobs)."""
    local = context.socket(zmq.ROUTER)
    local.linger = 0
    try:
        local.bind(f"ipc://{tmp_path / 'telemetry'}")
        dealer, _ = dealers()
        dealer.connect(f"ipc://{tmp_path / 'telemetry'}")
        dealer.send(heartbeat("local-job"))
        _identity, payload = receive(local)
        assert decode(payload).job_id == "local-job"
    finally:
        local.close()


def test_telemetry_over_tcp_uses_the_keys(secured_router, keys_dir, keys):
    """The trainer's Telemetry with a tcp endpoint and keys_dir heartbeats to a secured ROUTER
    and obeys its commands."""
    router, endpoint = secured_router
    requests = Requests()
    telemetry = Telemetry(
        endpoint, new_progress("tcp-job", 1, 0), requests, 0.05, keys_dir=str(keys_dir)
    )
    telemetry.start()
    try:
        identity, payload = receive(router)
        message = decode(payload)
        assert isinstance(message, Heartbeat) and message.job_id == "tcp-job"
        router.send_multipart([identity, TrainerCommand(action="checkpoint_now").encode()])
        wait_for(requests.checkpoint.is_set, ARRIVAL_S)
    finally:
        telemetry.close()


def test_telemetry_over_tcp_without_keys_is_refused(keys, tmp_path):
    """A tcp endpoint without keys_dir (or with a missing folder) fails at construction;
    ipc needs none."""
    progress = new_progress("job", 1, 0)
    with pytest.raises(ValueError, match="keys_dir"):
        Telemetry("tcp://127.0.0.1:5555", progress, Requests())
    with pytest.raises(MissingKeys, match="supervisor's Mac"):
        Telemetry("tcp://127.0.0.1:5555", progress, Requests(), keys_dir=str(tmp_path / "x"))
    assert Telemetry(f"ipc://{tmp_path / 'telemetry'}", progress, Requests()).keys is None
