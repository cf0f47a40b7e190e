"""Remote ranks on a second host: a network namespace with its own process table and host
name, reached over ssh as mlx.launch reaches a second Mac (see tests/secondhost.py)."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from pathlib import Path

import psutil
import pytest

from conftest import make_job, wait_for
from secondhost import (  # noqa: F401 (fixtures, used by name)
    NamespacedSupervisor,
    SecondHost,
    lossy_link_unavailable,
    second_host,
    second_host_factory,
    unavailable,
)

# Batch 2 is one sample per rank; checkpoints every 2 steps, as in test_ranks.
JOB = {"batch_size": 2, "iters": 12, "grad_accumulation_steps": 1, "checkpoint_every": 2}


def test_two_host_job_completes(tiny_workspace, tmp_path, second_host):
    """A 2-rank job with rank 1 on the second host completes, and leaves nothing there."""
    hostfile = second_host.hostfile(tmp_path / "hosts.json")
    supervisor = NamespacedSupervisor(tmp_path / "home", second_host=second_host)
    try:
        supervisor.start()
        distributed = {"backend": "ring", "hostfile": str(hostfile)}
        config = make_job(tiny_workspace, tmp_path / "job", **JOB, distributed=distributed)
        job_id = supervisor.submit(config)
        job = supervisor.wait_state(job_id, {"completed", "failed"}, timeout=240)
        assert job["state"] == "completed", job["reason"] + supervisor.debug()
        assert [rank["rank"] for rank in job["ranks"]] == [0, 1], job["ranks"]
        assert job["ranks"][1]["host"] in (second_host.address, second_host.name), job["ranks"]
        assert (Path(job["adapter_path"]) / "train.rank1.log").exists()
        wait_for(lambda: not second_host.trainers(), timeout=30)
    finally:
        supervisor.stop()


def test_helpers_isolate_the_hosts_and_restart_a_killed_supervisor(tmp_path):
    """The helpers themselves: a second host can carry this machine's name, its processes
    are apart from the supervisor's, ssh can be refused and allowed again, and a killed
    supervisor is restarted by its keep-alive loop and answers again."""
    if unavailable():
        pytest.skip(unavailable())
    with SecondHost(tmp_path / "host", name=socket.gethostname()) as host:
        assert host.ssh("hostname").stdout.strip() == socket.gethostname()
        sshd_pids = {proc.pid for proc in host.processes() if proc.name() == "sshd"}
        assert sshd_pids and not sshd_pids & {proc.pid for proc in psutil.Process(1).children()}
        host.refuse_ssh()
        assert host.ssh("true", timeout=15).returncode == 255
        host.allow_ssh()
        supervisor = NamespacedSupervisor(tmp_path / "home", second_host=host)
        try:
            first = supervisor.start().supervisor_pid()
            supervisor.kill()
            assert supervisor.supervisor_pid() != first
            assert not psutil.pid_exists(first) or psutil.Process(first).status() == "zombie"
        finally:
            supervisor.stop()
        assert supervisor.proc.poll() is not None


# Long enough for three faults between checkpoints; a short heartbeat_timeout so a partition
# is found (and a cut-off rank stops itself) in seconds, not the default 30, with the ranks'
# start-up allowance kept long for a loaded machine.
FAULTS_JOB = {**JOB, "iters": 40, "heartbeat_timeout": 8.0, "startup_timeout": 60.0}


def two_hosts(host: SecondHost, folder: Path) -> dict:
    return {"backend": "ring", "hostfile": str(host.hostfile(folder / "hosts.json"))}


def adapter_digest(job: dict) -> str:
    return hashlib.sha256(
        (Path(job["adapter_path"]) / "adapters.safetensors").read_bytes()
    ).hexdigest()


def history(job: dict, kind: str) -> list[dict]:
    return [event for event in job["history"] if event["kind"] == kind]


def both_ranks_at(supervisor, job_id: str, step: int, attempt: int) -> dict | None:
    """The job, once attempt ``attempt`` or a later one runs with both ranks past ``step``."""
    job = supervisor.show(job_id)
    ranks = job.get("ranks") or []
    if job["state"] == "running" and job["attempts"] >= attempt and len(ranks) == 2:
        if min(rank["step"] for rank in ranks) >= step:
            return job
    return None


def test_a_two_host_job_survives_a_remote_kill_a_partition_and_a_supervisor_kill(
    tiny_workspace, tmp_path, second_host
):
    """On the second host: rank 1 SIGKILLed is seen within 2 s and blamed on rank 1 with
    its own cause; a 40 s partition is a hang blamed on rank 1, and the cut-off rank stops
    itself; a supervisor SIGKILL is adopted with the attempt unchanged. The adapter equals
    an uninterrupted 2-host run's, and nothing of the job is left on the second host."""
    supervisor = NamespacedSupervisor(tmp_path / "home", second_host=second_host)
    distributed = two_hosts(second_host, tmp_path)
    try:
        supervisor.start()
        reference = supervisor.wait_state(
            supervisor.submit(
                make_job(tiny_workspace, tmp_path / "ref", **FAULTS_JOB, distributed=distributed)
            ),
            {"completed", "failed"},
            timeout=300,
        )
        assert reference["state"] == "completed", reference["reason"] + supervisor.debug()
        job_id = supervisor.submit(
            make_job(tiny_workspace, tmp_path / "job", **FAULTS_JOB, distributed=distributed)
        )

        # 1. The remote rank is SIGKILLed.
        wait_for(lambda: both_ranks_at(supervisor, job_id, 6, attempt=1), timeout=180)
        killed_at = time.time()
        second_host.kill_remote_trainer()
        lost = wait_for(lambda: history(supervisor.show(job_id), "rank_lost"), timeout=30)
        seen_after = lost[0]["at"] - killed_at
        print(f"rank 1's death recorded {seen_after:.2f} s after its SIGKILL")
        assert seen_after < 2.0, (lost, killed_at)
        assert lost[0]["detail"]["rank"] == 1, lost
        assert "its ssh session ended" in lost[0]["detail"]["words"], lost
        job = wait_for(lambda: (j := supervisor.show(job_id))["crashes"] and j, timeout=60)
        crash = job["crashes"][0]
        assert crash["rank"] == 1 and crash["host"] == second_host.address, crash
        assert "rank 1 (mac2 at " in crash["explanation"], crash
        assert "ssh session ended" in crash["explanation"], crash
        assert "collective" not in crash["explanation"], "the survivor's words, not rank 1's"

        # 2. A 40 s partition, with the relaunched attempt running.
        wait_for(lambda: both_ranks_at(supervisor, job_id, 14, attempt=2), timeout=180)
        second_host.partition()
        cut_at = time.monotonic()
        try:
            hung = wait_for(
                lambda: [
                    event
                    for event in history(supervisor.show(job_id), "hang_detected")
                    if event["detail"].get("rank") == 1
                ],
                timeout=60,
            )
            assert "rank 1" in hung[0]["detail"]["reason"], hung
            # Cut off from its supervisor, rank 1 stops itself: nothing trains unwatched.
            wait_for(lambda: not second_host.trainers(), timeout=40)
            time.sleep(max(0.0, 40 - (time.monotonic() - cut_at)))  # the partition's length
        finally:
            second_host.heal()
        job = supervisor.show(job_id)
        hang = [c for c in job["crashes"] if c["cause"] == "hang"]
        assert hang and hang[0]["rank"] == 1, job["crashes"]

        # 3. The supervisor is SIGKILLed while the job runs: adopted, the attempt unchanged.
        job = wait_for(
            lambda: (
                (j := supervisor.show(job_id))["state"] == "running"
                and len(j.get("ranks") or []) == 2
                and j
            ),
            timeout=180,
        )
        attempt = job["attempts"]
        supervisor.kill()
        job = supervisor.wait_state(job_id, {"completed", "failed"}, timeout=300)
        assert job["state"] == "completed", job["reason"] + supervisor.debug()
        assert history(job, "adopted"), "the restarted supervisor adopted the running attempt"
        adopted = history(job, "adopted")[-1]["detail"]
        assert adopted["attempt"] == attempt
        assert adapter_digest(job) == adapter_digest(reference)
        wait_for(lambda: not second_host.trainers(), timeout=30)
    finally:
        supervisor.stop()


