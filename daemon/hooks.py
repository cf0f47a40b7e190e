"""The training loop's hooks, and mlx-lm's loss reports.

``loractl.daemon.loop`` runs the plain training loop and calls ``TrainerHooks`` at its
boundaries; the hooks do everything around the arithmetic: progress, heartbeats and the
display, train.log, checkpoints (rank 0's), mlx-lm's ``save_every`` adapter copies, stop and
checkpoint requests, memory hygiene, and the test hooks (``loractl.daemon.faults``, the
examples trace). ``Reporter`` makes the loss reports mlx-lm's trainer makes, for train.log and
a report_to callback. The session that owns them is ``loractl.daemon.trainer``.
"""

from __future__ import annotations

import gc
import io
import json
import os
import queue
import threading
import time
from collections.abc import Callable
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from loractl.config import JobConfig
from loractl.daemon.collective import barrier
from loractl.daemon.faults import FaultInjector
from loractl.memory import MB, available_mb

if TYPE_CHECKING:
    from loractl.daemon.trainer import TrainingSession

log = structlog.get_logger("loractl.trainer")


# mlx-lm names its periodic adapter saves after the iteration, zero-padded to 7 digits.
def iteration_adapter_name(iteration: int) -> str:
    return f"{iteration:07d}_adapters.safetensors"


# How often the step hook reads the machine's available memory (a /proc/meminfo read and
# parse on Linux) for the low-memory cleanup: at most this often, not at every step.
MEMORY_CHECK_EVERY_S = 0.5


def safetensors_bytes(arrays: dict) -> bytes:
    """The bytes ``mx.save_safetensors(path, arrays)`` writes, made in memory: the same
    file, so that a thread can put it on disk without calling into MLX."""
    import mlx.core as mx

    buffer = io.BytesIO()
    mx.save_safetensors(buffer, arrays)
    return buffer.getvalue()


class BackgroundWriter:
    """Rank 0's periodic file writes (checkpoints, mlx-lm's adapter copies), one at a time in
    a thread of their own, in the order they were handed over.

    With several ranks every write on rank 0's main thread (fsyncs, renames, a pruned folder:
    40-50 ms a checkpoint on the project's machines) is time the other ranks spend spinning
    in the next step's collective. The main thread only turns the arrays into bytes (MLX
    arrays are immutable, and these were evaluated by the step) and goes on training; this
    thread writes them, and the disk's waits (fsync, write) release the GIL. A write that
    fails is raised on the main thread at its next step (``check``) or wait (``drain``);
    the checkpoint it was writing never became the newest, as if it had been killed.
    """

    # At most this many writes queued: a disk slower than the steps makes the step wait
    # instead of piling up copies of the model.
    QUEUE = 2

    def __init__(self) -> None:
        self._jobs: queue.Queue[Callable[[], None]] = queue.Queue(maxsize=self.QUEUE)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, job: Callable[[], None]) -> None:
        self.check()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="writer", daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if self._error is None:  # after a failure, nothing newer lands on disk
                    job()
            except BaseException as exc:
                self._error = exc
            finally:
                self._jobs.task_done()

    def pending(self) -> bool:
        return self._jobs.unfinished_tasks > 0

    def check(self) -> None:
        """Raise the failure of a write done in the background, once."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def drain(self) -> None:
        """Wait until every write handed over is on disk; raise a failed one."""
        if self._thread is not None:
            self._jobs.join()
        self.check()

    def close(self, timeout: float = 30.0) -> None:
        """On the way out (a crash, a lost peer): let the writes in flight finish, up to
        ``timeout`` seconds, and drop any failure (the attempt is failing already)."""
        deadline = time.monotonic() + timeout
        while self.pending() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._error = None


class Reporter:
    """mlx-lm's loss reports: every ``steps_per_report`` iterations and at the last one, the
    mean loss and the throughput since the previous report, to train.log and to the
    report_to callback (wandb, swanlab) with the keys mlx-lm's trainer gives it."""

    def __init__(
        self,
        cfg: JobConfig,
        optimizer,
        callback,
        total_iterations: int,
        tokens: int,
        world=None,
    ):
        self.cfg = cfg
        self.optimizer = optimizer
        self.callback = callback
        self.total_iterations = total_iterations
        self.trained_tokens = tokens
        # With several ranks each iteration's loss and tokens are the rank's own; as mlx-lm
        # does, they are summed over the ranks only when a report is due, or taken from the
        # steps' own sums when the report covers whole steps.
        self.world = world if world is not None and world.size() > 1 else None
        # Whether the iterations since the last report are whole optimizer steps (the
        # reporter starts at a step's start, as every attempt does).
        self.whole_steps = True
        self._reset()

    def _reset(self) -> None:
        self.losses = 0.0
        self.iterations = 0
        self.tokens = 0
        self.seconds = 0.0
        # The ranks' sums of the whole steps since the last report (see IterationReport).
        self.step_losses = 0.0
        self.step_tokens = 0.0

    def after_iteration(self, state, report) -> None:
        import mlx.core as mx

        self.losses += report.loss
        self.iterations += 1
        self.tokens += report.tokens
        self.seconds += report.seconds
        step_sums = getattr(report, "step_sums", None)
        if step_sums is not None:
            self.step_losses += step_sums[0]
            self.step_tokens += step_sums[1]
        it = state.iteration
        if it % self.cfg.steps_per_report and it != self.total_iterations:
            return
        losses, ranks = self.losses, 1
        if self.world is not None:
            if self.whole_steps and step_sums is not None:
                # The report covers whole steps: their sums over the ranks came with the
                # steps' own collective, so no second sync point per step (on a ring each
                # is a wait in which one rank spins until the slowest arrives).
                losses, tokens = self.step_losses, self.step_tokens
            else:
                summed = mx.distributed.all_sum(
                    mx.array([self.losses, self.tokens], dtype=mx.float32), group=self.world
                )
                losses, tokens = summed.tolist()
            self.tokens, ranks = int(tokens), self.world.size()
            self.whole_steps = step_sums is not None
        self.trained_tokens += self.tokens
        info = {
            "iteration": it,
            "train_loss": losses / (self.iterations * ranks),
            "learning_rate": self.optimizer.learning_rate.item(),
            "iterations_per_second": self.iterations / self.seconds if self.seconds else 0.0,
            "tokens_per_second": self.tokens / self.seconds if self.seconds else 0.0,
            "trained_tokens": self.trained_tokens,
            "peak_memory": mx.get_peak_memory() / 1e9,
        }
        log.info("report", **info)
        if self.callback is not None:
            self.callback.on_train_loss_report(info)
        self._reset()


