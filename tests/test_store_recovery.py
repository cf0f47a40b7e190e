"""A damaged or rolled-back job database loses no job and runs none twice: the supervisor
checks the store at start, moves a damaged one aside, rebuilds it from the job folders (and
its backup), adopts trainers the store forgot and never reruns a finished job."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import fill_disk, make_job, mount_small_disk, unmount, wait_for
from loractl.checkpoints import state_checksum
from loractl.client import doctor
from loractl.client.control import request
from loractl.client.harness import FAST, SupervisorProcess, trainers_of
from loractl.client.service_cmd import repair, repair_store
from loractl.config import load_config
from loractl.launchd import ServiceError
from loractl.paths import Layout
from loractl.protocol import ListRequest, ShowRequest
from loractl.supervisor import storecare
from loractl.supervisor.jobqueue import JobQueue
from loractl.supervisor.store import JobState, Store, StoreCorrupt


def finish_run(config: Path) -> None:
    """Write what a finished run leaves in the job's adapter folder (a checkpoint that consumed
    every example, its adapters beside it), as the trainer's checkpoint writer lays it out."""
    cfg = load_config(config)
    adapters = Path(cfg.adapter_path)
    step = adapters / "checkpoints" / "step-00000008"
    step.mkdir(parents=True)
    weights = b"finished adapters"
    (step / "adapters.safetensors").write_bytes(weights)
    (step / "optimizer.safetensors").write_bytes(b"moments")
    import hashlib

    files = {
        name: hashlib.sha256((step / name).read_bytes()).hexdigest()
        for name in ("adapters.safetensors", "optimizer.safetensors")
    }
    state = {
        "step": 8,
        "examples_seen": 32,
        "total_examples": 32,
        "files": files,
        "config_hash": cfg.identity_hash(),
    }
    state["self_sha256"] = state_checksum(dict(state))
    (step / "state.json").write_text(json.dumps(state))
    (adapters / "checkpoints" / "latest").write_text("step-00000008")
    (adapters / "adapters.safetensors").write_bytes(weights)


@pytest.fixture
def home_with_jobs(tiny_workspace, tmp_path):
    """A home whose store holds a completed job (its finished run in its adapter folder), a
    paused one at priority 7 and a queued one that had run an attempt."""
    layout = Layout.at(tmp_path / "home")
    layout.ensure()
    ids = {}
    with Store(layout.database) as store:
        queue = JobQueue(store, layout)
        for name in ("done", "held", "waiting"):
            config = make_job(tiny_workspace, tmp_path / name, name=name)
            ids[name] = queue.enqueue(config, load_config(config)).id
        finish_run(Path(store.get(ids["done"]).config_path))
        store.transition(ids["done"], JobState.STARTING, "test", attempt=1)
        store.transition(ids["done"], JobState.COMPLETED, "test")
        store.set_priority(ids["held"], 7)
        store.transition(ids["held"], JobState.PAUSED, "test")
        attempts = layout.job_dir(ids["waiting"]) / "attempts"
        attempts.mkdir()
        (attempts / "0001.stderr").write_text("")
    return layout, ids


def corrupt_header(path: Path) -> None:
    with path.open("r+b") as handle:
        handle.write(os.urandom(100))


def corrupt_page(path: Path, page: int = 3) -> None:
    with path.open("r+b") as handle:
        handle.seek(4096 * (page - 1))
        handle.write(os.urandom(4096))


def test_a_header_corrupt_store_is_moved_aside_and_every_job_folder_comes_back(
    home_with_jobs, tmp_path
):
    """Garbage over the header: the supervisor starts anyway, keeps the damaged file aside and
    rebuilds every job: the finished run completed, the others paused to resume."""
    layout, ids = home_with_jobs
    corrupt_header(layout.database)
    supervisor = SupervisorProcess(layout.home, LORACTL_KEEP_AWAKE="0").start()
    try:
        assert supervisor.show(ids["done"])["state"] == "completed"
        for name in ("held", "waiting"):
            job = supervisor.show(ids[name])
            assert job["state"] == "paused", job
            assert job["reason"].startswith(storecare.RECOVERED_REASON)
        assert supervisor.show(ids["waiting"])["attempts"] == 1  # from its attempts folder
        aside = sorted(layout.home.glob("loractl.db.corrupt-*"))
        assert aside and aside[0].read_bytes()[:16] != b"SQLite format 3\0"
        assert "Traceback" not in supervisor.debug()
    finally:
        supervisor.stop()


