"""A job's memory model from its own history, and where a memory stop steps it down to.

The readings are the job's history: each attempt's pre-flight (``preflight`` events: the
longest batch's peak, and the weights' footprint after loading) and the highest footprint the
guard saw on each rung (``peak_memory_mb``, a lower bound of that rung's peak). From them
:mod:`.memorymodel` predicts every rung, and :func:`next_rung` picks the first rung predicted
to fit under the budget with a margin, skipping what will not help. The ``blind`` policy (the
recipe's: one rung per memory stop) stays selectable, for comparison and for anyone who
wants it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loractl.config import JobConfig
from loractl.supervisor.ladder import describe_rung, rung_count
from loractl.supervisor.memorymodel import (
    Measurement,
    MemoryModel,
    RungShape,
    StepPlan,
    ladder_predictions,
    ladder_shapes,
    plan_step_down,
)
from loractl.supervisor.store import Job

POLICIES = ("learning", "blind")
# History event kinds: an attempt's pre-flight reading, and a rung a step down passed over.
PREFLIGHT_EVENT = "preflight"
SKIP_EVENT = "rung_skipped"


def measurements(
    job: Job, events: Sequence[dict[str, Any]], shapes: Sequence[RungShape]
) -> list[Measurement]:
    """Every reading of this job, each on the shape of the rung it was taken on."""
    found = []
    for event in events:
        if event["kind"] != PREFLIGHT_EVENT:
            continue
        detail, rung = event["detail"], event["detail"].get("rung")
        peak = detail.get("peak_mb")
        if not isinstance(rung, int) or not 0 <= rung < len(shapes):
            continue
        if not isinstance(peak, int | float) or peak <= 0:
            continue
        # The fixed part in the peak's own meter when the trainer sent it.
        weights = detail.get("fixed_mb") or detail.get("weights_mb")
        fixed = float(weights) if isinstance(weights, int | float) and weights > 0 else None
        found.append(Measurement(shapes[rung], float(peak), "preflight", fixed_mb=fixed))
    for key, peak in job.peak_memory_mb.items():
        rung = int(key)
        if 0 <= rung < len(shapes) and peak > 0:
            found.append(Measurement(shapes[rung], float(peak), "guard"))
    return found


def model_of(job: Job, events: Sequence[dict[str, Any]], cfg: JobConfig) -> MemoryModel:
    return MemoryModel.fit(measurements(job, events, ladder_shapes(cfg)))


def next_rung(
    job: Job,
    events: Sequence[dict[str, Any]],
    cfg: JobConfig,
    budget_mb: float,
    policy: str = "learning",
    margin: float = 0.10,
) -> StepPlan:
    """Where a memory stop on ``job.rung`` goes next. Under the blind policy: one rung down.
    Under the learning one: the first rung predicted to fit, once a pre-flight has measured
    the job; without one, or when no rung is predicted to fit, one rung down."""
    last = rung_count(cfg) - 1
    if job.rung >= last:
        return StepPlan(job.rung, None, (), "no rung is left")
    if policy == "blind":
        return StepPlan(job.rung, job.rung + 1, (), "one rung down (blind policy)", blind=True)
    shapes = ladder_shapes(cfg)
    readings = measurements(job, events, shapes)
    if not any(reading.kind == PREFLIGHT_EVENT for reading in readings):
        # Only the guard's readings, lower bounds taken mid-run: they cannot tell the fixed
        # part from the activations, so no rung is skipped on their word.
        return StepPlan(
            job.rung, job.rung + 1, (), "no pre-flight reading yet: one rung down", blind=True
        )
    plan = plan_step_down(MemoryModel.fit(readings), shapes, job.rung, budget_mb, margin=margin)
    if plan.target is None:
        # Nothing is predicted to fit: one rung down, as the recipe would, so a model that
        # is wrong never costs a rung the blind ladder would have tried.
        return StepPlan(
            job.rung,
            job.rung + 1,
            (),
            f"{plan.reason}; stepping down one rung",
            stopped_predicted_mb=plan.stopped_predicted_mb,
            limit_mb=plan.limit_mb,
        )
    return plan


def skip_reasons(events: Sequence[dict[str, Any]]) -> dict[int, str]:
    """The latest reason each rung was passed over, by rung."""
    reasons = {}
    for event in events:
        if event["kind"] == SKIP_EVENT and isinstance(event["detail"].get("rung"), int):
            reasons[event["detail"]["rung"]] = str(event["detail"].get("reason", ""))
    return reasons


def ladder_view(job: Job, events: Sequence[dict[str, Any]], cfg: JobConfig) -> list[dict[str, Any]]:
    """The ladder as `show` lists it: each rung's change, measured peak, predicted peak
    (null before any reading) and why it was skipped (null if it was not)."""
    shapes = ladder_shapes(cfg)
    model = MemoryModel.fit(measurements(job, events, shapes))
    predicted = ladder_predictions(model, shapes)
    skipped = skip_reasons(events)
    return [
        {
            "rung": rung,
            "change": describe_rung(cfg, rung),
            "peak_memory_mb": job.peak_memory_mb.get(str(rung)),
            "predicted_peak_mb": round(guess, 1) if (guess := predicted[rung]) else None,
            "skipped": skipped.get(rung),
        }
        for rung in range(rung_count(cfg))
    ]
