"""`loractl fit JOB.yaml [--budget SIZE]`: will this job fit in memory, and on which rung?

It runs the trainer's pre-flight alone (``python -m loractl.daemon.trainer CONFIG
--preflight-only``: the longest batch's forward and backward, nothing trained, nothing written
to the job's adapter folder) on rung 0, and, while the measured rung does not fit, on the rung
the memory model (``loractl.supervisor.memorymodel``) picks next from what was measured so
far: the supervisor's own step-down. The rungs not measured are shown with their predicted
peak. The client never imports the trainer's side: each pre-flight is a child process.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loractl.config import JobConfig
from loractl.protocol import ExitCode
from loractl.supervisor.jobview import budget_mb as job_budget_mb
from loractl.supervisor.ladder import describe_rung, rung_count, rung_overrides
from loractl.supervisor.memorymodel import (
    Measurement,
    MemoryModel,
    ladder_predictions,
    ladder_shapes,
    plan_step_down,
)

# The planner's margin: a rung predicted within 10% of the budget is not counted on to fit.
MARGIN = 0.10

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
# In MB, binary as memory_budget_gb is (1 GB = 1024 MB); a bare number is MB.
_UNITS_MB = {"k": 1 / 1024, "": 1.0, "m": 1.0, "g": 1024.0, "t": 1024.0 * 1024}


class FitError(RuntimeError):
    """A pre-flight that ended without a verdict (a config or model error, a crash)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def parse_size_mb(text: str) -> float:
    """``"12GB"``, ``"900MB"``, ``"900"`` (MB) or ``"512k"`` as MB; ValueError otherwise."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"expected a size like 12GB, 900MB or 900 (MB), got {text!r}")
    digits, unit, _ = match.groups()
    value = float(digits) * _UNITS_MB[unit.lower()]
    if value <= 0:
        raise ValueError(f"the budget must be above 0, got {text!r}")
    return value


def resolve_budget(cfg: JobConfig, size: str | None) -> float:
    """The budget in MB: ``size`` parsed, else the job's own (as the supervisor's guard)."""
    return parse_size_mb(size) if size is not None else job_budget_mb(cfg)


@dataclass
class Preflight:
    """One rung's pre-flight, as the trainer reported it."""

    rung: int
    fits: bool
    detail: dict[str, Any]

    @property
    def peak_mb(self) -> float:
        return float(self.detail["peak_mb"])


def preflight_command(config: Path, cfg: JobConfig, rung: int, budget_mb: float) -> list[str]:
    """The trainer's command line for ``rung``'s pre-flight alone."""
    return [
        sys.executable,
        "-m",
        "loractl.daemon.trainer",
        str(config),
        "--preflight-only",
        "--fresh",
        "--rung",
        str(rung),
        "--overrides",
        json.dumps(rung_overrides(cfg, rung)),
        "--budget-mb",
        repr(float(budget_mb)),
    ]


def run_preflight(config: Path, cfg: JobConfig, rung: int, budget_mb: float) -> Preflight:
    """Run one rung's pre-flight in a child trainer; FitError when it gives no verdict."""
    done = subprocess.run(
        preflight_command(config, cfg, rung, budget_mb),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    detail = None
    for line in reversed(done.stdout.splitlines()):
        if line.startswith('{"preflight"'):
            try:
                detail = json.loads(line)["preflight"]
            except (ValueError, KeyError, TypeError):
                continue
            break
    if detail is not None and done.returncode in (ExitCode.DONE, ExitCode.DOES_NOT_FIT):
        return Preflight(rung, done.returncode == ExitCode.DONE, detail)
    said = [line for line in done.stderr.splitlines() if line.strip()]
    last = said[-1] if said else f"exit code {done.returncode}"
    code = ExitCode.CONFIG_ERROR if done.returncode == ExitCode.CONFIG_ERROR else 1
    raise FitError(f"the pre-flight of rung {rung} gave no verdict: {last}", code)


def measurement(pre: Preflight, shape) -> Measurement:
    fixed = pre.detail.get("fixed_mb")
    fixed_mb = float(fixed) if isinstance(fixed, int | float) and fixed > 0 else None
    return Measurement(shape, pre.peak_mb, "preflight", fixed_mb=fixed_mb)


def fit_job(
    config: Path,
    cfg: JobConfig,
    budget_mb: float,
    measure=run_preflight,
    say=lambda line: None,
) -> dict[str, Any]:
    """Measure rung 0, then the rungs the memory model picks, until one fits or none is
    left; the result as ``--json`` prints it. ``measure`` runs one pre-flight (a seam)."""
    shapes = ladder_shapes(cfg)
    last = rung_count(cfg) - 1
    done: dict[int, Preflight] = {}
    notes: dict[int, str] = {}
    rung: int | None = 0
    while rung is not None:
        say(f"loractl: pre-flight of rung {rung} ({describe_rung(cfg, rung)})")
        done[rung] = measure(config, cfg, rung, budget_mb)
        if done[rung].fits:
            break
        model = MemoryModel.fit(measurement(p, shapes[p.rung]) for p in done.values())
        plan = plan_step_down(model, shapes, rung, budget_mb, margin=MARGIN)
        for skip in plan.skips:
            notes.setdefault(skip.rung, f"skipped: {skip.reason}")
        target = plan.target
        if target is None and rung < last and last not in done:
            # Nothing is predicted to fit: the cheapest rung's own pre-flight decides.
            target = last
        rung = target
    model = MemoryModel.fit(measurement(p, shapes[p.rung]) for p in done.values())
    predicted = ladder_predictions(model, shapes)
    limit = budget_mb * (1 - MARGIN)
    rows = []
    for index in range(len(shapes)):
        pre = done.get(index)
        guess = predicted[index]
        if pre is not None:
            fits: bool | None = pre.fits
        else:
            fits = None if guess is None else guess <= limit
        rows.append(
            {
                "rung": index,
                "change": describe_rung(cfg, index),
                "measured_mb": round(pre.peak_mb, 1) if pre else None,
                "predicted_mb": round(guess, 1) if guess is not None else None,
                "fits": fits,
                "note": notes.get(index) if pre is None else None,
            }
        )
    found = next((p.rung for p in done.values() if p.fits), None)
    return {"budget_mb": round(budget_mb, 1), "rungs": rows, "fits": found}


def fit_table(result: dict[str, Any]) -> str:
    """The text `loractl fit` prints: one row per rung, then the verdict."""
    rows = [("RUNG", "SETTINGS", "PEAK", "FITS")]
    for row in result["rungs"]:
        if row["measured_mb"] is not None:
            peak = f"{row['measured_mb']:.0f} MB measured"
        elif row["predicted_mb"] is not None:
            peak = f"{row['predicted_mb']:.0f} MB predicted"
        else:
            peak = "-"
        fits = {True: "yes", False: "no", None: "?"}[row["fits"]]
        if row["measured_mb"] is None and row["fits"] is not None:
            fits = f"{fits} (predicted)"
        rows.append((str(row["rung"]), row["change"], peak, fits))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.extend(f"rung {row['rung']} {row['note']}" for row in result["rungs"] if row["note"])
    budget = f"{result['budget_mb']:.0f} MB"
    if result["fits"] is not None:
        found = result["rungs"][result["fits"]]
        lines.append(f"fits under the {budget} budget on rung {found['rung']} ({found['change']})")
    else:
        lines.append(f"nothing fits under the {budget} budget: no rung's pre-flight fitted")
    return "\n".join(lines)
