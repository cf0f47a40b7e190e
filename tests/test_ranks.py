"""A distributed job under the real supervisor: 2 ranks on localhost through mlx.launch, with
rank kills, a memory step-down and a supervisor kill; and how a launcher's end is read."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from conftest import make_job, reconfigure, run_trainer, wait_for
from loractl.client.harness import SupervisorProcess
from loractl.protocol import ExitCode
from loractl.supervisor.ranks import Rank, attempt_exit, first_failed, launcher_exits

TWO_RANKS = {"distributed": {"backend": "ring", "processes": 2}}
# Batch 2 is one sample per rank; long enough for two kills between checkpoints.
JOB = {"batch_size": 2, "iters": 60, "grad_accumulation_steps": 1, "checkpoint_every": 2}


def adapter_digest(job: dict) -> str:
    return hashlib.sha256(
        (Path(job["adapter_path"]) / "adapters.safetensors").read_bytes()
    ).hexdigest()


def logged(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def step_losses(adapter_path: str | Path) -> list[float]:
    records = logged(Path(adapter_path) / "train.log")
    return [record["loss"] for record in records if record.get("event") == "step"]


def rank_processes(home: Path) -> list[psutil.Process]:
    """Live rank trainers of jobs under ``home`` (not the mlx.launch processes above them)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["status"] == psutil.STATUS_ZOMBIE or len(cmdline) < 4:
            continue
        if cmdline[1:3] == ["-m", "loractl.daemon.trainer"] and str(home) in " ".join(cmdline):
            found.append(proc)
    # A trainer's forked helper carries its command line until it execs: part of that rank.
    pids = {proc.pid for proc in found}
    return [proc for proc in found if proc.ppid() not in pids]


class RankCounter:
    """Samples the number of live ranks in a thread: the most ever seen at once."""

    def __init__(self, home: Path):
        self.home = home
        self.most = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.wait(0.05):
            try:
                self.most = max(self.most, len(rank_processes(self.home)))
            except psutil.Error:
                continue

    def __enter__(self) -> RankCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


@pytest.fixture
def supervisor(tmp_path):
    sup = SupervisorProcess(tmp_path / "home")
    yield sup
    sup.stop()


def attempt_logs(sup: SupervisorProcess) -> str:
    """Every attempt's stderr (the launcher's and its ranks'), for a failing assertion."""
    return "\n".join(
        f"--- {path}\n{path.read_text(errors='replace')[-3000:]}"
        for path in sorted(sup.home.rglob("attempts/*.stderr"))
    )


def two_ranks_running(sup: SupervisorProcess, job_id: str, step: int) -> dict | None:
    job = sup.show(job_id)
    if job["state"] == "running" and len(job["ranks"]) == 2 and job["progress"]["step"] >= step:
        return job
    return None


