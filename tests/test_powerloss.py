"""Power loss, as near as processes get: the supervisor and its trainer SIGKILLed together 50
times at random points of their checkpoint and database writes. After each kill, before any
restart, the store and the checkpoint folder must be consistent; at the end the job completes
bitwise equal to an uninterrupted run.

A disk that loses writes is played too: after some cuts the WAL, or the database file
itself, is cut short (a rolled-back or a damaged store). The supervisor then rebuilds what it
lost from the job folders; a job that comes back paused is resumed, as its user would. After
every cut, no job has two trainers and the job that had completed never runs again.

SIGKILL leaves the page cache alone, so this proves the write protocols (staging, fsync,
rename, pointer swap, one transaction per transition) against a crash at any instruction,
not against a disk that loses unsynced writes.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

import psutil
import pytest

from conftest import make_job, trainer_command, trainer_env, wait_for
from loractl.checkpoints import CheckpointReader, verify
from loractl.client.control import request
from loractl.client.harness import FAST, trainers_of
from loractl.paths import Layout
from loractl.protocol import ResumeRequest, ShowRequest, StatusRequest, SubmitRequest
from loractl.supervisor.store import JobState, Store

CYCLES = 50
ITERS = 240
# Batch 1, no accumulation, a checkpoint after every optimizer step: a step is ~0.1 s on two
# cores and much of it is checkpoint writing (three files, fsyncs, renames, a pointer swap,
# pruning) and the database update that follows, so a random instant often lands in one.
JOB = {
    "iters": ITERS,
    "lr_schedule": {"name": "cosine_decay", "arguments": [1.0e-4, ITERS]},
    "grad_accumulation_steps": 1,
    "checkpoint_every": 1,
    "keep_checkpoints": 3,
    "steps_per_eval": 10_000,  # evaluation is not what is under test; it only slows a cycle
}
# Where a job may be after a crash: nothing may be left half-way between two states, and it
# cannot have ended, since nothing but our kills ever stopped it.
MODES = ("start-up", "checkpoint write", "after a checkpoint")
RESUMABLE = {JobState.QUEUED, JobState.STARTING, JobState.RUNNING, JobState.BACKOFF}
# The share of cuts after which the WAL, or the database file, loses its tail as well.
TRUNCATED_WAL = 0.15
TRUNCATED_DATABASE = 0.06


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Rig:
    def __init__(self, root: Path):
        self.root = root
        self.home = root / "home"
        self.layout = Layout.at(self.home)
        self.env = {**os.environ, **FAST, "LORACTL_KEEP_AWAKE": "0"}
        self.env.pop("LORACTL_HOME", None)
        self.log = root / "supervisor.log"
        self.proc: subprocess.Popen | None = None

    def launch(self) -> subprocess.Popen:
        with self.log.open("ab") as handle:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "loractl.supervisor", "--home", str(self.home)],
                env=self.env,
                stdout=handle,
                stderr=handle,
            )
        return self.proc

    def answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"supervisor exited {self.proc.returncode}")
        try:
            request(self.layout, StatusRequest(), timeout=1)
            return True
        except Exception:
            return False

    def trainer_pids(self) -> list[int]:
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []
        pids = []
        for child in children:
            try:
                if "loractl.daemon.trainer" in child.cmdline():
                    pids.append(child.pid)
            except psutil.Error:
                continue
        return pids

    def power_cut(self, rng: random.Random) -> None:
        """SIGKILL the supervisor and its trainer back to back, in random order; then make sure
        no trainer outlived them (one spawned in that instant would be an orphan)."""
        victims = [self.proc.pid, *self.trainer_pids()]
        rng.shuffle(victims)
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        for proc in trainers_of(self.home):
            proc.kill()
        wait_for(lambda: not trainers_of(self.home), 30)


def staging_folders(checkpoints: Path) -> set[str]:
    try:
        return {e.name for e in os.scandir(checkpoints) if e.name.startswith(".step-")}
    except OSError:
        return set()


def latest_pointer(checkpoints: Path) -> str | None:
    try:
        return (checkpoints / "latest").read_text()
    except OSError:
        return None


def one_trainer_per_job(home: Path) -> None:
    """No job has two trainers (nor the finished job any)."""
    jobs = [proc.cmdline()[proc.cmdline().index("--job-id") + 1] for proc in trainers_of(home)]
    assert len(jobs) == len(set(jobs)), jobs


def cut_short(victim: Path, rng: random.Random) -> None:
    """What a disk that drops unsynced writes leaves: the file's tail is gone."""
    size = victim.stat().st_size
    with victim.open("r+b") as handle:
        handle.truncate(rng.randrange(0, max(size, 1)))


