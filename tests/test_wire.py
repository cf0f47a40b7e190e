"""Tests for loractl.wire on real ZeroMQ sockets: oversized multiparts are dropped at once."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import psutil
import pytest
import zmq

from conftest import wait_for
from loractl.client.control import request
from loractl.client.harness import SupervisorProcess
from loractl.protocol import (
    MAX_MESSAGE_BYTES,
    ErrorCode,
    Heartbeat,
    ProtocolError,
    Reply,
    StatusRequest,
)
from loractl.wire import ROUTING_ID_BYTES, drain, receive

MB = 1_000_000


@pytest.fixture
def endpoint():
    """An ipc:// endpoint in a short private folder (socket paths must stay short)."""
    folder = tempfile.mkdtemp(prefix="lc-wire-", dir="/tmp")
    yield f"ipc://{folder}/s"
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pair(endpoint):
    """A ROUTER set up as the supervisor sets its sockets up, and a DEALER connected to it."""
    context = zmq.Context.instance()
    router = context.socket(zmq.ROUTER)
    dealer = context.socket(zmq.DEALER)
    for sock in (router, dealer):
        sock.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
    router.bind(endpoint)
    dealer.connect(endpoint)
    yield router, dealer
    router.close()
    dealer.close()


def read(sock: zmq.Socket, expect: int, **kwargs) -> tuple[list, list[ProtocolError]]:
    """drain() after waiting until ``expect`` messages (kept or dropped) have been read."""
    got: list = []
    drops: list[ProtocolError] = []
    for _ in range(expect * 10):
        if len(got) + len(drops) >= expect:
            break
        assert sock.poll(5000), "nothing arrived"
        got.extend(drain(sock, drops.append, **kwargs))
    assert len(got) + len(drops) == expect
    return got, drops


def rss() -> int:
    return psutil.Process().memory_info().rss


SENDER = textwrap.dedent(
    """
    import json, sys, zmq
    endpoint, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.connect(endpoint)
    sock.send_multipart([b"x" * size] * count, copy=False)
    if len(sys.argv) > 4:
        # The valid request that follows the flood is answered, and nothing else comes back.
        request = sys.argv[4]
        sock.send(request.encode())
        if not sock.poll(20000):
            sys.exit("no reply")
        frames = sock.recv_multipart()
        if len(frames) != 1 or json.loads(frames[0])["id"] != json.loads(request)["id"]:
            sys.exit(f"wrong reply: {len(frames)} frames, {frames[0][:80]!r}")
        if sock.poll(500):
            sys.exit("a second reply came back")
    # term() waits (up to LINGER) until the flood is delivered; exiting without it may not.
    sock.close()
    zmq.Context.instance().term()
    """
)


def flood(endpoint: str, count: int, size: int, request: str | None = None):
    """Send one message of ``count`` frames of ``size`` bytes from another process (so only
    the receiver's memory is measured), then ``request``, whose reply it checks."""
    args = [endpoint, str(count), str(size)] + ([request] if request else [])
    return subprocess.Popen([sys.executable, "-c", SENDER, *args])