def test_a_page_corrupt_store_is_rebuilt_from_its_backup_where_the_folder_is_no_newer(
    home_with_jobs,
):
    """Garbage in a later page: the rebuild takes the backup's row (priority, history) for a
    job whose folder has not changed since the backup, and pauses the one that ran since."""
    layout, ids = home_with_jobs
    with Store(layout.database) as store:
        store.backup_to(storecare.backup_path(layout))
    # The waiting job ran again after the backup.
    (layout.job_dir(ids["waiting"]) / "attempts" / "0002.stderr").write_text("")
    corrupt_page(layout.database)
    assert storecare.check(layout.database) is not None
    repaired = storecare.ensure_sound(layout, full=False)
    assert repaired is not None and repaired.backup_used
    with Store(layout.database, readonly=True) as store:
        held = store.get(ids["held"])
        assert (held.state, held.priority) == (JobState.PAUSED, 7)
        assert [e["kind"] for e in store.events(held.id)][:2] == ["submitted", "priority"]
        waiting = store.get(ids["waiting"])
        assert waiting.state == JobState.PAUSED and waiting.attempt == 2
        assert store.get(ids["done"]).state == JobState.COMPLETED
    assert storecare.check(layout.database, full=True) is None


def test_a_damaged_store_read_while_open_says_how_to_repair_it(home_with_jobs):
    """SQLite's "malformed" becomes an error that names the file and the fix, and the owner
    of the store hears of it (the supervisor restarts itself to repair it)."""
    layout, ids = home_with_jobs
    for page in range(2, 6):
        corrupt_page(layout.database, page)
    seen = []
    with Store(layout.database, readonly=True) as store:
        store.on_corrupt = seen.append
        with pytest.raises(StoreCorrupt) as caught:
            store.list()
    assert str(layout.database) in str(caught.value)
    assert "loractl daemon repair" in str(caught.value) and seen


def test_a_store_that_cannot_be_rebuilt_exits_78_with_one_line(tmp_path):
    """Nothing recoverable (the home's disk is full): one line naming the file and the fix,
    and exit 78 by hand; under the service manager exit 0, the one exit neither launchd nor
    systemd restarts. The damaged file is kept in place for the next try."""
    disk = mount_small_disk(tmp_path / "disk", 2)
    try:
        layout = Layout.at(disk / "home")
        layout.ensure()
        garbage = os.urandom(8192)
        layout.database.write_bytes(garbage)
        filler = fill_disk(disk)
        env = {**os.environ, **FAST}
        env.pop("LORACTL_HOME", None)
        command = [sys.executable, "-m", "loractl.supervisor", "--home", str(layout.home)]
        for extra, code in (([], 78), (["--wait-for-lock"], 0)):
            done = subprocess.run(
                command + extra, env=env, capture_output=True, text=True, timeout=60
            )
            assert done.returncode == code, done.stderr
            errors = [line for line in done.stderr.splitlines() if line.startswith("loractl:")]
            assert len(errors) == 1 and str(layout.database) in errors[0], done.stderr
            # The last word, not a traceback (the full disk also refuses the log's lines).
            assert done.stderr.strip().splitlines()[-1] == errors[0]
            assert "loractl daemon repair" in errors[0]
            assert layout.database.read_bytes() == garbage
        filler.unlink()
    finally:
        unmount(disk)


def test_doctor_checks_the_store(home_with_jobs):
    """`doctor` passes a sound store and fails a damaged one, with the fix."""
    layout, _ = home_with_jobs
    assert doctor.check_store(doctor.Context(layout)).status == doctor.Status.OK
    corrupt_page(layout.database)
    check = doctor.check_store(doctor.Context(layout))
    assert check.status == doctor.Status.FAIL
    assert "loractl daemon repair" in check.fix


def test_daemon_repair_rebuilds_by_hand_and_refuses_beside_a_running_supervisor(
    home_with_jobs,
):
    """`daemon repair` runs the same rebuild; while a supervisor holds the home it refuses,
    saying why and what to run instead."""
    import fcntl

    layout, ids = home_with_jobs
    corrupt_header(layout.database)
    held = os.open(layout.pidfile, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX)
    os.write(held, b"4242\n")
    try:
        with pytest.raises(ServiceError, match="pid 4242.*daemon restart"):
            repair_store(layout)
    finally:
        os.close(held)
    result = CliRunner().invoke(repair, ["--json"], obj=layout)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["damaged"] and data["moved_to"]
    assert {job["state"] for job in data["recovered"]} == {"completed", "paused"}
    again = CliRunner().invoke(repair, [], obj=layout)
    assert "is sound" in again.output and "no job was missing" in again.output


