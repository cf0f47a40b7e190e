"""The training core: a plain loop that reads top to bottom.

Everything operational (heartbeats, logging, checkpoints, stop requests, memory hygiene) is a
hook; the loop itself only fetches batches, takes compiled steps and asks the hooks what to do
at optimizer-step boundaries. Swap the hooks and the loop is a library function.

The cadences are mlx-lm's: an iteration is one micro-batch (mlx-lm's ``it``); validation runs
before iteration 1, before every iteration divisible by ``steps_per_eval`` and before the last
one; the MLX cache is cleared after any iteration that leaves more than
``clear_cache_threshold`` bytes in it (0: after every one). Reports and mlx-lm-style adapter
saves are hooks called after every iteration.

Exactness rules, each of which a resumed run depends on:
- the data order is a pure function of (seed, batch size, examples seen), see ``ExampleOrder``;
- the dropout RNG is re-seeded before every micro-batch from (seed, examples seen), because
  MLX's random state cannot be restored item-wise;
- checkpoints happen only at optimizer-step boundaries, when no gradient is half-accumulated;
- the optimizer state (which includes its step count, so a schedule resumes too) is saved and
  restored whole.

Several ranks (``plan.world_size`` > 1, started by mlx.launch) train as mlx-lm's trainer does:
each takes its share of every global batch (``rank_share``), the gradients are averaged
across ranks at each update (``mlx.nn.average_gradients``) and the losses, token counts and
evaluations are summed across them, so every rank holds the same model and reports the same
numbers. With one rank none of that adds an operation, and the compiled step is unchanged.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.tuner.trainer import default_loss

from loractl.daemon.data import ExampleOrder, eval_batches, make_batch, rank_share
from loractl.signatures import is_memory_exception, is_resource_limit_text


@dataclass
class LoopState:
    """Where the run is. Everything here goes into a checkpoint's state.json."""

    step: int = 0
    iteration: int = 0  # micro-batches consumed: mlx-lm's iteration count
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
    steps_per_eval: int  # iterations, as in mlx-lm
    val_batches: int
    clear_cache_threshold: int = 0
    # The batch size the data order is cut with: the job's submitted one for the whole run,
    # so that a rung changing batch_size neither repeats nor skips data. 0: batch_size.
    order_batch_size: int = 0
    # This process's place among the ranks mlx.launch started; batch_size is the global one.
    rank: int = 0
    world_size: int = 1

    def total_iterations(self, state: LoopState) -> int:
        """The iteration number the run ends on, counting from where ``state`` stands."""
        remaining = max(0, self.total_examples - state.examples_seen)
        return state.iteration + math.ceil(remaining / self.batch_size)


@dataclass
class StepReport:
    loss: float
    tokens: int
    seconds: float
    examples: int


@dataclass
class IterationReport:
    """One micro-batch: its mean loss, its loss tokens and its wall time (evaluation excluded).

    ``step_sums``: on the micro-batch that ends an optimizer step with several ranks, the
    step's losses and tokens summed over its micro-batches and every rank, as the ranks agreed
    on them in the step's collective (None otherwise). A report falling there needs no
    collective of its own.
    """

    loss: float
    tokens: int
    seconds: float
    step_sums: tuple[float, float] | None = None


class OutOfMemory(RuntimeError):
    """A step failed to allocate twice. ``boundary`` is the last consistent state.

    ``resource_limit`` says the failure was MLX's buffer-count limit, which a restart clears,
    rather than a lack of memory, which a cheaper rung addresses.
    """

    def __init__(self, message: str, boundary: Boundary, resource_limit: bool = False):
        super().__init__(message)
        self.boundary = boundary
        self.resource_limit = resource_limit


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
    def after_iteration(self, state: LoopState, report: IterationReport) -> None: ...
    def after_step(self, state: LoopState, report: StepReport) -> None: ...
    def before_eval(self, state: LoopState) -> None: ...
    def on_eval(self, state: LoopState, val_loss: float, seconds: float) -> None: ...
    def on_oom_retry(self, state: LoopState, error: BaseException) -> None: ...
    def checkpoint_due(self, state: LoopState) -> bool: ...
    def checkpoint(self, state: LoopState) -> None: ...
    def stop_requested(self) -> bool: ...
    # With several ranks: this rank's pending (stop, checkpoint) requests, and what the ranks
    # agreed on at the end of the step (any rank's request applies to all of them).
    def requests_pending(self) -> tuple[bool, bool]: ...
    def requests_agreed(self, stop: bool, checkpoint: bool) -> None: ...


def micro_step_seed(seed: int, examples_seen: int, rank: int = 0) -> int:
    # Keyed on examples seen, not on the step number, so it survives accumulation changes;
    # and on the rank, so ranks draw different dropout masks for their different examples.
    return (seed * 1_000_003 + examples_seen + rank * (1 << 40)) % (1 << 63)


