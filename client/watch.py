"""`loractl watch`: a live terminal view of one job, or of whatever job is running.

Three layers, so the view can be tested without a daemon or a terminal: ``WatchState`` folds
events and control replies into a plain snapshot dict (no I/O), ``render`` turns a snapshot
into a rich renderable (no I/O), and ``run_watch`` does the sockets, the polling and the
terminal. Every text from the supervisor (names, paths, reasons, crash explanations) is
escaped by :func:`loractl.terminal.printable` and handed to rich as plain ``Text``, never as
markup. Nothing here imports mlx.
"""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from loractl.paths import Layout
from loractl.protocol import ACTIVE, IN_FLIGHT, MAX_MESSAGE_BYTES, TERMINAL, ClientExit, ErrorCode
from loractl.terminal import printable

# The supervisor publishes events as they happen, but a SUB socket silently drops what it
# missed (slow joiner, reconnects), so the control channel is asked again this often.
REPOLL_S = 2.0
REQUEST_TIMEOUT_S = 1.0
# Long enough to smooth out evaluation and checkpoint pauses, short enough to follow a rung
# change that makes each step slower.
RATE_WINDOW_S = 60.0
MAX_CRASHES_SHOWN = 3


# -- pure helpers ----------------------------------------------------------------------------


def examples_rate(samples: list[tuple[float, int]]) -> float | None:
    """Examples per second over the samples (time, examples_seen), or None if unknown."""
    if len(samples) < 2:
        return None
    (t0, n0), (t1, n1) = samples[0], samples[-1]
    if t1 <= t0 or n1 <= n0:
        return None
    return (n1 - n0) / (t1 - t0)


def eta_seconds(seen: int, total: int, rate: float | None) -> float | None:
    if not rate or not total or seen >= total:
        return None
    return (total - seen) / rate


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} MB"


def job_budget_mb(job: dict[str, Any]) -> float | None:
    """The budget the supervisor enforces; older daemons only have it in the config."""
    budget = job.get("budget_mb")
    if budget is None:
        budget = (job.get("effective_config") or {}).get("memory_budget_mb")
    return budget


def nothing_to_watch(status: dict[str, Any], follow: bool = False) -> str | None:
    """What `watch` says when there is no job to show, from a status reply; None when a job
    runs, is in flight (starting, backoff, ...) or is queued to start next. ``follow``: the
    watch goes on waiting, and says so."""
    counts = status.get("jobs") or {}
    if status.get("running") or any(counts.get(str(s)) for s in IN_FLIGHT):
        return None
    queued = counts.get("queued", 0)
    held = status.get("queue_held")
    if queued and not held:
        return None
    message = "nothing is running"
    shown = ", ".join(f"{n} {printable(state)}" for state, n in sorted(counts.items()) if n)
    if shown:
        message += f" ({shown})"
    if held:
        message += "; the queue is held until `loractl resume --all`"
    if follow:
        return message + "; waiting for the next job"
    return message + "; `loractl watch --follow` waits for the next job"


def _state_style(state: str) -> str:
    return {
        "running": "bold green",
        "starting": "green",
        "pausing": "bold yellow",
        "cancelling": "bold yellow",
        "backoff": "magenta",
        "completed": "bold green",
        "failed": "bold red",
        "cancelled": "yellow",
        "paused": "yellow",
        "queued": "cyan",
    }.get(state, "bold")


def _pressure_text(pressure: str) -> Text:
    style = {"normal": "green", "warn": "yellow", "critical": "bold red"}.get(pressure, "")
    return Text.assemble("memory pressure ", (pressure, style))


def _memory_text(footprint: float | None, budget: float | None, peak: float | None) -> Text:
    text = Text(_mb(footprint))
    if budget:
        ratio = (footprint or 0) / budget
        style = "green" if ratio < 0.8 else "yellow" if ratio < 0.95 else "bold red"
        text = Text.assemble(
            (_mb(footprint), style), f" / {_mb(budget)} budget", (f" ({ratio:.0%})", style)
        )
    else:
        text.append(" (no budget)")
    if peak is not None:
        text.append(f"  ·  MLX peak {_mb(peak)}")
    return text


# -- rendering -------------------------------------------------------------------------------


