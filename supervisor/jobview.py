"""How a stored job reads to a user: the summary `list` shows and the whole of `show`.

Built from the store and the job's folder alone, so the same view answers through the
supervisor (with the live attempt's pid and ranks added) and, read-only, from the database
when the supervisor is not running. Nothing here imports mlx.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from loractl.checkpoints import CHECKPOINT_DIR, STATE_FILE, CheckpointReader, state_checksum
from loractl.config import ConfigError, JobConfig, load_config
from loractl.memory import memory_limit_mb
from loractl.protocol import JobState
from loractl.supervisor.ladder import effective_config
from loractl.supervisor.ladderplan import ladder_view
from loractl.supervisor.store import Job, Store
from loractl.terminal import shell_join

# Without memory_budget_mb, a job may use this share of the machine's memory.
DEFAULT_BUDGET_FRACTION = 0.7


def budget_mb(cfg: JobConfig, default_fraction: float = DEFAULT_BUDGET_FRACTION) -> float:
    """The memory budget the guard holds the job to, in MB."""
    if cfg.memory_budget_mb:
        return float(cfg.memory_budget_mb)
    return memory_limit_mb() * default_fraction


def recent_rejections(inbox: Path, limit: int | None) -> list[dict[str, Any]]:
    """Files the inbox turned away, newest first, each with the reason it wrote for it."""
    from loractl.supervisor.inbox import REJECTED

    found: list[dict[str, Any]] = []
    try:
        entries = list(os.scandir(inbox / REJECTED))
    except OSError:
        return []
    for entry in entries:
        if not entry.name.endswith(".error.txt") or entry.name.startswith("."):
            continue
        try:
            at = entry.stat().st_mtime
            with open(entry.path, encoding="utf-8", errors="replace") as handle:
                reason = handle.read(4096).strip()
        except OSError:
            continue
        found.append({"name": entry.name.removesuffix(".error.txt"), "reason": reason, "at": at})
    found.sort(key=lambda item: item["at"], reverse=True)
    return found if limit is None else found[:limit]


def use_with(model: str | None, adapter_path: str | None) -> str | None:
    """How to try the adapters, once there are any, with a command that exists: the bare
    name when it is on PATH, else the one installed beside this interpreter. Quoted for a
    shell (``shell_join``): a path is pasted, never interpreted, and no control character in
    it reaches the terminal; `show` prints this very string."""
    if not model or not adapter_path:
        return None
    if not (Path(adapter_path) / "adapters.safetensors").is_file():
        return None
    command = ["mlx_lm.generate"]
    if shutil.which(command[0]) is None:
        beside = Path(sys.executable).parent / command[0]
        command = (
            [str(beside)] if beside.is_file() else [sys.executable, "-m", "mlx_lm", "generate"]
        )
    argv = [*command, "--model", model, "--adapter-path", adapter_path, "--prompt", "Hello"]
    return shell_join(argv)


def resolve(store: Store, ref: str) -> tuple[Job, list[str]]:
    """The job ``ref`` means (:meth:`Store.resolve`: an id, else the newest job of that
    name, else a unique id prefix), and a warning for the user when ``ref`` is a name that
    other jobs share too, naming them: the command acts on the newest, and says so."""
    job = store.resolve(ref)
    if job.id == ref or job.name != ref:
        return job, []
    others = [other.id for other in store.list() if other.name == ref and other.id != job.id]
    if not others:
        return job, []
    return job, [
        f"{len(others) + 1} jobs are named {ref!r}: this is the newest, {job.id} "
        f"({job.state}); the others are {', '.join(others)}; name a job by its id to pick "
        "another"
    ]


def summary(job: Job) -> dict[str, Any]:
    """One job as `list` shows it."""
    return {
        "id": job.id,
        "name": job.name,
        "state": str(job.state),
        "outcome": job.outcome,
        "priority": job.priority,
        "rung": job.rung,
        "attempts": job.attempt,
        "progress": {
            "examples_seen": job.examples_seen,
            "total_examples": job.total_examples,
            "step": job.step,
        },
    }


def checkpoint_progress(adapter_path: str) -> dict[str, int] | None:
    """The progress the newest checkpoint's ``state.json`` records (its own checksum holds),
    or None. Only that small file is read: `show` is polled by `watch` every few seconds."""
    reader = CheckpointReader(Path(adapter_path) / CHECKPOINT_DIR)
    name = reader.latest_name()
    if name is None:
        return None
    try:
        state = json.loads((reader.root / name / STATE_FILE).read_bytes())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(state, dict):
        return None
    claimed = state.pop("self_sha256", None)
    try:
        figures = {key: int(state.get(key) or 0) for key in ("step", "examples_seen")}
        figures["total_examples"] = int(state.get("total_examples") or 0)
    except (TypeError, ValueError):
        return None
    return figures if claimed == state_checksum(state) else None


def fresh_start_pending(job: Job, history: list[dict[str, Any]]) -> bool:
    """Whether `retry --fresh` asked the next attempt to discard the checkpoints: until it
    has, they are not this job's progress."""
    return any(
        event["kind"] == "fresh_start_requested"
        and (event.get("detail") or {}).get("attempt") == job.attempt + 1
        for event in history
    )


