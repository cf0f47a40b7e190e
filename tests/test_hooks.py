"""The trainer's loop hooks: with several ranks, a stop is what the ranks agreed at a step."""

from __future__ import annotations

from types import SimpleNamespace

from loractl.daemon.hooks import TrainerHooks
from loractl.daemon.telemetry import Requests


def hooks_for(world_size: int) -> TrainerHooks:
    session = SimpleNamespace(
        cfg=SimpleNamespace(checkpoint_interval=2),
        progress=SimpleNamespace(examples_seen=0),
        show_progress=False,
        rank=1,
        world_size=world_size,
        requests=Requests(),
    )
    plan = SimpleNamespace(total_examples=8)
    return TrainerHooks(session, None, None, None, plan, None)


def test_a_stop_landing_after_a_steps_agreement_waits_for_the_next_one():
    """A stop command that reaches one rank after its step's collective does not stop that rank
    alone (the others would block in the next collective): it stops once the ranks agreed."""
    hooks = hooks_for(world_size=2)
    hooks.requests_agreed(stop=False, checkpoint=False)
    hooks.session.requests.apply("stop")  # arrives now, after this step's agreement
    assert not hooks.stop_requested()
    assert hooks.requests_pending() == (True, False)  # carried into the next step's collective
    hooks.requests_agreed(stop=True, checkpoint=False)
    assert hooks.stop_requested()


def test_one_process_stops_on_its_own_request_at_once():
    """Without ranks to agree with, the trainer's own stop request is the decision."""
    hooks = hooks_for(world_size=1)
    assert not hooks.stop_requested()
    hooks.session.requests.apply("stop")
    assert hooks.stop_requested()
