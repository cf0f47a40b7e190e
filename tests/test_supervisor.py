"""The real supervisor over the real trainer: chaos, memory step-down, hangs, its own crash."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import make_job, run_trainer, wait_for
from loractl.client.harness import SupervisorProcess, measure_footprint, trainers_of
from loractl.daemon.tinymodel import prepare

CHAOS_JOB = {"iters": 600, "checkpoint_every": 2, "grad_accumulation_steps": 4, "max_retries": 5}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def supervisor(tmp_path):
    sup = SupervisorProcess(tmp_path / "home")
    yield sup
    sup.stop()


def test_chaos_ten_sigkills_end_bitwise_equal_and_never_step_the_ladder(
    tiny_workspace, tmp_path, supervisor
):
    """Ten SIGKILLs of the real trainer: the job completes, exact, every crash external."""
    config = make_job(tiny_workspace, tmp_path / "src", **CHAOS_JOB)
    reference = make_job(tiny_workspace, tmp_path / "ref", **CHAOS_JOB)
    result = run_trainer(reference, "--fresh")
    assert result.returncode == 0, result.stderr

    supervisor.start()
    job_id = supervisor.submit(config)
    # The schedule is random but repeatable: the seed is printed, and LORACTL_FAULT_SEED
    # replays a failing run's.
    seed = int(os.environ.get("LORACTL_FAULT_SEED") or random.randrange(2**32))
    print(f"fault schedule seed: {seed} (LORACTL_FAULT_SEED={seed} replays it)")
    rng = random.Random(seed)
    kills = 0
    last_step = -1
    while kills < 10:
        # Wait for a fresh checkpoint since the last kill, then strike at a random moment.
        job = wait_for(
            lambda after=last_step: (
                (j := supervisor.show(job_id))["trainer_pid"]
                and (j["last_checkpoint_step"] or -1) > after
                and j
            ),
            timeout=90,
            interval=0.05,
        )
        time.sleep(rng.uniform(0, 0.3))
        pid = job["trainer_pid"]
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        kills += 1
        last_step = job["last_checkpoint_step"]
        wait_for(lambda p=pid: supervisor.show(job_id)["trainer_pid"] != p, 30)
        assert supervisor.show(job_id)["state"] != "completed", "job ended before 10 kills"
    job = supervisor.wait_state(job_id, {"completed", "failed"}, timeout=240)
    assert job["state"] == "completed", f"seed {seed}: " + job["reason"] + supervisor.debug()
    assert len(job["crashes"]) == 10
    assert {c["cause"] for c in job["crashes"]} == {"killed_externally"}
    assert job["rung"] == 0
    assert not [e for e in job["history"] if e["kind"] == "ladder_step"]
    produced = Path(job["adapter_path"]) / "adapters.safetensors"
    assert digest(produced) == digest(tmp_path / "ref" / "adapters" / "adapters.safetensors")


@pytest.fixture(scope="module")
def ladder_workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ladder")
    prepare(root, preset="ladder", seed=0)
    return root


def test_real_memory_pressure_steps_down_to_the_rung_that_fits(
    ladder_workspace, tmp_path, supervisor
):
    """A budget between seq-256 and seq-128 footprints ends the job on the seq-128 rung: the
    guard's own path, mid-run, with the blind ladder and no pre-flight (the learning ladder
    and the pre-flight are tested in test_ladder_learning.py)."""
    probe = make_job(ladder_workspace, tmp_path / "probe", iters=24, val_batches=1)
    long_seq = measure_footprint(probe, {"max_seq_length": 256})
    short_seq = measure_footprint(probe, {"max_seq_length": 128})
    assert long_seq > short_seq * 1.1, (long_seq, short_seq)
    budget = int((long_seq + short_seq) / 2)
    config = make_job(
        ladder_workspace,
        tmp_path / "src",
        iters=24,
        memory_budget_mb=budget,
        val_batches=1,
        checkpoint_every=1,
        preflight=False,
    )
    supervisor.env["LORACTL_LADDER_POLICY"] = "blind"
    supervisor.start()
    job_id = supervisor.submit(config)
    job = supervisor.wait_state(job_id, {"completed", "failed"}, timeout=400)
    assert job["state"] == "completed", job["reason"] + supervisor.debug()
    assert job["rung"] == 2
    assert job["effective_config"]["max_seq_length"] == 128
    memory_crashes = [c for c in job["crashes"] if c["cause"] == "memory"]
    assert len(memory_crashes) == 2
    peaks = job["peak_memory_mb"]
    assert peaks["0"] > budget and peaks["1"] > budget and peaks["2"] <= budget, peaks
    steps = [e for e in job["history"] if e["kind"] == "ladder_step"]
    assert [s["detail"]["to_rung"] for s in steps] == [1, 2]


def test_segfault_is_memory_only_with_memory_evidence(tiny_workspace, tmp_path, supervisor):
    """A real SIGSEGV with low readings is a crash (retried on the same rung); near the
    budget it is memory and steps down."""
    supervisor.env["LORACTL_FAULT_SEGV"] = "1:6"
    supervisor.start()
    low = make_job(tiny_workspace, tmp_path / "low", iters=120, memory_budget_mb=100_000)
    job_id = supervisor.submit(low)
    job = supervisor.wait_state(job_id, {"completed", "failed"}, timeout=180)
    assert job["state"] == "completed", job["reason"]
    assert [c["cause"] for c in job["crashes"]] == ["crash"]
    assert job["crashes"][0]["signal"] == "SIGSEGV"
    assert job["rung"] == 0
    footprint = job["peak_memory_mb"]["0"]

    near = make_job(
        tiny_workspace, tmp_path / "near", iters=120, memory_budget_mb=int(footprint / 0.95) + 1
    )
    job_id = supervisor.submit(near)
    job = supervisor.wait_state(job_id, {"completed", "failed"}, timeout=180)
    assert job["state"] == "completed", job["reason"]
    assert [c["cause"] for c in job["crashes"]] == ["memory"], job["crashes"]
    # Down at least one rung; the memory model may pass over the accumulation rung, which
    # saves nothing, and then says so in the history.
    skipped = {e["detail"]["rung"] for e in job["history"] if e["kind"] == "rung_skipped"}
    assert job["rung"] >= 1 and skipped == set(range(1, job["rung"])), (job["rung"], skipped)


def test_stopped_trainer_is_detected_as_hung_and_restarted(tiny_workspace, tmp_path, supervisor):
    """SIGSTOP freezes the trainer; the watchdog notices within heartbeat_timeout + 2 s."""
    config = make_job(
        tiny_workspace, tmp_path / "src", iters=400, heartbeat_timeout=3.0, checkpoint_every=5
    )
    supervisor.start()
    job_id = supervisor.submit(config)
    wait_for(lambda: supervisor.show(job_id)["progress"]["step"] >= 5, 60)
    pid = supervisor.show(job_id)["trainer_pid"]
    stopped_at = time.time()
    os.kill(pid, signal.SIGSTOP)
    job = wait_for(
        lambda: (j := supervisor.show(job_id))["crashes"] and j, timeout=20, interval=0.05
    )
    hang = [e for e in job["history"] if e["kind"] == "hang_detected"][0]
    assert hang["at"] - stopped_at < 3.0 + 2.0
    assert job["crashes"][0]["cause"] == "hang"
    job = supervisor.wait_state(job_id, {"completed", "failed"}, timeout=180)
    assert job["state"] == "completed", job["reason"]
    assert job["attempts"] == 2


def test_supervisor_sigkill_readopts_the_live_trainer(tiny_workspace, tmp_path, supervisor):
    """SIGKILL the supervisor mid-job and restart it: the same trainer finishes the job, never
    two trainers at once, and no example is consumed twice."""
    trace = tmp_path / "trace.jsonl"
    supervisor.env["LORACTL_TRACE_EXAMPLES"] = str(trace)
    config = make_job(tiny_workspace, tmp_path / "src", iters=800, checkpoint_every=5)
    supervisor.start()
    job_id = supervisor.submit(config)
    seen_pids: set[int] = set()
    most_at_once = 0
    done = threading.Event()

    def census():
        nonlocal most_at_once
        while not done.is_set():
            live = trainers_of(supervisor.home)
            most_at_once = max(most_at_once, len(live))
            seen_pids.update(p.pid for p in live)
            time.sleep(0.02)

    watcher = threading.Thread(target=census, daemon=True)
    watcher.start()
    try:
        wait_for(lambda: supervisor.show(job_id)["progress"]["step"] >= 10, 60)
        pid = supervisor.show(job_id)["trainer_pid"]
        supervisor.kill()
        # The orphan trains on while nobody supervises it: a few more examples first.
        consumed = len(trace.read_text().splitlines())
        wait_for(lambda: len(trace.read_text().splitlines()) >= consumed + 4, 60)
        supervisor.start()
        job = supervisor.wait_state(job_id, {"completed", "failed"}, timeout=240)
    finally:
        done.set()
        watcher.join()
    assert job["state"] == "completed", job["reason"] + supervisor.debug()
    assert seen_pids == {pid}
    assert most_at_once == 1
    assert any(e["kind"] == "adopted" for e in job["history"])
    starts = [json.loads(line)["start"] for line in trace.read_text().splitlines()]
    assert len(starts) == len(set(starts)), "an example was consumed twice"
    assert sorted(starts) == list(range(0, 800))


def test_second_supervisor_refuses_to_start(tmp_path, supervisor):
    """The pidfile lock keeps a second supervisor from stealing the sockets."""
    supervisor.start()
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "loractl.client.cli",
            "--home",
            str(supervisor.home),
            "daemon",
            "run",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 3
    assert "already running" in second.stderr
    assert supervisor._answers(), "the first supervisor stopped answering"


def loractl(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loractl.client.cli", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_submit_show_wait_round_trip(tiny_workspace, tmp_path, supervisor):
    """`submit --json` prints the id, `wait` exits 0 on completion, `show --json` has it all."""
    supervisor.start()
    config = make_job(tiny_workspace, tmp_path / "src", iters=16)
    submitted = loractl(supervisor.home, "submit", "--json", str(config))
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["id"]
    waited = loractl(supervisor.home, "wait", job_id, "--timeout", "120")
    assert waited.returncode == 0, waited.stdout + waited.stderr
    shown = json.loads(loractl(supervisor.home, "show", "--json", job_id).stdout)
    for key in (
        "id",
        "name",
        "state",
        "rung",
        "effective_config",
        "attempts",
        "trainer_pid",
        "crashes",
        "progress",
        "peak_memory_mb",
        "adapter_path",
        "history",
    ):
        assert key in shown, key
    assert shown["state"] == "completed" and shown["progress"]["examples_seen"] == 16
    assert (Path(shown["adapter_path"]) / "adapters.safetensors").exists()
    assert "mlx_lm.generate" in loractl(supervisor.home, "show", job_id).stdout


def test_cli_says_when_the_daemon_is_not_running(tmp_path):
    """Without a daemon every command answers at once, in one line, naming how to start it."""
    began = time.monotonic()
    result = loractl(tmp_path / "nowhere", "status")
    assert result.returncode == 3
    assert "not running" in result.stderr and "daemon run" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert time.monotonic() - began < 10


def test_bad_data_fails_without_retry(tiny_workspace, tmp_path, supervisor):
    """A data error (exit 65) fails the job on its first attempt, with the line in the reason."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    config = make_job(tiny_workspace, tmp_path / "src", data=str(data), batch_size=1)
    supervisor.start()
    job_id = supervisor.submit(config)
    job = supervisor.wait_state(job_id, {"failed", "completed"}, timeout=120)
    assert job["state"] == "failed" and job["outcome"] == "failed:data_error"
    assert job["attempts"] == 1
    assert "train.jsonl:2" in job["reason"]


