"""`loractl report`: one self-contained HTML page that tells the story of a job.

The page draws the loss curves (from the trainer's ``train.log``, or the newest checkpoint's
histories when the log is gone), marks every crash, memory stop, ladder step, pause, resume and
supervisor restart on the same iteration axis, and adds tokens per second, the peak memory of
each rung against the budget, the attempts on a timeline, the settings that ran against the
ones submitted, and the command that uses the adapters.

Gathering (``read_train_log``, ``markers``, ``attempts``) is kept apart from drawing
(``render_html``); both take the job dict ``loractl show --json`` prints, so the page can be
made from a running supervisor's answer or from the database read offline. The page holds no
URL, font, script or stylesheet from anywhere else: SVG and CSS are inline, written by
``loractl.client.svg``. Nothing here imports mlx or the trainer.
"""

from __future__ import annotations

import bisect
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any

from loractl.client.svg import Element, Frame, Scale, axes, legend, path_data, svg, ticks

TRAIN_LOG = "train.log"
BLOCKS = "▁▂▃▄▅▆▇█"

# The chart width fits a 1280 px window with the page's margins, and an A4/Letter page in
# landscape or portrait once the print style scales it to the paper's width.
CHART_WIDTH = 1100
# Rows of event labels above the loss chart, so events close together stay readable.
MARKER_ROWS = 6


# -- a terminal sparkline -----------------------------------------------------------------


def sparkline(values: Sequence[float], width: int = 40) -> str:
    """``values`` as one line of block characters, at most ``width`` of them (each the mean
    of its share of the values); non-finite values are left out, and a flat series is drawn
    at the lowest block."""
    finite = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    if not finite or width <= 0:
        return ""
    if len(finite) > width:
        buckets = []
        for index in range(width):
            share = finite[index * len(finite) // width : (index + 1) * len(finite) // width]
            buckets.append(sum(share) / len(share))
        finite = buckets
    low, high = min(finite), max(finite)
    if high == low:
        return BLOCKS[0] * len(finite)
    top = len(BLOCKS) - 1
    return "".join(BLOCKS[round((v - low) / (high - low) * top)] for v in finite)


def loss_sparkline(adapter_path: str | None, width: int = 40) -> str:
    """The training loss so far as a sparkline, from the job's train.log ("" without one):
    the one line `show` prints."""
    if not adapter_path:
        return ""
    train, _ = loss_curves(read_train_log(Path(adapter_path) / TRAIN_LOG))
    return sparkline([loss for _, loss in train], width)


# -- train.log ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPoint:
    """One optimizer step as the trainer logged it."""

    at: float
    attempt: int  # which "attempt starting" line came before it, counting from 1
    step: int
    iteration: int
    loss: float | None
    tokens_per_sec: float | None


@dataclass(frozen=True)
class EvalPoint:
    at: float
    iteration: int
    val_loss: float


@dataclass
class TrainLog:
    """What the page needs from ``train.log``; ``found`` is False when there is no file."""

    path: Path
    found: bool = False
    steps: list[StepPoint] = field(default_factory=list)
    evals: list[EvalPoint] = field(default_factory=list)
    # (time, iteration) pairs that say where the run was: every step, and every "training"
    # line (where an attempt resumed), sorted by time.
    anchors: list[tuple[float, int]] = field(default_factory=list)
    planned_iterations: int | None = None
    skipped_lines: int = 0


def parse_timestamp(text: object) -> float | None:
    """structlog's ISO timestamp ("2026-12-03T13:08:28.202230Z") as unix time."""
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def read_train_log(path: Path) -> TrainLog:
    """Parse ``train.log``, appended to by every attempt. A torn last line (a trainer killed
    mid-write, or one still writing), garbage and lines of unknown shape are skipped and
    counted, never fatal: the page is most wanted after something went wrong."""
    log = TrainLog(path=path)
    try:
        raw = path.read_bytes()
    except OSError:
        return log
    log.found = True
    attempt = 0
    for line in raw.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            log.skipped_lines += 1
            continue
        at = parse_timestamp(entry.get("timestamp")) if isinstance(entry, dict) else None
        if at is None or not isinstance(entry.get("event"), str):
            log.skipped_lines += 1
            continue
        event = entry["event"]
        iteration = entry.get("iteration")
        has_iteration = isinstance(iteration, int) and not isinstance(iteration, bool)
        if event == "attempt starting":
            attempt += 1
        elif event == "step" and has_iteration:
            log.steps.append(
                StepPoint(
                    at=at,
                    attempt=max(attempt, 1),
                    step=int(_number(entry.get("step")) or 0),
                    iteration=iteration,
                    loss=_number(entry.get("loss")),
                    tokens_per_sec=_number(entry.get("tokens_per_sec")),
                )
            )
            log.anchors.append((at, iteration))
        elif event == "eval" and has_iteration and _number(entry.get("val_loss")) is not None:
            log.evals.append(EvalPoint(at, iteration, float(entry["val_loss"])))
        elif event == "training" and has_iteration:
            log.anchors.append((at, iteration))
            plan = entry.get("plan") if isinstance(entry.get("plan"), dict) else {}
            total, batch = plan.get("total_examples"), plan.get("batch_size")
            if isinstance(total, int) and isinstance(batch, int) and batch > 0:
                log.planned_iterations = math.ceil(total / batch)
    log.anchors.sort(key=lambda pair: pair[0])
    return log


def iteration_at(log: TrainLog, at: float) -> int | None:
    """The iteration the run had reached at time ``at``: that of the last step (or resume)
    logged at or before it; 0 before the first; None without a log to tell."""
    if not log.anchors:
        return None
    index = bisect.bisect_right([when for when, _ in log.anchors], at)
    return log.anchors[index - 1][1] if index else 0


def loss_curves(log: TrainLog) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(iteration, loss) of training and of validation, one value per iteration. Steps lost
    after a checkpoint are trained again by the next attempt; the later value wins, being
    the one the adapters carry."""
    train = {p.iteration: p.loss for p in log.steps if p.loss is not None}
    val = {p.iteration: p.val_loss for p in log.evals}
    return sorted(train.items()), sorted(val.items())


def checkpoint_curves(adapter_path: str | None) -> tuple[list, list]:
    """(step, loss) and (iteration, val loss) from the newest checkpoint's state.json: the
    curves when train.log is gone. Read without verifying checksums (the adapters may be
    large, and a report only reads)."""
    if not adapter_path:
        return [], []
    from loractl.checkpoints import CHECKPOINT_DIR, STATE_FILE, CheckpointReader

    for folder in CheckpointReader(Path(adapter_path) / CHECKPOINT_DIR).folders():
        try:
            state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(state, dict):
            return _pairs(state.get("loss_history")), _pairs(state.get("val_history"))
    return [], []


def _pairs(items: object) -> list[tuple[int, float]]:
    """[[x, value], ...] from a checkpoint's history, leaving out anything else."""
    found = []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, list) and len(item) == 2 and _number(item[0]) is not None:
            if _number(item[1]) is not None:
                found.append((int(item[0]), float(item[1])))
    return found


