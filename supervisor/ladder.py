"""The fallback ladder: pure functions, no processes, no mlx.

Rung 0 is the job as submitted; rung k applies the first k rungs of the job's ladder on top
of each other (the recipe's rungs accumulate: accumulation 2 *and* seq 128 *and* rank 4).
"""

from __future__ import annotations

from typing import Any

from loractl.config import JobConfig, deep_merge


def rung_count(cfg: JobConfig) -> int:
    """How many rungs there are, counting the submitted settings as rung 0."""
    return 1 + len(cfg.effective_ladder())


def rung_overrides(cfg: JobConfig, rung: int) -> dict[str, Any]:
    """The config overrides that put a job on ``rung``."""
    overrides: dict[str, Any] = {}
    for step in cfg.effective_ladder()[:rung]:
        overrides = deep_merge(overrides, step)
    return overrides


def effective_config(cfg: JobConfig, rung: int) -> JobConfig:
    overrides = rung_overrides(cfg, rung)
    return cfg.with_overrides(overrides) if overrides else cfg


def describe_rung(cfg: JobConfig, rung: int) -> str:
    if rung == 0:
        return "as submitted"
    step = cfg.effective_ladder()[rung - 1]
    parts: list[str] = []
    for key, value in step.items():
        if isinstance(value, dict):
            parts.extend(f"{key}.{k}={v}" for k, v in value.items())
        else:
            parts.append(f"{key}={value}")
    return ", ".join(parts)
