"""Rendering for the CLI, kept apart from the commands: JSON for machines, text for people.

Every value from a job, a path or a log goes through :func:`loractl.terminal.printable`
before it is written as text (JSON escapes control characters itself), and nothing is ever
printed as ``None``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from loractl.terminal import printable

# What text output shows for a value that is not known (never "None").
UNKNOWN = "-"


def shown(value: Any, multiline: bool = False) -> str:
    """A value as text for a person: escaped, and "-" for nothing."""
    return UNKNOWN if value is None else printable(value, multiline=multiline)


def _text(value: Any, indent: int = 0) -> list[str]:
    pad = "  " * indent
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}{shown(key)}:")
                lines.extend(_text(item, indent + 1))
            else:
                lines.append(f"{pad}{shown(key)}: {shown(item, multiline=True)}")
        return lines
    if isinstance(value, list):
        lines = []
        for item in value:
            if isinstance(item, dict):
                inner = _text(item, indent + 1)
                lines.append(f"{pad}- {inner[0].strip()}")
                lines.extend(inner[1:])
            else:
                lines.append(f"{pad}- {shown(item, multiline=True)}")
        return lines
    return [f"{pad}{shown(value, multiline=True)}"]


def emit(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        click.echo("\n".join(_text(data)))


def fail(message: str, code: int, as_json: bool) -> None:
    """Report an error in one line (or a JSON object) and exit with ``code``; no traceback."""
    if as_json:
        click.echo(json.dumps({"ok": False, "error": int(code), "reason": message}))
    else:
        click.echo(f"loractl: {printable(message, multiline=True)}", err=True)
    sys.exit(int(code))


# What a state in the middle of a stop means, for people reading `show`.
STATE_NOTES = {
    "pausing": "the trainer is writing a checkpoint, then the job pauses",
    "cancelling": "the trainer is writing a checkpoint, then the job is cancelled",
    "backoff": "waiting to restart after a crash",
}


def job_table(jobs: list[dict[str, Any]]) -> str:
    if not jobs:
        return "no jobs"
    rows = [("ID", "NAME", "STATE", "RUNG", "PROGRESS", "PRIO")]
    for job in jobs:
        progress = job["progress"]
        total = progress.get("total_examples") or 0
        done = progress.get("examples_seen") or 0
        done_share = f"{100 * done / total:.0f}%" if total else UNKNOWN
        cells = (job["id"], job["name"], job["state"], job["rung"], done_share, job["priority"])
        rows.append(tuple(shown(cell) for cell in cells))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


def _rung_memory(rung: dict[str, Any], unmeasured: str) -> str:
    """A ladder rung's memory: its measured peak (or ``unmeasured``), its predicted peak when
    the job's memory model has one, and why a step down skipped it."""
    peak = rung.get("peak_memory_mb")
    parts = [f"peak {peak:.0f} MB" if peak else unmeasured]
    predicted = rung.get("predicted_peak_mb")
    if predicted:
        parts.append(f"predicted {predicted:.0f} MB")
    text = ", ".join(parts)
    if rung.get("skipped"):
        text += f" (skipped: {printable(rung['skipped'])})"
    return text


def state_words(state: str, outcome: str | None) -> str:
    """A job's state with what its outcome adds, said once: "failed (memory)", "completed",
    "cancelled", never "failed, failed:memory" or "cancelled, cancelled"."""
    if not outcome or outcome in (state, "success"):
        return shown(state)
    prefix, _, cause = outcome.partition(":")
    if prefix == state and cause:
        return f"{shown(state)} ({shown(cause)})"
    return f"{shown(state)}, {shown(outcome)}"


def rank_place(rank: dict[str, Any]) -> str:
    """Where a rank runs, as a user knows it: a local rank by this Mac's name, a remote one
    by its host name and the address the config gives (two Macs may share one name)."""
    host, hostname = str(rank.get("host") or ""), str(rank.get("hostname") or "")
    if rank.get("local", True):
        return hostname or host
    return f"{hostname} at {host}" if hostname and hostname != host else host


