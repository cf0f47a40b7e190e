"""Test-only fault injection: the failures MLX raises, on chosen steps of a real trainer.

The suite cannot make Metal run out of memory (nor run Metal at all on Linux), so before every
micro-step the trainer's hooks let ``FaultInjector`` fail the way MLX would, as environment
variables set by the tests and benches ask; with none of them set it never fails. (The one
fault before the first heartbeat, ``LORACTL_FAULT_EARLY_EXIT``, is in
``loractl.daemon.trainer.run``; ``stop_in_preflight`` is asked for by the pre-flight.)
"""

from __future__ import annotations

import os
import signal


def stop_in_preflight() -> None:
    """``LORACTL_FAULT_STOP_IN_PREFLIGHT=1``: the trainer sends itself SIGTERM as its
    pre-flight begins, as the memory guard does when the longest batch crosses the budget
    (the guard reads about once a second, so when it lands in a short pass is chance)."""
    if os.environ.get("LORACTL_FAULT_STOP_IN_PREFLIGHT") == "1":
        os.kill(os.getpid(), signal.SIGTERM)


class FaultInjector:
    """Failures on chosen steps, for tests of the paths that handle them.

    ``LORACTL_FAULT_OOM="STEP:COUNT[,STEP:COUNT]"``: the micro-steps of optimizer step STEP
    raise a Metal allocation failure COUNT times in total. Metal's messages cannot be produced
    on Linux, so the suite fakes them here, with the real message text.
    ``LORACTL_FAULT_SEGV="ATTEMPT:STEP"``: attempt ATTEMPT (as numbered by the supervisor)
    sends itself a real SIGSEGV at optimizer step STEP, as MLX's CPU backend does when malloc
    fails.
    ``LORACTL_FAULT_RESOURCE_LIMIT="ATTEMPT:STEP"``: every micro-step of optimizer step STEP
    of attempt ATTEMPT raises MLX's Metal buffer-count error (the retry too).
    ``LORACTL_FAULT_BALLAST="RANK:RUNG:STEP:MB"``: rank RANK, on ladder rung RUNG, takes MB
    more memory at optimizer step STEP and keeps it: one rank (one on another Mac, say) over
    the budget while the others are not, for the memory guard.
    """

    MESSAGE = (
        "[METAL] Command buffer execution failed: Insufficient Memory "
        "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)"
    )
    # mlx/backend/metal/allocator.cpp, with the default iogpu.rsrc_limit.
    RESOURCE_LIMIT_MESSAGE = "[metal::malloc] Resource limit (499000) exceeded."

    def __init__(
        self,
        plan: dict[int, int],
        segv: tuple[int, int] | None = None,
        resource_limit: tuple[int, int] | None = None,
        ballast: tuple[int, int, int, int] | None = None,
    ):
        self.remaining = dict(plan)
        self.segv = segv
        self.resource_limit = resource_limit
        self.ballast = ballast
        self._held: bytearray | None = None

    @classmethod
    def from_env(cls) -> FaultInjector:
        spec = os.environ.get("LORACTL_FAULT_OOM", "")
        plan = {}
        for item in filter(None, spec.split(",")):
            step, count = item.split(":")
            plan[int(step)] = int(count)

        def attempt_and_step(name: str) -> tuple[int, int] | None:
            value = os.environ.get(name)
            if not value:
                return None
            attempt, step = value.split(":")
            return int(attempt), int(step)

        ballast = os.environ.get("LORACTL_FAULT_BALLAST")
        rank, rung, step, megabytes = map(int, ballast.split(":")) if ballast else (0, 0, 0, 0)
        return cls(
            plan,
            attempt_and_step("LORACTL_FAULT_SEGV"),
            attempt_and_step("LORACTL_FAULT_RESOURCE_LIMIT"),
            (rank, rung, step, megabytes) if ballast else None,
        )

    def maybe_fail(self, step: int, attempt: int = 0, rank: int = 0, rung: int = 0) -> None:
        if self.ballast is not None and self._held is None:
            if self.ballast[:3] == (rank, rung, step):
                # Every page written, so the footprint really holds it.
                self._held = bytearray(b"\x01" * (self.ballast[3] << 20))
        if self.segv is not None and self.segv == (attempt, step):
            os.kill(os.getpid(), signal.SIGSEGV)
        if self.resource_limit is not None and self.resource_limit == (attempt, step):
            raise RuntimeError(self.RESOURCE_LIMIT_MESSAGE)
        if self.remaining.get(step, 0) > 0:
            self.remaining[step] -= 1
            raise RuntimeError(self.MESSAGE)
