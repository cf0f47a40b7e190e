"""`pause --all`, `resume --all`, `remove` and `wait --all` through the real CLI, against a
real supervisor running the real trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_job, wait_for
from loractl.client.harness import SupervisorProcess


def loractl(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The real CLI in a child process, as a user runs it."""
    return subprocess.run(
        cli_argv(home, *args), capture_output=True, text=True, timeout=timeout, env=cli_env()
    )


def cli_argv(home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "loractl.client.cli", "--home", str(home), *args]


def cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "LORACTL_HOME"}


@pytest.fixture
def live(tmp_path):
    sup = SupervisorProcess(tmp_path / "home").start()
    yield sup
    sup.stop()


def test_pause_all_holds_the_queue_and_resume_all_releases_it(tiny_workspace, tmp_path, live):
    """pause --all pauses the running job and starts nothing new; watch then says nothing is
    running; resume --all resumes the job it paused, and wait --all sees both complete."""
    home = live.home
    first = live.submit(make_job(tiny_workspace, tmp_path / "a", name="long", iters=400))
    second = live.submit(make_job(tiny_workspace, tmp_path / "b", name="next", iters=8))
    wait_for(lambda: live.show(first)["progress"]["step"] >= 2, 60)

    held = loractl(home, "pause", "--all", "--json")
    assert held.returncode == 0, held.stderr
    data = json.loads(held.stdout)
    assert data["held"] is True and data["paused"] == [first]
    live.wait_state(first, {"paused"}, timeout=60)
    assert live.show(second)["state"] == "queued"
    assert "queue:   held" in loractl(home, "status").stdout
    again = loractl(home, "pause", "--all")
    assert again.returncode == 0 and again.stdout.startswith("queue already held")

    idle = loractl(home, "watch")
    assert idle.returncode == 0, idle.stderr
    assert idle.stdout.startswith("nothing is running (1 paused, 1 queued)")
    assert "resume --all" in idle.stdout and "--follow" in idle.stdout
    timed_out = loractl(home, "wait", "--all", "--timeout", "0.5")
    assert timed_out.returncode == 124 and f"{second} (queued)" in timed_out.stderr
    assert live.show(second)["state"] == "queued", "a held queue starts nothing"

    released = loractl(home, "resume", "--all")
    assert released.returncode == 0, released.stderr
    assert released.stdout.splitlines() == [
        "queue released: queued jobs start again",
        f"  resumed: {first}",
    ]
    waited = loractl(home, "wait", "--all", "--json", timeout=240)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    result = json.loads(waited.stdout)
    assert result["completed"] is True
    assert {j["id"]: j["state"] for j in result["jobs"]} == {
        first: "completed",
        second: "completed",
    }


def test_wait_all_exits_1_when_a_pending_job_is_cancelled(tiny_workspace, tmp_path, live):
    """wait --all waits out the queue and exits 1 naming the job that did not complete."""
    home = live.home
    job_id = live.submit(make_job(tiny_workspace, tmp_path / "a", name="doomed", iters=4000))
    waiter = subprocess.Popen(
        cli_argv(home, "wait", "--all"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    try:
        wait_for(lambda: live.show(job_id)["progress"]["step"] >= 1, 60)
        assert waiter.poll() is None, "wait --all returned while a job was running"
        cancel = loractl(home, "cancel", job_id)
        assert cancel.returncode == 0, cancel.stderr
        out, err = waiter.communicate(timeout=60)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert waiter.returncode == 1, out + err
    assert f"{job_id} (doomed): cancelled" in out
    assert out.splitlines()[-1] == "1 of 1 did not complete"
    assert loractl(home, "wait", "--all").stdout.strip() == (
        "nothing to wait for: no job is pending"
    )


def test_remove_forgets_a_finished_job_and_keeps_its_adapters(tiny_workspace, tmp_path, live):
    """remove prints where the adapters stay; the job is gone, its adapters are not; a job
    that has not finished is refused with the supervisor's own reason."""
    home = live.home
    job_id = live.submit(make_job(tiny_workspace, tmp_path / "a", name="kept", iters=8))
    live.wait_state(job_id, {"completed"}, timeout=120)
    adapters = tmp_path / "a" / "adapters"
    removed = loractl(home, "remove", "kept")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.strip() == f"removed {job_id}; adapters kept in {adapters}"
    assert (adapters / "adapters.safetensors").is_file()
    assert loractl(home, "show", job_id).returncode == 4
    running = live.submit(make_job(tiny_workspace, tmp_path / "b", name="busy", iters=4000))
    refused = loractl(home, "remove", running, "--json")
    assert refused.returncode == 5
    reply = json.loads(refused.stdout)
    assert reply["ok"] is False and f"job {running}" in reply["reason"]
    assert live.show(running)["state"] in {"queued", "starting", "running"}