def render(snapshot: dict[str, Any]) -> RenderableType:
    """The whole view for one snapshot (see ``WatchState.snapshot`` for its keys)."""
    job = snapshot.get("job")
    footer = Text("Ctrl-C to quit", style="dim")
    if snapshot.get("daemon_lost"):
        footer = Text.assemble(("daemon not answering; retrying", "bold red"), "  ·  ", footer)
    elif snapshot.get("heartbeat_age_s") is not None:
        footer.append(f"  ·  heartbeat {snapshot['heartbeat_age_s']:.1f}s ago")
    if job is None:
        return Panel(_idle(snapshot), title="loractl watch", subtitle=footer, expand=True)
    title = Text.assemble(
        "job ",
        (printable(job.get("id", "?")), "bold"),
        f" ({printable(job.get('name', '?'))})  ",
        _state_line(snapshot),
    )
    return Panel(_job_table(snapshot), title=title, subtitle=footer, expand=True)


def _state_line(snapshot: dict[str, Any]) -> Text:
    job = snapshot["job"]
    state = job.get("state", "?")
    text = Text(printable(state), style=_state_style(state))
    beat = snapshot.get("heartbeat")
    if beat and state in ACTIVE and beat.get("phase"):
        text.append(f" ({printable(beat['phase'])})")
    return text


def _idle(snapshot: dict[str, Any]) -> RenderableType:
    lines: list[RenderableType] = [Text("idle: no job is running", style="bold")]
    queue = snapshot.get("queue") or {}
    if queue:
        counts = ", ".join(
            f"{printable(count)} {printable(state)}" for state, count in sorted(queue.items())
        )
        lines.append(Text(f"jobs: {counts}"))
    if snapshot.get("pressure"):
        lines.append(Text.assemble("system ", _pressure_text(snapshot["pressure"])))
    last = snapshot.get("last_job")
    if last:
        lines.append(
            Text.assemble(
                f"last job {printable(last.get('id'))} ({printable(last.get('name'))}): ",
                (printable(last.get("state", "?")), _state_style(last.get("state", ""))),
            )
        )
    if snapshot.get("message"):
        lines.append(Text(printable(snapshot["message"]), style="yellow"))
    return Group(*lines)


def _job_table(snapshot: dict[str, Any]) -> Table:
    job = snapshot["job"]
    beat = snapshot.get("heartbeat") or {}
    progress = job.get("progress") or {}
    seen = beat.get("examples_seen", progress.get("examples_seen")) or 0
    total = beat.get("total_examples") or progress.get("total_examples") or 0
    step = beat.get("step", progress.get("step"))

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()

    rung = job.get("rung", 0)
    ladder = job.get("ladder") or []
    change = next((r.get("change") for r in ladder if r.get("rung") == rung), None)
    rung_text = Text(printable(rung))
    if change:
        rung_text.append(f": {printable(change)}", style="cyan" if rung else "")
    below = len(ladder) - 1 - rung
    if below > 0:
        rung_text.append(f"  ({below} cheaper rung{'s' if below > 1 else ''} left)", style="dim")
    grid.add_row("rung", rung_text)

    bar = ProgressBar(total=total or None, completed=seen, width=40)
    percent = f"{100 * seen / total:.0f}%" if total else "-"
    counts = Text(f" {percent}  {seen:,}/{total:,} examples" if total else f" {seen:,} examples")
    if step is not None:
        counts.append(f"  ·  step {step}")
    row = Table.grid()
    row.add_row(bar, counts)
    grid.add_row("progress", row)

    loss = beat.get("loss")
    loss_text = Text("-" if loss is None else f"{loss:.3f}")
    if snapshot.get("val_loss") is not None:
        loss_text.append(f"  (val {snapshot['val_loss']:.3f})")
    grid.add_row("loss", loss_text)

    speed = Text(f"{beat.get('tokens_per_sec') or 0:,.0f} tok/s")
    if snapshot.get("rate"):
        speed.append(f"  ·  {snapshot['rate']:.2f} examples/s")
    if beat.get("step_seconds"):
        speed.append(f"  ·  {beat['step_seconds']:.2f} s/step")
    grid.add_row("speed", speed)
    grid.add_row("ETA", format_duration(snapshot.get("eta_s")))

    peaks = job.get("peak_memory_mb") or {}
    memory = _memory_text(beat.get("footprint_mb"), job_budget_mb(job), beat.get("mlx_peak_mb"))
    if peaks.get(str(rung)) is not None:
        memory.append(f"  ·  rung peak {_mb(peaks[str(rung)])}")
    grid.add_row("memory", memory)
    if snapshot.get("pressure"):
        grid.add_row("system", _pressure_text(snapshot["pressure"]))

    checkpoint = beat.get("last_checkpoint_step")
    if checkpoint is None:
        checkpoint = job.get("last_checkpoint_step")
    grid.add_row("checkpoint", "none yet" if checkpoint is None else f"step {checkpoint}")

    crashes = job.get("crashes") or []
    if crashes:
        lines = Text()
        for crash in crashes[-MAX_CRASHES_SHOWN:]:
            if lines:
                lines.append("\n")
            lines.append(
                f"step {printable(crash.get('step'))} rung {printable(crash.get('rung'))}: "
            )
            lines.append(printable(crash.get("cause")), style="red")
            if crash.get("explanation"):
                lines.append(f" - {printable(crash['explanation'])}")
        hidden = len(crashes) - MAX_CRASHES_SHOWN
        label = f"crashes ({len(crashes)})" if hidden > 0 else "crashes"
        grid.add_row(label, lines)
    if job.get("state") in TERMINAL and job.get("reason"):
        grid.add_row("reason", Text(printable(job["reason"].splitlines()[0])))
    if job.get("state") == "completed" and job.get("adapter_path"):
        grid.add_row("adapters", Text(printable(job["adapter_path"])))
    if snapshot.get("message"):
        grid.add_row("", Text(printable(snapshot["message"]), style="yellow"))
    return grid