# -- what happened: markers and attempts ----------------------------------------------------


@dataclass
class Marker:
    """One event placed on the iteration axis; ``kind`` is its CSS class."""

    kind: str  # crash, memory-stop, ladder, pause, resume, restart
    at: float
    label: str
    detail: str
    iteration: int | None = None


def _detail(event: dict) -> dict:
    return event.get("detail") if isinstance(event.get("detail"), dict) else {}


def markers(job: dict, log: TrainLog) -> list[Marker]:
    """Every crash, memory stop, ladder step, pause, resume and supervisor restart in the
    job's history, in time order, each placed at the iteration reached at its time."""
    found: list[Marker] = []
    for event in job.get("history") or []:
        at = _number(event.get("at"))
        if at is None:
            continue
        kind, detail = event.get("kind"), _detail(event)
        cause = str(event.get("cause") or "")
        to_state, from_state = event.get("to_state"), event.get("from_state")
        if kind == "crash":
            rank = detail.get("rank")
            where = f", rank {rank}" if rank is not None else ""
            crash_cause = str(detail.get("cause") or cause or "crash")
            explanation = str(detail.get("explanation") or "")
            if crash_cause == "memory":
                found.append(Marker("memory-stop", at, f"memory stop{where}", explanation))
            else:
                found.append(Marker("crash", at, f"crash: {crash_cause}{where}", explanation))
        elif kind == "ladder_step":
            change = str(detail.get("change") or "")
            steps = f"rung {detail.get('from_rung', '?')}→{detail.get('to_rung', '?')}"
            found.append(Marker("ladder", at, f"{steps}: {change}", cause or change))
        elif kind == "transition" and to_state == "paused":
            found.append(Marker("pause", at, "paused", cause))
        elif kind == "transition" and from_state == "paused" and to_state != "paused":
            found.append(Marker("resume", at, "resumed", cause))
        elif kind == "adopted":
            words = f"trainer pid {detail.get('pid', '?')} adopted"
            found.append(Marker("restart", at, "supervisor restarted", words))
        elif kind == "completion_found":
            found.append(Marker("restart", at, "supervisor restarted", "found the run finished"))
        elif kind == "transition" and cause.startswith("supervisor "):
            label = "supervisor stopped" if "shutting down" in cause else "supervisor restarted"
            found.append(Marker("restart", at, label, cause))
    for marker in found:
        marker.iteration = iteration_at(log, marker.at)
    return sorted(found, key=lambda m: m.at)