@pytest.fixture(scope="module")
def uninterrupted(tiny_workspace, tmp_path_factory):
    """One supervised 2-rank run of JOB with no fault: the reference."""
    folder = tmp_path_factory.mktemp("reference")
    sup = SupervisorProcess(folder / "home").start()
    try:
        job_id = sup.submit(make_job(tiny_workspace, folder / "job", **JOB, **TWO_RANKS))
        job = sup.wait_state(job_id, {"completed", "failed"}, timeout=240)
        listening = [
            c for c in psutil.Process(sup.proc.pid).net_connections("tcp") if c.status == "LISTEN"
        ]
        shown = subprocess.run(
            [sys.executable, "-m", "loractl.client.cli", "--home", str(sup.home), "show", job_id],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    finally:
        sup.stop()
    assert job["state"] == "completed", job["reason"] + sup.debug()
    return job, listening, shown


# --- how a launcher's end is read ------------------------------------------------------------


def test_launcher_lines_give_each_ranks_end():
    """mlx.launch's log lines become rank -> exit code (negative: signal; None: terminated)."""
    text = (
        "noise\n[WARNING] Node with rank 1 exited with code -9\n"
        "loractl: a peer rank was lost (rank 0)\n[WARNING] Node with rank 0 was killed\n"
        "Node with rank 2 exited with code 75\n"
    )
    assert launcher_exits(text) == {1: -9, 0: None, 2: 75}


def test_the_first_rank_to_fail_on_its_own_is_blamed_not_the_peers_that_lost_it():
    """A survivor that only lost its peer is never the culprit, even if it ended first."""
    survivor = Rank(rank=0, pid=10, host="a", local=True, ended_at=1.0, reported_exit=1)
    survivor.peer_lost = True
    killed = Rank(rank=1, pid=11, host="a", local=True, ended_at=2.0)
    ranks = {0: survivor, 1: killed}
    assert first_failed(ranks) is killed
    log = "Node with rank 1 exited with code -9\n"
    assert attempt_exit(ranks, 2, log, culprit=None) == (None, 9, 1)
    # An announced exit beats the launcher's word; the supervisor's own verdict beats both.
    killed.reported_exit = int(ExitCode.OUT_OF_MEMORY)
    assert attempt_exit(ranks, 2, log, culprit=None) == (int(ExitCode.OUT_OF_MEMORY), None, 1)
    assert attempt_exit(ranks, 2, log, culprit=0) == (1, None, 0)
    # The rank seen to vanish was terminated by mlx.launch because the other, never heard
    # from, had failed at start-up: that one is blamed.
    started = {0: Rank(rank=0, pid=10, host="a", local=True, ended_at=1.0)}
    log = "Node with rank 1 exited with code 1\nNode with rank 0 exited with code -15\n"
    assert attempt_exit(started, 2, log, culprit=0) == (1, None, 1)


def test_done_and_stopped_attempts_have_no_culprit():
    """All ranks done is done; a coordinated stop ends stopped even when mlx.launch then
    terminated the slower rank (a second signal, after the shared checkpoint)."""

    def rank(n: int, code: int | None) -> Rank:
        return Rank(rank=n, pid=n + 1, host="a", local=True, ended_at=1.0, reported_exit=code)

    done = {0: rank(0, 0), 1: rank(1, 0)}
    assert attempt_exit(done, 2, "", None) == (0, None, None)
    stopped = {0: rank(0, None), 1: rank(1, int(ExitCode.STOPPED))}
    log = "Node with rank 1 exited with code 82\nNode with rank 0 exited with code -15\n"
    assert attempt_exit(stopped, 2, log, None) == (int(ExitCode.STOPPED), None, None)
    # Only one rank of two ever spoke, and said done: not the whole job.
    assert attempt_exit({0: rank(0, 0)}, 2, "", None) == (None, None, None)


# --- real ranks under the real supervisor --------------------------------------------------


def test_two_rank_job_completes_like_one_process_and_shows_its_ranks(
    tiny_workspace, tmp_path, uninterrupted
):
    """Supervised, 2 ranks of batch 1 follow one process of batch 2 within 1%; `show` lists
    both ranks with host, pid, step and footprint; the supervisor opens no TCP port."""
    job, listening, shown = uninterrupted
    assert job["attempts"] == 1 and job["crashes"] == []
    assert [r["rank"] for r in job["ranks"]] == [0, 1]
    for rank in job["ranks"]:
        assert set(rank) == {"rank", "host", "hostname", "local", "pid", "step", "footprint_mb"}
        assert rank["step"] == JOB["iters"] and rank["footprint_mb"] > 0 and rank["host"]
        assert rank["local"] and rank["hostname"] == socket.gethostname()
    assert job["ranks"][0]["pid"] != job["ranks"][1]["pid"]
    running = [e for e in job["history"] if e.get("to_state") == "running"]
    assert running and "all 2 ranks heartbeat" in running[0]["cause"]
    assert listening == [], "a single-machine job must not open a TCP port"
    rank_lines = shown.split("  ranks:\n", 1)[1].splitlines()[:2]
    for line, rank in zip(rank_lines, job["ranks"], strict=True):
        assert line.strip().startswith(f"{rank['rank']}: {rank['hostname']} pid {rank['pid']}")

    single = make_job(tiny_workspace, tmp_path, **JOB)
    result = run_trainer(single, "--fresh")
    assert result.returncode == 0, result.stderr
    one, two = step_losses(tmp_path / "adapters"), step_losses(job["adapter_path"])
    assert len(one) == len(two) == JOB["iters"]
    assert all(abs(a - b) < 0.01 * abs(a) for a, b in zip(one, two, strict=True))
    assert two[-1] < two[0]


def test_rank_1_sigkilled_twice_relaunches_both_and_ends_bitwise_equal(
    tiny_workspace, tmp_path, supervisor, uninterrupted
):
    """Each SIGKILL of rank 1 stops rank 0, relaunches both from the checkpoint, and is
    recorded as rank 1 killed externally; the adapter equals the uninterrupted run's."""
    reference, _, _ = uninterrupted
    supervisor.start()
    job_id = supervisor.submit(make_job(tiny_workspace, tmp_path / "job", **JOB, **TWO_RANKS))
    with RankCounter(supervisor.home) as counter:
        for kill, at_step in enumerate((8, 30)):
            job = wait_for(lambda s=at_step: two_ranks_running(supervisor, job_id, s), 120)
            victim = job["ranks"][1]["pid"]
            survivor = job["ranks"][0]["pid"]
            os.kill(victim, signal.SIGKILL)
            job = wait_for(
                lambda n=kill: len((j := supervisor.show(job_id))["crashes"]) > n and j, 60
            )
            assert not psutil.pid_exists(survivor) or psutil.Process(survivor).status() == (
                psutil.STATUS_ZOMBIE
            ), "the surviving rank was left running"
        job = supervisor.wait_state(job_id, {"completed", "failed"}, timeout=240)
    assert job["state"] == "completed", job["reason"] + supervisor.debug()
    assert counter.most == 2, "never more than one attempt's ranks at once"
    assert job["attempts"] == 3
    for crash in job["crashes"]:
        seen = (crash["rank"], crash["cause"], crash["signal"])
        assert seen == (1, "killed_externally", "SIGKILL"), crash
    lost = [e["detail"] for e in job["history"] if e["kind"] == "rank_lost"]
    assert [d["rank"] for d in lost] == [1, 1]
    assert adapter_digest(job) == adapter_digest(reference)
    assert rank_processes(supervisor.home) == []


def test_pause_stops_both_ranks_at_one_checkpoint_and_resume_ends_bitwise_equal(
    tiny_workspace, tmp_path, supervisor, uninterrupted
):
    """Pause reaches every rank through its stop command: both stop at the same step, the
    job is paused with no crash, and resumed it ends equal to the uninterrupted run."""
    from loractl.client.control import request
    from loractl.protocol import PauseRequest, ResumeRequest

    reference, _, _ = uninterrupted
    supervisor.start()
    job_id = supervisor.submit(make_job(tiny_workspace, tmp_path / "job", **JOB, **TWO_RANKS))
    job = wait_for(lambda: two_ranks_running(supervisor, job_id, 10), 120)
    ranks = [rank["pid"] for rank in job["ranks"]]
    assert request(supervisor.layout, PauseRequest(job=job_id)).ok
    job = supervisor.wait_state(job_id, {"paused", "failed", "completed"}, timeout=90)
    assert job["state"] == "paused" and job["crashes"] == [], job["reason"]
    assert not any(psutil.pid_exists(pid) for pid in ranks) or all(
        psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        for pid in ranks
        if psutil.pid_exists(pid)
    )
    adapters = Path(job["adapter_path"])
    stops = [
        [r["step"] for r in logged(adapters / name) if r.get("event") == "stopped on request"]
        for name in ("train.log", "train.rank1.log")
    ]
    assert len(stops[0]) == 1 and stops[0] == stops[1], stops
    assert request(supervisor.layout, ResumeRequest(job=job_id)).ok
    job = supervisor.wait_state(job_id, {"completed", "failed"}, timeout=240)
    assert job["state"] == "completed", job["reason"] + supervisor.debug()
    assert job["crashes"] == [] and job["attempts"] == 2, (
        f"{job['crashes']}\n{supervisor.debug()}\n{attempt_logs(supervisor)}"
    )
    assert adapter_digest(job) == adapter_digest(reference)


def test_a_budget_only_the_cheaper_rung_fits_steps_the_two_rank_job_down(
    tiny_workspace, tmp_path, supervisor
):
    """With a per-rank budget between the measured rung-0 and rung-1 footprints, the memory
    guard stops both ranks, the job steps down one rung and completes there."""
    # 8 samples per rank: the sequence length then moves each rank's footprint by tens of MB.
    heavy = {"batch_size": 16, "grad_accumulation_steps": 1, "max_seq_length": 256, **TWO_RANKS}
    ladder = [{"max_seq_length": 128}]
    supervisor.start()
    peaks = []
    for seq in (256, 128):
        probe = make_job(
            tiny_workspace, tmp_path / f"probe{seq}", iters=6, **{**heavy, "max_seq_length": seq}
        )
        job = supervisor.wait_state(supervisor.submit(probe), {"completed", "failed"}, 240)
        assert job["state"] == "completed", job["reason"]
        peaks.append(job["peak_memory_mb"]["0"])
    assert peaks[0] > peaks[1] * 1.1, peaks
    budget = int((peaks[0] + peaks[1]) / 2)
    config = make_job(
        tiny_workspace,
        tmp_path / "job",
        iters=16,
        checkpoint_every=1,
        memory_budget_mb=budget,
        ladder=ladder,
        **heavy,
    )
    job_id = supervisor.submit(config)
    job = supervisor.wait_state(job_id, {"completed", "failed"}, timeout=300)
    assert job["state"] == "completed", job["reason"] + supervisor.debug()
    assert job["rung"] == 1 and job["effective_config"]["max_seq_length"] == 128
    assert [c["cause"] for c in job["crashes"]] == ["memory"]
    assert job["crashes"][0]["rank"] in (0, 1)
    # Stopped by the guard while it trained, or by a rank's pre-flight at step 0 when the
    # longest batch's reading is over the budget too (it sits a few MB from the running peak).
    guard = [e["detail"] for e in job["history"] if e["kind"] == "memory_guard"]
    if job["crashes"][0]["rule"] == "preflight_over_budget":
        assert job["crashes"][0]["step"] == 0, job["crashes"]
    else:
        assert guard and guard[0]["rank"] in (0, 1) and guard[0]["footprint_mb"] > budget
    assert job["peak_memory_mb"]["1"] <= budget < job["peak_memory_mb"]["0"]


def test_supervisor_sigkill_leaves_no_orphan_rank_and_nothing_runs_twice(
    tiny_workspace, tmp_path, supervisor, uninterrupted
):
    """The supervisor dies mid-run; the next one adopts the launcher and its ranks, never a
    second set, and the job ends bitwise equal in its first attempt."""
    reference, _, _ = uninterrupted
    supervisor.start()
    job_id = supervisor.submit(make_job(tiny_workspace, tmp_path / "job", **JOB, **TWO_RANKS))
    with RankCounter(supervisor.home) as counter:
        wait_for(lambda: two_ranks_running(supervisor, job_id, 10), 120)
        supervisor.kill()
        supervisor.start()
        job = wait_for(lambda: two_ranks_running(supervisor, job_id, 0), 60)
        assert [e for e in job["history"] if e["kind"] == "adopted"]
        job = supervisor.wait_state(job_id, {"completed", "failed"}, timeout=240)
    assert job["state"] == "completed", job["reason"] + supervisor.debug()
    assert counter.most == 2
    assert job["attempts"] == 1 and job["crashes"] == []
    assert adapter_digest(job) == adapter_digest(reference)
    assert rank_processes(supervisor.home) == []


# --- ranks on other Macs: telemetry and control over TCP, with keys only ------------------


def test_a_tcp_client_without_the_keys_is_refused(inprocess_supervisor):
    """The remote telemetry socket takes heartbeats only from holders of this install's
    CURVE keys (kept 0600), sends commands only to them, and is gone once closed."""
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    from loractl.keys import keys_folder, load_keys, secure_client
    from loractl.protocol import Heartbeat, TrainerCommand

    sup = inprocess_supervisor
    endpoint = sup.channels.open_remote("127.0.0.1")
    assert endpoint.startswith("tcp://127.0.0.1:")
    folder = keys_folder(sup.layout.home)
    assert all(p.stat().st_mode & 0o077 == 0 for p in folder.rglob("*"))
    context = zmq.Context.instance()
    keyless = context.socket(zmq.DEALER)
    keyed = context.socket(zmq.DEALER)
    try:
        for sock, name in ((keyless, b"trainer-1"), (keyed, b"trainer-2")):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IDENTITY, name)
        secure_client(keyed, load_keys(folder))
        monitor = keyless.get_monitor_socket()
        keyless.connect(endpoint)
        beat = Heartbeat(job_id="someone-elses", pid=1).encode()
        for _ in range(5):
            keyless.send(beat)
        # The server turns the plain client away in the handshake, before any frame.
        refused = {zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_AUTH}
        wait_for(
            lambda: monitor.poll(100) and recv_monitor_message(monitor)["event"] in refused, 10
        )
        keyless.disable_monitor()
        monitor.close()
        keyed.connect(endpoint)
        keyed.send(beat)

        def arrived() -> int:
            sup.drain_telemetry({sup.channels.remote: zmq.POLLIN})
            return sup.dropped_frames  # a job nobody runs: counted, never acted on

        wait_for(lambda: arrived() >= 1, 10)
        assert arrived() == 1, "only the keyed client's heartbeat may get through"
        stop = TrainerCommand(action="stop").encode()
        sup.channels.remote.send_multipart([b"trainer-2", stop])
        assert keyed.poll(5000) and keyed.recv() == stop
        with pytest.raises(zmq.ZMQError):  # unroutable: it never completed the handshake
            sup.channels.remote.send_multipart([b"trainer-1", stop])
    finally:
        keyless.close()
        keyed.close()
    sup.channels.close_remote()
    port = int(endpoint.rsplit(":", 1)[1])

    def listening() -> set[int]:
        connections = psutil.Process().net_connections("tcp")
        return {c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN}

    wait_for(lambda: port not in listening(), 5)  # ZeroMQ closes it in its I/O thread