# -- state: events and replies folded into a snapshot ----------------------------------------


class WatchState:
    """What the view knows. Fed by events and control replies; no I/O of its own."""

    def __init__(self, job_ref: str | None, *, follow: bool = True):
        self.job_ref = job_ref
        # No job named: take whatever runs; and with ``follow`` False, stay with the first
        # job taken (as if it had been named) instead of moving on to the next.
        self.follow = job_ref is None
        self.pin = job_ref is None and not follow
        self.job: dict[str, Any] | None = None
        self.last_job: dict[str, Any] | None = None
        self.running: str | None = None
        self.pressure: str | None = None
        self.queue: dict[str, int] = {}
        self.heartbeat: dict[str, Any] | None = None
        self.heartbeat_at: float | None = None
        self.val_loss: float | None = None
        self.samples: deque[tuple[float, int]] = deque()
        self.daemon_lost = False
        self.message = ""

    @property
    def job_id(self) -> str | None:
        return self.job.get("id") if self.job else None

    def target(self) -> str | None:
        """The job to ask about: the named one, else the running one, else the last one
        until it ends (so a job waiting out a crash backoff does not flicker to idle)."""
        if not self.follow:
            return self.job_id or self.job_ref
        if self.running:
            return self.running
        if self.job and self.job.get("state") not in TERMINAL:
            return self.job_id
        return None

    @property
    def waiting(self) -> bool:
        """Pinned to the next job that runs, and none has started yet."""
        return self.pin and self.follow

    def _switch(self, job_id: str) -> None:
        if self.job is not None and self.job_id != job_id:
            self.last_job = self.job
        if self.pin:
            self.follow, self.job_ref = False, job_id
        self.job = {"id": job_id, "name": "?", "state": "starting"}
        self.message = ""
        self.heartbeat = None
        self.heartbeat_at = None
        self.val_loss = None
        self.samples.clear()

    def apply_status(self, data: dict[str, Any]) -> None:
        self.daemon_lost = False
        self.running = data.get("running")
        self.pressure = data.get("pressure")
        self.queue = data.get("jobs") or {}
        if self.follow:
            if self.running and self.running != self.job_id:
                self._switch(self.running)
            elif not self.running and self.target() is None and self.job is not None:
                self.last_job, self.job = self.job, None

    def apply_show(self, job: dict[str, Any]) -> None:
        self.daemon_lost = False
        self.message = ""
        if self.job_id and job.get("id") != self.job_id:
            self._switch(job["id"])
        self.job = job
        if self.follow and job.get("state") in TERMINAL and not self.running:
            self.last_job, self.job = job, None

    def apply_event(self, topic: str, data: dict[str, Any], now: float) -> bool:
        """Fold in one published event; True when the picture changed enough to re-poll."""
        job_id = data.get("job_id")
        if topic == "heartbeat":
            if self.follow and job_id and job_id != self.job_id:
                self._switch(job_id)
                self.running = job_id
                return True
            if job_id != self.job_id:
                return False
            self.heartbeat, self.heartbeat_at = data, now
            self._sample(now, int(data.get("examples_seen") or 0))
            return False
        if topic == "job":
            state = data.get("state")
            if self.follow and state in ACTIVE and job_id and job_id != self.job_id:
                self._switch(job_id)
                self.running = job_id
                return True
            if job_id == self.job_id and self.job is not None:
                self.job = {**self.job, "state": state}
                return True
            return False
        if topic == "crash":
            if job_id == self.job_id and self.job is not None:
                crash = {k: v for k, v in data.items() if k != "job_id"}
                self.job = {**self.job, "crashes": [*(self.job.get("crashes") or []), crash]}
                self.heartbeat = None
                self.samples.clear()
                return True
            return False
        if topic == "trainer_event" and job_id == self.job_id and self.job is not None:
            kind = data.get("kind")
            detail = data.get("detail") or {}
            if kind == "eval" and detail.get("val_loss") is not None:
                self.val_loss = detail["val_loss"]
            beat = self.heartbeat
            if beat is not None and (data.get("step") or 0) > (beat.get("step") or 0):
                # Heartbeats come about once a second; an event can be several steps newer.
                seen = max(data.get("examples_seen") or 0, beat.get("examples_seen") or 0)
                self.heartbeat = {**beat, "step": data["step"], "examples_seen": seen}
            if kind == "checkpoint" and self.heartbeat is not None:
                self.heartbeat = {**self.heartbeat, "last_checkpoint_step": data.get("step")}
            return kind in ("done", "stopped", "error")
        return False

    def _sample(self, now: float, seen: int) -> None:
        # A restart from a checkpoint rewinds examples_seen: the old rate no longer applies.
        if self.samples and seen < self.samples[-1][1]:
            self.samples.clear()
        self.samples.append((now, seen))
        while len(self.samples) > 2 and now - self.samples[0][0] > RATE_WINDOW_S:
            self.samples.popleft()

    def snapshot(self, now: float) -> dict[str, Any]:
        beat = self.heartbeat
        rate = examples_rate(list(self.samples))
        eta = None
        if self.job is not None and self.job.get("state") in ACTIVE:
            progress = self.job.get("progress") or {}
            seen = (beat or progress).get("examples_seen") or 0
            total = (beat or {}).get("total_examples") or progress.get("total_examples") or 0
            eta = eta_seconds(seen, total, rate)
        active = self.job is not None and self.job.get("state") in ACTIVE
        return {
            "job": self.job,
            "heartbeat": beat if active else None,
            "heartbeat_age_s": (
                now - self.heartbeat_at if active and self.heartbeat_at is not None else None
            ),
            "rate": rate if active else None,
            "eta_s": eta,
            "val_loss": self.val_loss,
            "pressure": self.pressure,
            "queue": self.queue,
            "last_job": self.last_job,
            "daemon_lost": self.daemon_lost,
            "message": self.message,
        }

    def outcome(self) -> int | None:
        """The exit code once the watched job has ended, else None."""
        job = self.job if self.job is not None else (self.last_job if self.follow else None)
        if job is None or job.get("state") not in TERMINAL:
            return None
        return int(ClientExit.OK if job["state"] == "completed" else ClientExit.JOB_FAILED)


