"""The training core: a plain loop that reads top to bottom.

Everything operational (heartbeats, logging, checkpoints, stop requests, memory hygiene) is a
hook; the loop itself only fetches batches, takes compiled steps and asks the hooks what to do
at optimizer-step boundaries. Swap the hooks and the loop is a library function.

Exactness rules, each of which a resumed run depends on:
- the data order is a pure function of (seed, examples seen), see ``ExampleOrder``;
- the dropout RNG is re-seeded before every micro-batch from (seed, examples seen), because
  MLX's random state cannot be restored item-wise;
- checkpoints happen only at optimizer-step boundaries, when no gradient is half-accumulated;
- the optimizer state (which includes its step count, so a schedule resumes too) is saved and
  restored whole.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.tuner.trainer import default_loss

from loractl.daemon.data import ExampleOrder, eval_batches, make_batch
from loractl.signatures import is_memory_exception


@dataclass
class LoopState:
    """Where the run is. Everything here goes into a checkpoint's state.json."""

    step: int = 0
    examples_seen: int = 0
    tokens_seen: int = 0
    loss_history: list[list[float]] = field(default_factory=list)  # [step, loss]
    val_history: list[list[float]] = field(default_factory=list)  # [step, val_loss]


@dataclass
class LoopPlan:
    """The settings the loop runs under (they may change between attempts via the ladder)."""

    total_examples: int
    batch_size: int
    grad_accumulation_steps: int
    max_seq_length: int
    seed: int
    steps_per_eval: int
    val_batches: int
    clear_cache_threshold: int = 0


@dataclass
class StepReport:
    loss: float
    tokens: int
    seconds: float
    examples: int


class OutOfMemory(RuntimeError):
    """A step failed to allocate twice. ``boundary`` is the last consistent state."""

    def __init__(self, message: str, boundary: Boundary):
        super().__init__(message)
        self.boundary = boundary


@dataclass
class Boundary:
    """The model and optimizer at the start of an optimizer step: a safe checkpoint point.

    MLX arrays are immutable, so holding these references costs no copy until the update
    replaces them (then one extra set of adapter-sized tensors).
    """

    state: LoopState
    params: list[tuple[str, mx.array]]
    optimizer: list[tuple[str, mx.array]]


class Hooks(Protocol):
    def before_micro_step(self, state: LoopState, indices: list[int]) -> None: ...
    def after_step(self, state: LoopState, report: StepReport) -> None: ...
    def before_eval(self, state: LoopState) -> None: ...
    def on_eval(self, state: LoopState, val_loss: float, seconds: float) -> None: ...
    def on_oom_retry(self, state: LoopState, error: BaseException) -> None: ...
    def checkpoint_due(self, state: LoopState) -> bool: ...
    def checkpoint(self, state: LoopState) -> None: ...
    def stop_requested(self) -> bool: ...


def micro_step_seed(seed: int, examples_seen: int) -> int:
    # Keyed on examples seen, not on the step number, so it survives accumulation changes.
    return (seed * 1_000_003 + examples_seen) % (1 << 63)


def snapshot(model: nn.Module, optimizer, state: LoopState) -> Boundary:
    return Boundary(
        state=LoopState(
            step=state.step,
            examples_seen=state.examples_seen,
            tokens_seen=state.tokens_seen,
            loss_history=list(state.loss_history),
            val_history=list(state.val_history),
        ),
        params=tree_flatten(model.trainable_parameters()),
        optimizer=tree_flatten(optimizer.state),
    )


def restore(model: nn.Module, optimizer, boundary: Boundary) -> None:
    """Put the model and optimizer back to a boundary, in place (compiled steps hold refs)."""
    model.update(tree_unflatten(boundary.params))
    restored = tree_unflatten(boundary.optimizer)
    optimizer.state.clear()
    optimizer.state.update(restored)


def evaluate(model, dataset, plan: LoopPlan, loss=default_loss) -> float:
    model.eval()
    total_loss = mx.array(0.0)
    total_tokens = mx.array(0)
    for batch, lengths in eval_batches(
        dataset, plan.batch_size, plan.val_batches, plan.max_seq_length
    ):
        value, tokens = loss(model, batch, lengths)
        total_loss += value * tokens
        total_tokens += tokens
        mx.eval(total_loss, total_tokens)
    model.train()
    if total_tokens.item() == 0:
        return float("nan")
    return (total_loss / total_tokens).item()


