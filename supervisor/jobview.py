"""How a stored job reads to a user: the summary `list` shows and the whole of `show`.

Built from the store and the job's folder alone, so the same view answers through the
supervisor (with the live attempt's pid and ranks added) and, read-only, from the database
when the supervisor is not running. Nothing here imports mlx.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

from loractl.config import ConfigError, JobConfig, load_config
from loractl.memory import memory_limit_mb
from loractl.supervisor.ladder import effective_config
from loractl.supervisor.ladderplan import ladder_view
from loractl.supervisor.store import Job, Store

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
    shell: a path is pasted, never interpreted."""
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
    return shlex.join(argv)


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
    return {
        **summary(job),
        "reason": job.reason,
        "effective_config": effective,
        "trainer_pid": trainer_pid,
        "ranks": ranks or [],
        "crashes": job.crashes,
        "peak_memory_mb": job.peak_memory_mb,
        "ladder": ladder,
        "adapter_path": adapter_path,
        "use_with": use_with(effective.get("model"), adapter_path),
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