def job_details(job: dict[str, Any], loss_line: str = "") -> str:
    """`show` in text; ``loss_line``, the training loss so far as a sparkline (from the
    client, which reads train.log: the view itself reads nothing)."""
    progress = job["progress"]
    note = STATE_NOTES.get(job["state"])
    lines = [
        f"job {shown(job['id'])} ({shown(job['name'])}): "
        + state_words(job["state"], job.get("outcome"))
        + (f" ({note})" if note else ""),
        f"  progress: {shown(progress['examples_seen'])}/{shown(progress['total_examples'])} "
        f"examples, step {shown(progress['step'])}, attempts {shown(job['attempts'])}",
        f"  rung: {shown(job['rung'])}",
    ]
    if loss_line:
        lines.append(f"  loss: {loss_line}")
    if job.get("trainer_pid"):
        lines.append(f"  trainer pid: {shown(job['trainer_pid'])}")
    if job.get("ranks"):
        lines.append("  ranks:")
        for rank in job["ranks"]:
            footprint = f"{rank['footprint_mb']:.0f} MB" if rank.get("footprint_mb") else UNKNOWN
            lines.append(
                f"    {shown(rank['rank'])}: {shown(rank_place(rank))} pid {shown(rank['pid'])}, "
                f"step {shown(rank['step'])}, {footprint}"
            )
    if job.get("ladder"):
        lines.append("  ladder:")
        for rung in job["ladder"]:
            marker = "->" if rung["rung"] == job["rung"] else "  "
            memory = _rung_memory(rung, "not run")
            lines.append(f"   {marker} {shown(rung['rung'])}: {shown(rung['change']):<40} {memory}")
    if job.get("crashes"):
        lines.append("  crashes:")
        for crash in job["crashes"]:
            where = f" rank {shown(crash.get('rank', 0))}" if job.get("ranks") else ""
            lines.append(
                f"    step {shown(crash['step'])} rung {shown(crash['rung'])}{where}: "
                f"{shown(crash['cause'])} ({shown(crash['explanation'])})"
            )
    for event in job.get("history") or []:
        if event.get("kind") == "started_over":
            # Every checkpoint was damaged: a resume that silently began again would mislead.
            lines.append(f"  note: {shown(event.get('cause'))}")
    if job.get("reason"):
        lines.append("  reason: " + shown(job["reason"], multiline=True).replace("\n", "\n    "))
    lines.append(f"  adapters: {adapters_line(job)}")
    if job.get("use_with"):
        # Already quoted for a shell and free of control characters (jobview.use_with):
        # printed as `show --json` has it, so either can be pasted.
        partial = job.get("adapters_partial")
        label = f"use with (partial adapters, {shown(partial)})" if partial else "use with"
        lines.append(f"  {label}: {shown(job['use_with'])}")
    return "\n".join(lines)


def adapters_line(job: dict[str, Any]) -> str:
    """Where the job's adapters go; when its config no longer loads, why that is unknown."""
    if job.get("adapter_path"):
        return shown(job["adapter_path"])
    error = (job.get("effective_config") or {}).get("error")
    if error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "unknown error"
        return f"unknown: its config does not load ({shown(first)})"
    return "unknown"


def history_table(events: list[dict[str, Any]]) -> str:
    import datetime

    lines = []
    for event in events:
        when = datetime.datetime.fromtimestamp(event["at"]).strftime("%Y-%m-%d %H:%M:%S")
        move = ""
        if event.get("to_state"):
            # A job's first event has no state to come from.
            move = (
                f"{event['from_state']} -> {event['to_state']}"
                if event.get("from_state")
                else f"new -> {event['to_state']}"
            )
        detail = event.get("detail") or {}
        extra = ", ".join(
            f"{shown(k)}={shown(v)}" for k, v in detail.items() if k not in ("crashes",)
        )
        lines.append(
            f"{when}  {shown(event['kind']):<14} {shown(move):<24} rung {shown(event.get('rung'))} "
            f"step {shown(event.get('step'))}  {shown(event.get('cause') or '')} {extra}".rstrip()
        )
    return "\n".join(lines) or "no events"


def ladder_table(ladder: list[dict[str, Any]], current: int) -> str:
    lines = []
    for rung in ladder:
        marker = "->" if rung["rung"] == current else "  "
        memory = _rung_memory(rung, "not run yet")
        lines.append(f"{marker} rung {shown(rung['rung'])}: {shown(rung['change']):<40} {memory}")
    return "\n".join(lines)


def status_text(status: dict[str, Any]) -> str:
    """`loractl status`: the supervisor, the queue, the inbox and what it turned away."""
    counts = status.get("jobs") or {}
    queue = (
        ", ".join(f"{shown(count)} {shown(state)}" for state, count in sorted(counts.items()))
        or "no jobs"
    )
    lines = [
        f"supervisor {shown(status['version'])} (pid {shown(status['pid'])}), "
        f"up {status['uptime_s']:.0f} s, memory pressure {shown(status.get('pressure', '?'))}",
        f"  home:    {shown(status['home'])}",
        f"  inbox:   {shown(status.get('inbox', '?'))}  (drop .yaml/.toml/.json job configs here)",
        f"  logs:    {shown(status.get('logs', '?'))}",
        f"  jobs:    {queue}",
    ]
    if status.get("running"):
        lines.append(
            f"  running: {shown(status['running'])} "
            f"(trainer pid {shown(status.get('trainer_pid'))})"
        )
    if status.get("queue_held"):
        lines.append("  queue:   held by `pause --all`; `loractl resume --all` releases it")
    rejected = status.get("rejected") or []
    if rejected:
        lines.append("  recently rejected from the inbox:")
        lines.extend(rejection_lines(rejected, indent="    "))
    return "\n".join(lines)