class TrainerHooks:
    """The loop's hooks: progress, heartbeats, logging, checkpoints, memory hygiene, stop."""

    def __init__(
        self, session: TrainingSession, model, optimizer, store, plan, order, callback=None
    ):
        from loractl.daemon.display import Display

        self.session = session
        self.cfg = session.cfg
        self.model = model
        self.optimizer = optimizer
        self.store = store
        self.plan = plan
        self.order = order
        self.progress = session.progress
        self.reporter: Reporter | None = None
        self.callback = callback
        self.display = Display(
            enabled=session.show_progress,
            total_examples=plan.total_examples,
            start_examples=session.progress.examples_seen,
            quiet=session.rank != 0,
        )
        self._fault = FaultInjector.from_env()
        # With several ranks, a stop is decided only by what the ranks agreed at a step's
        # collective: a stop command that lands on one rank after that step's agreement waits
        # for the next one, or that rank would stop alone and the others block in a collective.
        self._agreed_stop = False
        # Tests audit the exact examples consumed across kills and resumes through this trace.
        trace_path = os.environ.get("LORACTL_TRACE_EXAMPLES")
        self._trace = open(trace_path, "a") if trace_path else None  # noqa: SIM115
        # With several ranks, rank 0's periodic writes go to disk in a thread (see
        # BackgroundWriter): the others would wait for them. One process writes them itself,
        # straight from its arrays: no bytes copies, so no checkpoint outgrows the pre-flight.
        self.background = session.world_size > 1
        self.writer = BackgroundWriter()
        # The iteration whose adapters were last handed to the writer as adapters.safetensors
        # (a checkpoint at the same iteration need not write the same bytes again).
        self._adapters_at: int | None = None
        self._memory_checked = float("-inf")

    def before_micro_step(self, state, indices) -> None:
        self.session.touch()
        if self.reporter is None:
            self.reporter = Reporter(
                self.cfg,
                self.optimizer,
                self.callback,
                self.plan.total_iterations(state),
                state.tokens_seen,
                self.session.world,
            )
        self._fault.maybe_fail(
            state.step + 1, self.session.progress.attempt, self.session.rank, self.session.rung
        )
        # ``indices`` is the global batch, the same on every rank: one rank traces it.
        if self._trace is not None and self.session.rank == 0:
            self._trace.write(
                json.dumps({"start": state.examples_seen, "indices": list(indices)}) + "\n"
            )
            self._trace.flush()

    def after_iteration(self, state, report) -> None:
        self.session.touch()
        self.reporter.after_iteration(state, report)
        if state.iteration % self.cfg.save_every == 0 and self.session.rank == 0:
            # mlx-lm's save_every: the adapters now, and a copy named after the iteration
            # that mlx_lm.generate --adapter-path or resume_adapter_file can use as it is
            # (with several ranks, written by the writer thread while the next steps run).
            self._adapters_at = state.iteration
            if not self.background:
                self.session.write_adapters(self.model, iteration_adapter_name(state.iteration))
                log.info("adapters saved", iteration=state.iteration)
                return
            from mlx.utils import tree_flatten

            blob = safetensors_bytes(dict(tree_flatten(self.model.trainable_parameters())))
            self.writer.submit(partial(self._save_adapters, blob, state.iteration))

    def _save_adapters(self, blob: bytes, iteration: int) -> None:
        self.session.write_adapter_bytes(
            blob, "adapters.safetensors", iteration_adapter_name(iteration)
        )
        log.info("adapters saved", iteration=iteration)

    def after_step(self, state, report) -> None:
        import mlx.core as mx

        cfg = self.cfg
        progress = self.progress
        progress.step = state.step
        progress.examples_seen = state.examples_seen
        progress.epoch = state.examples_seen // self.order.epoch_length
        progress.loss = report.loss
        progress.step_seconds = report.seconds
        progress.tokens_per_sec = report.tokens / report.seconds if report.seconds else 0.0
        progress.mlx_active_mb = mx.get_active_memory() / MB
        progress.mlx_peak_mb = mx.get_peak_memory() / MB
        progress.mlx_cache_mb = mx.get_cache_memory() / MB
        log.info(
            "step",
            step=state.step,
            iteration=state.iteration,
            examples_seen=state.examples_seen,
            loss=report.loss,
            tokens=report.tokens,
            tokens_per_sec=round(progress.tokens_per_sec, 1),
            step_seconds=round(report.seconds, 4),
            mlx_active_mb=round(progress.mlx_active_mb, 1),
            mlx_peak_mb=round(progress.mlx_peak_mb, 1),
        )
        self.display.update(progress)
        # A periodic write that failed in the background (a full disk) ends the run here.
        self.writer.check()
        low_memory = False
        now = time.monotonic()
        if now - self._memory_checked >= MEMORY_CHECK_EVERY_S:
            self._memory_checked = now
            low_memory = available_mb() < cfg.low_memory_mb
        if (
            state.step % cfg.cleanup_every == 0
            or low_memory
            or self.session.requests.clear_cache.is_set()
        ):
            self.session.requests.clear_cache.clear()
            gc.collect()
            mx.clear_cache()
            if low_memory:
                log.warning("low memory: cache cleared", available_mb=round(available_mb()))

    def before_eval(self, state) -> None:
        self.session.touch()
        self.progress.phase = "eval"

    def on_eval(self, state, val_loss: float, seconds: float) -> None:
        self.session.touch()
        self.progress.phase = "train"
        self.progress.eval_seconds = seconds
        log.info(
            "eval",
            step=state.step,
            iteration=state.iteration,
            val_loss=val_loss,
            seconds=round(seconds, 3),
        )
        self.display.note(f"iteration {state.iteration}: val loss {val_loss:.3f}")
        self.session.telemetry.event("eval", val_loss=val_loss, seconds=seconds)
        if self.callback is not None:
            self.callback.on_val_loss_report(
                {"iteration": state.iteration, "val_loss": val_loss, "val_time": seconds}
            )

    def on_oom_retry(self, state, error: BaseException) -> None:
        log.warning("allocation failed; cache cleared, retrying step", error=str(error))
        self.session.telemetry.event("oom_retry", error=str(error)[:500])

    def requests_pending(self) -> tuple[bool, bool]:
        requests = self.session.requests
        return requests.stop.is_set(), requests.checkpoint.is_set()

    def requests_agreed(self, stop: bool, checkpoint: bool) -> None:
        """With several ranks, a stop or checkpoint request that reached any rank (a signal,
        a supervisor command) applies to all of them at this step: a rank that stopped alone
        would leave the others blocked in their next collective."""
        self._agreed_stop = stop
        if stop:
            self.session.requests.stop.set()
        if checkpoint:
            self.session.requests.checkpoint.set()

    def checkpoint_due(self, state) -> bool:
        if self.session.requests.checkpoint.is_set():
            self.session.requests.checkpoint.clear()
            return True
        return state.step % self.cfg.checkpoint_interval == 0

    def stop_requested(self) -> bool:
        if self.session.world_size > 1:
            return self._agreed_stop
        return self.session.requests.stop.is_set()

    def checkpoint(self, state) -> None:
        """Rank 0 checkpoints the state (and writes adapters.safetensors beside it). A
        periodic checkpoint is written by the writer thread while training goes on; the one a
        stop or the end of the run asks for is on disk when this returns."""
        from mlx.utils import tree_flatten

        if self.session.rank == 0:
            final = self.stop_requested() or state.examples_seen >= self.plan.total_examples
            params = tree_flatten(self.model.trainable_parameters())
            job = self._checkpoint_job(
                state,
                params,
                tree_flatten(self.optimizer.state),
                # The same bytes went to adapters.safetensors at this iteration already.
                adapters=self._adapters_at != state.iteration,
                background=self.background and not final,
            )
            if self.background and not final:
                self.writer.submit(job)
            else:
                # On this thread, after whatever the writer still holds: MLX writes here.
                self.writer.drain()
                job()
        if self.stop_requested():
            # No rank exits before the checkpoint it stops at is on disk: mlx.launch would
            # terminate rank 0 mid-write. A periodic checkpoint needs no wait (a rank that runs
            # ahead only blocks in the next step's collective, and if rank 0 dies mid-write
            # every rank resumes from the checkpoint before), so the others compute meanwhile.
            barrier(self.session.world)

    def checkpoint_boundary(self, boundary) -> None:
        """Checkpoint the last consistent state after a fatal allocation failure, if we can."""
        try:
            self.writer.drain()
        except Exception as exc:  # an earlier periodic write failed: try this one anyway
            log.error("a periodic write failed", error=str(exc))
        try:
            self._checkpoint_job(
                boundary.state, boundary.params, boundary.optimizer, adapters=False
            )()
        except Exception as exc:  # out of memory may well mean out of everything
            log.error("could not checkpoint after out-of-memory", error=str(exc))

    def close(self) -> None:
        """The attempt is ending without its final checkpoint (a crash, a lost peer): let a
        periodic write in flight land."""
        self.writer.close()

    def _checkpoint_job(
        self, state, params, optimizer_state, *, adapters: bool, background: bool = False
    ) -> Callable[[], None]:
        """The checkpoint of ``state`` as a job to run now or in the writer thread. What it
        writes is fixed here, on the calling thread: the tensors as safetensors bytes, the
        state's lists copied (the loop appends to them meanwhile)."""
        cfg = self.cfg
        body = {
            "iteration": state.iteration,
            "examples_seen": state.examples_seen,
            "tokens_seen": state.tokens_seen,
            "total_examples": self.plan.total_examples,
            "epoch": state.examples_seen // self.order.epoch_length,
            "order": {
                "scheme": "examples sorted by token length, cut into batches of batch_size; "
                "each epoch's batches in numpy default_rng([seed, epoch]).permutation order",
                "seed": cfg.seed,
                "batch_size": self.order.batch_size,
                "epoch_examples": self.order.epoch_length,
            },
            "rng": {
                "mlx": "re-seeded before every micro-batch from (seed, examples_seen)",
                "seed": cfg.seed,
                "numpy": "default_rng([seed, epoch]) for the data order",
            },
            "rung": self.session.rung,
            "settings": self.session.settings(),
            "loss_history": [list(entry) for entry in state.loss_history],
            "val_history": [list(entry) for entry in state.val_history],
            "config_hash": self._config_hash,
            "written_at": time.time(),
        }
        step, examples_seen = state.step, state.examples_seen
        files: dict[str, Callable[[Path], object]]
        if background:
            # Made now: the writer thread must not call into MLX.
            adapter_blob = safetensors_bytes(dict(params))
            optimizer_blob = safetensors_bytes(dict(optimizer_state))
            files = {
                "adapters.safetensors": lambda p: p.write_bytes(adapter_blob),
                "optimizer.safetensors": lambda p: p.write_bytes(optimizer_blob),
            }
        else:
            import mlx.core as mx

            files = {
                "adapters.safetensors": lambda p: mx.save_safetensors(str(p), dict(params)),
                "optimizer.safetensors": lambda p: mx.save_safetensors(
                    str(p), dict(optimizer_state)
                ),
            }

        def write() -> None:
            if not background:
                self.progress.phase = "checkpoint"
            tic = time.perf_counter()
            checkpoint = self.store.write(step, body, files)
            seconds = time.perf_counter() - tic
            # Only once it is on disk: the supervisor records the step as checkpointed.
            self.progress.last_checkpoint_step = step
            if not background:
                self.progress.phase = "train"
            log.info(
                "checkpoint",
                step=step,
                examples_seen=examples_seen,
                path=str(checkpoint.path),
                seconds=round(seconds, 4),
                background=background,
            )
            self.session.telemetry.event("checkpoint", path=str(checkpoint.path), seconds=seconds)
            if adapters and background:
                self.session.write_adapter_bytes(adapter_blob)
            elif adapters:
                self.session.write_adapters(self.model)

        return write

    @cached_property
    def _config_hash(self) -> str:
        return self.cfg.identity_hash()
