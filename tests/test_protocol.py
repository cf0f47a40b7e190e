"""Tests for the shared protocol module."""

from __future__ import annotations

import json

import pytest

from loractl.protocol import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    ErrorCode,
    Heartbeat,
    ProtocolError,
    Reply,
    TrainerCommand,
    TrainerEvent,
    decode,
)


def test_messages_round_trip_with_type_id_and_version():
    """Every message encodes to JSON with type, id and v, and decodes to an equal object."""
    for message in (
        Heartbeat(job_id="j1", pid=42, step=3, examples_seen=12, loss=1.5),
        TrainerEvent(kind="checkpoint", step=4, detail={"path": "/x"}),
        TrainerCommand(action="stop"),
        Reply.failure("abc", ErrorCode.NOT_FOUND, "no such job"),
    ):
        wire = json.loads(message.encode())
        assert wire["type"] == message.TYPE
        assert wire["v"] == PROTOCOL_VERSION
        assert wire["id"] == message.id
        assert decode(message.encode()) == message


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\xff\xfe garbage", ErrorCode.MALFORMED),
        (b"[1, 2]", ErrorCode.MALFORMED),
        (b'{"type": "heartbeat", "id": "x"}', ErrorCode.VERSION_MISMATCH),
        (b'{"type": "heartbeat", "id": "x", "v": 99}', ErrorCode.VERSION_MISMATCH),
        (b'{"type": "nope", "id": "x", "v": 1}', ErrorCode.UNKNOWN_TYPE),
        (b'{"type": "heartbeat", "id": "x", "v": 1, "evil": 1}', ErrorCode.MALFORMED),
        (b'{"type": "heartbeat", "id": 5, "v": 1}', ErrorCode.MALFORMED),
        (
            b'{"type": "trainer_command", "id": "x", "v": 1, "action": "rm"}',
            ErrorCode.INVALID_ARGUMENT,
        ),
        (b'{"type": "heartbeat", "id": "x", "v": 1, "footprint_mb": NaN}', ErrorCode.MALFORMED),
        (b"{" * 100000, ErrorCode.TOO_LARGE),
        (b"[" * 5000 + b"]" * 5000, ErrorCode.MALFORMED),
    ],
)
def test_bad_frames_raise_protocol_error_with_a_code(frame, code):
    """Garbage, wrong versions, unknown types and oversized frames map to a precise code."""
    with pytest.raises(ProtocolError) as info:
        decode(frame)
    assert info.value.code == code
    assert info.value.reason


def test_size_limit_is_exact():
    """A frame just over the limit is refused before it is parsed."""
    with pytest.raises(ProtocolError) as info:
        decode(b" " * (MAX_MESSAGE_BYTES + 1))
    assert info.value.code == ErrorCode.TOO_LARGE