def test_deaths_before_the_first_heartbeat_fail_with_the_stderr_tail(
    tiny_workspace, tmp_path, supervisor
):
    """A trainer that dies before heartbeating three times running fails the job, quoting it."""
    supervisor.env["LORACTL_FAULT_EARLY_EXIT"] = "1"
    supervisor.start()
    job_id = supervisor.submit(make_job(tiny_workspace, tmp_path / "src", iters=16))
    job = supervisor.wait_state(job_id, {"failed", "completed"}, timeout=120)
    assert job["state"] == "failed" and job["outcome"] == "failed:early_death"
    assert job["attempts"] == 3
    assert "simulated start-up failure" in job["reason"]


def test_exhausted_ladder_fails_listing_every_rung_and_its_peak(
    tiny_workspace, tmp_path, supervisor
):
    """With a budget no rung fits, the job fails naming each rung and the peak of each it
    tried; the memory model may skip rungs between, and every stop comes at step 0."""
    supervisor.start()
    config = make_job(tiny_workspace, tmp_path / "src", iters=400, memory_budget_mb=64)
    job_id = supervisor.submit(config)
    job = supervisor.wait_state(job_id, {"failed", "completed"}, timeout=240)
    assert job["state"] == "failed" and job["outcome"] == "failed:memory"
    rungs = len(job["ladder"])
    assert rungs == 4 and job["rung"] == rungs - 1
    tried = [c["rung"] for c in job["crashes"]]
    assert tried[0] == 0 and tried[-1] == rungs - 1
    assert {c["cause"] for c in job["crashes"]} == {"memory"}
    # Stopped by the guard while loading, or by its own pre-flight: either way at step 0.
    assert {c["rule"] for c in job["crashes"]} <= {"preflight_over_budget", "memory_guard"}
    assert {c["step"] for c in job["crashes"]} == {0}
    for rung in range(rungs):
        assert f"rung {rung} (" in job["reason"]
    for rung in tried:
        assert job["peak_memory_mb"][str(rung)] > 64
    assert "peak" in job["reason"]