def test_a_job_with_ranks_on_other_macs_reports_over_tcp_with_the_keys(
    inprocess_supervisor, tiny_workspace, tmp_path
):
    """Its attempt runs mlx.launch over both hosts, and the trainers get the TCP endpoint
    and the keys folder; a single-machine job keeps ipc and no keys."""
    import zmq

    from loractl.config import load_config
    from loractl.keys import keys_folder

    sup = reconfigure(inprocess_supervisor, telemetry_address="127.0.0.1")
    remote = make_job(
        tiny_workspace,
        tmp_path / "remote",
        batch_size=2,
        distributed={"hosts": ["127.0.0.1", "192.0.2.10"]},
    )
    job = sup.queue.enqueue(remote, load_config(remote))
    command, is_remote = sup.runner.attempt_command(job, load_config(remote), 1)
    assert is_remote and "--hosts" in command
    assert command[command.index("--hosts") + 1] == "127.0.0.1,192.0.2.10"
    trainer_argv = command[command.index("--") + 1 :]
    endpoint = trainer_argv[trainer_argv.index("--telemetry") + 1]
    assert endpoint == sup.channels.remote.getsockopt_string(zmq.LAST_ENDPOINT)
    assert trainer_argv[trainer_argv.index("--keys-dir") + 1] == str(keys_folder(sup.layout.home))
    sup.channels.close_remote()

    local = make_job(tiny_workspace, tmp_path / "local", batch_size=2, **TWO_RANKS)
    job = sup.queue.enqueue(local, load_config(local))
    command, is_remote = sup.runner.attempt_command(job, load_config(local), 1)
    assert not is_remote and "--keys-dir" not in command and sup.channels.remote is None
    assert command[command.index("--telemetry") + 1].startswith("ipc://")