# -- the I/O loop ----------------------------------------------------------------------------


def in_flight_job(layout: Layout, status: dict[str, Any]) -> str | None:
    """The job to watch from a status reply: the running one, else one that is starting,
    stopping or waiting out a crash backoff (asked for only when the counts show one)."""
    from loractl.client.control import request
    from loractl.protocol import ListRequest

    if status.get("running"):
        return status["running"]
    counts = status.get("jobs") or {}
    if not any(counts.get(str(s)) for s in IN_FLIGHT):
        return None
    reply = request(
        layout, ListRequest(states=sorted(str(s) for s in IN_FLIGHT)), timeout=REQUEST_TIMEOUT_S
    )
    jobs = reply.data.get("jobs") or []
    return jobs[0]["id"] if jobs else None


def _poll(layout: Layout, state: WatchState) -> dict[str, Any]:
    """Ask the supervisor for the picture again; returns its status reply."""
    from loractl.client.control import request
    from loractl.protocol import ShowRequest, StatusRequest

    status = request(layout, StatusRequest(), timeout=REQUEST_TIMEOUT_S).data
    state.apply_status(status)
    if state.follow and state.job is None:
        found = in_flight_job(layout, status)
        if found:
            state._switch(found)
    target = state.target()
    if target:
        reply = request(layout, ShowRequest(job=target), timeout=REQUEST_TIMEOUT_S)
        state.apply_show(reply.data["job"])
    return status