@dataclass
class AttemptSpan:
    """One trainer attempt: when it started and ended, on which rung, and how it ended."""

    number: int
    rung: int
    start: float
    end: float | None = None
    how: str = "running"
    outcome: str = "running"  # CSS class: ok, crash, memory, stopped, running, unknown


ENDING_STATES = {
    "completed": ("completed", "ok"),
    "failed": ("failed", "crash"),
    "cancelled": ("cancelled", "stopped"),
    "paused": ("paused", "stopped"),
    "queued": ("stopped; queued again", "stopped"),
}


def attempts(job: dict) -> list[AttemptSpan]:
    """The attempts, from the history: each "attempt N on rung R" start (or adoption) until
    its crash record or the next state that has no trainer."""
    spans: list[AttemptSpan] = []
    current: AttemptSpan | None = None
    for event in job.get("history") or []:
        at = _number(event.get("at"))
        if at is None:
            continue
        kind, detail, to_state = event.get("kind"), _detail(event), event.get("to_state")
        number = detail.get("attempt")
        if kind == "transition" and to_state == "starting" and isinstance(number, int):
            if current is not None and current.end is None:
                current.end, current.how, current.outcome = at, "ended unrecorded", "unknown"
            current = AttemptSpan(number, int(event.get("rung") or 0), at)
            spans.append(current)
        elif current is None or current.end is not None:
            continue
        elif kind == "crash":
            cause = str(detail.get("cause") or "crash")
            current.end, current.how = at, f"{cause}: {detail.get('explanation') or ''}".strip()
            current.outcome = "memory" if cause == "memory" else "crash"
        elif kind == "transition" and to_state in ENDING_STATES:
            current.end = at
            current.how, current.outcome = ENDING_STATES[to_state]
            if to_state == "queued" and event.get("cause"):
                current.how = str(event["cause"])
    return spans