class TrainableRefs:
    """Where each trainable parameter lives, found once: reading the current arrays from
    there gives ``tree_flatten(model.trainable_parameters())`` without walking and filtering
    the whole module tree at every step (a few hundred microseconds a step on the tiny model,
    on every rank). Falls back to that walk for a layout it cannot resolve."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.refs: list[tuple[str, Any, str]] | None = []
        for name, value in tree_flatten(model.trainable_parameters()):
            owner: Any = model
            *path, key = name.split(".")
            try:
                for part in path:
                    owner = owner[int(part)] if isinstance(owner, (list, tuple)) else owner[part]
                found = isinstance(owner, dict) and owner.get(key) is value
            except (KeyError, IndexError, ValueError, TypeError):
                found = False
            if not found:
                self.refs = None
                break
            self.refs.append((name, owner, key))

    def flat(self) -> list[tuple[str, mx.array]]:
        if self.refs is None:
            return tree_flatten(self.model.trainable_parameters())
        return [(name, owner[key]) for name, owner, key in self.refs]


def snapshot(
    model: nn.Module, optimizer, state: LoopState, refs: TrainableRefs | None = None
) -> Boundary:
    return Boundary(
        state=LoopState(
            step=state.step,
            iteration=state.iteration,
            examples_seen=state.examples_seen,
            tokens_seen=state.tokens_seen,
            loss_history=list(state.loss_history),
            val_history=list(state.val_history),
        ),
        params=refs.flat() if refs is not None else tree_flatten(model.trainable_parameters()),
        optimizer=tree_flatten(optimizer.state),
    )


def restore(model: nn.Module, optimizer, boundary: Boundary) -> None:
    """Put the model and optimizer back to a boundary, in place (compiled steps hold refs)."""
    model.update(tree_unflatten(boundary.params))
    restored = tree_unflatten(boundary.optimizer)
    optimizer.state.clear()
    optimizer.state.update(restored)


def clear_cache_over(threshold: int) -> None:
    """mlx-lm's rule after every iteration and evaluation batch: clear past ``threshold``."""
    if mx.get_cache_memory() > threshold:
        mx.clear_cache()