def _subscribe(layout: Layout, extra_topics: tuple[bytes, ...] = ()):
    import zmq

    sock = zmq.Context.instance().socket(zmq.SUB)
    # LINGER 0: quitting must never wait on the socket; MAXMSGSIZE: the view trusts nobody.
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    for topic in (b"heartbeat", b"job", b"crash", b"trainer_event", *extra_topics):
        sock.setsockopt(zmq.SUBSCRIBE, topic)
    sock.connect(layout.events)
    return sock


def _drain(sock, state: WatchState, now: float, limit: int = 500) -> bool:
    """Apply every queued event (bounded, so a flood cannot starve the screen)."""
    import zmq

    repoll = False
    for _ in range(limit):
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            break
        if len(frames) != 2:
            continue
        try:
            data = json.loads(frames[1])
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(data, dict):
            repoll |= state.apply_event(frames[0].decode("ascii", "replace"), data, now)
    return repoll


def run_watch(
    layout: Layout,
    job_ref: str | None,
    *,
    console: Console | None = None,
    refresh_per_second: float = 4,
    exit_when_done: bool = False,
    follow: bool = False,
) -> int:
    """Show JOB (or the running job) live until Ctrl-C; returns the process exit code.

    Without JOB, the job running now (or the next one queued to start); with nothing to
    show, one line saying so and 0. With ``follow``, whatever runs, job after job, idle in
    between. 0 on Ctrl-C; 3 if the daemon is not running; 4 if JOB does not exist. With
    ``exit_when_done``, 0 once the job completes and 1 once it fails or is cancelled.
    """
    from rich.live import Live

    from loractl.client.control import DaemonNotRunning, RequestFailed

    console = console or Console()
    errors = console if console.file is not sys.stdout else Console(stderr=True)
    state = WatchState(job_ref, follow=follow)
    sock = None

    def idle(status: dict[str, Any]) -> str | None:
        return nothing_to_watch(status) if state.waiting and state.job is None else None

    try:
        # Subscribe before the first poll, so nothing between the two goes unseen.
        sock = _subscribe(layout)
        try:
            status = _poll(layout, state)
        except DaemonNotRunning as exc:
            errors.print(
                f"loractl: {printable(exc)}", soft_wrap=True, markup=False, highlight=False
            )
            return int(ClientExit.DAEMON_NOT_RUNNING)
        except RequestFailed as exc:
            errors.print(
                f"loractl: {printable(exc)}", soft_wrap=True, markup=False, highlight=False
            )
            if exc.code == ErrorCode.NOT_FOUND:
                return int(ClientExit.NOT_FOUND)
            return int(ClientExit.REFUSED)
        except RuntimeError as exc:
            errors.print(
                f"loractl: {printable(exc)}", soft_wrap=True, markup=False, highlight=False
            )
            return int(ClientExit.REFUSED)
        if message := idle(status):
            console.print(printable(message), soft_wrap=True, markup=False, highlight=False)
            return int(ClientExit.OK)
        if state.waiting and state.job is None:
            state.message = "waiting for the next queued job to start"
        period = 1.0 / max(refresh_per_second, 0.5)
        next_poll = time.monotonic() + REPOLL_S
        with Live(
            render(state.snapshot(time.monotonic())),
            console=console,
            refresh_per_second=refresh_per_second,
            transient=False,
        ) as live:
            while True:
                if exit_when_done and (code := state.outcome()) is not None:
                    live.update(render(state.snapshot(time.monotonic())), refresh=True)
                    return code
                wait = max(0.0, min(period, next_poll - time.monotonic()))
                repoll = False
                if sock.poll(int(wait * 1000)):
                    repoll = _drain(sock, state, time.monotonic())
                now = time.monotonic()
                if repoll or now >= next_poll:
                    next_poll = now + REPOLL_S
                    try:
                        status = _poll(layout, state)
                    except DaemonNotRunning:
                        state.daemon_lost = True
                    except RuntimeError as exc:  # a refusal or another protocol version
                        state.message = str(exc)
                    else:
                        # Waiting for a queued job that will no longer start (cancelled,
                        # or the queue held): say so rather than wait forever.
                        if message := idle(status):
                            state.message = message
                            live.update(render(state.snapshot(time.monotonic())), refresh=True)
                            return int(ClientExit.OK)
                live.update(render(state.snapshot(time.monotonic())))
    except KeyboardInterrupt:
        # Live's context manager has already put the cursor back; Ctrl-C is the normal exit.
        return int(ClientExit.OK)
    finally:
        if sock is not None:
            sock.close()