def test_pressure_warn_asks_for_a_checkpoint_and_a_cache_clear(
    tiny_workspace, tmp_path, supervisor
):
    """At pressure "warn" (a fake sysctl level) the trainer checkpoints off its schedule."""
    level = tmp_path / "pressure-level"
    level.write_text("1")
    supervisor.env["LORACTL_PRESSURE_LEVEL_FILE"] = str(level)
    supervisor.start()
    config = make_job(tiny_workspace, tmp_path / "src", iters=1200, checkpoint_every=1000)
    job_id = supervisor.submit(config)
    wait_for(lambda: supervisor.show(job_id)["progress"]["step"] >= 3, 60)
    level.write_text("2")
    job = wait_for(
        lambda: (j := supervisor.show(job_id))["last_checkpoint_step"] and j, 30, interval=0.05
    )
    guard = [e for e in job["history"] if e["kind"] == "memory_guard"]
    assert guard and guard[0]["detail"]["action"] == "checkpoint+clear_cache"
    assert job["last_checkpoint_step"] % 1000 != 0
    assert job["state"] == "running"


def test_supervisor_sigterm_checkpoints_the_job_and_exits_zero(
    tiny_workspace, tmp_path, supervisor
):
    """SIGTERM to the supervisor stops the trainer with a checkpoint, requeues, and exits 0."""
    supervisor.start()
    config = make_job(tiny_workspace, tmp_path / "src", iters=240, checkpoint_every=1000)
    job_id = supervisor.submit(config)
    wait_for(lambda: supervisor.show(job_id)["progress"]["step"] >= 3, 60)
    pid = supervisor.show(job_id)["trainer_pid"]
    supervisor.proc.send_signal(signal.SIGTERM)
    assert supervisor.proc.wait(timeout=30) == 0
    assert not psutil_alive(pid)
    checkpoints = (tmp_path / "src" / "adapters" / "checkpoints").glob("step-*")
    assert list(checkpoints), "no checkpoint written on the way out"
    supervisor.start()
    job = supervisor.wait_state(job_id, {"completed", "failed"}, timeout=180)
    assert job["state"] == "completed"
    assert any("shutting down" in (e["cause"] or "") for e in job["history"])