def submitted_config(job: dict) -> dict | None:
    """The job's config as submitted (rung 0), read from the job folder's copy."""
    from loractl.config import ConfigError, load_config
    from loractl.supervisor.ladder import effective_config

    path = None
    for event in job.get("history") or []:
        if event.get("kind") == "submitted":
            path = _detail(event).get("config_path")
    if not path and job.get("job_dir"):
        path = str(Path(job["job_dir"]) / "config.yaml")
    if not path:
        return None
    try:
        return effective_config(load_config(Path(path)), 0).to_dict()
    except (ConfigError, OSError, ValueError):
        return None


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """Nested settings as dotted keys with JSON values, for a two-column table."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


# -- the whole report ------------------------------------------------------------------------


@dataclass
class Report:
    job: dict
    log: TrainLog
    markers: list[Marker]
    attempts: list[AttemptSpan]
    submitted: dict | None
    generated_at: float


def gather(job: dict, now: float | None = None) -> Report:
    """Everything the page shows, read from the job dict and the files it names."""
    adapter_path = job.get("adapter_path")
    log = read_train_log(Path(adapter_path) / TRAIN_LOG if adapter_path else Path(TRAIN_LOG))
    if not adapter_path:
        log.found = False
    return Report(
        job=job,
        log=log,
        markers=markers(job, log),
        attempts=attempts(job),
        submitted=submitted_config(job),
        generated_at=time.time() if now is None else now,
    )


def default_output(job: dict) -> Path:
    """``report-<name>.html`` in the current folder (names are file-name safe)."""
    name = str(job.get("name") or job.get("id") or "job")
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name).lstrip(".") or "job"
    return Path(f"report-{safe}.html")


def write_report(job: dict, output: Path | None = None) -> dict[str, Any]:
    """Write the page for ``job`` (a `show` dict) to ``output``; what was written, for
    ``--json``: the path, the job, and what the page could not draw."""
    from loractl.atomic import atomic_write_bytes

    report = gather(job)
    page = render_html(report).encode("utf-8")
    path = (output or default_output(job)).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, page)
    train, val = loss_curves(report.log)
    return {
        "path": str(path),
        "id": job.get("id"),
        "name": job.get("name"),
        "state": job.get("state"),
        "offline": bool(job.get("offline")),
        "bytes": len(page),
        "train_log": str(report.log.path) if report.log.found else None,
        "skipped_lines": report.log.skipped_lines,
        "train_points": len(train),
        "val_points": len(val),
        "markers": len(report.markers),
        "attempts": len(report.attempts),
    }


# -- drawing --------------------------------------------------------------------------------


def local_time(at: float | None) -> str:
    if at is None:
        return "now"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def clock_ticks(span: float, count: int = 8) -> list[float]:
    """Elapsed-time ticks on whole seconds, minutes or hours, as suits ``span``."""
    units = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200)
    for unit in (*units, 86400):
        if span / unit <= count:
            return [unit * index for index in range(math.ceil(span / unit - 1e-9) + 1)]
    return ticks(0, span, count)


def loss_chart(report: Report) -> Element | None:
    train, val = loss_curves(report.log)
    x_label = "iteration"
    placed = [m for m in report.markers if m.iteration is not None]
    if not train and not val:
        train, val = checkpoint_curves(report.job.get("adapter_path"))
        x_label = "optimizer step (from the newest checkpoint; train.log is missing)"
        placed = []  # without the log, times cannot be turned into steps
    if not train and not val:
        return None
    frame = Frame(left=72, top=22 + 14 * MARKER_ROWS, right=CHART_WIDTH - 24, bottom=400)
    x_values = [x for x, _ in train + val] + [m.iteration for m in placed]
    x_high = max([*x_values, report.log.planned_iterations or 0, 1])
    x_ticks = ticks(0, x_high, 10)
    losses = [v for _, v in train + val]
    y_ticks = ticks(min(losses), max(losses), 6)
    x = Scale(x_ticks[0], x_ticks[-1], frame.left, frame.right)
    y = Scale(y_ticks[0], y_ticks[-1], frame.bottom, frame.top)
    root = svg(CHART_WIDTH, frame.bottom + 70, id="loss-chart", class_="chart loss")
    root.child("title", "Training and validation loss over iterations, with events")
    axes(root, frame, x, y, x_ticks, y_ticks, x_label, "loss")
    for name, points in (("train", train), ("val", val)):
        if points:
            root.child(
                "path",
                id=f"curve-{name}",
                class_=f"curve {name}",
                d=path_data((x(i), y(v)) for i, v in points),
                data_points=len(points),
            ).titled(f"{'training' if name == 'train' else 'validation'} loss")
    for iteration, value in val:
        root.child("circle", class_="point val", cx=x(iteration), cy=y(value), r=3.5).titled(
            f"validation loss {value:.4f} at iteration {iteration}"
        )
    draw_markers(root, frame, x, placed)
    legend(
        root,
        [("train", "training loss"), ("val", "validation loss")],
        frame.left + 12,
        frame.bottom + 56,
    )
    return root


def draw_markers(root: Element, frame: Frame, x: Scale, placed: list[Marker]) -> None:
    """A vertical line per event at its iteration (on whole pixels, so it is drawn in its own
    colour), labelled above the plot on the first row where the label does not overlap."""
    rows_end: list[float] = [-1e9] * MARKER_ROWS
    group = root.child("g", class_="markers")
    for index, marker in enumerate(placed):
        at = round(x(marker.iteration))
        node = group.child(
            "g",
            id=f"marker-{index}",
            class_=f"marker {marker.kind}",
            data_iteration=marker.iteration,
            data_at=f"{marker.at:.3f}",
            data_x=at,
        )
        node.titled(f"{local_time(marker.at)} · iteration {marker.iteration}\n{marker.label}")
        if marker.detail:
            node.children[0].text += f"\n{marker.detail}"
        node.child("line", x1=at, x2=at, y1=frame.top - 4, y2=frame.bottom)
        label = marker.label if len(marker.label) <= 48 else marker.label[:47] + "…"
        free = [r for r, end in enumerate(rows_end) if end < at]
        row = free[0] if free else min(range(MARKER_ROWS), key=rows_end.__getitem__)
        width = 7 * len(label) + 10
        anchor_left = at + width < frame.right + 20
        rows_end[row] = at + width if anchor_left else at
        node.child(
            "text",
            label,
            x=at + 3 if anchor_left else at - 3,
            y=16 + 14 * row,
            text_anchor="start" if anchor_left else "end",
        )


def tokens_chart(report: Report) -> Element | None:
    points = [p for p in report.log.steps if p.tokens_per_sec is not None]
    if not points:
        return None
    start = min(p.at for p in points)
    span = max(p.at for p in points) - start
    frame = Frame(left=72, top=20, right=CHART_WIDTH - 24, bottom=240)
    x_ticks = clock_ticks(max(span, 1.0))
    rates = [p.tokens_per_sec for p in points]
    y_ticks = ticks(0, max(rates), 5)
    x = Scale(0, x_ticks[-1] if x_ticks[-1] > 0 else 1, frame.left, frame.right)
    y = Scale(y_ticks[0], y_ticks[-1], frame.bottom, frame.top)
    root = svg(CHART_WIDTH, frame.bottom + 50, id="tokens-chart", class_="chart tokens")
    root.child("title", "Tokens per second over time")
    axes(
        root,
        frame,
        x,
        y,
        x_ticks,
        y_ticks,
        f"time since {local_time(start)} (h:mm:ss)",
        "tokens / s",
        x_text=duration,
    )
    by_attempt: dict[int, list[StepPoint]] = {}
    for point in points:
        by_attempt.setdefault(point.attempt, []).append(point)
    for attempt, run in by_attempt.items():
        # One line per attempt: the gap between attempts is time nothing trained.
        root.child(
            "path",
            class_="curve tokens",
            data_attempt=attempt,
            data_points=len(run),
            d=path_data((x(p.at - start), y(p.tokens_per_sec)) for p in run),
        ).titled(f"attempt {attempt} (as counted in train.log): {len(run)} steps")
    return root


def memory_chart(report: Report) -> Element | None:
    job = report.job
    ladder = [r for r in job.get("ladder") or [] if isinstance(r, dict)]
    peaks = job.get("peak_memory_mb") or {}
    budget = _number(job.get("budget_mb"))
    if not ladder:
        ladder = [{"rung": int(r), "change": ""} for r in sorted(peaks, key=int)]
    if not ladder:
        return None
    values = [budget or 0]
    for rung in ladder:
        values += [
            _number(rung.get("peak_memory_mb")) or _number(peaks.get(str(rung.get("rung")))) or 0,
            _number(rung.get("predicted_peak_mb")) or 0,
        ]
    frame = Frame(left=72, top=20, right=CHART_WIDTH - 24, bottom=260)
    y_ticks = ticks(0, max(values) or 1, 5)
    y = Scale(0, y_ticks[-1], frame.bottom, frame.top)
    slot = frame.width / len(ladder)
    root = svg(CHART_WIDTH, frame.bottom + 64, id="memory-chart", class_="chart memory")
    root.child("title", "Peak memory per ladder rung against the budget")
    axes(root, frame, Scale(0, 1, frame.left, frame.right), y, [], y_ticks, "", "peak memory (MB)")
    current = job.get("rung")
    for index, rung in enumerate(ladder):
        number = rung.get("rung", index)
        measured = _number(rung.get("peak_memory_mb")) or _number(peaks.get(str(number)))
        predicted = _number(rung.get("predicted_peak_mb"))
        skipped = rung.get("skipped")
        value = measured if measured is not None else predicted
        left = frame.left + index * slot + slot * 0.2
        kind = "measured" if measured is not None else "predicted"
        if budget and measured is not None and measured > budget:
            kind += " over"
        if skipped:
            kind += " skipped"
        if number == current:
            kind += " current"
        group = root.child("g", class_=f"rung {kind}", data_rung=number)
        words = f"rung {number} ({rung.get('change') or 'as submitted'}): "
        if measured is not None:
            words += f"peak {measured:.0f} MB measured"
        elif predicted is not None:
            words += f"not run; predicted {predicted:.0f} MB"
        else:
            words += "not run"
        if skipped:
            words += f"; skipped: {skipped}"
        group.titled(words)
        if value is not None:
            group.child(
                "rect",
                class_=f"bar {kind}",
                x=left,
                y=y(value),
                width=slot * 0.6,
                height=max(frame.bottom - y(value), 1.0),
            )
            group.child(
                "text",
                f"{value:.0f} MB{'' if measured is not None else ' (predicted)'}",
                x=left + slot * 0.3,
                y=y(value) - 5,
                text_anchor="middle",
            )
        centre = left + slot * 0.3
        change = str(rung.get("change") or "as submitted")
        group.child("text", f"rung {number}", x=centre, y=frame.bottom + 18, text_anchor="middle")
        group.child(
            "text",
            change if len(change) <= 34 else change[:33] + "…",
            class_="change",
            x=centre,
            y=frame.bottom + 34,
            text_anchor="middle",
        )
        if skipped:
            group.child(
                "text",
                "skipped",
                class_="skipped-label",
                x=centre,
                y=frame.bottom + 50,
                text_anchor="middle",
            )
    if budget:
        line = root.child("g", class_="budget", data_budget_mb=budget)
        line.titled(f"memory budget {budget:.0f} MB")
        line.child("line", x1=frame.left, x2=frame.right, y1=y(budget), y2=y(budget))
        line.child(
            "text",
            f"budget {budget:.0f} MB",
            x=frame.right - 4,
            y=y(budget) - 5,
            text_anchor="end",
        )
    return root


def timeline_chart(report: Report) -> Element | None:
    spans = report.attempts
    if not spans:
        return None
    now = report.generated_at
    start = min(s.start for s in spans)
    end = max((s.end if s.end is not None else now) for s in spans)
    row = 26
    frame = Frame(left=72, top=12, right=CHART_WIDTH - 24, bottom=12 + row * len(spans))
    x_ticks = clock_ticks(max(end - start, 1.0))
    x = Scale(0, x_ticks[-1] or 1, frame.left, frame.right)
    root = svg(CHART_WIDTH, frame.bottom + 46, id="attempts-chart", class_="chart attempts")
    root.child("title", "The attempts over time")
    axes(
        root,
        frame,
        x,
        Scale(0, 1, frame.bottom, frame.top),
        x_ticks,
        [],
        f"time since {local_time(start)} (h:mm:ss)",
        "",
        x_text=duration,
    )
    for index, span in enumerate(spans):
        top = frame.top + index * row + 4
        left = x(span.start - start)
        right = x((span.end if span.end is not None else now) - start)
        group = root.child(
            "g", class_=f"attempt {span.outcome}", data_attempt=span.number, data_rung=span.rung
        )
        group.titled(
            f"attempt {span.number} on rung {span.rung}: {local_time(span.start)} to "
            f"{local_time(span.end)}\n{span.how}"
        )
        group.child("rect", x=left, y=top, width=max(right - left, 3.0), height=row - 8)
        group.child("text", f"#{span.number}", x=frame.left - 8, y=top + 14, text_anchor="end")
        label = f"rung {span.rung}: {span.how}"
        label = label if len(label) <= 60 else label[:59] + "…"
        inside = left + 6 + 6.2 * len(label) < frame.right
        group.child(
            "text",
            label,
            class_="label",
            x=left + 6 if inside else right - 6,
            y=top + 14,
            text_anchor="start" if inside else "end",
        )
    return root


STYLE = """
:root { --train: #1f77b4; --val: #ff7f0e; --tokens: #2ca02c; --crash: #d62728;
  --memory: #e377c2; --ladder: #9467bd; --pause: #7f7f7f; --resume: #17becf;
  --restart: #8c564b; --ink: #222; --muted: #666; --rule: #ddd; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff;
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 40px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; }
.sub { color: var(--muted); margin: 0 0 16px; }
section { break-inside: avoid; page-break-inside: avoid; }
figure { margin: 8px 0 16px; }
figcaption { margin-top: 4px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 3px 8px; border-bottom: 1px solid var(--rule);
  vertical-align: top; overflow-wrap: anywhere; }
