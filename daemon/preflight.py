"""The pre-flight: before its first optimizer step, an attempt runs its longest batch.

The peak memory of a run is set by its longest batch, and with length-sorted, shuffled batches
that batch may first come hours into the run. So before the first optimizer step of every
attempt (fresh or resumed) the trainer finds, among the batches the attempt will still train
on, the one with the most tokens as ``make_batch`` pads it (rows x padded length, at this
rung's batch size and sequence length), runs forward and backward on it with the training
loss, and runs the largest validation batch through the evaluation loss, whose peak can be
higher. Over each pass it reads MLX's peak and the process footprint's (the meter the
supervisor's guard reads, at its high-water mark: see ``FootprintPeak``); an attempt whose
peak is over the memory budget stops at once with ``ExitCode.DOES_NOT_FIT``: a memory stop at
step 0 instead of hours in.

Nothing the run depends on changes: the gradients are dropped (the optimizer never sees
them), the model keeps its parameters and its train/eval mode, the data order is a pure
function read here without being advanced, and numpy's and Python's global RNGs are put back.
MLX's random state cannot be read or restored (MLX 0.32), and the dropout of the training
pass draws from it; that is harmless because the loop re-seeds it before every micro-step
(``micro_step_seed``) and nothing between here and the first micro-step draws from it (the
evaluation that may come first runs with dropout off). A resumed run with the pre-flight on
ends bitwise equal to an uninterrupted one (tests/test_preflight.py).

The pass is uncompiled (``nn.value_and_grad``); the loop's step is compiled and also holds the
optimizer update and, with accumulation, the previous micro-batch's gradients. On the CPU the
two peak within a few percent of each other on the tiny presets (see ``run_preflight``).
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.tuner.trainer import default_loss

from loractl.config import JobConfig
from loractl.daemon.data import (
    ExampleOrder,
    TokenizedDataset,
    make_batch,
    padded_width,
    rank_share,
)
from loractl.memory import MB, footprint_mb, memory_limit_mb
from loractl.signatures import is_memory_exception, is_resource_limit_text

# Without memory_budget_mb a job may use this share of the machine's memory: the supervisor's
# default (loractl.supervisor.jobview.DEFAULT_BUDGET_FRACTION, which a test keeps equal).
DEFAULT_BUDGET_FRACTION = 0.7


def default_budget_mb(cfg: JobConfig) -> float:
    """The budget of a trainer the supervisor did not give one (a foreground run): the job's
    memory_budget_mb, else the supervisor's default share of RAM (or of a lower cgroup
    limit)."""
    if cfg.memory_budget_mb:
        return float(cfg.memory_budget_mb)
    return memory_limit_mb() * DEFAULT_BUDGET_FRACTION


@dataclass(frozen=True)
class BatchChoice:
    """One global batch of the run: where it starts, its examples, and its padded size."""

    start: int  # its first position in the run (examples seen before it)
    indices: list[int]
    rows: int
    width: int

    @property
    def tokens(self) -> int:
        return self.rows * self.width


def longest_train_batch(
    order: ExampleOrder,
    lengths: Sequence[int],
    start: int,
    total: int,
    batch_size: int,
    max_seq_length: int,
) -> BatchChoice | None:
    """The batch with the most padded tokens among those the loop cuts from positions
    ``start`` to ``total`` (``batch_size`` at a time, the last one shorter), the first such
    one on a tie; None when nothing is left to train."""
    if start >= total:
        return None
    lengths = np.asarray(lengths)
    parts = []
    position = start
    while position < total:
        epoch, offset = divmod(position, order.epoch_length)
        take = min(order.epoch_length - offset, total - position)
        parts.append(lengths[order.permutation(epoch)[offset : offset + take]])
        position += take
    in_order = np.minimum(np.concatenate(parts), max_seq_length)
    count = len(in_order)
    batches = -(-count // batch_size)
    padded = np.zeros(batches * batch_size, dtype=np.int64)
    padded[:count] = in_order
    widths = padded_width(padded.reshape(batches, batch_size).max(axis=1), max_seq_length)
    rows = np.full(batches, batch_size, dtype=np.int64)
    rows[-1] = count - (batches - 1) * batch_size
    best = int(np.argmax(rows * widths))
    first = start + best * batch_size
    return BatchChoice(
        start=first,
        indices=order.indices(first, int(rows[best])),
        rows=int(rows[best]),
        width=int(widths[best]),
    )


def longest_eval_batch(
    dataset: TokenizedDataset | None,
    batch_size: int,
    num_batches: int,
    max_seq_length: int,
    seed: int,
) -> BatchChoice | None:
    """The largest of the validation batches ``eval_batches`` yields (all of batch_size
    rows), or None when no evaluation runs."""
    if dataset is None or num_batches == 0 or len(dataset) < batch_size:
        return None
    order = ExampleOrder(dataset.lengths, batch_size, seed).permutation(0)
    count = len(order) // batch_size
    if num_batches != -1:
        count = min(count, num_batches)
    batches = order[: count * batch_size].reshape(count, batch_size)
    longest = np.minimum(dataset.lengths[batches], max_seq_length).max(axis=1)
    widths = padded_width(longest, max_seq_length)
    best = int(np.argmax(widths))
    return BatchChoice(
        start=best * batch_size,
        indices=[int(i) for i in batches[best]],
        rows=batch_size,
        width=int(widths[best]),
    )


class FootprintPeak:
    """The process footprint's high-water mark since ``reset``, in MB.

    On Linux MLX's CPU backend hands a large buffer back to the OS as soon as it is freed
    (only small ones stay in its cache), so the footprint read after a pass misses the pass's
    own peak: on the varlen preset's longest batch (4 x 512) it read 152 MB where the peak RSS
    was 233 MB. There the kernel keeps the high-water mark of RSS (VmHWM in
    /proc/self/status, the footprint's meter), and writing 5 to /proc/self/clear_refs resets
    it. Elsewhere (macOS) the footprint now is the reading: Metal's buffer cache keeps freed
    buffers, and phys_footprint with them, until the cache is cleared.
    """

    STATUS = Path("/proc/self/status")
    CLEAR_REFS = Path("/proc/self/clear_refs")

    def __init__(self) -> None:
        self.tracking = False

    def reset(self) -> None:
        self.tracking = False
        if not sys.platform.startswith("linux"):
            return
        try:
            self.CLEAR_REFS.write_text("5")
        except OSError:
            return
        self.tracking = True

    def read(self) -> float:
        now = footprint_mb(os.getpid())
        if not self.tracking:
            return now
        try:
            for line in self.STATUS.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return max(now, int(line.split()[1]) / 1024)
        except (OSError, ValueError, IndexError):
            pass
        return now


@dataclass
class Reading:
    """MLX's peak and the process footprint's, over one pass, in MB."""

    mlx_peak_mb: float = 0.0
    footprint_mb: float = 0.0

    @property
    def peak_mb(self) -> float:
        return max(self.mlx_peak_mb, self.footprint_mb)


def _start_reading() -> FootprintPeak:
    footprint = FootprintPeak()
    mx.reset_peak_memory()
    footprint.reset()
    return footprint


def _finish_reading(footprint: FootprintPeak) -> Reading:
    return Reading(mx.get_peak_memory() / MB, footprint.read())


@dataclass
class Preflight:
    """What the pre-flight measured on this rank; ``fits`` once the ranks agreed."""

    weights_mb: float
    budget_mb: float
    batch_size: int
    max_seq_length: int
    train: Reading
    rows: int = 0  # this rank's share of the longest batch, as make_batch padded it
    width: int = 0
    start: int = 0  # where that batch comes in the run (examples seen before it)
    evaluation: Reading | None = None
    eval_tokens: int = 0
    seconds: float = 0.0
    # A memory error raised by the pass itself (a CUDA or Metal allocation failure).
    error: str = ""
    # The highest peak of all ranks, and whether any rank was over (or failed): the verdict.
    agreed_peak_mb: float = 0.0
    agreed_tokens: int = 0
    fits: bool = True

    @property
    def tokens(self) -> int:
        return self.rows * self.width

    @property
    def mlx_peak_mb(self) -> float:
        return max(self.train.mlx_peak_mb, self.evaluation.mlx_peak_mb if self.evaluation else 0)

    @property
    def footprint_mb(self) -> float:
        return max(self.train.footprint_mb, self.evaluation.footprint_mb if self.evaluation else 0)

    @property
    def peak_mb(self) -> float:
        return max(self.mlx_peak_mb, self.footprint_mb)

    @property
    def over(self) -> bool:
        return bool(self.error) or self.peak_mb > self.budget_mb

    def detail(self) -> dict[str, Any]:
        """The preflight event's detail (fields documented on TrainerEvent)."""
        out: dict[str, Any] = {
            "peak_mb": round(self.peak_mb, 1),
            "mlx_peak_mb": round(self.mlx_peak_mb, 1),
            "footprint_mb": round(self.footprint_mb, 1),
            "weights_mb": round(self.weights_mb, 1),
            "tokens": self.tokens,
            "batch_size": self.batch_size,
            "max_seq_length": self.max_seq_length,
            "eval_peak_mb": round(self.evaluation.peak_mb, 1) if self.evaluation else None,
            "budget_mb": round(self.budget_mb, 1),
            # Beyond the documented fields: the batch's shape and place, the time it took.
            "rows": self.rows,
            "width": self.width,
            "position": self.start,
            "eval_tokens": self.eval_tokens,
            "seconds": round(self.seconds, 3),
            "fits": self.fits,
        }
        if self.error:
            out["error"] = self.error[:500]
        return out

    def summary(self) -> str:
        """One line for the terminal and train.log."""
        line = f"pre-flight: longest batch {self.rows}\u00d7{self.width} = {self.tokens} tokens "
        if self.error:
            return line + f"ran out of memory; budget {self.budget_mb:.0f} MB"
        line += (
            f"peaked at {self.train.peak_mb:.0f} MB (MLX {self.train.mlx_peak_mb:.0f} MB, "
            f"footprint {self.train.footprint_mb:.0f} MB)"
        )
        if self.evaluation is not None:
            line += f", evaluation at {self.evaluation.peak_mb:.0f} MB"
        return line + f"; budget {self.budget_mb:.0f} MB ({self.seconds:.2f} s)"

    def does_not_fit_words(self, world_size: int = 1) -> str:
        """The reason an attempt that does not fit exits with."""
        if self.error:
            return (
                f"does not fit: out of memory on the longest batch ({self.tokens} tokens) "
                f"with a {self.budget_mb:.0f} MB budget: {self.error}"
            )
        peak = self.agreed_peak_mb or self.peak_mb
        tokens = self.agreed_tokens or self.tokens
        ranks = f" (the highest of {world_size} ranks)" if world_size > 1 else ""
        return (
            f"does not fit: peak {peak:.0f} MB{ranks} over the {self.budget_mb:.0f} MB budget "
            f"on the longest batch ({tokens} tokens)"
        )


def weights_mb() -> float:
    """The fixed part: what MLX holds once the model is loaded and the adapters applied."""
    return mx.get_active_memory() / MB


def run_preflight(
    model: nn.Module,
    train_set: TokenizedDataset,
    val_set: TokenizedDataset | None,
    *,
    order: ExampleOrder,
    start: int,
    total: int,
    batch_size: int,
    max_seq_length: int,
    val_batches: int,
    seed: int,
    budget_mb: float,
    weights: float,
    clear_cache_threshold: int = 0,
    rank: int = 0,
    world_size: int = 1,
    world=None,
    loss: Callable = default_loss,
) -> Preflight:
    """Measure the attempt's longest batch, forward and backward, and its largest validation
    batch, evaluated; with several ranks each runs its share and they agree on the verdict.

    The pass is uncompiled; the loop's first step is compiled and adds the AdamW update.
    Measured against that step on the same longest batch, each in its own process, on the CPU
    (MLX 0.32.4, 2 cores; MLX peak / peak footprint, MB):

    | preset | batch | pre-flight | compiled first step |
    |---|---|---|---|
    | tiny | 1 x 256 | 7.1 / 108.0 | 6.5-6.7 / 109.5 |
    | ladder | 1 x 256 | 85.7 / 198.0 | 85.9 / 200.5 |
    | varlen | 4 x 512 | 105.2 / 233.4 | 101.6-102.2 / 223.4 |

    So the pre-flight reads the step's peak within about 1.5% low to 4.5% high: the compiled
    step holds its own code and the Adam moments (small for LoRA), the uncompiled pass keeps
    a few more intermediates alive.
    """
    tic = time.perf_counter()
    result = Preflight(
        weights_mb=weights,
        budget_mb=budget_mb,
        batch_size=batch_size,
        max_seq_length=max_seq_length,
        train=Reading(),
    )
    python_rng = random.getstate()
    numpy_rng = np.random.get_state()
    was_training = model.training
    try:
        choice = longest_train_batch(
            order, train_set.lengths, start, total, batch_size, max_seq_length
        )
        if choice is not None:
            share = rank_share(choice.indices, rank, world_size)
            batch, lengths = make_batch(train_set, share, max_seq_length)
            result.rows, result.width = batch.shape
            result.start = choice.start
            result.train = _measure_train(model, batch, lengths, loss)
            del batch, lengths
            if mx.get_cache_memory() > clear_cache_threshold:
                mx.clear_cache()  # as the loop does after an iteration
        largest = longest_eval_batch(val_set, batch_size, val_batches, max_seq_length, seed)
        if largest is not None and val_set is not None:
            share = rank_share(largest.indices, rank, world_size)
            batch, lengths = make_batch(val_set, share, max_seq_length)
            result.eval_tokens = batch.shape[0] * batch.shape[1]
            result.evaluation = _measure_eval(model, batch, lengths, loss)
            del batch, lengths
    except (MemoryError, RuntimeError) as exc:
        if not is_memory_exception(exc) or is_resource_limit_text(str(exc)):
            raise
        result.error = str(exc)
    finally:
        model.train(was_training)
        random.setstate(python_rng)
        np.random.set_state(numpy_rng)
        # Training starts as it would have without the pre-flight: an empty cache, and a
        # peak counter that the step reports will not mistake for their own.
        mx.clear_cache()
        mx.reset_peak_memory()
    result.agreed_peak_mb, result.agreed_tokens = result.peak_mb, result.tokens
    over = result.over
    if world_size > 1:
        # Every rank stops, or none: a rank that went on alone would wait forever for the
        # others in its first collective. The message names the highest rank's figures.
        mine = mx.array([float(over), result.peak_mb, float(result.tokens)], dtype=mx.float32)
        agreed = mx.distributed.all_max(mine, group=world)
        flag, peak, tokens = agreed.tolist()
        over, result.agreed_peak_mb, result.agreed_tokens = flag > 0, peak, int(tokens)
    result.fits = not over
    result.seconds = time.perf_counter() - tic
    return result


def _measure_train(model: nn.Module, batch: mx.array, lengths: mx.array, loss) -> Reading:
    """Forward and backward as the loop's step does them; the gradients are dropped."""
    model.train()
    value_and_grad = nn.value_and_grad(model, loss)
    footprint = _start_reading()
    (value, tokens), grad = value_and_grad(model, batch, lengths)
    mx.eval(value, tokens, grad)
    # Read while the gradients are still held, as they are when the optimizer runs.
    reading = _finish_reading(footprint)
    del value, tokens, grad
    return reading


def _measure_eval(model: nn.Module, batch: mx.array, lengths: mx.array, loss) -> Reading:
    """The evaluation loss, no gradient, as ``loop.evaluate`` computes it."""
    model.eval()
    footprint = _start_reading()
    value, tokens = loss(model, batch, lengths)
    mx.eval(value, tokens)
    reading = _finish_reading(footprint)
    del value, tokens
    return reading