@pytest.mark.parametrize(("count", "size"), [(200, MB), (2000, MB // 10)])
def test_huge_multipart_is_dropped_counted_and_its_memory_handed_back(endpoint, count, size):
    """A 200 MB multipart (1 MB or 100 kB frames) is dropped unread, RSS returns to where it
    was, and the valid request sent after it is answered."""
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
    router.bind(endpoint)
    before = rss()
    sender = flood(endpoint, count, size, StatusRequest().encode().decode())
    try:
        # libzmq signals the message only once all of it is queued in this process.
        assert router.poll(30000)
        queued = rss()
        got, drops = read(router, expect=2)
        after = rss()
        ((frames, message),) = got
        router.send_multipart([*frames[:-1], Reply.success(message.id).encode()])
        assert sender.wait(timeout=30) == 0
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
        router.close()
    assert queued - before > 150 * MB, "the message was not held whole: nothing was tested"
    ((drop,),) = [drops]
    assert drop.code == ErrorCode.TOO_LARGE
    assert f"{count + 1} frames and {count * size + 5} bytes" in drop.reason
    assert isinstance(message, StatusRequest)
    assert after - before < 40 * MB, (before, queued, after)


def test_more_frames_than_the_protocol_allows_are_dropped_without_decoding(pair):
    """Extra frames make a message wrong even when its last frame is a valid request."""
    router, dealer = pair
    valid = StatusRequest().encode()
    dealer.send_multipart([b"extra", valid])
    dealer.send(valid)
    got, drops = read(router, expect=2)
    assert [type(m) for _, m in got] == [StatusRequest]
    assert len(got[0][0]) == 2, "identity and payload"
    (drop,) = drops
    assert drop.code == ErrorCode.TOO_LARGE and "3 frames" in drop.reason


def test_payload_over_the_limit_is_dropped_before_decoding(pair):
    """Just over the limit (with room for an identity frame) is refused; at it, decoded."""
    router, dealer = pair
    padding = " " * (MAX_MESSAGE_BYTES + ROUTING_ID_BYTES - 5)
    dealer.send(padding.encode())
    dealer.send(padding.encode() + b"  ")
    _, drops = read(router, expect=2)
    assert drops[0].code == ErrorCode.TOO_LARGE and "exceeds" in drops[0].reason
    assert drops[1].code == ErrorCode.TOO_LARGE and "unread" in drops[1].reason


def test_the_dealer_side_takes_exactly_one_frame(pair):
    """The trainer's DEALER drops a two-frame command and reads the one-frame one after it."""
    router, dealer = pair
    dealer.send(Heartbeat(pid=1).encode())
    ((frames, _),), _ = read(router, expect=1)
    identity = frames[0]
    router.send_multipart([identity, b"stray", Heartbeat(pid=2).encode()])
    router.send_multipart([identity, Heartbeat(pid=3).encode()])
    got, drops = read(dealer, expect=2)
    assert [m.pid for _, m in got] == [3]
    assert "2 frames" in drops[0].reason


def test_garbage_is_dropped_and_the_next_message_still_read(pair):
    """A payload that does not decode is dropped with its reason; the reader goes on."""
    router, dealer = pair
    dealer.send(b"\xff not json")
    dealer.send(StatusRequest().encode())
    got, drops = read(router, expect=2)
    assert [type(m) for _, m in got] == [StatusRequest]
    assert drops[0].code == ErrorCode.MALFORMED


def test_receive_yields_frames_undecoded_for_callers_that_answer_errors(pair):
    """receive() passes a well-shaped message through as bytes, garbage included, so the
    control channel can still reply to a bad request."""
    router, dealer = pair
    dealer.send(b"not json")
    assert router.poll(5000)
    drops: list[ProtocolError] = []
    (frames,) = list(receive(router, drops.append))
    assert frames[1] == b"not json" and len(frames) == 2 and drops == []


def test_max_frames_can_be_given(pair):
    """An explicit max_frames overrides the socket kind's (a REQ peer's delimiter frame)."""
    router, dealer = pair
    dealer.send_multipart([b"", StatusRequest().encode()])
    got, drops = read(router, expect=1, max_frames=3)
    assert drops == [] and [len(f) for f, _ in got] == [3]


def test_the_trim_after_a_drop_is_available_here():
    """The allocator call that hands memory back resolves on this platform's C library."""
    from loractl import wire

    if sys.platform.startswith("linux") and not Path("/lib/ld-musl-x86_64.so.1").exists():
        assert wire._trimmer() is not None


# -- through a real supervisor -----------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    sup = SupervisorProcess(tmp_path_factory.mktemp("wire") / "home").start()
    yield sup
    sup.stop()


def dropped(sup: SupervisorProcess) -> int:
    return request(sup.layout, StatusRequest()).data["dropped_frames"]


def flood_daemon(sup: SupervisorProcess, endpoint: str, follow_up: str | None) -> int:
    """Send a 200 MB multipart of 100 kB frames; return the daemon's RSS growth after it
    counted the drop."""
    process = psutil.Process(sup.proc.pid)
    before, count = process.memory_info().rss, dropped(sup)
    sender = flood(endpoint, 2000, MB // 10, follow_up)
    assert sender.wait(timeout=60) == 0
    wait_for(lambda: dropped(sup) > count, 20)
    assert sup.proc.poll() is None
    return process.memory_info().rss - before


def test_supervisor_drops_a_huge_multipart_on_its_telemetry_socket(daemon):
    """The supervisor's telemetry ROUTER counts the flood as dropped and hands its memory
    back; it keeps serving."""
    assert flood_daemon(daemon, daemon.layout.telemetry, None) < 40 * MB
    assert request(daemon.layout, StatusRequest()).ok


def test_supervisor_drops_a_huge_multipart_on_its_control_socket(daemon):
    """The control ROUTER drops the flood unread (no reply to it), hands its memory back,
    and answers the valid request sent right after it."""
    growth = flood_daemon(daemon, daemon.layout.control, StatusRequest().encode().decode())
    assert growth < 40 * MB