th { background: #f5f5f5; white-space: nowrap; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0; }
dl.facts dt { color: var(--muted); } dl.facts dd { margin: 0; overflow-wrap: anywhere; }
pre { background: #f6f8fa; padding: 8px 12px; white-space: pre-wrap;
  overflow-wrap: anywhere; font: 13px/1.4 ui-monospace, Menlo, Consolas, monospace; }
.note { color: var(--muted); font-style: italic; }
.state-completed { color: #2a7d2a; } .state-failed { color: var(--crash); }
tr.changed td { background: #fff4d6; font-weight: 600; }
svg.chart { display: block; max-width: 100%; height: auto; font-size: 12px; }
svg text { fill: var(--ink); font-family: inherit; }
.grid line { stroke: #eee; } .axis line { stroke: #999; }
.axis-title { fill: var(--muted); }
.curve { fill: none; stroke-width: 2; stroke-linejoin: round; }
.curve.train, .legend-item.train .swatch { stroke: var(--train); }
.curve.val, .legend-item.val .swatch { stroke: var(--val); }
.swatch { stroke-width: 3; }
.point.val { fill: var(--val); }
.curve.tokens { stroke: var(--tokens); }
.marker line { stroke-width: 2; }
.marker.crash line { stroke: var(--crash); } .marker.crash text { fill: var(--crash); }
.marker.memory-stop line { stroke: var(--memory); }
.marker.memory-stop text { fill: #b5418f; }
.marker.ladder line { stroke: var(--ladder); } .marker.ladder text { fill: var(--ladder); }
.marker.pause line, .marker.resume line, .marker.restart line { stroke-dasharray: 4 3; }
.marker.pause line { stroke: var(--pause); } .marker.pause text { fill: var(--pause); }
.marker.resume line { stroke: var(--resume); } .marker.resume text { fill: #0f8796; }
.marker.restart line { stroke: var(--restart); } .marker.restart text { fill: var(--restart); }
.bar.measured { fill: #6baed6; } .bar.over { fill: var(--crash); }
.bar.predicted { fill: none; stroke: #6baed6; stroke-width: 2; stroke-dasharray: 5 3; }
.bar.skipped { stroke: #aaa; } .rung.current text { font-weight: 700; }
.change, .skipped-label { fill: var(--muted); }
.budget line { stroke: var(--crash); stroke-width: 2; stroke-dasharray: 8 4; }
.budget text { fill: var(--crash); }
.attempt rect { fill: #9ecae1; } .attempt.ok rect { fill: #74c476; }
.attempt.crash rect { fill: #fb6a4a; } .attempt.memory rect { fill: #e9a3cf; }
.attempt.stopped rect { fill: #bdbdbd; } .attempt.running rect { fill: #6baed6; }
.attempt .label { font-size: 12px; }
td.kind { white-space: nowrap; font-weight: 600; }
td.kind.crash { color: var(--crash); } td.kind.ladder { color: var(--ladder); }
td.kind.memory-stop { color: #b5418f; }
@media print {
  @page { margin: 12mm; }
  body { font-size: 11px; -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  main { max-width: none; padding: 0; }
  svg.chart { width: 100%; }
  h2 { break-after: avoid; page-break-after: avoid; }
}
"""


def tag(name: str, content: str, **attributes: str) -> str:
    attrs = "".join(
        f' {key.rstrip("_")}="{escape(value, quote=True)}"' for key, value in attributes.items()
    )
    return f"<{name}{attrs}>{content}</{name}>"


def text(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def header(report: Report) -> str:
    job = report.job
    state = str(job.get("state") or "?")
    progress = job.get("progress") if isinstance(job.get("progress"), dict) else {}
    history_times = [t for e in job.get("history") or [] if (t := _number(e.get("at")))]
    began = min(history_times) if history_times else None
    ended = max(history_times) if state in ("completed", "failed", "cancelled") else None
    steps = report.log.steps
    redone = len(steps) - len({p.iteration for p in steps})
    crashes = job.get("crashes") or []
    facts = [
        ("state", tag("span", text(state), class_=f"state-{state}")),
        ("outcome", text(job.get("outcome") or "—")),
        ("rung", text(job.get("rung"))),
        ("attempts", text(job.get("attempts"))),
        ("crashes", text(len(crashes))),
        (
            "progress",
            text(
                f"{progress.get('examples_seen', 0)}/{progress.get('total_examples', '?')} "
                f"examples, step {progress.get('step', 0)}"
            ),
        ),
        (
            "budget",
            text(f"{job['budget_mb']:.0f} MB" if _number(job.get("budget_mb")) else "unknown"),
        ),
    ]
    if began is not None:
        facts.append(
            (
                "time",
                text(
                    f"{local_time(began)} to {local_time(ended)} "
                    f"({duration((ended or report.generated_at) - began)})"
                ),
            )
        )
    if steps:
        facts.append(("steps logged", text(f"{len(steps)} ({redone} trained again after a crash)")))
    body = "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in facts)
    offline = " (supervisor not running: read from the database)" if job.get("offline") else ""
    parts = [
        tag("h1", f"{text(job.get('name'))} <small>{text(job.get('id'))}</small>"),
        tag(
            "p",
            text(f"loractl report, made {local_time(report.generated_at)}{offline}"),
            class_="sub",
        ),
        tag("dl", body, class_="facts"),
    ]
    if job.get("reason"):
        parts.append(tag("pre", text(job["reason"]), class_="reason"))
    return tag("section", "".join(parts), id="summary")


def log_note(report: Report) -> str:
    log = report.log
    if not log.found:
        return tag(
            "p",
            text(
                f"No train.log at {log.path}: the loss curves come from the newest checkpoint "
                "if there is one, and events cannot be placed on the iteration axis."
            ),
            class_="note",
            id="no-train-log",
        )
    if log.skipped_lines:
        return tag(
            "p",
            text(f"{log.skipped_lines} unreadable line(s) of {log.path} were skipped."),
            class_="note",
            id="skipped-lines",
        )
    return ""


def figure(chart: Element | None, caption: str, missing: str) -> str:
    if chart is None:
        return tag("p", text(missing), class_="note")
    return tag("figure", chart.render() + tag("figcaption", text(caption), class_="note"))


def events_table(report: Report) -> str:
    if not report.markers:
        return tag("p", "No crash, memory stop, ladder step, pause or restart.", class_="note")
    rows = "".join(
        tag(
            "tr",
            tag("td", text(local_time(m.at)))
            + tag("td", text("—" if m.iteration is None else m.iteration))
            + tag("td", text(m.label), class_=f"kind {m.kind}")
            + tag("td", text(m.detail)),
        )
        for m in report.markers
    )
    head = "<tr><th>time</th><th>iteration</th><th>event</th><th>detail</th></tr>"
    return tag("table", head + rows, class_="events")


def attempts_table(report: Report) -> str:
    rows = "".join(
        tag(
            "tr",
            tag("td", text(s.number))
            + tag("td", text(s.rung))
            + tag("td", text(local_time(s.start)))
            + tag("td", text(local_time(s.end) if s.end is not None else "running"))
            + tag("td", text(duration((s.end or report.generated_at) - s.start)))
            + tag("td", text(s.how)),
            class_=f"attempt {s.outcome}",
        )
        for s in report.attempts
    )
    head = (
        "<tr><th>#</th><th>rung</th><th>start</th><th>end</th><th>took</th>"
        "<th>how it ended</th></tr>"
    )
    return tag("table", head + rows, class_="attempts") if rows else ""


def settings_table(report: Report) -> str:
    effective = report.job.get("effective_config") or {}
    if not isinstance(effective, dict) or "error" in effective and len(effective) == 1:
        return tag("p", text(f"The settings cannot be read: {effective}"), class_="note")
    ran = flatten(effective)
    submitted = flatten(report.submitted) if report.submitted is not None else {}
    keys = sorted(set(ran) | set(submitted))
    changed = [k for k in keys if report.submitted is not None and ran.get(k) != submitted.get(k)]
    rows = []
    for key in changed + [k for k in keys if k not in changed]:
        rows.append(
            tag(
                "tr",
                tag("td", text(key))
                + tag("td", text(submitted.get(key, "—") if report.submitted else "unknown"))
                + tag("td", text(ran.get(key, "—"))),
                class_="changed" if key in changed else "same",
            )
        )
    note = (
        tag("p", text(f"Changed by the ladder: {', '.join(changed)}."), class_="note")
        if changed
        else tag("p", "The job ran with the settings it was submitted with.", class_="note")
    )
    if report.submitted is None:
        note = tag("p", "The submitted config could not be read.", class_="note")
    head = "<tr><th>setting</th><th>submitted</th><th>ran with</th></tr>"
    return note + tag("table", head + "".join(rows), class_="settings")


def adapters_section(report: Report) -> str:
    job = report.job
    adapter_path = job.get("adapter_path")
    parts = []
    if adapter_path:
        folder = Path(adapter_path)
        try:
            names = sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors")
        except OSError:
            names = []
        parts.append(tag("p", "Adapter folder: " + tag("code", text(adapter_path))))
        if names:
            items = "".join(tag("li", tag("code", text(n))) for n in names)
            parts.append(tag("ul", items, class_="adapter-files"))
        else:
            parts.append(tag("p", "No adapters written yet.", class_="note"))
    use_with = job.get("use_with")
    if use_with:
        if job.get("state") != "completed":
            parts.append(
                tag("p", text("The adapters are partial: the run has not finished."), class_="note")
            )
        parts.append(tag("pre", tag("code", text(use_with)), class_="use-with"))
    else:
        parts.append(tag("p", "No adapters to use yet.", class_="note"))
    return "".join(parts)


def render_html(report: Report) -> str:
    """The page: one HTML document, no reference to anything outside it."""
    title = f"loractl report: {report.job.get('name') or report.job.get('id')}"
    sections = [
        header(report),
        tag(
            "section",
            tag("h2", "Loss")
            + log_note(report)
            + figure(
                loss_chart(report),
                "Training loss per optimizer step and validation loss, by iteration; each "
                "event is drawn at the iteration the run had reached when it happened.",
                "No losses logged yet.",
            ),
            id="loss",
        ),
        tag("section", tag("h2", "Events") + events_table(report), id="events"),
        tag(
            "section",
            tag("h2", "Throughput")
            + figure(
                tokens_chart(report),
                "Tokens per second of each step; one line per attempt.",
                "No steps logged yet.",
            ),
            id="throughput",
        ),
        tag(
            "section",
            tag("h2", "Memory")
            + figure(
                memory_chart(report),
                "Peak memory of each ladder rung against the budget: solid bars were "
                "measured, dashed ones are predictions for rungs not run.",
                "No memory readings yet.",
            ),
            id="memory",
        ),
        tag(
            "section",
            tag("h2", "Attempts")
            + figure(timeline_chart(report), "Each attempt, and how it ended.", "No attempt yet.")
            + attempts_table(report),
            id="attempts",
        ),
        tag("section", tag("h2", "Settings") + settings_table(report), id="settings"),
        tag("section", tag("h2", "Adapters") + adapters_section(report), id="adapters"),
    ]
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{text(title)}</title><style>{STYLE}</style></head>"
        f"<body><main>{''.join(sections)}</main></body></html>\n"
    )