def settle_after_restart(rig: Rig, job_id: str, done_id: str) -> None:
    """After a restart: the job is still listed (never lost), and if it came back paused from
    a rebuild it is resumed; the finished job is completed and never ran again."""
    wait_for(rig.answers, 30, interval=0.05)
    job = request(rig.layout, ShowRequest(job=job_id)).data["job"]
    if job["state"] == "paused":
        request(rig.layout, ResumeRequest(job=job_id))
    done = request(rig.layout, ShowRequest(job=done_id)).data["job"]
    assert done["state"] == "completed", done
    attempts = os.listdir(rig.layout.job_dir(done_id) / "attempts")
    assert attempts == ["0001.stderr"], attempts


def check_after_cut(rig: Rig, job_id: str, checkpoints: Path, floor: int) -> int:
    """The store and the checkpoints as a restart would find them; returns the step that a
    resume would start from."""
    # The read-only store, as `loractl status` opens it, must read the job in a valid state.
    with Store(rig.layout.database, readonly=True) as store:
        job = store.get(job_id)
        events = store.events(job_id)
        assert len(store.list()) == 2
    assert job.state in RESUMABLE, job
    assert job.outcome is None, job
    # A transition writes the row and its event in one transaction: they always agree.
    transitions = [e for e in events if e["to_state"]]
    assert transitions[-1]["to_state"] == str(job.state), (transitions[-1], job)
    with closing(sqlite3.connect(rig.layout.database)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    step = check_checkpoints(checkpoints, floor)
    # The database learns of a checkpoint from the trainer after it is on disk, never before.
    assert (job.last_checkpoint_step or -1) <= step, (job.last_checkpoint_step, step)
    return step


def check_checkpoints(checkpoints: Path, floor: int) -> int:
    """The checkpoints as a restart would find them; the step a resume would start from."""
    picked, skipped = CheckpointReader(checkpoints).newest_valid()
    if picked is None:
        assert floor < 0 and not skipped, skipped
        return -1
    # Folders appear under their final name only once complete, and the pointer moves only
    # after that: nothing newer than what a resume picks may be torn, nor a staging folder.
    assert not skipped, skipped
    assert picked.path.parent == checkpoints and picked.path.name.startswith("step-")
    verify(picked.path)
    assert picked.step >= floor, (picked.step, floor)
    return picked.step


@pytest.mark.slow
def test_fifty_power_cuts_in_checkpoint_and_database_writes_leave_everything_consistent(
    tiny_workspace, tmp_path, capsys
):
    """50 joint SIGKILLs mid-write: store and checkpoints stay consistent; the end bitwise exact."""
    began = time.monotonic()
    seed = int(os.environ.get("LORACTL_POWERLOSS_SEED") or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)
    # The reference trains beside the cycles: two cores are enough, and it saves its ~20 s.
    reference_config = make_job(tiny_workspace, tmp_path / "ref", **JOB)
    reference = subprocess.Popen(
        trainer_command(reference_config, "--fresh"),
        env=trainer_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    config = make_job(tiny_workspace, tmp_path / "src", **JOB)
    checkpoints = tmp_path / "src" / "adapters" / "checkpoints"
    rig = Rig(tmp_path)
    rig.launch()
    try:
        wait_for(rig.answers, 30, interval=0.05)
        # A job that completes first: no cut, rollback or rebuild may ever run it again.
        short = make_job(tiny_workspace, tmp_path / "done", iters=4, steps_per_eval=1000)
        done_id = request(rig.layout, SubmitRequest(config_path=str(short))).data["id"]
        wait_for(
            lambda: (
                request(rig.layout, ShowRequest(job=done_id)).data["job"]["state"] == "completed"
            ),
            120,
            interval=0.1,
        )
        job_id = request(rig.layout, SubmitRequest(config_path=str(config))).data["id"]
        step = -1
        modes: Counter = Counter()
        left: Counter = Counter()
        for _ in range(CYCLES):
            mode = "first checkpoint" if step < 0 else rng.choice(MODES)
            modes[mode] += 1
            stale = staging_folders(checkpoints)
            if mode == "start-up":
                # Anywhere from the supervisor's start (recovery, requeue, spawn, the first
                # heartbeats) through the trainer's load and resume.
                time.sleep(rng.uniform(0, 2.5))
            elif mode == "checkpoint write":
                # Inside a checkpoint write: its staging folder exists until the rename.
                wait_for(lambda s=stale: staging_folders(checkpoints) - s, 60, 0.001)
                time.sleep(rng.uniform(0, 0.01))
            else:
                # Just after a checkpoint: its pointer swap, the pruning of old ones, the
                # trainer's event and the database update that records it.
                before = latest_pointer(checkpoints)
                wait_for(lambda b=before: latest_pointer(checkpoints) not in (b, None), 60, 0.002)
                time.sleep(rng.uniform(0, 0.03))
            one_trainer_per_job(rig.home)
            rig.power_cut(rng)
            if staging_folders(checkpoints) - stale:
                left["a half-written checkpoint"] += 1
            folders = sorted(p.name for p in checkpoints.glob("step-*"))
            if folders and latest_pointer(checkpoints) != folders[-1]:
                left["a checkpoint the pointer did not name yet"] += 1
            draw = rng.random()
            wal = rig.layout.database.with_name("loractl.db-wal")
            if draw < TRUNCATED_WAL and wal.exists():
                # A rolled-back store: only the checkpoints can be held to the rules.
                cut_short(wal, rng)
                left["a truncated WAL"] += 1
                step = check_checkpoints(checkpoints, step)
            else:
                step = check_after_cut(rig, job_id, checkpoints, step)
                if draw < TRUNCATED_WAL + TRUNCATED_DATABASE:
                    cut_short(rig.layout.database, rng)
                    left["a truncated database"] += 1
            rig.launch()
            settle_after_restart(rig, job_id, done_id)
        cycles_took = time.monotonic() - began
        assert step < ITERS - 1, "the job finished before the last power cut; raise ITERS"
        wait_for(rig.answers, 30, interval=0.05)
        job = wait_for(
            lambda: (
                (j := request(rig.layout, ShowRequest(job=job_id)).data["job"])["state"]
                in ("completed", "failed")
                and j
            ),
            240,
            interval=0.2,
        )
        assert job["state"] == "completed", job["reason"]
        assert reference.wait(timeout=240) == 0, reference.stderr.read().decode()
        produced = tmp_path / "src" / "adapters" / "adapters.safetensors"
        assert digest(produced) == digest(tmp_path / "ref" / "adapters" / "adapters.safetensors")
    finally:
        if rig.proc is not None and rig.proc.poll() is None:
            rig.proc.kill()
            rig.proc.wait()
        for proc in trainers_of(rig.home):
            proc.kill()
        if reference.poll() is None:
            reference.kill()
            reference.wait()
        reference.stderr.close()
    with capsys.disabled():
        print(
            f"\npower loss: {CYCLES} cuts in {cycles_took:.0f} s, "
            f"{time.monotonic() - began:.0f} s in all (LORACTL_POWERLOSS_SEED={seed}); "
            f"cut at: {dict(modes)}; they left: {dict(left)}"
        )
