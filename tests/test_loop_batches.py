"""Under a flood of control requests the loop answers a bounded batch per turn, so reaping,
timers and progress records are never starved."""

from __future__ import annotations

import zmq

from conftest import wait_for
from loractl.protocol import StatusRequest
from loractl.supervisor.service import CONTROL_BATCH


def test_a_control_flood_is_answered_a_bounded_batch_per_turn(inprocess_supervisor, tmp_path):
    """500 waiting requests: no turn answers more than CONTROL_BATCH of them, and the turns
    that follow answer them all."""
    sup = inprocess_supervisor
    context = zmq.Context.instance()
    endpoint = f"ipc://{tmp_path}/control"
    router = context.socket(zmq.ROUTER)
    client = context.socket(zmq.DEALER)
    for sock in (router, client):
        sock.setsockopt(zmq.LINGER, 0)
    try:
        router.bind(endpoint)
        client.connect(endpoint)
        sup.control = router
        flood = 500
        for _ in range(flood):
            client.send(StatusRequest().encode())
        wait_for(lambda: router.getsockopt(zmq.EVENTS) & zmq.POLLIN, 10)

        def answered() -> int:
            count = 0
            while client.poll(50):
                client.recv_multipart()
                count += 1
            return count

        per_turn: list[int] = []

        def one_turn() -> bool:
            sup.drain_control()
            per_turn.append(answered())
            return sum(per_turn) >= flood

        wait_for(one_turn, 30, interval=0)
        total = sum(per_turn)
        assert max(per_turn) == CONTROL_BATCH, per_turn
        assert total == flood and sup.requests_served == flood
    finally:
        client.close()
        router.close()