def test_a_second_host_with_this_machines_name_joins_and_is_shown(
    tiny_workspace, tmp_path, second_host_factory
):
    """Two hosts with one host name: both ranks join, each known by its place, and `show`
    lists the remote one by its name and address."""
    host = second_host_factory(name=socket.gethostname())
    supervisor = NamespacedSupervisor(tmp_path / "home", second_host=host)
    try:
        supervisor.start()
        config = make_job(
            tiny_workspace, tmp_path / "job", **JOB, distributed=two_hosts(host, tmp_path)
        )
        job = supervisor.wait_state(supervisor.submit(config), {"completed", "failed"}, 240)
        assert job["state"] == "completed", job["reason"] + supervisor.debug()
        ranks = job["ranks"]
        assert [(r["rank"], r["local"], r["hostname"]) for r in ranks] == [
            (0, True, socket.gethostname()),
            (1, False, socket.gethostname()),
        ], ranks
        assert ranks[1]["host"] == host.address
        shown = supervisor_text(supervisor, job["id"])
        assert f"1: {socket.gethostname()} at {host.address} pid" in shown, shown
    finally:
        supervisor.stop()


def supervisor_text(supervisor, job_id: str) -> str:
    import subprocess
    import sys

    return subprocess.run(
        [
            sys.executable,
            "-m",
            "loractl.client.cli",
            "--home",
            str(supervisor.home),
            "show",
            job_id,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout


def test_a_host_refusing_ssh_fails_each_try_in_time_then_pauses_the_job(
    tiny_workspace, tmp_path, second_host
):
    """With the second host refusing ssh, each attempt ends within heartbeat_timeout as
    host_unreachable naming the host, without spending retries; once the host has been away
    for host_unreachable_minutes the job pauses, saying since when."""
    supervisor = NamespacedSupervisor(tmp_path / "home", second_host=second_host)
    second_host.refuse_ssh()
    try:
        supervisor.start()
        config = make_job(
            tiny_workspace,
            tmp_path / "job",
            **JOB,
            heartbeat_timeout=3.0,  # how long hostwait tries each time
            startup_timeout=60.0,  # once launched, loading under a busy suite takes longer
            host_unreachable_minutes=0.2,
            distributed=two_hosts(second_host, tmp_path),
        )
        submitted = time.monotonic()
        job_id = supervisor.submit(config)
        job = wait_for(lambda: (j := supervisor.show(job_id))["crashes"] and j, timeout=30)
        assert time.monotonic() - submitted < 3.0 + 10, "the first try ended within its allowance"
        crash = job["crashes"][0]
        assert crash["cause"] == "host_unreachable", crash
        assert f"{second_host.address} did not answer ssh" in crash["explanation"], crash
        job = supervisor.wait_state(job_id, {"paused", "failed", "completed"}, timeout=90)
        assert job["state"] == "paused", job["reason"]
        assert job["reason"].startswith(f"host {second_host.address} unreachable since "), job
        # More tries than max_retries and the early-death limit allow (3 each): none spent.
        assert len(job["crashes"]) >= 4, job["crashes"]
        assert {crash["cause"] for crash in job["crashes"]} == {"host_unreachable"}
        assert not second_host.trainers()
        # The host back: resume runs the job to the end.
        second_host.allow_ssh()
        from loractl.client.control import request
        from loractl.protocol import ResumeRequest

        assert request(supervisor.layout, ResumeRequest(job=job_id)).ok
        job = supervisor.wait_state(job_id, {"completed", "failed"}, timeout=240)
        assert job["state"] == "completed", job["reason"] + supervisor.debug()
    finally:
        supervisor.stop()


def test_a_remote_rank_over_the_budget_steps_the_whole_job_down(
    tiny_workspace, tmp_path, second_host
):
    """Rank 1, on the second host, outgrows the budget on rung 0 while rank 0 does not: its
    footprint reaches the memory guard through its heartbeats, the guard stops the job
    blaming rank 1, and the job steps down one rung and completes there."""
    supervisor = NamespacedSupervisor(tmp_path / "home", second_host=second_host)
    distributed = two_hosts(second_host, tmp_path)
    try:
        supervisor.start()
        probe = make_job(tiny_workspace, tmp_path / "probe", **JOB, distributed=distributed)
        measured = supervisor.wait_state(supervisor.submit(probe), {"completed", "failed"}, 240)
        assert measured["state"] == "completed", measured["reason"]
        peak = measured["peak_memory_mb"]["0"]
        budget = int(peak + 150)
        # Rank 1 on rung 0 takes 400 MB more at step 4: over the budget, alone.
        distributed["env"] = {"LORACTL_FAULT_BALLAST": "1:0:4:400"}
        config = make_job(
            tiny_workspace,
            tmp_path / "job",
            **JOB,
            memory_budget_mb=budget,
            preflight=False,
            distributed=distributed,
            ladder=[{"max_seq_length": 128}],
        )
        job = supervisor.wait_state(supervisor.submit(config), {"completed", "failed"}, 300)
        assert job["state"] == "completed", job["reason"] + supervisor.debug()
        assert job["rung"] == 1, job
        stops = [
            event["detail"]
            for event in history(job, "memory_guard")
            if event["detail"].get("action") == "stop"
        ]
        assert stops and stops[0]["rank"] == 1 and stops[0]["footprint_mb"] > budget, stops
        assert job["crashes"][0]["rank"] == 1 and job["crashes"][0]["cause"] == "memory"
    finally:
        supervisor.stop()


def test_a_slow_lossy_link_raises_no_false_hang(tiny_workspace, tmp_path, second_host):
    """With 200 ms delay and 5% loss each way on the link the ranks and their telemetry use
    (netem where the kernel has it, else a relay between two TUN devices that does the same
    to every packet), the 2-host job completes in one attempt: no hang, no lost rank."""
    reason = lossy_link_unavailable()
    if reason:
        pytest.skip(reason)
    supervisor = NamespacedSupervisor(tmp_path / "home", second_host=second_host)
    try:
        supervisor.start()
        if SecondHost.netem_unavailable():
            here, there = second_host.lossy_link(delay_ms=200, loss_pct=5)
            hosts = [
                {"ssh": "127.0.0.1", "ips": [here]},
                {"ssh": second_host.address, "ips": [there]},
            ]
            hostfile = tmp_path / "lossy-hosts.json"
            hostfile.write_text(json.dumps(hosts))
            distributed = {"backend": "ring", "hostfile": str(hostfile)}
        else:
            second_host.netem(delay_ms=200, loss_pct=5)
            distributed = two_hosts(second_host, tmp_path)
        config = make_job(
            tiny_workspace, tmp_path / "job", **{**JOB, "iters": 8}, distributed=distributed
        )
        job = supervisor.wait_state(supervisor.submit(config), {"completed", "failed"}, 400)
        assert job["state"] == "completed", job["reason"] + supervisor.debug()
        assert job["attempts"] == 1 and job["crashes"] == [], job["crashes"]
        assert not history(job, "hang_detected") and not history(job, "rank_lost")
        if SecondHost.netem_unavailable():
            # The ranks' telemetry crossed the lossy link too, not the clean veth.
            endpoint = supervisor.layout.job_dir(job["id"]) / "attempts" / "0001.endpoint"
            assert endpoint.read_text().startswith(f"tcp://{here}:"), endpoint.read_text()
    finally:
        second_host.clear_netem()
        supervisor.stop()
