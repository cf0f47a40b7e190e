"""The trainer process: one job attempt, in the foreground or under the supervisor.

It loads the config, the model and the data with mlx-lm's own parts, resumes from the newest
valid checkpoint, runs the plain loop in ``loop.py`` with hooks for heartbeats, logging,
checkpoints, stop requests and memory hygiene, and writes mlx-lm-compatible adapters. Its exit
code tells the supervisor what happened (see ``loractl.protocol.ExitCode``).

A distributed job runs one trainer per rank, started by mlx.launch (see
``loractl.distributed.launch_command``). Every rank trains; rank 0 alone holds the adapter
folder's lock and writes checkpoints, adapters and train.log (the others log to
``train.rank<N>.log``). The ranks agree at every optimizer step on whether to stop or
checkpoint, and wait for each other after a checkpoint, so all of them stop on, and resume
from, the same step. Every rank heartbeats and announces its own exit; a rank whose peer dies
fails with "a peer rank was lost" (exit 1), and mlx.launch then terminates the rest.

This module is the session and its command line, as mlx-lm's ``lora.py`` is; the loop is
``loractl.daemon.loop`` (mlx-lm's ``tuner/trainer.py``). The loop's hooks are
``loractl.daemon.hooks``, the ranks' group and their collectives ``loractl.daemon.collective``,
the test-only fault injection ``loractl.daemon.faults``, and the checkpoint writer
``loractl.daemon.checkpoint``. The supervisor starts it as ``python -m loractl.daemon.trainer``
and finds its trainers by that string in their command line.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import structlog

from loractl.atomic import atomic_write_bytes
from loractl.config import ConfigError, DataFileError, JobConfig, load_job
from loractl.daemon.collective import PEER_LOST_TEXT, CollectiveWatch, barrier, init_world
from loractl.daemon.hooks import TrainerHooks
from loractl.distributed import RANK_LOG_PATTERN
from loractl.memory import MB, return_freed_buffers_to_the_os
from loractl.protocol import ExitCode
from loractl.signatures import is_disk_full_error, is_memory_exception, is_resource_limit_text

log = structlog.get_logger("loractl.trainer")

LOG_FILE = "train.log"


class ModelError(ValueError):
    """The model cannot be loaded or does not fit the config: a config problem (exit 78)."""


class StoppedBeforeTraining(BaseException):  # noqa: N818  (a way out, like KeyboardInterrupt)
    """A stop asked for while loading or in the pre-flight: nothing has been trained in this
    attempt, so there is nothing to checkpoint and no reason to wait for the next step.

    Raised from the signal handler wherever the main thread is, so, like KeyboardInterrupt, it
    is not an Exception: the ``except Exception`` of the code it interrupts (the tokenizer's
    "cannot tokenize sample", a library's own) must not turn a stop into a data error."""


# The history's word for a run whose every checkpoint was damaged (see ``_resume``).
STARTED_OVER_EVENT = "started_over"
# Trainer events that say "still loading" are sent at most this often.
LOADING_EVENT_EVERY_S = 5.0


def resource_limit_words(exc: BaseException) -> str:
    # Exit 1 with this line: the supervisor's classifier reads it as the buffer-count limit
    # and restarts on the same rung (exit 75 would step down, which cannot help here).
    return (
        f"MLX resource limit, not out of memory: {exc} (too many live buffers; a restart "
        "frees them)"
    )


def configure_logging(log_path: Path | None) -> None:
    """structlog JSON lines to the job's log file; nothing on stdout, which stays for humans."""
    processors: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.dict_tracebacks,
        structlog.processors.JSONRenderer(),
    ]
    if log_path is None:
        structlog.configure(
            processors=processors,
            logger_factory=structlog.PrintLoggerFactory(file=open(os.devnull, "w")),  # noqa: SIM115
            cache_logger_on_first_use=False,
        )
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handle = _LogFile(log_path.open("a", buffering=1, encoding="utf-8"))
    structlog.configure(
        processors=processors,
        logger_factory=structlog.PrintLoggerFactory(file=handle),
        cache_logger_on_first_use=False,
    )


# MLX's savers report a failed write without its errno ("[write] Unable to write 8 bytes");
# with this little room left on the adapter disk, that is the reason.
DISK_FULL_BELOW = 64 * MB


def _is_write_failure(exc: BaseException) -> bool:
    return isinstance(exc, OSError) or "Unable to write" in str(exc)


# Held open (and flocked) for the whole life of the process: the adapter folder is ours alone.
_ADAPTER_LOCK: list[int] = []


def lock_adapter_folder(adapter_path: Path) -> str | None:
    """Take the adapter folder for this process, or say who has it.

    Two trainers on one folder would interleave checkpoints (one "completes" on the other's),
    whoever started them: a foreground `loractl train`, the supervisor, or both.
    """
    import fcntl

    lock_file = adapter_path / ".lock"
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        return (
            f"adapter_path {adapter_path} is in use by another trainer (pid {holder}); wait "
            "for it to finish, or give this job its own adapter_path"
        )
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass  # a full disk: holding the lock is what matters
    _ADAPTER_LOCK.append(fd)
    return None


class _LogFile:
    """The log file, minus its failures: a full disk must stop the run at its next
    checkpoint, with a clear reason, not crash it in the middle of a log line."""

    def __init__(self, handle):
        self.handle = handle

    def write(self, text: str) -> int:
        try:
            return self.handle.write(text)
        except OSError:
            return 0

    def flush(self) -> None:
        try:
            self.handle.flush()
        except OSError:
            pass


