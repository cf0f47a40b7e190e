"""`loractl watch`: the pure view and state, and the real command in a real pseudo-terminal."""

from __future__ import annotations

import io
import json
import os
import re
import select
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from conftest import make_job, wait_for
from loractl.client.harness import SupervisorProcess
from loractl.client.watch import (
    WatchState,
    eta_seconds,
    examples_rate,
    format_duration,
    nothing_to_watch,
    render,
    run_watch,
)

ANSI = re.compile(rb"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
HIDE_CURSOR, SHOW_CURSOR = b"\x1b[?25l", b"\x1b[?25h"
ROWS, COLS = 40, 120

# The slave end of a pty only becomes the child's controlling terminal (so that the line
# discipline turns ^C into SIGINT) once a session leader claims it; subprocess cannot do that,
# and pty.fork() is unsafe in a process already running zmq's threads.
# As a shell starts a foreground job: the pty becomes its controlling terminal, and SIGINT
# is back to its default and unblocked (a test worker may hand down an ignored or blocked
# SIGINT, and Python then never turns ^C into KeyboardInterrupt).
CLAIM_TTY = (
    "import fcntl, os, signal, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT]); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


def snapshot() -> dict:
    return {
        "job": {
            "id": "a1b2c3d4e5f6",
            "name": "tiny-lora",
            "state": "running",
            "rung": 1,
            "progress": {"examples_seen": 100, "total_examples": 500, "step": 25},
            "ladder": [
                {"rung": 0, "change": "as submitted", "peak_memory_mb": 1300.0},
                {"rung": 1, "change": "max_seq_length=128", "peak_memory_mb": 612.0},
                {"rung": 2, "change": "batch_size=1", "peak_memory_mb": None},
            ],
            "peak_memory_mb": {"0": 1300.0, "1": 612.0},
            "crashes": [
                {
                    "step": 12,
                    "rung": 0,
                    "cause": "memory",
                    "explanation": "footprint reached the budget",
                }
            ],
            "effective_config": {"memory_budget_mb": 1024},
            "last_checkpoint_step": 20,
        },
        "heartbeat": {
            "job_id": "a1b2c3d4e5f6",
            "phase": "train",
            "step": 42,
            "examples_seen": 210,
            "total_examples": 500,
            "loss": 2.3456,
            "tokens_per_sec": 1234.5,
            "step_seconds": 0.48,
            "footprint_mb": 512.0,
            "mlx_peak_mb": 400.0,
            "last_checkpoint_step": 40,
        },
        "heartbeat_age_s": 0.4,
        "rate": 2.1,
        "eta_s": 137.0,
        "pressure": "warn",
        "val_loss": None,
    }


def screen_text(renderable) -> str:
    console = Console(record=True, width=100, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_render_shows_progress_loss_speed_memory_rung_and_crashes():
    """render() of a running job's snapshot shows every figure a person watches for."""
    text = screen_text(render(snapshot()))
    assert "a1b2c3d4e5f6" in text and "tiny-lora" in text and "running (train)" in text
    assert "42%" in text and "210/500 examples" in text and "step 42" in text
    assert re.search(r"loss +2\.346", text)
    assert "1,234 tok/s" in text and "2.10 examples/s" in text
    assert "512 MB / 1,024 MB budget (50%)" in text and "MLX peak 400 MB" in text
    assert "1: max_seq_length=128" in text and "rung peak 612 MB" in text
    assert re.search(r"ETA +2m 17s", text)
    assert "memory pressure warn" in text
    assert re.search(r"checkpoint +step 40", text)
    assert "memory - footprint reached the budget" in text
    assert all(len(line) <= 100 for line in text.splitlines())


def test_render_prefers_the_daemons_budget_and_copes_without_a_heartbeat():
    """budget_mb wins over the config's; with no heartbeat yet the stored progress shows."""
    snap = snapshot()
    snap["job"]["budget_mb"] = 2048.0
    snap["heartbeat"] = None
    snap["eta_s"] = None
    text = screen_text(render(snap))
    assert "20%" in text and "100/500 examples" in text
    assert "- / 2,048 MB budget" in text
    assert re.search(r"checkpoint +step 20", text)
    assert re.search(r"loss +- ", text) and re.search(r"ETA +- ", text)


def test_render_idle_names_the_queue_and_the_last_job():
    """With nothing running the view says idle, with the queue and how the last job ended."""
    snap = {
        "job": None,
        "queue": {"queued": 2},
        "pressure": "normal",
        "last_job": {"id": "abc", "name": "night-run", "state": "completed"},
    }
    text = screen_text(render(snap))
    assert "idle" in text and "2 queued" in text
    assert "last job abc (night-run): completed" in text


def test_rate_and_eta_come_from_the_examples_seen_over_time():
    """The examples rate spans the samples; ETA is what is left over that rate."""
    assert examples_rate([(0.0, 0)]) is None
    assert examples_rate([(10.0, 100), (20.0, 120), (30.0, 140)]) == pytest.approx(2.0)
    assert eta_seconds(140, 500, 2.0) == pytest.approx(180.0)
    assert eta_seconds(500, 500, 2.0) is None and eta_seconds(1, 500, None) is None
    assert format_duration(59) == "59s" and format_duration(137) == "2m 17s"
    assert format_duration(3 * 3600 + 300) == "3h 05m" and format_duration(None) == "-"


def test_state_follows_whatever_job_runs_and_goes_idle_after():
    """Without a job ref the state switches to each new job and is idle once it ends."""
    state = WatchState(None)
    state.apply_status({"running": None, "jobs": {"queued": 1}, "pressure": "normal"})
    assert state.target() is None and state.snapshot(0.0)["job"] is None
    assert state.apply_event("job", {"job_id": "j1", "state": "starting"}, 1.0)
    assert state.target() == "j1"
    beat = {"job_id": "j1", "examples_seen": 10, "total_examples": 110, "loss": 3.0}
    state.apply_event("heartbeat", {**beat}, 1.0)
    state.apply_show({"id": "j1", "name": "first", "state": "running", "progress": {}})
    state.apply_event("heartbeat", {**beat, "examples_seen": 30}, 11.0)
    snap = state.snapshot(12.0)
    assert snap["rate"] == pytest.approx(2.0) and snap["eta_s"] == pytest.approx(40.0)
    assert snap["heartbeat_age_s"] == pytest.approx(1.0)
    # A heartbeat from another job means a new one started while an event was missed.
    assert state.apply_event("heartbeat", {"job_id": "j2", "examples_seen": 0}, 13.0)
    assert state.target() == "j2" and state.last_job["name"] == "first"
    assert state.snapshot(13.0)["rate"] is None
    state.apply_show({"id": "j2", "name": "second", "state": "running", "progress": {}})
    assert state.outcome() is None
    assert state.apply_event("job", {"job_id": "j2", "state": "failed"}, 14.0)
    state.apply_status({"running": None, "jobs": {"failed": 1}, "pressure": "normal"})
    assert state.snapshot(15.0)["job"] is None
    assert state.last_job["id"] == "j2" and state.outcome() == 1


def test_state_for_a_named_job_ignores_others_and_keeps_crashes():
    """A named job's view ignores other jobs' events and collects its own crashes."""
    state = WatchState("mine")
    state.apply_show({"id": "m1", "name": "mine", "state": "running", "crashes": []})
    assert not state.apply_event("heartbeat", {"job_id": "x9", "examples_seen": 5}, 1.0)
    assert state.heartbeat is None and state.target() == "m1"
    crash = {"job_id": "m1", "cause": "memory", "explanation": "too big", "step": 3, "rung": 0}
    assert state.apply_event("crash", crash, 2.0)
    assert state.job["crashes"] == [{k: v for k, v in crash.items() if k != "job_id"}]
    event = {"job_id": "m1", "kind": "eval", "detail": {"val_loss": 1.5}}
    state.apply_event("trainer_event", event, 3.0)
    assert state.snapshot(3.0)["val_loss"] == 1.5
    state.apply_event("job", {"job_id": "m1", "state": "completed"}, 4.0)
    assert state.outcome() == 0


def test_nothing_to_watch_only_when_no_job_runs_or_is_about_to():
    """The idle message names the counts and the hold; a running, in-flight or startable
    queued job means there is something to watch."""
    assert nothing_to_watch({"running": "j1", "jobs": {"running": 1}}) is None
    assert nothing_to_watch({"running": None, "jobs": {"backoff": 1}}) is None
    assert nothing_to_watch({"running": None, "jobs": {"pausing": 1}}) is None
    assert nothing_to_watch({"running": None, "jobs": {"queued": 2}}) is None
    assert nothing_to_watch({"running": None, "jobs": {}}) == (
        "nothing is running; `loractl watch --follow` waits for the next job"
    )
    held = nothing_to_watch({"running": None, "jobs": {"queued": 2}, "queue_held": True})
    assert held.startswith("nothing is running (2 queued); the queue is held until")
    assert nothing_to_watch({"jobs": {}}, follow=True) == (
        "nothing is running; waiting for the next job"
    )
    done = nothing_to_watch({"running": None, "jobs": {"completed": 3, "paused": 1}})
    assert done.startswith("nothing is running (3 completed, 1 paused);")


def test_state_without_follow_stays_with_the_first_job_it_takes():
    """Not following, the state takes the next job that starts and keeps it after it ends,
    as if it had been named; the outcome is that job's."""
    state = WatchState(None, follow=False)
    assert state.waiting and state.target() is None
    assert state.apply_event("job", {"job_id": "j1", "state": "starting"}, 1.0)
    assert not state.waiting and state.target() == "j1"
    assert not state.apply_event("heartbeat", {"job_id": "j2", "examples_seen": 1}, 2.0)
    assert state.apply_event("job", {"job_id": "j1", "state": "pausing"}, 3.0)
    assert state.snapshot(3.0)["job"]["state"] == "pausing" and state.outcome() is None
    state.apply_event("job", {"job_id": "j1", "state": "cancelled"}, 4.0)
    state.apply_status({"running": "j2", "jobs": {"running": 1, "cancelled": 1}})
    assert state.target() == "j1" and state.job["id"] == "j1" and state.outcome() == 1


def test_pausing_and_cancelling_show_their_phase_and_memory():
    """A job being paused still shows its heartbeat, phase and memory while it checkpoints."""
    snap = snapshot()
    snap["job"]["state"] = "pausing"
    snap["heartbeat"]["phase"] = "checkpoint"
    text = screen_text(render(snap))
    assert "pausing (checkpoint)" in text and "512 MB / 1,024 MB budget" in text
    state = WatchState("m1")
    state.apply_show({"id": "m1", "name": "x", "state": "cancelling", "progress": {}})
    state.apply_event("heartbeat", {"job_id": "m1", "examples_seen": 5, "phase": "checkpoint"}, 1.0)
    assert state.snapshot(1.5)["heartbeat"]["phase"] == "checkpoint"


# -- the real command ------------------------------------------------------------------------


def watch_argv(home: Path, *args: str) -> list[str]:
    """`loractl --home HOME watch ARGS` for a child interpreter."""
    return ["-m", "loractl.client.cli", "--home", str(home), "watch", *args]


class Terminal:
    """A child process on a real pseudo-terminal, and everything it drew."""

    def __init__(self, argv: list[str]):
        import fcntl
        import termios

        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(COLS), "LINES": str(ROWS)}
        for name in ("LORACTL_HOME", "NO_COLOR", "FORCE_COLOR", "TERM_PROGRAM"):
            env.pop(name, None)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLAIM_TTY, *argv],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
        )
        os.close(slave)
        self.raw = b""

    def read(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.master], [], [], left)
            if not ready:
                return
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: every slave descriptor is closed, the child is gone
                return
            if not chunk:
                return
            self.raw += chunk

    @property
    def text(self) -> str:
        return ANSI.sub(b"", self.raw).decode("utf-8", "replace")

    def wait_for_text(self, pattern: str, timeout: float) -> re.Match:
        def seen():
            self.read(0.1)
            if self.proc.poll() is not None:
                raise AssertionError(f"watch exited early ({self.proc.returncode}): {self.text}")
            return re.search(pattern, self.text)

        try:
            return wait_for(seen, timeout, interval=0)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; no {pattern!r} on screen:\n{self.text}") from None

    def finish(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.read(0.1)
        self.read(0.2)
        return self.proc.poll()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


@pytest.fixture
def supervisor(tmp_path):
    sup = SupervisorProcess(tmp_path / "home")
    yield sup
    sup.stop()


def test_watch_draws_the_running_job_in_a_terminal_and_quits_on_ctrl_c(
    tiny_workspace, tmp_path, supervisor
):
    """`loractl watch JOB` on a pty draws name, loss and tok/s live; ^C exits 0, cursor back."""
    supervisor.start()
    config = make_job(tiny_workspace, tmp_path / "src", name="watched-job", iters=400)
    job_id = supervisor.submit(config)
    terminal = Terminal(watch_argv(supervisor.home, job_id))
    try:
        terminal.wait_for_text("watched-job", timeout=30)
        terminal.wait_for_text(r"loss +\d+\.\d{3}", timeout=120)
        terminal.wait_for_text(r"[\d,]+ tok/s", timeout=30)
        terminal.wait_for_text(r"MB / [\d,]+ MB budget", timeout=30)
        assert job_id in terminal.text
        assert supervisor.show(job_id)["state"] == "running", "the job ended before ^C"
        os.write(terminal.master, b"\x03")
        code = terminal.finish(timeout=30)
        assert code == 0, terminal.text
    finally:
        terminal.close()
    assert "Traceback" not in terminal.text and "KeyboardInterrupt" not in terminal.text
    # Live hid the cursor while drawing; quitting has to give it back.
    assert terminal.raw.rfind(SHOW_CURSOR) > terminal.raw.rfind(HIDE_CURSOR) >= 0


def watch_in_thread(
    layout, job_ref: str | None, follow: bool = False
) -> tuple[dict, io.StringIO, threading.Thread]:
    """run_watch(exit_when_done=True) on a daemon thread, so a hang fails instead of sticking.
    The console draws as on a terminal, so what is on screen can be read while it runs."""
    result: dict = {}
    out = io.StringIO()

    def target():
        console = Console(file=out, width=100, force_terminal=True)
        result["code"] = run_watch(
            layout, job_ref, console=console, exit_when_done=True, follow=follow
        )

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return result, out, thread


def test_watch_until_done_returns_0_for_a_named_job_and_for_the_followed_one(
    tiny_workspace, tmp_path, supervisor
):
    """exit_when_done returns 0 on completion, both watching JOB and following what runs."""
    supervisor.start()
    following, follow_out, follow_thread = watch_in_thread(supervisor.layout, None, follow=True)
    # Once it draws "idle" it has subscribed and polled: the job cannot start unseen.
    wait_for(lambda: "idle: no job is running" in follow_out.getvalue(), 30)
    job_id = supervisor.submit(make_job(tiny_workspace, tmp_path / "src", name="short", iters=16))
    named, named_out, named_thread = watch_in_thread(supervisor.layout, job_id)
    for thread in (named_thread, follow_thread):
        thread.join(timeout=120)
        assert not thread.is_alive(), named_out.getvalue() + follow_out.getvalue()
    assert supervisor.show(job_id)["state"] == "completed"
    assert named["code"] == 0 and following["code"] == 0
    assert job_id in named_out.getvalue() and "completed" in named_out.getvalue()
    assert "last job " + job_id in follow_out.getvalue()
    missing, missing_out, missing_thread = watch_in_thread(supervisor.layout, "no-such-job")
    missing_thread.join(timeout=30)
    assert missing["code"] == 4 and "no-such-job" in missing_out.getvalue()


def test_watch_without_a_daemon_says_so_in_one_line_and_exits_3(tmp_path):
    """With no daemon for the home, watch prints one line naming the fix and exits 3."""
    began = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k != "LORACTL_HOME"}
    result = subprocess.run(
        [sys.executable, *watch_argv(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert result.returncode == 3, result.stdout + result.stderr
    output = (result.stdout + result.stderr).strip()
    assert len(output.splitlines()) == 1, output
    assert "not running" in output and "daemon run" in output
    assert time.monotonic() - began < 10


def test_watch_with_nothing_running_says_so_and_exits_0_unless_following(tmp_path, supervisor):
    """On a terminal and in a pipe, `watch` with no job says nothing is running and exits
    0; `watch --follow` waits and prints the next job's events as it runs."""
    supervisor.start()
    terminal = Terminal(watch_argv(supervisor.home))
    try:
        assert terminal.finish(timeout=30) == 0, terminal.text
    finally:
        terminal.close()
    assert "nothing is running; `loractl watch --follow` waits for the next job" in terminal.text
    piped = subprocess.run(
        [sys.executable, *watch_argv(supervisor.home, "--json")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["message"].startswith("nothing is running")
    refused = subprocess.run(
        [sys.executable, *watch_argv(supervisor.home, "some-job", "--follow")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 2 and "takes no JOB" in refused.stderr


def test_watch_follow_waits_for_the_next_job_and_prints_its_events(
    tiny_workspace, tmp_path, supervisor
):
    """`watch --follow` piped keeps running while idle, then prints the job's lines."""
    supervisor.start()
    follower = subprocess.Popen(
        [sys.executable, *watch_argv(supervisor.home, "--follow")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(follower.stdout), daemon=True)
    reader.start()
    try:
        # It says it is waiting once it has subscribed and asked for the status.
        wait_for(lambda: any(line.startswith("nothing is running") for line in lines), 30)
        job_id = supervisor.submit(make_job(tiny_workspace, tmp_path / "src", iters=8))
        supervisor.wait_state(job_id, {"completed"}, timeout=120)
        wait_for(lambda: f"{job_id} completed\n" in lines, 30)
        assert follower.poll() is None, "--follow must keep waiting for the next job"
    finally:
        follower.kill()
        follower.wait()
        reader.join(timeout=5)
        follower.stdout.close()
    assert lines[0] == "nothing is running; waiting for the next job\n"
    assert len([line for line in lines if line.startswith(f"{job_id} ")]) >= 2, lines