def psutil_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_crashed_supervisor_is_reported_at_once_not_after_a_timeout(tmp_path, supervisor):
    """After a SIGKILL leaves the socket file behind, the client still answers immediately."""
    supervisor.start()
    supervisor.kill()
    began = time.monotonic()
    result = loractl(supervisor.home, "status")
    assert result.returncode == 3 and "not running" in result.stderr
    assert time.monotonic() - began < 3


def test_an_adopted_trainer_that_finished_unheard_is_done_not_killed(
    tiny_workspace, tmp_path, inprocess_supervisor
):
    """A trainer whose "done" went to a supervisor that died, then exited before the next one
    heard it, is found complete in its adapter folder: the job completes, with no crash."""
    from conftest import put_in_state
    from loractl.supervisor.store import JobState

    config = make_job(tiny_workspace, tmp_path / "src", iters=4)
    result = run_trainer(config, "--fresh")
    assert result.returncode == 0, result.stderr
    sup = inprocess_supervisor
    job_id = put_in_state(sup, config, JobState.RUNNING)
    stand_in = sup.runner.attempt.popen
    sup.runner.attempt.popen = None  # adopted: not our child, its exit status is lost
    stand_in.kill()
    stand_in.wait()
    sup.tick()
    job = sup.store.get(job_id)
    assert job.state == JobState.COMPLETED and job.crashes == []
    assert [e for e in sup.store.events(job_id) if e["kind"] == "completion_found"]


def test_a_pause_taken_back_at_once_by_resume_lets_the_job_complete(
    tiny_workspace, tmp_path, supervisor
):
    """The last command wins: `pausing` shows while the pause is carried out, a `resume`
    right after takes it back, and the job completes instead of waiting paused."""
    from loractl.client.control import request
    from loractl.protocol import PauseRequest, ResumeRequest

    config = make_job(tiny_workspace, tmp_path / "src", iters=60, checkpoint_every=5)
    supervisor.start()
    job_id = supervisor.submit(config)
    wait_for(lambda: supervisor.show(job_id)["progress"]["step"] >= 2, 90)
    layout = supervisor.layout
    assert request(layout, PauseRequest(job=job_id)).data["state"] == "pausing"
    assert supervisor.show(job_id)["state"] == "pausing"
    assert request(layout, ResumeRequest(job=job_id)).data["state"] == "running"
    job = supervisor.wait_state(job_id, {"completed", "failed", "paused"}, timeout=240)
    assert job["state"] == "completed", job["reason"] + supervisor.debug()
    moves = [(e["from_state"], e["to_state"]) for e in job["history"] if e["kind"] == "transition"]
    assert ("running", "pausing") in moves and ("pausing", "running") in moves
    assert "paused" not in {to for _, to in moves}