def run(
    config_path: str | Path | None,
    *,
    fresh: bool = False,
    settings: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    telemetry_endpoint: str | None = None,
    job_id: str = "",
    attempt: int = 0,
    rung: int = 0,
    show_progress: bool | None = None,
    keys_dir: str | None = None,
    budget_mb: float | None = None,
    preflight_only: bool = False,
    test_only: bool = False,
) -> int:
    """Run one attempt of a job and return its exit code. Never raises.

    ``config_path`` None: the job is ``settings`` alone (``loractl train --model M --data
    D``). ``test_only`` (``--test`` without training, as mlx_lm.lora takes it) evaluates the
    adapters in adapter_path on the test set and prints the test loss and perplexity.

    ``settings`` change the job itself, as the command line's flags do (``--iters 8`` makes
    an 8-iteration job); ``overrides`` are a ladder rung's, which change how the job runs but
    never its length. ``budget_mb`` is the memory budget the pre-flight holds the attempt to
    (the supervisor's guard's); without it, the job's memory_budget_mb or a share of RAM.

    With ``preflight_only`` (`loractl fit`) it stops after the pre-flight, prints its detail
    as one JSON line on stdout and returns DONE or DOES_NOT_FIT; the job's own adapter folder
    is never touched (nor its lock taken): the attempt runs in a temporary one.
    """
    if os.environ.get("LORACTL_FAULT_EARLY_EXIT"):
        # Test hook: die the way a broken install does, before the first heartbeat.
        print("loractl: simulated start-up failure (LORACTL_FAULT_EARLY_EXIT)", file=sys.stderr)
        return ExitCode.CRASH
    try:
        # The run's length comes from the submitted job: a ladder rung that halves
        # batch_size must not halve the number of examples the job trains on.
        base = load_job(config_path, settings or None)
        cfg = base.with_overrides(overrides) if overrides else base
        if test_only:
            for warning in base.warnings:
                print(f"loractl: warning: {warning}", file=sys.stderr)
            return evaluate_adapters(cfg)
        if preflight_only:
            import tempfile

            scratch = tempfile.mkdtemp(prefix="loractl-fit-")
            cfg = cfg.with_overrides({"adapter_path": scratch, "preflight": True})
        world = init_world(cfg)
        keys_problem = _telemetry_keys_problem(telemetry_endpoint, keys_dir)
    except DataFileError as exc:
        # A data file swapped for a FIFO or a device after submit: bad data, not bad config.
        print(f"loractl: data error: {exc}", file=sys.stderr)
        return ExitCode.DATA_ERROR
    except ConfigError as exc:
        print(f"loractl: config error: {exc}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR
    if keys_problem:
        print(f"loractl: config error: {keys_problem}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR
    rank = world.rank()
    for warning in base.warnings:
        if rank == 0:
            print(f"loractl: warning: {warning}", file=sys.stderr)
    adapter_path = Path(cfg.adapter_path)
    try:
        adapter_path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"loractl: config error: adapter_path {adapter_path}: {exc}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR
    # Only rank 0 writes to the folder, so only it takes the lock: the other ranks of the
    # same job would otherwise find it busy.
    busy = lock_adapter_folder(adapter_path) if rank == 0 else None
    if busy:
        print(f"loractl: {busy}", file=sys.stderr)
        return ExitCode.ADAPTER_BUSY
    configure_logging(
        adapter_path / (LOG_FILE if rank == 0 else RANK_LOG_PATTERN.format(rank=rank))
    )
    for warning in base.warnings:
        log.warning("config", warning=warning)
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    session = TrainingSession(
        cfg,
        world=world,
        base_cfg=base,
        fresh=fresh,
        telemetry_endpoint=telemetry_endpoint,
        keys_dir=keys_dir,
        job_id=job_id or cfg.name,
        supervised=telemetry_endpoint is not None,
        attempt=attempt,
        rung=rung,
        show_progress=show_progress,
        budget_mb=budget_mb,
    )
    if not preflight_only:
        return session.run()
    session.preflight_only = True
    try:
        return session.run()
    finally:
        shutil.rmtree(adapter_path, ignore_errors=True)


def _telemetry_keys_problem(endpoint: str | None, keys_dir: str | None) -> str:
    """Why the telemetry channel cannot be secured, or "": over tcp:// (ranks on other Macs)
    it needs this install's CURVE keys, copied from the supervisor's Mac."""
    from loractl.keys import MissingKeys, UnsafeKeys, is_tcp, load_keys

    if not endpoint or not is_tcp(endpoint):
        return ""
    if not keys_dir:
        return f"telemetry over {endpoint} needs --keys-dir, the supervisor's keys folder"
    try:
        load_keys(keys_dir)
    except (MissingKeys, UnsafeKeys) as exc:
        return str(exc)
    return ""


class TrainingSession:
    """Everything one attempt needs, wired together; ``run`` maps outcomes to exit codes."""

    # `loractl fit`: stop after the pre-flight, printing its detail on stdout.
    preflight_only = False

    def __init__(
        self,
        cfg: JobConfig,
        *,
        world=None,
        base_cfg: JobConfig | None = None,
        fresh: bool,
        telemetry_endpoint: str | None,
        job_id: str,
        attempt: int,
        rung: int,
        show_progress: bool,
        supervised: bool = False,
        keys_dir: str | None = None,
        budget_mb: float | None = None,
    ):
        from loractl.daemon.preflight import default_budget_mb
        from loractl.daemon.telemetry import Requests, Telemetry, new_progress

        self.cfg = cfg
        self.base_cfg = base_cfg or cfg
        self.fresh = fresh
        self.rung = rung
        self.world = world if world is not None else init_world(cfg)
        self.rank = self.world.rank()
        self.world_size = self.world.size()
        # One progress bar per job, not one per rank on the same terminal.
        self.show_progress = show_progress and self.rank == 0
        self.progress = new_progress(job_id, attempt, rung, self.rank, self.world_size)
        self.requests = Requests()
        self.telemetry = Telemetry(
            telemetry_endpoint,
            self.progress,
            self.requests,
            cfg.heartbeat_interval,
            keys_dir=keys_dir,
            lost_after=cfg.heartbeat_timeout,
        )
        self.adapter_path = Path(cfg.adapter_path)
        self.job_id = job_id
        self.supervised = supervised
        self._signals_seen = 0
        self.collective_watch: CollectiveWatch | None = None
        self.budget_mb = budget_mb if budget_mb else default_budget_mb(cfg)
        self.weights_mb = 0.0
        self.fixed_mb = 0.0
        # While True, a stop request ends the attempt at once (StoppedBeforeTraining): it
        # is loading or in the pre-flight, with nothing to checkpoint. A FIFO or a dead mount
        # can block it there for ever, and a cancel should not wait out the grace for that.
        self._stop_at_once = False
        self._loading_lock = threading.Lock()
        self._loading_what = ""
        self._loading_sent = 0.0

    def start_over_hint(self) -> str:
        """How to discard the checkpoints and train from the start, for whoever runs us."""
        if self.supervised:
            return f"run `loractl retry --fresh {self.job_id}` to train it from the start"
        return "pass --fresh to train it from the start"

    # -- top level -------------------------------------------------------------------------

    def run(self) -> int:
        self._install_signal_handlers()
        self.telemetry.start()
        log.info("attempt starting", pid=os.getpid(), config=self.cfg.to_dict(), rung=self.rung)
        try:
            return self._run()
        except StoppedBeforeTraining:
            self._stop_at_once = False
            return self._stopped_before_training()
        except ConfigError as exc:
            return self._fail(ExitCode.CONFIG_ERROR, f"config error: {exc}")
        except ModelError as exc:
            return self._fail(ExitCode.CONFIG_ERROR, f"model error: {exc}")
        except Exception as exc:
            from loractl.daemon.data import DataError

            if isinstance(exc, DataError):
                return self._fail(ExitCode.DATA_ERROR, f"data error: {exc}")
            if is_disk_full_error(exc) or (_is_write_failure(exc) and self._disk_nearly_full()):
                return self._fail(ExitCode.DISK_FULL, self._disk_full_words())
            if is_resource_limit_text(str(exc)):
                return self._fail(ExitCode.CRASH, resource_limit_words(exc))
            if is_memory_exception(exc):
                return self._fail(ExitCode.OUT_OF_MEMORY, f"out of memory: {exc}")
            if self.world_size > 1 and PEER_LOST_TEXT in str(exc):
                # Not this rank's fault: the dead peer's own exit (or its silence) says why.
                return self._fail(
                    ExitCode.CRASH, f"a peer rank was lost (rank {self.rank}): {exc}", True
                )
            traceback.print_exc()
            return self._fail(ExitCode.CRASH, f"crashed: {type(exc).__name__}: {exc}")
        finally:
            self.telemetry.close()

    def _existing_adapter_folder(self) -> Path:
        folder = self.adapter_path
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        return folder

    def _disk_nearly_full(self) -> bool:
        try:
            return shutil.disk_usage(self._existing_adapter_folder()).free < DISK_FULL_BELOW
        except OSError:
            return False

    def _disk_full_words(self) -> str:
        folder = self._existing_adapter_folder()
        try:
            free = f"{shutil.disk_usage(folder).free / MB:.0f} MB free"
        except OSError:
            free = "no space"
        again = f"`loractl resume {self.job_id}`" if self.supervised else "the same command again"
        return (
            f"disk full: {free} on {folder}; the last complete checkpoint is kept. Free some "
            f"space, then {again} continues from it"
        )

    def _fail(self, code: ExitCode, message: str, peer_lost: bool = False) -> int:
        """Announce the failure (``peer_lost``: only because another rank went away, so the
        supervisor blames that rank, not this one) and return the exit code."""
        print(f"loractl: {message}", file=sys.stderr)
        log.error("attempt failed", exit_code=int(code), reason=message)
        extra = {"peer_lost": True} if peer_lost else {}
        self.telemetry.event("error", exit_code=int(code), reason=message, **extra)
        return int(code)

    def _install_signal_handlers(self) -> None:
        def request_stop(signum, _frame):
            self._signals_seen += 1
            if self._signals_seen > 1:
                # A second ^C means "now": skip the final checkpoint.
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            self.requests.stop.set()
            if self._stop_at_once:
                # Raised where the main thread is, a blocking open() or read() included
                # (PEP 475 retries a call only when the handler returns normally).
                self._stop_at_once = False
                raise StoppedBeforeTraining()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        if self.world_size > 1:
            self.collective_watch = CollectiveWatch(self)
            self.collective_watch.start()

    def touch(self) -> None:
        """The main thread is back in Python (a hook ran): see ``CollectiveWatch``."""
        if self.collective_watch is not None:
            self.collective_watch.touch()

    def loading_progress(self, what: str | None = None) -> None:
        """A sign of life before training (``what``: the stage it reached, or None: more of
        the same), sent as a "loading" trainer event at most every few seconds. The
        supervisor counts it as progress; without it a trainer stuck while loading is a hang.
        Called from the main thread and from ``LoadWatch``'s."""
        now = time.monotonic()
        with self._loading_lock:
            if what is not None:
                self._loading_what = what
            if now - self._loading_sent < LOADING_EVENT_EVERY_S and what is None:
                return
            self._loading_sent = now
            stage = self._loading_what
        self.telemetry.event("loading", stage=stage, phase=self.progress.phase)

    def _stopped_before_training(self) -> int:
        """The stop came while loading or in the pre-flight: exit 82 at once."""
        log.info("stopped before training", phase=self.progress.phase)
        self.telemetry.event("stopped", step=self.progress.step, before_training=True)
        print(
            f"loractl: stopped while {self._loading_what or self.progress.phase}, before "
            "training; the checkpoints are as they were. Run the same command again to resume",
            file=sys.stderr,
        )
        return ExitCode.STOPPED

    # -- the attempt -----------------------------------------------------------------------

    def _run(self) -> int:
        from loractl.daemon.data import hub_dataset_names, uses_hub_data
        from loractl.daemon.hub import prepare_hub_access

        cfg = self.cfg
        self.progress.phase = "loading"
        self._stop_at_once = True
        if self.requests.stop.is_set():
            raise StoppedBeforeTraining()  # the signal came before the handler could raise
        hub_online = True
        model_from_hub = not Path(cfg.model).is_absolute()
        if model_from_hub or uses_hub_data(cfg):
            # Before anything imports huggingface_hub: with no network it and datasets retry
            # for ~25 s; offline mode makes them use the local cache or fail at once.
            hub_online = prepare_hub_access()
            if not hub_online:
                wanted = ([cfg.model] if model_from_hub else []) + (
                    hub_dataset_names(cfg) if uses_hub_data(cfg) else []
                )
                log.warning("hub unreachable; offline mode", wanted=wanted)
                print(
                    "loractl: the Hugging Face Hub cannot be reached; using the local cache for "
                    + ", ".join(wanted),
                    file=sys.stderr,
                )
        return self._train(hub_online)

    def _train(self, hub_online: bool) -> int:
        import mlx.core as mx

        from loractl.checkpoints import CHECKPOINT_DIR
        from loractl.daemon.checkpoint import CheckpointStore
        from loractl.daemon.data import ExampleOrder, load_datasets
        from loractl.daemon.loadwatch import LoadWatch, hub_cache_folder
        from loractl.daemon.loop import LoopPlan, LoopState, OutOfMemory, train
        from loractl.daemon.preflight import weights_mb

        cfg = self.cfg
        callback = self._reporting_callback()
        self.loading_progress("loading the model")
        with LoadWatch(self.loading_progress, download=hub_cache_folder(cfg.model)):
            model, tokenizer = self._load_model()
        self.loading_progress("reading and tokenizing the data")
        datasets = load_datasets(
            cfg, tokenizer, hub_online=hub_online, progress=self.loading_progress
        )
        self.loading_progress("evaluating the weights")
        # Seed before the LoRA layers are made: their initial A matrices are random.
        mx.random.seed(cfg.seed)
        self._apply_adapters(model)
        # The fixed part, for the pre-flight's report: the weights with the adapters, before
        # a checkpoint, an optimizer state or a batch adds anything. (Evaluating the adapters'
        # initial values now rather than in the first step draws no random numbers: those
        # were drawn when the layers were made.)
        mx.eval(model.parameters())
        self.weights_mb = weights_mb()
        # The same in the pre-flight peak's meter (the larger of MLX's and the process
        # footprint): the part no rung moves, for the supervisor's memory model.
        from loractl.memory import footprint_mb

        self.fixed_mb = max(self.weights_mb, footprint_mb(os.getpid()))
        self.loading_progress("resuming from the checkpoints")
        optimizer = self._build_optimizer()
        store = CheckpointStore(self.adapter_path / CHECKPOINT_DIR, keep=cfg.keep_checkpoints)
        if self.fresh and self.rank == 0:
            shutil.rmtree(store.root, ignore_errors=True)
        # No rank may read the checkpoints while rank 0 may still be deleting them.
        barrier(self.world)
        resumed = self._resume(store, model, optimizer)
        saved = resumed[1] if resumed else {}
        state = resumed[0] if resumed else LoopState()
        self._agree_on_start(state)
        # The data order and the run's length were fixed by the attempt that started the run;
        # a later attempt (a rung, a changed batch_size) keeps them, so no data repeats.
        order_batch_size = saved.get("order", {}).get("batch_size") or self.base_cfg.batch_size
        order = ExampleOrder(datasets.train.lengths, order_batch_size, cfg.seed)
        total = saved.get("total_examples") or self.base_cfg.total_examples(order.epoch_length)
        if resumed and state.examples_seen >= total:
            return self._already_complete(state, total)
        if state.step == 0 and cfg.resume_adapter_file:
            model.load_weights(cfg.resume_adapter_file, strict=False)
        # From here on the attempt writes to the adapter folder: a stop waits for a step.
        self._stop_at_once = False
        if self.rank == 0:
            self._write_adapter_config(total, order_batch_size)
        # The model, data and transformers' import leave ~100k long-lived objects; freezing
        # them keeps the periodic gc.collect() of the memory hygiene from rescanning them
        # (30-60 ms each time on the tiny model).
        gc.collect()
        gc.freeze()

        plan = LoopPlan(
            total_examples=total,
            batch_size=cfg.batch_size,
            grad_accumulation_steps=cfg.grad_accumulation_steps,
            max_seq_length=cfg.max_seq_length,
            seed=cfg.seed,
            steps_per_eval=cfg.steps_per_eval,
            val_batches=cfg.val_batches,
            clear_cache_threshold=cfg.clear_cache_threshold,
            order_batch_size=order_batch_size,
            rank=self.rank,
            world_size=self.world_size,
        )
        self.progress.total_examples = total
        self.progress.examples_seen = state.examples_seen
        self.progress.step = state.step
        try:
            from mlx_lm.utils import maybe_set_recommended_wired_limit

            maybe_set_recommended_wired_limit()
        except ImportError:
            pass
        if cfg.grad_checkpoint:
            from mlx_lm.tuner.trainer import grad_checkpoint

            grad_checkpoint(model.layers[0])
        if cfg.preflight:
            if self.requests.stop.is_set():
                raise StoppedBeforeTraining()
            # A stop asked for during the pre-flight (most often the guard's, when the longest
            # batch crosses the budget) ends the attempt once the reading is sent: that reading
            # is what the step down predicts the other rungs from. The pre-flight reads no file
            # and takes one batch's forward and backward, so nothing can hold the stop for long.
            stopped = self._preflight(model, datasets, plan, order, state)
            if stopped is not None:
                return stopped
            if self.requests.stop.is_set():
                raise StoppedBeforeTraining()
        if self.preflight_only:
            return ExitCode.DONE
        hooks = TrainerHooks(self, model, optimizer, store, plan, order, callback)
        self.progress.phase = "train"
        log.info(
            "training",
            total_examples=total,
            epoch_examples=order.epoch_length,
            examples_seen=state.examples_seen,
            step=state.step,
            iteration=state.iteration,
            plan=asdict(plan),
            data=datasets.source,
        )
        try:
            with hooks.display:
                outcome = train(
                    model=model,
                    optimizer=optimizer,
                    train_set=datasets.train,
                    val_set=datasets.valid,
                    plan=plan,
                    state=state,
                    hooks=hooks,
                )
        except OutOfMemory as exc:
            if self.rank == 0:
                hooks.checkpoint_boundary(exc.boundary)
            if exc.resource_limit:
                return self._fail(ExitCode.CRASH, resource_limit_words(exc))
            return self._fail(ExitCode.OUT_OF_MEMORY, f"out of memory twice in one step: {exc}")
        finally:
            # A crash between checkpoints: a periodic one still being written lands first.
            hooks.close()
        if outcome == "stopped":
            log.info("stopped on request", step=state.step)
            self.telemetry.event("stopped", step=state.step)
            print(
                f"loractl: stopped at step {state.step} after a checkpoint; "
                "run the same command again to resume",
                file=sys.stderr,
            )
            return ExitCode.STOPPED
        self._finish(model, datasets, plan)
        return ExitCode.DONE

    def _preflight(self, model, datasets, plan, order, state) -> int | None:
        """Run the attempt's longest batch before its first step (see ``preflight.py``);
        report it, and return ExitCode.DOES_NOT_FIT when its peak is over the budget."""
        from loractl.daemon.faults import stop_in_preflight
        from loractl.daemon.preflight import run_preflight

        self.progress.phase = "preflight"
        self.touch()
        stop_in_preflight()
        result = run_preflight(
            model,
            datasets.train,
            datasets.valid,
            order=order,
            start=state.examples_seen,
            total=plan.total_examples,
            batch_size=plan.batch_size,
            max_seq_length=plan.max_seq_length,
            val_batches=plan.val_batches,
            seed=plan.seed,
            budget_mb=self.budget_mb,
            weights=self.weights_mb,
            clear_cache_threshold=plan.clear_cache_threshold,
            rank=self.rank,
            world_size=self.world_size,
            world=self.world,
        )
        self.touch()
        detail = result.detail()
        log.info("preflight", line=result.summary(), **detail)
        rank = f" (rank {self.rank})" if self.world_size > 1 else ""
        print(f"loractl: {result.summary()}{rank}", file=sys.stderr)
        self.telemetry.event("preflight", **detail, fixed_mb=round(self.fixed_mb, 1))
        if self.preflight_only and self.rank == 0:
            line = {"preflight": {**detail, "fixed_mb": round(self.fixed_mb, 1)}}
            print(json.dumps(line, sort_keys=True), flush=True)
        if result.fits:
            return None
        return self._fail(ExitCode.DOES_NOT_FIT, result.does_not_fit_words(self.world_size))

    def _agree_on_start(self, state) -> None:
        """Every rank resumed from the same step, or none trains.

        The ranks read the same checkpoint folder after a barrier, so they agree unless the
        folder is not shared (ranks on other hosts) or a rank could not read a checkpoint.
        """
        if self.world_size == 1:
            return
        import mlx.core as mx

        mine = mx.array([state.step, state.examples_seen], dtype=mx.int64)
        low = mx.distributed.all_min(mine, group=self.world)
        high = mx.distributed.all_max(mine, group=self.world)
        if not mx.array_equal(low, high).item():
            raise ConfigError(
                f"the ranks resumed from different steps ({low[0].item()} to {high[0].item()}); "
                f"every rank must see the checkpoints in {self.adapter_path} (a shared folder)"
            )

    def _already_complete(self, state, total: int) -> int:
        """A run whose checkpoint has consumed every example: say so, change nothing."""
        adapters = self.adapter_path / "adapters.safetensors"
        message = (
            f"{self.cfg.name} is already complete: step {state.step}, {state.examples_seen} of "
            f"{total} examples trained; the adapters are in {adapters}. Nothing to do; "
            + self.start_over_hint()
        )
        log.info("already complete", step=state.step, examples_seen=state.examples_seen)
        print(f"loractl: {message}", file=sys.stderr)
        self.progress.phase = "done"
        self.telemetry.event("done", adapter_path=str(self.adapter_path), already_complete=True)
        return ExitCode.DONE

    def _reporting_callback(self):
        """mlx-lm's wandb / swanlab callback for report_to, or None."""
        cfg = self.cfg
        if not cfg.report_to:
            return None
        from mlx_lm.tuner.callbacks import get_reporting_callbacks

        try:
            return get_reporting_callbacks(
                cfg.report_to,
                project_name=cfg.project_name,
                log_dir=str(self.adapter_path),
                config=cfg.mlx_lm_args(),
            )
        except (ImportError, ValueError) as exc:
            raise ConfigError(f"report_to: {exc}") from None

    def _load_model(self):
        return load_model(self.cfg)

    def _apply_adapters(self, model) -> None:
        apply_lora(model, self.cfg)

    def _build_optimizer(self):
        import mlx.optimizers as optim
        from mlx_lm.tuner.utils import build_schedule

        cfg = self.cfg
        learning_rate = build_schedule(cfg.lr_schedule) if cfg.lr_schedule else cfg.learning_rate
        classes = {
            "adam": optim.Adam,
            "adamw": optim.AdamW,
            "muon": optim.Muon,
            "sgd": optim.SGD,
            "adafactor": optim.Adafactor,
        }
        options = cfg.optimizer_config.get(cfg.optimizer, {}) or {}
        try:
            return classes[cfg.optimizer](learning_rate=learning_rate, **options)
        except TypeError as exc:
            raise ConfigError(f"optimizer_config.{cfg.optimizer}: {exc}") from None

    def settings(self) -> dict[str, Any]:
        """The settings a ladder rung or a user may change between attempts of one run."""
        cfg = self.cfg
        return {
            "batch_size": cfg.batch_size,
            "grad_accumulation_steps": cfg.grad_accumulation_steps,
            "max_seq_length": cfg.max_seq_length,
            "lora_rank": cfg.lora_parameters.rank,
            "num_layers": cfg.num_layers,
            "grad_checkpoint": cfg.grad_checkpoint,
        }

    def _resume(self, store, model, optimizer):
        """Restore the newest valid checkpoint into model and optimizer, if there is one.

        Returns (LoopState, the checkpoint's state.json) or None.
        """
        import mlx.core as mx
        import numpy as np
        from mlx.utils import tree_flatten, tree_unflatten

        from loractl.daemon.adapters import reconcile
        from loractl.daemon.loop import LoopState

        checkpoint, skipped = store.newest_valid()
        for reason in skipped:
            log.warning("checkpoint skipped", reason=reason)
            print(f"loractl: skipping damaged checkpoint: {reason}", file=sys.stderr)
        if checkpoint is None:
            if skipped:
                self._say_started_over(skipped)
            return None
        saved = checkpoint.state
        if saved.get("config_hash") != self.cfg.identity_hash():
            raise ConfigError(
                f"the checkpoints in {store.root} belong to a different run (model, data, seed "
                "or schedule changed); " + self.start_over_hint()
            )
        expected = {k: tuple(v.shape) for k, v in tree_flatten(model.trainable_parameters())}
        tensors = {k: np.array(v) for k, v in mx.load(str(checkpoint.adapters_file)).items()}
        fitted, notes = reconcile(tensors, expected, seed=self.cfg.seed)
        model.load_weights([(k, mx.array(v)) for k, v in fitted.items()], strict=False)
        optimizer.init(model.trainable_parameters())
        opt_saved = mx.load(str(checkpoint.optimizer_file))
        if notes:
            # The adapter changed shape (a rank step or fewer layers): the old moments no
            # longer describe it, but the step count keeps the schedule where it was.
            if "step" in opt_saved:
                optimizer.state["step"] = opt_saved["step"]
            for note in notes:
                log.info("adapter converted", note=note)
        else:
            optimizer.state = tree_unflatten(list(opt_saved.items()))
        mx.eval(model.parameters(), optimizer.state)
        examples_seen = saved["examples_seen"]
        previous = saved.get("settings", {})
        state = LoopState(
            step=saved["step"],
            # Checkpoints from before iterations were counted: the micro-batches so far.
            iteration=saved.get("iteration")
            or -(-examples_seen // previous.get("batch_size", self.cfg.batch_size)),
            examples_seen=examples_seen,
            tokens_seen=saved.get("tokens_seen", 0),
            loss_history=saved.get("loss_history", []),
            val_history=saved.get("val_history", []),
        )
        self.progress.last_checkpoint_step = state.step
        log.info(
            "resumed",
            checkpoint=str(checkpoint.path),
            step=state.step,
            examples_seen=state.examples_seen,
            converted=notes,
        )
        print(
            f"loractl: resumed from {checkpoint.path.name} "
            f"(step {state.step}, {state.examples_seen} examples seen)",
            file=sys.stderr,
        )
        self._say_changes(previous, notes)
        return state, saved

    def _say_started_over(self, skipped: list[str]) -> None:
        """Every checkpoint was damaged: the run starts again from step 0. Said on stderr, in
        train.log and to the supervisor (for the job's history and `show`), never silently."""
        reason = f"all {len(skipped)} checkpoints failed their checksums; starting over from step 0"
        log.warning("started over", reason=reason, skipped=skipped)
        print(f"loractl: {reason}", file=sys.stderr)
        self.telemetry.event(
            STARTED_OVER_EVENT, reason=reason, checkpoints=len(skipped), first=skipped[0][:300]
        )

    def _say_changes(self, previous: dict[str, Any], notes: list[str]) -> None:
        """Tell the terminal, not only train.log, what this attempt runs differently."""
        changes = [
            f"{name} {previous[name]} -> {value}"
            for name, value in self.settings().items()
            if name in previous and previous[name] != value
        ]
        if not changes and not notes:
            return
        if changes:
            rung = f" (ladder rung {self.rung})" if self.rung else ""
            print(
                f"loractl: resuming with changed settings{rung}: " + ", ".join(changes),
                file=sys.stderr,
            )
            log.info("settings changed", changes=changes, rung=self.rung)
        converted = [n for n in notes if "by SVD" in n]
        if converted:
            print(
                f"loractl: adapter converted: {len(converted)} LoRA layers "
                + converted[0].split(": ", 1)[1]
                + "; the optimizer moments restart",
                file=sys.stderr,
            )
        others = [n for n in notes if "by SVD" not in n]
        for note in others[:3]:
            print(f"loractl: adapter: {note}", file=sys.stderr)
        if len(others) > 3:
            print(
                f"loractl: adapter: ... and {len(others) - 3} more (see train.log)", file=sys.stderr
            )

    def _write_adapter_config(self, total_examples: int, order_batch_size: int) -> None:
        """mlx-lm's adapter_config.json, recording what runs: ``iters`` is the run's length
        in iterations (what ``epochs`` came to), not the config's unused default."""
        from loractl.atomic import atomic_write_bytes

        args = self.cfg.mlx_lm_args()
        args["iters"] = -(-total_examples // max(order_batch_size, 1))
        body = json.dumps(args, indent=4, sort_keys=True).encode()
        atomic_write_bytes(self.adapter_path / "adapter_config.json", body)

    def _finish(self, model, datasets, plan) -> None:
        from loractl.daemon.loop import evaluate

        self.write_adapters(model)
        if self.cfg.test and datasets.test is not None:
            test_plan = type(plan)(**{**asdict(plan), "val_batches": self.cfg.test_batches})
            test_loss = evaluate(model, datasets.test, test_plan)
            log.info("test", test_loss=test_loss)
            perplexity = math.exp(test_loss) if test_loss == test_loss else float("nan")
            print(
                f"loractl: test loss {test_loss:.3f}, test perplexity {perplexity:.3f}",
                file=sys.stderr,
            )
        # A rank announces "done" only once rank 0's adapters are on disk.
        barrier(self.world)
        self.progress.phase = "done"
        log.info("done", adapter_path=str(self.adapter_path))
        if self.rank == 0 and not self.supervised:
            print(
                f"loractl: done: step {self.progress.step}; adapters in "
                f"{self.adapter_path / 'adapters.safetensors'}",
                file=sys.stderr,
            )
        self.telemetry.event("done", adapter_path=str(self.adapter_path))

    def write_adapters(self, model, *names: str) -> None:
        """mlx-lm's adapter file (and any ``names`` beside it), each written atomically so a
        reader (mlx_lm.generate, a resume_adapter_file) never sees half of one. Rank 0's
        alone: every rank holds the same weights."""
        if self.rank != 0:
            return
        import mlx.core as mx
        from mlx.utils import tree_flatten

        weights = dict(tree_flatten(model.trainable_parameters()))
        for name in ("adapters.safetensors", *names):
            target = self.adapter_path / name
            tmp = target.with_name(f".{target.stem}.tmp-{os.getpid()}.safetensors")
            mx.save_safetensors(str(tmp), weights)
            with tmp.open("rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, target)

    def write_adapter_bytes(self, blob: bytes, *names: str) -> None:
        """``write_adapters`` for adapters already made into safetensors bytes (by the
        caller's thread; this one may be the hooks' writer thread): each file written to a
        hidden name, fsynced and renamed into place. Default: adapters.safetensors."""
        for name in names or ("adapters.safetensors",):
            atomic_write_bytes(self.adapter_path / name, blob)


def load_model(cfg: JobConfig):
    """The model and tokenizer, with mlx-lm's own loader; ModelError for a bad one."""
    from mlx_lm.utils import load

    model_dir = Path(cfg.model)
    if cfg.model.startswith(("/", ".", "~")) and not model_dir.exists():
        raise ModelError(f"model path {cfg.model} does not exist")
    try:
        return load(
            cfg.model,
            tokenizer_config={"trust_remote_code": cfg.trust_remote_code},
            trust_remote_code=cfg.trust_remote_code,
        )
    except (FileNotFoundError, ValueError, OSError, KeyError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot load model {cfg.model}: {exc}") from None
    except Exception as exc:
        # huggingface_hub raises its own types when the name is not a local folder and
        # there is no network; to the user that is the same "model not found".
        if "hub" in type(exc).__module__ or "Repository" in type(exc).__name__:
            raise ModelError(f"cannot load model {cfg.model}: {exc}") from None
        raise


def apply_lora(model, cfg: JobConfig) -> None:
    """Freeze the model and make its trained layers LoRA (or DoRA, or unfrozen for full)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    layers = len(model.layers)
    if cfg.num_layers > layers:
        raise ModelError(f"num_layers is {cfg.num_layers} but the model has only {layers} layers")
    if cfg.fine_tune_type == "full":
        for layer in model.layers[-max(cfg.num_layers, 0) :]:
            layer.unfreeze()
        return
    params = asdict(cfg.lora_parameters)
    if params.get("keys") is None:
        params.pop("keys")
    linear_to_lora_layers(model, cfg.num_layers, params, use_dora=cfg.fine_tune_type == "dora")


def evaluate_adapters(cfg: JobConfig) -> int:
    """``--test`` without training, as mlx_lm.lora runs it: load the model and the adapters
    in adapter_path (as adapter_config.json describes them, with mlx-lm's ``load_adapters``),
    evaluate ``test_batches`` batches of test.jsonl and print "Test loss X, Test ppl Y."."""
    import mlx.core as mx

    from loractl.daemon.data import DataError, load_datasets
    from loractl.daemon.loop import LoopPlan, evaluate

    adapter_path = Path(cfg.adapter_path)
    if not (adapter_path / "adapters.safetensors").is_file():
        print(
            f"loractl: config error: no adapters to test in {adapter_path} "
            "(adapters.safetensors); train first, or point --adapter-path at them",
            file=sys.stderr,
        )
        return ExitCode.CONFIG_ERROR
    try:
        from mlx_lm.tuner.utils import load_adapters

        model, tokenizer = load_model(cfg)
        datasets = load_datasets(cfg.with_overrides({"test": True}), tokenizer, only_test=True)
        model.freeze()
        load_adapters(model, str(adapter_path))
    except ModelError as exc:
        print(f"loractl: config error: {exc}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR
    except (DataError, ConfigError) as exc:
        print(f"loractl: data error: {exc}", file=sys.stderr)
        return ExitCode.DATA_ERROR
    mx.random.seed(cfg.seed)
    plan = LoopPlan(
        total_examples=0,
        batch_size=cfg.batch_size,
        grad_accumulation_steps=1,
        max_seq_length=cfg.max_seq_length,
        seed=cfg.seed,
        steps_per_eval=1,
        val_batches=cfg.test_batches,
    )
    assert datasets.test is not None
    loss = evaluate(model, datasets.test, plan)
    print(f"Test loss {loss:.3f}, Test ppl {math.exp(loss):.3f}.", flush=True)
    return ExitCode.DONE


def main(argv: list[str] | None = None) -> int:
    """Entry point the supervisor spawns: ``python -m loractl.daemon.trainer CONFIG ...``."""
    import argparse

    parser = argparse.ArgumentParser(prog="loractl-trainer")
    parser.add_argument("config", nargs="?", help="the job config; none: --settings alone")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--telemetry")
    parser.add_argument(
        "--keys-dir", help="this install's CURVE keys folder; required for a tcp:// --telemetry"
    )
    parser.add_argument("--job-id", default="")
    parser.add_argument("--attempt", type=int, default=0)
    parser.add_argument("--rung", type=int, default=0)
    parser.add_argument(
        "--settings", default="{}", help="JSON object of job settings (as command-line flags)"
    )
    parser.add_argument(
        "--overrides", default="{}", help="JSON object of a ladder rung's config overrides"
    )
    parser.add_argument(
        "--budget-mb",
        type=float,
        default=None,
        help="the memory budget the pre-flight holds this attempt to, in MB (the supervisor "
        "passes its guard's); default: the job's memory_budget_mb, else 70%% of RAM (or of "
        "a lower cgroup limit)",
    )
    parser.add_argument(
        "--preflight-only",
        action="store_true",
        help="run the pre-flight alone (`loractl fit`): print its detail as one JSON line, "
        "exit 0 if it fits and 83 if not; nothing is written to the adapter folder",
    )
    parser.add_argument(
        "--test-only",
        action="store_true",
        help="evaluate the adapters in adapter_path on the test set, as mlx_lm.lora --test "
        "without --train does; nothing is trained or written",
    )
    args = parser.parse_args(argv)
    # Before the model loads, so that none of its buffers land in a heap that never shrinks.
    return_freed_buffers_to_the_os()
    return run(
        args.config,
        fresh=args.fresh,
        settings=json.loads(args.settings),
        overrides=json.loads(args.overrides),
        telemetry_endpoint=args.telemetry,
        job_id=args.job_id,
        attempt=args.attempt,
        rung=args.rung,
        keys_dir=args.keys_dir,
        budget_mb=args.budget_mb,
        preflight_only=args.preflight_only,
        test_only=args.test_only,
    )


if __name__ == "__main__":
    sys.exit(main())