def test_a_trainer_told_to_report_over_tcp_without_keys_exits_78(tiny_workspace, tmp_path):
    """Telemetry over TCP never falls back to an open channel: no keys, no training."""
    config = make_job(tiny_workspace, tmp_path, iters=2)
    result = run_trainer(config, "--telemetry", "tcp://127.0.0.1:9", timeout=60)
    assert result.returncode == ExitCode.CONFIG_ERROR, result.stderr
    assert "needs --keys-dir" in result.stderr
    result = run_trainer(
        config, "--telemetry", "tcp://127.0.0.1:9", "--keys-dir", str(tmp_path / "none")
    )
    assert result.returncode == ExitCode.CONFIG_ERROR and "no CURVE keys folder" in result.stderr


def test_a_real_trainer_reports_over_tcp_to_the_supervisors_keyed_socket(
    inprocess_supervisor, tiny_workspace, tmp_path
):
    """The trainer a remote rank runs (`--telemetry tcp://… --keys-dir …`) heartbeats through
    the supervisor's CURVE socket and announces its end there."""
    import zmq

    from loractl.keys import keys_folder
    from loractl.protocol import Heartbeat, TrainerEvent, decode

    sup = inprocess_supervisor
    endpoint = sup.channels.open_remote("127.0.0.1")
    # Read the frames ourselves: no job of this supervisor owns this trainer.
    sock = sup.channels.remote
    config = make_job(tiny_workspace, tmp_path, iters=4)
    keys = str(keys_folder(sup.layout.home))
    result = run_trainer(
        config, "--fresh", "--telemetry", endpoint, "--keys-dir", keys, "--job-id", "remote-1"
    )
    assert result.returncode == 0, result.stderr
    messages = []
    while sock.poll(1000, zmq.POLLIN):
        messages.append(decode(sock.recv_multipart()[-1]))
    beats = [m for m in messages if isinstance(m, Heartbeat)]
    assert beats and all(b.job_id == "remote-1" for b in beats)
    assert any(isinstance(m, TrainerEvent) and m.kind == "done" for m in messages)
    sup.channels.close_remote()
