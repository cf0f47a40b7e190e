"""SIGHUP, SIGUSR1 and SIGUSR2 never take the supervisor down: a hand-started `daemon run`
outlives its terminal and keeps its trainer; SIGHUP reopens the log files (ignored under the
service manager), SIGUSR1 dumps the state to the log, SIGUSR2 is ignored."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import threading
from pathlib import Path

from conftest import make_job, wait_for
from loractl.client.control import request
from loractl.client.harness import FAST, SupervisorProcess, trainers_of
from loractl.paths import Layout
from loractl.protocol import ShowRequest, StatusRequest, SubmitRequest


def log_records(layout: Layout, name: str = "supervisor.log") -> list[dict]:
    path = layout.logs / name
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def logged(layout: Layout, event: str, name: str = "supervisor.log") -> list[dict]:
    return [r for r in log_records(layout, name) if r.get("event", "").startswith(event)]


def answers(layout: Layout) -> bool:
    try:
        request(layout, StatusRequest(), timeout=1)
        return True
    except Exception:
        return False


def supervisor_env() -> dict[str, str]:
    env = {**os.environ, **FAST, "LORACTL_KEEP_AWAKE": "0"}
    env.pop("LORACTL_HOME", None)
    return env


def take_terminal() -> None:
    """In the child, after setsid: make the pty on stdin its controlling terminal, as a
    login shell's session has one."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def test_daemon_run_outlives_its_terminal_and_answers_every_signal(tiny_workspace, tmp_path):
    """In a terminal that then closes: SIGUSR1 dumps the state, SIGUSR2 is ignored, SIGHUP
    reopens a rotated log, a storm changes nothing, and closing the terminal leaves the
    supervisor serving and its trainer supervised; SIGTERM still stops it cleanly."""
    home = tmp_path / "home"
    home.mkdir()
    layout = Layout.at(home)
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "loractl.client.cli", "--home", str(home), "daemon", "run"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=supervisor_env(),
        start_new_session=True,
        preexec_fn=take_terminal,
    )
    os.close(slave)
    # The terminal: it reads what the supervisor writes (a full pty would block it) until
    # its window closes; a read blocked in another thread would keep the pty open.
    window_closed = threading.Event()

    def terminal() -> None:
        while not window_closed.is_set():
            if select.select([master], [], [], 0.05)[0]:
                try:
                    os.read(master, 65536)
                except OSError:
                    break
        os.close(master)

    reader = threading.Thread(target=terminal, daemon=True)
    reader.start()
    try:
        wait_for(lambda: proc.poll() is None and answers(layout), 30, interval=0.05)
        config = make_job(tiny_workspace, tmp_path / "job", iters=100_000, steps_per_eval=100_000)
        job_id = request(layout, SubmitRequest(config_path=str(config))).data["id"]
        running = wait_for(
            lambda: (
                (j := request(layout, ShowRequest(job=job_id)).data["job"])["state"] == "running"
                and j
            ),
            120,
        )
        pid = running["trainer_pid"]

        os.kill(proc.pid, signal.SIGUSR1)
        dump = wait_for(lambda: logged(layout, "state dump"), 20)[-1]
        assert dump["attempt"]["job_id"] == job_id and dump["attempt"]["pid"] == pid
        assert [job["id"] for job in dump["jobs"]] == [job_id]
        assert "backoff_s" in dump["timers"] and dump["queue_held"] is False
        assert dump["counters"]["signals"]["SIGUSR1"] == 1

        os.kill(proc.pid, signal.SIGUSR2)
        wait_for(lambda: logged(layout, "SIGUSR2 ignored"), 20)

        # logrotate's way: move the file, then SIGHUP; the supervisor writes a new one.
        os.replace(layout.logs / "supervisor.log", layout.logs / "supervisor.log.1")
        os.kill(proc.pid, signal.SIGHUP)
        reopened = wait_for(lambda: logged(layout, "SIGHUP: log files reopened"), 20)[-1]
        assert reopened["terminal"] == "open"

        for _ in range(30):  # a storm: each is answered, none is fatal
            for signum in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
                os.kill(proc.pid, signum)
        wait_for(lambda: logged(layout, "state dump"), 20)
        assert answers(layout)

        window_closed.set()  # the kernel hangs up the terminal's session
        reader.join(timeout=10)
        gone = wait_for(
            lambda: [r for r in logged(layout, "SIGHUP") if r["terminal"] != "open"], 20
        )
        assert gone[-1]["terminal"].startswith("closed")
        assert proc.poll() is None and answers(layout)
        job = request(layout, ShowRequest(job=job_id)).data["job"]
        assert job["state"] == "running" and job["trainer_pid"] == pid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not trainers_of(home)
        assert logged(layout, "supervisor stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for trainer in trainers_of(home):
            trainer.kill()
        window_closed.set()
        reader.join(timeout=10)


def test_under_the_service_sighup_is_ignored_and_the_log_stays_put(tmp_path):
    """Started as the service starts it (--wait-for-lock), SIGHUP is logged as ignored and
    changes nothing: the log file is not reopened."""
    home = tmp_path / "home"
    home.mkdir()
    layout = Layout.at(home)
    proc = subprocess.Popen(
        [sys.executable, "-m", "loractl.supervisor", "--home", str(home), "--wait-for-lock"],
        env=supervisor_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: proc.poll() is None and answers(layout), 30, interval=0.05)
        os.replace(layout.logs / "supervisor.log", layout.logs / "moved.log")
        os.kill(proc.pid, signal.SIGHUP)
        wait_for(lambda: logged(layout, "SIGHUP ignored", "moved.log"), 20)
        assert not (layout.logs / "supervisor.log").exists()
        assert answers(layout)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_signal_storm_on_a_supervisor_process_is_survived(tmp_path):
    """The harness's supervisor (as `loractl daemon run`) takes 300 of each signal at once
    and still answers."""
    supervisor = SupervisorProcess(Path(tmp_path / "home"), LORACTL_KEEP_AWAKE="0").start()
    try:
        for _ in range(300):
            for signum in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
                os.kill(supervisor.proc.pid, signum)
        wait_for(lambda: logged(supervisor.layout, "state dump"), 20)
        assert supervisor.proc.poll() is None and answers(supervisor.layout)
    finally:
        supervisor.stop()