# -- without a terminal: one line (or one JSON object) per event ----------------------------

PLAIN_HEARTBEAT_EVERY_S = 5.0


def event_line(topic: str, data: dict[str, Any]) -> str | None:
    """One event as one plain line, for logs and pipes; None for events not worth a line.
    Escaped: a name, path or reason can never write a control character to the terminal."""
    line = _event_text(topic, data)
    return None if line is None else printable(line)


def _event_text(topic: str, data: dict[str, Any]) -> str | None:
    job = data.get("job_id") or "?"
    if topic == "heartbeat":
        total = data.get("total_examples") or 0
        seen = data.get("examples_seen") or 0
        loss = data.get("loss")
        return (
            f"{job} step {data.get('step')} examples {seen}/{total or '?'}"
            + (f" loss {loss:.4f}" if isinstance(loss, int | float) else "")
            + f" {data.get('tokens_per_sec') or 0:.0f} tok/s"
            + f" memory {_mb(data.get('footprint_mb'))} rung {data.get('rung')}"
        )
    if topic == "job":
        reason = data.get("reason")
        return f"{job} {data.get('state')}" + (f": {reason.splitlines()[0]}" if reason else "")
    if topic == "crash":
        return f"{job} crashed at step {data.get('step')}: {data.get('explanation')}"
    if topic == "trainer_event":
        kind = data.get("kind")
        detail = data.get("detail") or {}
        if kind == "checkpoint":
            return f"{job} checkpoint at step {data.get('step')}"
        if kind == "eval" and detail.get("val_loss") is not None:
            return f"{job} step {data.get('step')} val_loss {detail['val_loss']:.4f}"
        if kind == "loading":
            return f"{job} loading: {detail.get('stage') or 'the model and data'}"
        return f"{job} {kind} at step {data.get('step')}"
    if topic == "rejected":
        return f"inbox rejected {data.get('name')}: {data.get('reason')}"
    return None