def rejection_lines(rejected: list[dict[str, Any]], indent: str = "") -> list[str]:
    import datetime

    lines = []
    for item in rejected:
        when = datetime.datetime.fromtimestamp(item["at"]).strftime("%Y-%m-%d %H:%M")
        reason = shown(item["reason"], multiline=True).replace("\n", "\n" + indent + "    ")
        lines.append(f"{indent}{when}  {shown(item['name'])}: {reason}")
    return lines


def service_text(service: dict[str, Any] | None, supervisor: dict[str, Any] | None) -> str:
    """`loractl daemon status`: the service manager's view beside the supervisor's own."""
    lines = []
    if service is not None:
        if not service.get("installed"):
            lines.append(
                f"service ({shown(service.get('target'))}): not installed; "
                "`loractl daemon install` makes it start at login and restart after a crash"
            )
        else:
            state = (
                "running"
                if service.get("running")
                else ("loaded, not running" if service.get("loaded") else "installed, not loaded")
            )
            extra = []
            if service.get("pid"):
                extra.append(f"pid {shown(service['pid'])}")
            if service.get("last_exit") is not None:
                extra.append(f"last exit {shown(service['last_exit'])}")
            details = f" ({', '.join(extra)})" if extra else ""
            lines.append(f"service ({shown(service.get('target'))}): {state}{details}")
            lines.append(f"  definition: {shown(service.get('unit_path'))}")
        if service.get("detail"):
            lines.append(f"  {shown(service['detail'], multiline=True)}")
    if supervisor is None:
        lines.append("supervisor: not answering")
    else:
        lines.append(status_text(supervisor))
    return "\n".join(lines)


def _ids(items: list[Any]) -> str:
    return ", ".join(
        shown(item.get("id", item)) if isinstance(item, dict) else shown(item) for item in items
    )


def queue_text(data: dict[str, Any], held: bool) -> str:
    """`pause --all` / `resume --all`: whether the queue is held, and which jobs moved."""
    held = data.get("held", held)
    if held:
        lines = ["queue held: nothing new starts until `loractl resume --all`"]
        if data.get("already_held"):
            lines[0] = "queue already held: nothing new starts until `loractl resume --all`"
    elif data.get("was_held") is False:
        lines = ["queue was not held: queued jobs start as usual"]
    else:
        lines = ["queue released: queued jobs start again"]
    labels = {
        "pausing": "pausing (checkpointing first)",
        "paused": "paused",
        "resumed": "resumed",
        "queued": "queued",
    }
    for key, label in labels.items():
        moved = data.get(key)
        if isinstance(moved, str):
            moved = [moved]
        if moved:
            lines.append(f"  {label}: {_ids(moved)}")
    return "\n".join(lines)


def drained_text(jobs: list[dict[str, Any]]) -> str:
    """`wait --all`: each job that was pending and how it ended, then the verdict."""
    if not jobs:
        return "nothing to wait for: no job is pending"
    lines = []
    for job in jobs:
        line = f"{shown(job['id'])} ({shown(job['name'])}): {shown(job['state'])}"
        if job.get("reason") and job["state"] != "completed":
            line += f": {shown(job['reason'].splitlines()[0])}"
        lines.append(line)
    done = sum(job["state"] == "completed" for job in jobs)
    if done == len(jobs):
        lines.append(f"all {len(jobs)} completed")
    else:
        lines.append(f"{len(jobs) - done} of {len(jobs)} did not complete")
    return "\n".join(lines)


def config_summary(
    source: str, config: dict[str, Any], rungs: list[str], budget: str, resumes: str | None
) -> str:
    """`config validate`: what the job will do, in a few lines, and its ladder as one line per
    rung ("rung 1: grad_accumulation_steps=2"); `--json` gives the raw form."""
    lora = config.get("lora_parameters") or {}
    length = (
        f"{config['epochs']} epochs"
        if config.get("epochs")
        else f"{shown(config.get('iters'))} iterations"
    )
    data = config.get("data") or config.get("hf_dataset")
    lines = [
        f"{shown(source)}: ok, job {shown(config.get('name'))}",
        f"  model:    {shown(config.get('model'))}",
        f"  data:     {shown(data)}",
        f"  adapters: {shown(config.get('adapter_path'))}",
        f"  training: {length}, batch_size {shown(config.get('batch_size'))}, "
        f"grad_accumulation_steps {shown(config.get('grad_accumulation_steps'))}, "
        f"max_seq_length {shown(config.get('max_seq_length'))}, "
        f"learning_rate {shown(config.get('learning_rate'))}",
        f"  {shown(config.get('fine_tune_type'))}:     rank {shown(lora.get('rank'))}, "
        f"scale {shown(lora.get('scale'))}, num_layers {shown(config.get('num_layers'))}",
        f"  memory:   {shown(budget)}; checkpoint every "
        f"{shown(config.get('checkpoint_interval'))} optimizer steps",
        "  ladder (stepped down after an out-of-memory stop):",
    ]
    lines.extend(f"    rung {index}: {shown(change)}" for index, change in enumerate(rungs))
    if resumes:
        lines.append(f"  note: {shown(resumes)}")
    return "\n".join(lines)
