"""A full disk under the supervisor's home: it keeps serving, loses nothing, and carries on
once there is space again. The disk is a real tmpfs of a few MB (needs root to mount)."""

from __future__ import annotations

import os
import signal

import pytest

from conftest import fill_disk, make_job, mount_small_disk, unmount, wait_for
from loractl.client.control import RequestFailed, request
from loractl.client.harness import SupervisorProcess
from loractl.protocol import ErrorCode, PriorityRequest, StatusRequest, SubmitRequest


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB tmpfs, unmounted afterwards."""
    disk = mount_small_disk(tmp_path / "disk", 6)
    yield disk
    unmount(disk)


def test_a_full_home_disk_never_takes_the_supervisor_down(tiny_workspace, tmp_path, small_disk):
    """With the home's disk full the supervisor keeps answering, refuses writes with a
    disk-full reason, holds a trainer's exit until there is space, then records it and
    finishes the job; restarted on a full disk, it starts, waits, and recovers."""
    sup = SupervisorProcess(small_disk / "home")
    sup.log = tmp_path / "supervisor.log"  # off the small disk, so it survives filling it
    sup.start()
    try:
        config = make_job(
            tiny_workspace, tmp_path / "job", iters=300, checkpoint_every=2, max_retries=10
        )
        job_id = sup.submit(config)
        pid = wait_for(
            lambda: sup.show(job_id)["progress"]["step"] >= 2 and sup.trainer_pid(job_id), 90
        )
        filler = fill_disk(small_disk)

        assert request(sup.layout, StatusRequest()).data["running"] == job_id
        with pytest.raises(RequestFailed) as refused:
            other = make_job(tiny_workspace, tmp_path / "other", iters=8)
            request(sup.layout, SubmitRequest(config_path=str(other)))
        assert refused.value.code == ErrorCode.DISK_FULL and "disk full" in str(refused.value)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: request(sup.layout, StatusRequest()).data["running"] is None, 30)
        for _ in range(3):  # a few seconds full: the exit waits, the supervisor serves
            assert sup.proc.poll() is None
            assert sup.show(job_id)["state"] == "running"
            wait_for(lambda: sup.proc.poll() is None, 1)

        filler.unlink()
        job = wait_for(lambda: (j := sup.show(job_id))["crashes"] and j["trainer_pid"] and j, 60)
        assert [c["cause"] for c in job["crashes"]] == ["killed_externally"]

        # Killed and restarted while the disk is full: it starts, serves, and recovers later.
        sup.kill()
        filler = fill_disk(small_disk)
        sup.start()
        assert request(sup.layout, StatusRequest()).data["pid"] == sup.proc.pid
        with pytest.raises(RequestFailed) as refused:
            request(sup.layout, PriorityRequest(job=job_id, priority=3))
        assert refused.value.code == ErrorCode.DISK_FULL
        filler.unlink()
        job = sup.wait_state(job_id, {"completed", "failed"}, timeout=240)
        assert job["state"] == "completed", job["reason"] + sup.debug()
        assert [e["kind"] for e in job["history"]].count("adopted") == 1
        assert sup.proc.poll() is None
    finally:
        sup.stop()
