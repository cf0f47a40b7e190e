"""The adapter folder: one trainer at a time, whoever started it, and a full disk under it
that stops the run cleanly, keeps the last checkpoint, and pauses a supervised job."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from conftest import (
    fill_disk,
    make_job,
    mount_small_disk,
    run_trainer,
    trainer_command,
    trainer_env,
    unmount,
    wait_for,
)
from loractl.checkpoints import CheckpointReader
from loractl.client.control import request
from loractl.client.harness import SupervisorProcess
from loractl.protocol import ExitCode, ResumeRequest


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_second_trainer_on_a_busy_adapter_folder_is_refused(tiny_workspace, tmp_path):
    """While one trainer runs, another on the same adapter folder exits 73 at once, naming
    the holder's pid, and writes nothing."""
    config = make_job(tiny_workspace, tmp_path, iters=4000)
    first = subprocess.Popen(
        trainer_command(config, "--fresh"),
        env=trainer_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        lock = tmp_path / "adapters" / ".lock"
        wait_for(lambda: lock.exists() and lock.read_text().strip() == str(first.pid), 60)
        second = run_trainer(config, timeout=60)
        assert second.returncode == ExitCode.ADAPTER_BUSY
        assert f"is in use by another trainer (pid {first.pid})" in second.stderr
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()
    assert run_trainer(make_job(tiny_workspace, tmp_path, iters=4)).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 8 MB tmpfs, unmounted afterwards."""
    disk = mount_small_disk(tmp_path / "disk", 8)
    yield disk
    unmount(disk)


JOB = {"iters": 120, "checkpoint_every": 1, "keep_checkpoints": 2}


def test_a_full_adapter_disk_stops_cleanly_and_resumes_exactly(
    tiny_workspace, tmp_path, small_disk
):
    """The disk fills mid-run: the trainer exits 74 saying how much is free where, the newest
    checkpoint is whole, and once there is room the run resumes and ends bitwise equal to an
    uninterrupted one."""
    reference = make_job(tiny_workspace, tmp_path / "ref", **JOB)
    assert run_trainer(reference, "--fresh").returncode == 0
    config = make_job(tiny_workspace, tmp_path / "src", **JOB, adapter_path=str(small_disk / "a"))
    store = CheckpointReader(small_disk / "a" / "checkpoints")
    proc = subprocess.Popen(
        trainer_command(config, "--fresh"),
        env=trainer_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: len(store.folders()) >= 2 or proc.poll() is not None, 120)
    filler = fill_disk(small_disk)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == ExitCode.DISK_FULL, stderr
    assert f"disk full: 0 MB free on {small_disk / 'a'}" in stderr
    assert "Traceback" not in stderr
    newest, skipped = store.newest_valid()
    assert newest is not None and not skipped
    assert not list(store.root.glob(".step-*")), "a half-written checkpoint was left behind"
    filler.unlink()
    assert run_trainer(config).returncode == 0
    produced = small_disk / "a" / "adapters.safetensors"
    assert digest(produced) == digest(tmp_path / "ref" / "adapters" / "adapters.safetensors")


def test_a_full_adapter_disk_pauses_a_supervised_job_until_resumed(
    tiny_workspace, tmp_path, small_disk
):
    """Under the supervisor a full adapter disk pauses the job (no retry loop) with the free
    space and the path in its reason; `resume` after freeing space finishes it."""
    sup = SupervisorProcess(tmp_path / "home").start()
    try:
        config = make_job(
            tiny_workspace, tmp_path / "src", **JOB, adapter_path=str(small_disk / "a")
        )
        job_id = sup.submit(config)
        wait_for(lambda: (sup.show(job_id)["last_checkpoint_step"] or 0) >= 2, 120)
        filler = fill_disk(small_disk)
        job = sup.wait_state(job_id, {"paused", "failed"}, timeout=120)
        assert job["state"] == "paused", job["reason"]
        assert job["reason"].startswith(f"disk full: 0 MB free on {small_disk / 'a'}")
        assert [c["cause"] for c in job["crashes"]] == ["disk_full"]
        filler.unlink()
        request(sup.layout, ResumeRequest(job=job_id))
        job = sup.wait_state(job_id, {"completed", "failed"}, timeout=180)
        assert job["state"] == "completed", job["reason"]
    finally:
        sup.stop()