def run_watch_lines(
    layout: Layout,
    job_ref: str | None,
    *,
    as_json: bool = False,
    out=None,
    heartbeat_every_s: float = PLAIN_HEARTBEAT_EVERY_S,
    follow: bool = False,
) -> int:
    """Print events as they come, one line (or JSON object) each; for pipes and logs.

    With JOB, only its events, and the exit code once it ends (0 completed, 1 failed or
    cancelled). Without, the same for the job running now (or the next one queued to
    start), or one line saying nothing is running and 0. With ``follow``, every event until
    Ctrl-C. Plain heartbeat lines are thinned to one every ``heartbeat_every_s``; JSON
    carries every event.
    """
    from loractl.client.control import DaemonNotRunning, RequestFailed, request
    from loractl.protocol import ShowRequest, StatusRequest

    out = out or sys.stdout

    def say(topic: str, data: dict[str, Any]) -> None:
        line = json.dumps({"topic": topic, **data}) if as_json else event_line(topic, data)
        if line is not None:
            print(line, file=out, flush=True)

    def show(ref: str) -> dict[str, Any]:
        return request(layout, ShowRequest(job=ref), timeout=REQUEST_TIMEOUT_S).data["job"]

    def status() -> dict[str, Any]:
        return request(layout, StatusRequest(), timeout=REQUEST_TIMEOUT_S).data

    def outcome(state: str | None) -> int | None:
        if state not in TERMINAL:
            return None
        return int(ClientExit.OK if state == "completed" else ClientExit.JOB_FAILED)

    def idle(data: dict[str, Any], message: str) -> int:
        if as_json:
            print(
                json.dumps({"topic": "idle", "jobs": data.get("jobs") or {}, "message": message}),
                file=out,
                flush=True,
            )
        else:
            print(printable(message), file=out, flush=True)
        return int(ClientExit.OK)

    sock = None
    try:
        sock = _subscribe(layout, extra_topics=(b"rejected",))
        job_id, state = None, None
        # Without JOB or --follow: the job running now, or the next to start.
        waiting = job_ref is None and not follow
        try:
            current = status()
            if waiting:
                job_ref = in_flight_job(layout, current)
                if job_ref is None and (message := nothing_to_watch(current)):
                    return idle(current, message)
                waiting = job_ref is None
            elif job_ref is None and nothing_to_watch(current):
                # --follow with nothing running: say so once, then wait.
                idle(current, nothing_to_watch(current, follow=True))
            if job_ref:
                job = show(job_ref)
                job_id, state = job["id"], job["state"]
                say("job", {"job_id": job_id, "state": state, "reason": job.get("reason")})
        except DaemonNotRunning as exc:
            print(f"loractl: {printable(exc)}", file=sys.stderr)
            return int(ClientExit.DAEMON_NOT_RUNNING)
        except RequestFailed as exc:
            print(f"loractl: {printable(exc)}", file=sys.stderr)
            return int(ClientExit.NOT_FOUND if exc.code == ErrorCode.NOT_FOUND else 5)
        last_beat = 0.0
        next_poll = time.monotonic() + REPOLL_S
        while (code := outcome(state)) is None:
            if sock.poll(int(REPOLL_S * 1000)):
                frames = sock.recv_multipart()
                try:
                    topic, data = frames[0].decode("ascii"), json.loads(frames[1])
                except (IndexError, UnicodeDecodeError, json.JSONDecodeError):
                    continue
                if not isinstance(data, dict):
                    continue
                if waiting:
                    # The first job seen starting or beating is the one to stay with.
                    starts = topic == "heartbeat" or (
                        topic == "job" and data.get("state") in ACTIVE
                    )
                    if not (starts and isinstance(data.get("job_id"), str)):
                        continue
                    waiting, job_id = False, data["job_id"]
                    if topic == "heartbeat":
                        state = "running"
                        say("job", {"job_id": job_id, "state": state})
                if job_id and data.get("job_id") != job_id:
                    continue
                if topic == "heartbeat" and not as_json:
                    now = time.monotonic()
                    if now - last_beat < heartbeat_every_s:
                        continue
                    last_beat = now
                if topic == "job" and job_id:
                    state = data.get("state")
                say(topic, data)
            if (job_id or waiting) and time.monotonic() >= next_poll:
                # Events can be missed (a SUB socket drops what it was not there for).
                next_poll = time.monotonic() + REPOLL_S
                try:
                    if waiting:
                        current = status()
                        found = in_flight_job(layout, current)
                        if found is None:
                            if message := nothing_to_watch(current):
                                return idle(current, message)
                            continue
                        waiting, job_id = False, found
                    fresh = show(job_id)
                except RuntimeError:
                    continue
                if fresh["state"] != state:
                    state = fresh["state"]
                    say("job", {"job_id": job_id, "state": state, "reason": fresh.get("reason")})
        return code
    except KeyboardInterrupt:
        return int(ClientExit.OK)
    finally:
        if sock is not None:
            sock.close()
