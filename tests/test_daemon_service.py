"""The supervisor as a background service: kept alive by a restart loop as launchd's KeepAlive
would, its log file, notifications, the power assertion, the lock a second supervisor waits
on, and what `status`, `daemon stop` and `show` tell a user."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import make_job, run_trainer, wait_for
from loractl.client.control import request
from loractl.client.harness import FAST, SupervisorProcess, trainers_of
from loractl.client.render import history_table
from loractl.paths import Layout
from loractl.protocol import StatusRequest, SubmitRequest

# What launchd does with KeepAlive {SuccessfulExit: false}: start it again unless it exited 0.
KEEP_ALIVE_LOOP = (
    'while true; do "$@"; rc=$?; echo "$rc" >> "$EXITS"; [ "$rc" -eq 0 ] && exit 0; sleep 0.3; done'
)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def loractl(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loractl.client.cli", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def status_pid(layout: Layout) -> int | None:
    try:
        return request(layout, StatusRequest(), timeout=0.5).data["pid"]
    except Exception:
        return None


def log_records(home: Path) -> list[dict]:
    return [
        json.loads(line) for line in (home / "logs" / "supervisor.log").read_text().splitlines()
    ]


@pytest.mark.slow
def test_keep_alive_loop_survives_two_supervisor_kills_and_daemon_stop_ends_it(
    tiny_workspace, tmp_path
):
    """Under a restart-on-failure loop, two SIGKILLs of the supervisor mid-job lose nothing:
    the job completes bitwise equal to an uninterrupted run; `daemon stop` exits 0, so the
    loop ends with no restart."""
    job = {"iters": 400, "checkpoint_every": 2}
    reference = make_job(tiny_workspace, tmp_path / "ref", **job)
    assert run_trainer(reference, "--fresh").returncode == 0
    config = make_job(tiny_workspace, tmp_path / "src", **job)
    home = tmp_path / "home"
    layout = Layout.at(home)
    exits = tmp_path / "exits.txt"
    env = {**os.environ, **FAST, "EXITS": str(exits), "LORACTL_KEEP_AWAKE": "0"}
    env.pop("LORACTL_HOME", None)
    command = [sys.executable, "-m", "loractl.supervisor", "--home", str(home), "--wait-for-lock"]
    with (tmp_path / "supervisor.err").open("wb") as errors:
        loop = subprocess.Popen(
            ["bash", "-c", KEEP_ALIVE_LOOP, "keep-alive", *command],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=errors,
        )
    try:
        first = wait_for(lambda: status_pid(layout), 30)
        job_id = request(layout, SubmitRequest(config_path=str(config))).data["id"]
        killed = []
        pid = first
        for progress in (5, 20):
            wait_for(
                lambda p=progress: (
                    request(layout, StatusRequest()).data["running"] == job_id
                    and _step(layout, job_id) >= p
                ),
                90,
            )
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            pid = wait_for(lambda: (p := status_pid(layout)) not in (None, *killed) and p, 30)
        shown = wait_for(lambda: _finished(layout, job_id), 300)
        assert shown["state"] == "completed", shown["reason"]
        produced = Path(shown["adapter_path"]) / "adapters.safetensors"
        assert digest(produced) == digest(tmp_path / "ref" / "adapters" / "adapters.safetensors")
        assert [e["kind"] for e in shown["history"]].count("adopted") == 2
        stop = loractl(home, "daemon", "stop")
        assert stop.returncode == 0, stop.stderr
        assert f"(pid {pid}) stopped" in stop.stdout
        assert loop.wait(timeout=60) == 0
        assert exits.read_text().split() == ["137", "137", "0"]
        assert not trainers_of(home)
        assert not layout.pidfile.exists(), "a clean stop leaves no pidfile"
        assert not layout.runtime.exists(), "a clean stop leaves no socket folder"
    finally:
        if loop.poll() is None:
            loop.kill()
            loop.wait()
        for proc in psutil.process_iter(["cmdline"]):
            if str(home) in " ".join(proc.info["cmdline"] or []):
                proc.kill()


def _step(layout: Layout, job_id: str) -> int:
    from loractl.protocol import ShowRequest

    return request(layout, ShowRequest(job=job_id)).data["job"]["progress"]["step"]


def _finished(layout: Layout, job_id: str) -> dict | None:
    from loractl.protocol import ShowRequest

    try:
        job = request(layout, ShowRequest(job=job_id), timeout=2).data["job"]
    except Exception:
        return None  # between a kill and the restart
    return job if job["state"] in ("completed", "failed", "cancelled") else None


@pytest.fixture
def desktop(tmp_path):
    """Stand-ins for osascript and caffeinate that record how they were called."""
    notify_log, awake_log = tmp_path / "notifications.tsv", tmp_path / "awake.txt"
    notify = tmp_path / "notify.sh"
    notify.write_text(f'#!/bin/sh\nprintf \'%s\\t%s\\n\' "$1" "$2" >> {notify_log}\n')
    awake = tmp_path / "awake.sh"
    awake.write_text(f'#!/bin/sh\necho "$$ $1" >> {awake_log}\nexec sleep 600\n')
    for script in (notify, awake):
        script.chmod(0o755)
    return {
        "env": {"LORACTL_NOTIFY_CMD": str(notify), "LORACTL_KEEP_AWAKE_CMD": str(awake)},
        "notifications": notify_log,
        "awake": awake_log,
    }


def notifications(path: Path) -> list[tuple[str, str]]:
    if not path.exists():
        return []
    return [tuple(line.split("\t", 1)) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_notifications_power_assertion_and_the_supervisor_log(tiny_workspace, tmp_path, desktop):
    """A completed job notifies exactly once, naming the job; every ladder step notifies once,
    naming its rung; a power assertion is held for each trainer's lifetime only; the log file
    has JSON lines for each spawn, each exit with its cause, and the completion."""
    sup = SupervisorProcess(tmp_path / "home", **desktop["env"]).start()
    try:
        squeezed = make_job(
            tiny_workspace, tmp_path / "squeezed", name="squeezed", iters=80, notify=True,
            memory_budget_mb=64,
        )  # fmt: skip
        squeezed_id = sup.submit(squeezed)
        failed = sup.wait_state(squeezed_id, {"failed"}, timeout=180)
        # The guard's stop checkpoints first, so a squeezed job may well have adapters.
        has_adapters = (Path(failed["adapter_path"]) / "adapters.safetensors").exists()
        assert (failed["use_with"] is not None) == has_adapters
        steps = [e for e in failed["history"] if e["kind"] == "ladder_step"]
        sent = notifications(desktop["notifications"])
        rung_notes = [n for n in sent if n[0] == "squeezed: out of memory"]
        assert len(rung_notes) == len(steps) >= 1
        for note, step in zip(rung_notes, steps, strict=True):
            assert f"rung {step['detail']['to_rung']}" in note[1]
        assert [n for n in sent if n[0] == "squeezed failed"]

        quiet = make_job(tiny_workspace, tmp_path / "quiet", name="quiet", iters=8)
        done = sup.wait_state(sup.submit(quiet), {"completed"}, timeout=120)
        assert not [n for n in notifications(desktop["notifications"]) if "quiet" in n[0]]

        config = make_job(tiny_workspace, tmp_path / "loud", name="loud", iters=40, notify=True)
        job_id = sup.submit(config)
        trainer = sup.trainer_pid(job_id)
        holder = wait_for(lambda: _holder_of(desktop["awake"], trainer), 30)
        assert psutil.pid_exists(holder)
        done = sup.wait_state(job_id, {"completed"}, timeout=120)
        wait_for(lambda: not _alive(holder), 10)
        completed = [n for n in notifications(desktop["notifications"]) if n[0].startswith("loud")]
        assert completed == [("loud completed", f"adapters in {done['adapter_path']}")]
        command = done["use_with"].split()[0]
        assert shutil.which(command) or Path(command).is_file()
        watched = loractl(sup.home, "watch", job_id, "--json")  # piped: no terminal
        assert watched.returncode == 0, watched.stderr
        events = [json.loads(line) for line in watched.stdout.splitlines()]
        assert events[-1]["topic"] == "job" and events[-1]["state"] == "completed"
    finally:
        sup.stop()
    shown = loractl(sup.home, "logs", "--daemon", "-n", "50")
    assert shown.returncode == 0 and "job completed" in shown.stdout
    records = log_records(sup.home)
    assert all({"event", "timestamp", "level"} <= set(r) for r in records)
    spawned = [r for r in records if r["event"] == "spawned trainer" and r["job"] == job_id]
    exited = [r for r in records if r["event"] == "trainer exited" and r["job"] == job_id]
    assert len(spawned) == len(exited) == 1 and exited[0]["cause"] == "done"
    assert [r for r in records if r["event"] == "job completed" and r["job"] == job_id]
    squeezed_exits = [
        r for r in records if r["event"] == "trainer exited" and r["job"] == squeezed_id
    ]
    assert squeezed_exits and {r["cause"] for r in squeezed_exits} == {"memory"}


def _holder_of(awake_log: Path, trainer_pid: int) -> int | None:
    if not awake_log.exists():
        return None
    for line in awake_log.read_text().splitlines():
        pid, target = line.split()
        if int(target) == trainer_pid:
            return int(pid)
    return None


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_second_supervisor_waits_for_the_lock_and_takes_over(tmp_path):
    """Started by a service manager (--wait-for-lock) while another supervisor holds the
    home, it neither runs beside it nor exits (which would be a restart loop): it waits, and
    serves once the first one stops."""
    first = SupervisorProcess(tmp_path / "home").start()
    second = subprocess.Popen(
        [sys.executable, "-m", "loractl.supervisor", "--home", str(first.home), "--wait-for-lock"],
        env=first.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: "waiting for the running supervisor" in _log_text(first.home), 30)
        assert second.poll() is None
        assert status_pid(first.layout) == first.proc.pid
        first.stop()
        wait_for(lambda: status_pid(first.layout) == second.pid, 30)
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
        first.stop()


def _log_text(home: Path) -> str:
    path = home / "logs" / "supervisor.log"
    return path.read_text() if path.exists() else ""


def test_status_list_show_and_daemon_stop_tell_the_user_what_happened(tiny_workspace, tmp_path):
    """`status` names the inbox and the files it rejected, with their reasons; `list
    --rejected` lists them too; a job that failed on bad data says where, once, and offers
    no adapters to try; `daemon stop` says what it did."""
    sup = SupervisorProcess(tmp_path / "home").start()
    try:
        (sup.layout.inbox / "broken.yaml").write_text("model: [unclosed\n")
        wait_for(lambda: (sup.layout.inbox / "rejected" / "broken.yaml.error.txt").exists(), 30)
        status = json.loads(loractl(sup.home, "status", "--json").stdout)
        assert status["inbox"] == str(sup.layout.inbox)
        assert status["rejected"][0]["name"] == "broken.yaml"
        assert "YAML" in status["rejected"][0]["reason"]
        text = loractl(sup.home, "status").stdout
        assert str(sup.layout.inbox) in text and "broken.yaml" in text
        listed = loractl(sup.home, "list", "--rejected")
        assert listed.returncode == 0 and "broken.yaml" in listed.stdout
        bad_data = tmp_path / "bad-data"
        bad_data.mkdir()
        (bad_data / "train.jsonl").write_text('{"text": "fine"}\n{"text": "no closing quote}\n')
        (bad_data / "valid.jsonl").write_text('{"text": "fine"}\n')
        job = make_job(tiny_workspace, tmp_path / "job", data=str(bad_data), iters=4)
        failed = sup.wait_state(sup.submit(job), {"failed"}, timeout=60)
        assert failed["use_with"] is None, "no adapters, so nothing to try them with"
        assert "train.jsonl:2: invalid JSON" in failed["reason"]
        assert failed["reason"].count("Invalid control character at column") == 1
        shown = loractl(sup.home, "show", failed["id"]).stdout
        assert "use with" not in shown
        # The job `demo --prepare` writes works once copied into the inbox, as README says.
        prepared = (tiny_workspace / "job.yaml").read_text()
        (sup.layout.inbox / "prepared.yaml").write_text(
            prepared.replace(str(tiny_workspace / "adapters"), str(tmp_path / "prepared"))
        )
        wait_for(lambda: "tiny-seed0" in {j["name"] for j in sup_list(sup)}, 30)
        assert not (sup.layout.inbox / "rejected" / "prepared.yaml.error.txt").exists()
        stop = loractl(sup.home, "daemon", "stop")
        assert stop.returncode == 0
        assert f"Supervisor (pid {sup.proc.pid}) stopped" in stop.stdout
        assert sup.proc.wait(timeout=30) == 0
    finally:
        sup.stop()


def sup_list(sup: SupervisorProcess) -> list[dict]:
    from loractl.protocol import ListRequest

    return request(sup.layout, ListRequest()).data["jobs"]


def test_history_never_shows_a_missing_state():
    """A job's first event has no previous state: history shows `new -> queued`."""
    events = [
        {"at": time.time(), "kind": "transition", "from_state": None, "to_state": "queued",
         "cause": "submitted", "rung": 0, "step": 0, "detail": {}},
    ]  # fmt: skip
    shown = history_table(events)
    assert "new -> queued" in shown and "None" not in shown