def train(
    *,
    model: nn.Module,
    optimizer,
    train_set,
    val_set,
    plan: LoopPlan,
    state: LoopState,
    hooks: Hooks,
    loss=default_loss,
) -> str:
    """Train until ``plan.total_examples`` have been consumed. Returns "done" or "stopped"."""
    loss_value_and_grad = nn.value_and_grad(model, loss)
    compiled_state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=compiled_state, outputs=compiled_state)
    def micro_step(batch, lengths, prev_grad, update_divisor):
        (value, tokens), grad = loss_value_and_grad(model, batch, lengths)
        if prev_grad is not None:
            grad = tree_map(lambda g, p: g + p, grad, prev_grad)
        if update_divisor:
            if update_divisor > 1:
                grad = tree_map(lambda g: g / update_divisor, grad)
            optimizer.update(model, grad)
            grad = None
        return value, tokens, grad

    order = ExampleOrder(len(train_set), plan.seed)
    model.train()

    def run_eval() -> None:
        hooks.before_eval(state)
        tic = time.perf_counter()
        val_loss = evaluate(model, val_set, plan, loss)
        state.val_history.append([state.step, val_loss])
        hooks.on_eval(state, val_loss, time.perf_counter() - tic)

    if val_set is not None and state.step == 0 and plan.val_batches != 0:
        run_eval()

    while state.examples_seen < plan.total_examples:
        boundary = snapshot(model, optimizer, state)
        tic = time.perf_counter()
        grad = None
        losses = []
        tokens = 0
        window_examples = 0
        for micro in range(plan.grad_accumulation_steps):
            remaining = plan.total_examples - state.examples_seen
            indices = order.indices(state.examples_seen, min(plan.batch_size, remaining))
            batch, lengths = make_batch(train_set, indices, plan.max_seq_length)
            last = (
                micro == plan.grad_accumulation_steps - 1
                or state.examples_seen + len(indices) >= plan.total_examples
            )
            update_divisor = micro + 1 if last else 0

            def run(prev=grad, batch=batch, lengths=lengths, divisor=update_divisor, idx=indices):
                hooks.before_micro_step(state, idx)
                return micro_step(batch, lengths, prev, divisor)

            def roll_back(exc: BaseException, boundary=boundary) -> None:
                restore(model, optimizer, boundary)
                hooks.on_oom_retry(state, exc)

            value, count, grad = _step_with_retry(
                run,
                seed=micro_step_seed(plan.seed, state.examples_seen),
                evaluate_also=compiled_state,
                on_retry=roll_back,
                boundary=boundary,
            )
            losses.append(value)
            tokens += count
            window_examples += len(indices)
            state.examples_seen += len(indices)
            if plan.clear_cache_threshold and mx.get_cache_memory() > plan.clear_cache_threshold:
                mx.clear_cache()
            if last:
                break
        state.step += 1
        state.tokens_seen += tokens
        step_loss = sum(losses) / len(losses)
        state.loss_history.append([state.step, step_loss])
        hooks.after_step(
            state,
            StepReport(
                loss=step_loss,
                tokens=tokens,
                seconds=time.perf_counter() - tic,
                examples=window_examples,
            ),
        )
        finished = state.examples_seen >= plan.total_examples
        if val_set is not None and plan.val_batches != 0 and (
            state.step % plan.steps_per_eval == 0 or finished
        ):
            run_eval()
        if hooks.stop_requested() and not finished:
            hooks.checkpoint(state)
            return "stopped"
        if not finished and hooks.checkpoint_due(state):
            hooks.checkpoint(state)
    hooks.checkpoint(state)
    return "done"


def _step_with_retry(
    run, *, seed: int, evaluate_also: list, on_retry, boundary: Boundary
) -> tuple[float, int, Any]:
    """One micro-step; on an allocation failure free the cache and retry it once.

    The recipe's try/except around each step: a transient spike (a fragmented cache) often
    passes on the second try. A second failure raises OutOfMemory carrying the last boundary,
    so the trainer can still checkpoint it before exiting with the memory exit code.
    """
    for attempt in (1, 2):
        try:
            mx.random.seed(seed)
            value, tokens, grad = run()
            mx.eval(evaluate_also, value, tokens, grad)
            return value.item(), int(tokens.item()), grad
        except (MemoryError, RuntimeError) as exc:
            if not is_memory_exception(exc):
                raise
            mx.clear_cache()
            if attempt == 2:
                raise OutOfMemory(str(exc), boundary) from exc
            on_retry(exc)
    raise AssertionError("unreachable")