def evaluate(model, dataset, plan: LoopPlan, loss=default_loss) -> float:
    """The mean loss per token over ``plan.val_batches`` batches, as mlx-lm computes it."""
    model.eval()
    total_loss = mx.array(0.0)
    total_tokens = mx.array(0)
    for batch, lengths in eval_batches(
        dataset,
        plan.batch_size,
        plan.val_batches,
        plan.max_seq_length,
        plan.seed,
        plan.rank,
        plan.world_size,
    ):
        value, tokens = loss(model, batch, lengths)
        total_loss += value * tokens
        total_tokens += tokens
        mx.eval(total_loss, total_tokens)
        clear_cache_over(plan.clear_cache_threshold)
    model.train()
    if plan.world_size > 1:
        # mlx-lm's evaluate: each rank scored its share; the mean is over every rank's tokens.
        total_loss = mx.distributed.all_sum(total_loss)
        total_tokens = mx.distributed.all_sum(total_tokens)
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
    distributed = plan.world_size > 1

    @partial(mx.compile, inputs=compiled_state, outputs=compiled_state)
    def micro_step(batch, lengths, prev_grad, update_divisor, carry):
        (value, tokens), grad = loss_value_and_grad(model, batch, lengths)
        if prev_grad is not None:
            grad = tree_map(lambda g, p: g + p, grad, prev_grad)
        agreed = None
        if update_divisor:
            if distributed:
                # Where mlx-lm averages: once per update, over the accumulated gradient. The
                # step's loss and tokens and the ranks' pending requests travel together in
                # one more collective beside it: on a ring every collective is a wait that
                # busy-spins, so a sync point per micro-step costs a small Mac throughput.
                grad = average_gradients(grad)
                step_sums = [value.astype(mx.float32), tokens.astype(mx.float32)]
                mine = carry + mx.stack([*step_sums, mx.array(0.0), mx.array(0.0)])
                agreed = mx.distributed.all_sum(mine)
            if update_divisor > 1:
                grad = tree_map(lambda g: g / update_divisor, grad)
            optimizer.update(model, grad)
            grad = None
        return value, tokens, grad, agreed

    order = ExampleOrder(train_set.lengths, plan.order_batch_size or plan.batch_size, plan.seed)
    total_iterations = plan.total_iterations(state)
    model.train()
    # The trainable parameters are fixed for the whole loop (the loop never freezes or
    # unfreezes a layer), so where they live is looked up once.
    trainable = TrainableRefs(model)

    def run_eval() -> float:
        """Evaluate now (between iterations; never inside a compiled step); its seconds."""
        hooks.before_eval(state)
        tic = time.perf_counter()
        val_loss = evaluate(model, val_set, plan, loss)
        state.val_history.append([state.iteration, val_loss])
        seconds = time.perf_counter() - tic
        hooks.on_eval(state, val_loss, seconds)
        return seconds

    def eval_due(iteration: int) -> bool:
        # mlx-lm evaluates at the top of iteration `it`, so the loss it reports describes the
        # model after it - 1 iterations; the same here.
        return (
            val_set is not None
            and plan.val_batches != 0
            and (
                iteration == 1
                or iteration % plan.steps_per_eval == 0
                or iteration == total_iterations
            )
        )

    while state.examples_seen < plan.total_examples:
        boundary = snapshot(model, optimizer, state, trainable)
        tic = time.perf_counter()
        eval_seconds = 0.0
        grad = None
        losses = []
        tokens = 0
        window_examples = 0
        agreed: list[float] | None = None
        for micro in range(plan.grad_accumulation_steps):
            iteration = state.iteration + 1
            if eval_due(iteration):
                eval_seconds += run_eval()
            iteration_tic = time.perf_counter()
            remaining = plan.total_examples - state.examples_seen
            indices = order.indices(state.examples_seen, min(plan.batch_size, remaining))
            # The config keeps every batch size divisible by the ranks, and the run's length
            # is a multiple of it, so each rank's share is never empty.
            share = rank_share(indices, plan.rank, plan.world_size)
            batch, lengths = make_batch(train_set, share, plan.max_seq_length)
            last = (
                micro == plan.grad_accumulation_steps - 1
                or state.examples_seen + len(indices) >= plan.total_examples
            )
            update_divisor = micro + 1 if last else 0
            carry = None
            if distributed and last:
                stop, checkpoint = hooks.requests_pending()
                carry = mx.array([sum(losses), tokens, float(stop), float(checkpoint)])

            def run(
                prev=grad,
                batch=batch,
                lengths=lengths,
                divisor=update_divisor,
                idx=indices,
                carry=carry,
            ):
                hooks.before_micro_step(state, idx)
                return micro_step(batch, lengths, prev, divisor, carry)

            def roll_back(exc: BaseException, boundary=boundary) -> None:
                restore(model, optimizer, boundary)
                hooks.on_oom_retry(state, exc)

            value, count, grad, agreed_sums = _step_with_retry(
                run,
                seed=micro_step_seed(plan.seed, state.examples_seen, plan.rank),
                evaluate_also=compiled_state,
                on_retry=roll_back,
                boundary=boundary,
            )
            losses.append(value)
            tokens += count
            window_examples += len(indices)
            state.iteration = iteration
            state.examples_seen += len(indices)
            if not distributed:
                state.tokens_seen += count  # a rank's own count; the step adds all ranks'
            step_sums = None
            if agreed_sums is not None:
                # Evaluated with the step: the step's losses, tokens and requests, all ranks'.
                agreed = agreed_sums.tolist()
                step_sums = (agreed[0], agreed[1])
            clear_cache_over(plan.clear_cache_threshold)
            hooks.after_iteration(
                state,
                IterationReport(value, count, time.perf_counter() - iteration_tic, step_sums),
            )
            if last:
                break
        state.step += 1
        step_loss = sum(losses) / len(losses)
        if distributed:
            # Each rank's losses were its own: the step's is the mean of the ranks' means, as
            # mlx-lm reports it, and its tokens are every rank's.
            assert agreed is not None
            total_loss, tokens, stop, checkpoint = agreed
            step_loss = total_loss / (len(losses) * plan.world_size)
            tokens = int(tokens)
            state.tokens_seen += tokens
            hooks.requests_agreed(stop > 0, checkpoint > 0)
        state.loss_history.append([state.step, step_loss])
        hooks.after_step(
            state,
            StepReport(
                loss=step_loss,
                tokens=tokens,
                seconds=time.perf_counter() - tic - eval_seconds,
                examples=window_examples,
            ),
        )
        finished = state.examples_seen >= plan.total_examples
        if hooks.stop_requested() and not finished:
            hooks.checkpoint(state)
            return "stopped"
        if not finished and hooks.checkpoint_due(state):
            hooks.checkpoint(state)
    hooks.checkpoint(state)
    return "done"


def _step_with_retry(
    run, *, seed: int, evaluate_also: list, on_retry, boundary: Boundary
) -> tuple[float, int, Any, mx.array | None]:
    """One micro-step; on an allocation failure free the cache and retry it once.

    The recipe's try/except around each step: a transient spike (a fragmented cache) often
    passes on the second try. A second failure raises OutOfMemory carrying the last boundary,
    so the trainer can still checkpoint it before exiting with the memory exit code.
    """
    for attempt in (1, 2):
        try:
            mx.random.seed(seed)
            value, tokens, grad, agreed = run()
            mx.eval(evaluate_also, value, tokens, grad, agreed)
            return value.item(), int(tokens.item()), grad, agreed
        except (MemoryError, RuntimeError) as exc:
            if not is_memory_exception(exc):
                raise
            # Clearing the cache also frees buffers, so it helps against MLX's buffer-count
            # limit as much as against a fragmented cache.
            mx.clear_cache()
            if attempt == 2:
                raise OutOfMemory(
                    str(exc), boundary, resource_limit=is_resource_limit_text(str(exc))
                ) from exc
            on_retry(exc)
    raise AssertionError("unreachable")