def test_a_truncated_wal_loses_no_job_and_runs_none_twice(tiny_workspace, tmp_path):
    """After a supervisor SIGKILL and a WAL cut back to before a job finished and another was
    submitted: the finished job is not rerun, the forgotten one comes back and its orphaned
    trainer is adopted, and no job ever has two trainers."""
    home = tmp_path / "home"
    supervisor = SupervisorProcess(home, LORACTL_KEEP_AWAKE="0").start()
    layout = supervisor.layout
    wal = layout.database.with_name("loractl.db-wal")
    try:
        short = make_job(tiny_workspace, tmp_path / "short", iters=4, steps_per_eval=1000)
        done_id = supervisor.submit(short)
        cut_at = wal.stat().st_size  # the WAL right after the submission's commit
        supervisor.wait_state(done_id, {"completed"}, timeout=120)
        long = make_job(tiny_workspace, tmp_path / "long", iters=100_000, steps_per_eval=100_000)
        running_id = supervisor.submit(long)
        supervisor.wait_state(running_id, {"running"}, timeout=120)
        pid = supervisor.trainer_pid(running_id)
        supervisor.kill()
        with wal.open("r+b") as handle:
            handle.truncate(cut_at)
        with closing(sqlite3.connect(layout.database)) as conn:
            # The rolled-back store: the finished job is back to queued, the other unknown.
            rows = dict(conn.execute("SELECT id, state FROM jobs").fetchall())
        assert rows == {done_id: "queued"}
        supervisor.start()
        shown = supervisor.wait_state(running_id, {"running", "starting"}, timeout=60)
        assert shown["trainer_pid"] == pid
        supervisor.wait_state(done_id, {"completed"}, timeout=60)
        attempts = sorted(p.name for p in (layout.job_dir(done_id) / "attempts").iterdir())
        assert attempts == ["0001.stderr"]
        trainers = [p for p in trainers_of(home) if "--job-id" in p.cmdline()]
        assert [p.pid for p in trainers] == [pid]
        history = request(layout, ShowRequest(job=running_id)).data["job"]
        assert history["state"] in ("running", "starting")
    finally:
        supervisor.stop()


def test_a_store_damaged_while_running_is_repaired_in_place_and_the_trainer_kept(
    tiny_workspace, tmp_path
):
    """Damage the running supervisor runs into: the request is answered with the fix, then
    the supervisor restarts itself (same pid), repairs the store and adopts its trainer."""
    home = tmp_path / "home"
    supervisor = SupervisorProcess(home, LORACTL_KEEP_AWAKE="0").start()
    layout = supervisor.layout
    try:
        config = make_job(tiny_workspace, tmp_path / "job", iters=100_000, steps_per_eval=100_000)
        job_id = supervisor.submit(config)
        pid = supervisor.trainer_pid(job_id)
        supervisor.wait_state(job_id, {"running"}, timeout=120)
        with closing(sqlite3.connect(layout.database)) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        for page in range(2, 5):
            corrupt_page(layout.database, page)
        with closing(sqlite3.connect(layout.database, isolation_level=None)) as conn:
            conn.execute("PRAGMA busy_timeout = 10000")
            # Any commit by another process makes the supervisor drop its page cache (this one
            # writes only the header page, which is sound).
            conn.execute("PRAGMA user_version = 2")

        def answered_with_advice():
            try:
                request(layout, ListRequest(), timeout=2)
            except Exception as exc:
                return "daemon repair" in str(exc) or "not running" in str(exc)
            return False

        wait_for(answered_with_advice, 30)
        shown = wait_for(lambda: _show_quietly(layout, job_id), 60, interval=0.2)
        assert shown["state"] in ("running", "starting") and shown["trainer_pid"] == pid
        assert supervisor.proc.poll() is None
        assert sorted(layout.home.glob("loractl.db.corrupt-*"))
    finally:
        supervisor.stop()


def _show_quietly(layout: Layout, job_id: str):
    try:
        return request(layout, ShowRequest(job=job_id), timeout=2).data["job"]
    except Exception:
        return None