def last_known_progress(
    job: Job, adapter_path: str | None, history: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The job's progress as far as anything recorded it: the store's figures, or its newest
    checkpoint's when those are further on (progress the store could not take, on a full
    disk say, is still on the adapter disk). ``from_checkpoint`` says which."""
    stored: dict[str, Any] = {
        "examples_seen": job.examples_seen,
        "total_examples": job.total_examples,
        "step": job.step,
    }
    if not adapter_path or job.attempt == 0:  # a job that never ran has no progress of its own
        return stored
    if history is not None and fresh_start_pending(job, history):
        return stored
    checkpoint = checkpoint_progress(adapter_path)
    if checkpoint is None or (checkpoint["examples_seen"], checkpoint["step"]) <= (
        job.examples_seen,
        job.step,
    ):
        return stored
    return {
        "examples_seen": checkpoint["examples_seen"],
        "total_examples": checkpoint["total_examples"] or job.total_examples,
        "step": checkpoint["step"],
        "from_checkpoint": True,
    }


def partial_words(progress: dict[str, Any], cfg: JobConfig) -> str:
    """How far an unfinished job's adapters got: "step 12 of 40" (optimizer steps)."""
    step = int(progress.get("step") or 0)
    per_step = cfg.batch_size * cfg.grad_accumulation_steps
    total = int(progress.get("total_examples") or 0)
    if total and per_step:
        return f"step {step} of {-(-total // per_step)}"
    return f"step {step}"


def describe(
    job: Job,
    store: Store,
    *,
    trainer_pid: int | None = None,
    ranks: list[dict[str, Any]] | None = None,
    default_budget_fraction: float = DEFAULT_BUDGET_FRACTION,
) -> dict[str, Any]:
    """Everything `show` prints about ``job``. ``trainer_pid`` and ``ranks`` are the live
    attempt's, which only a running supervisor knows."""
    cfg: JobConfig | None
    history = store.events(job.id)
    try:
        cfg = load_config(job.config_path)
        effective = effective_config(cfg, job.rung).to_dict()
        ladder = ladder_view(job, history, cfg)
    except ConfigError as exc:
        cfg, effective, ladder = None, {"error": str(exc)}, []
    adapter_path = effective.get("adapter_path")
    progress = last_known_progress(job, adapter_path, history)
    command = use_with(effective.get("model"), adapter_path)
    return {
        **summary(job),
        "progress": progress,
        "reason": job.reason,
        "effective_config": effective,
        "trainer_pid": trainer_pid,
        "ranks": ranks or [],
        "crashes": job.crashes,
        "peak_memory_mb": job.peak_memory_mb,
        "ladder": ladder,
        "adapter_path": adapter_path,
        "use_with": command,
        # Adapters of a job that has not finished hold the training so far, not the run's.
        "adapters_partial": (
            partial_words(progress, cfg)
            if command and cfg and job.state != JobState.COMPLETED
            else None
        ),
        "job_dir": job.job_dir,
        "budget_mb": round(budget_mb(cfg, default_budget_fraction), 1) if cfg else None,
        "last_checkpoint_step": job.last_checkpoint_step,
        "history": history,
    }


def state_counts(jobs: list[Job]) -> dict[str, int]:
    """How many jobs are in each state, as `status` reports them."""
    counts: dict[str, int] = {}
    for job in jobs:
        counts[str(job.state)] = counts.get(str(job.state), 0) + 1
    return counts
