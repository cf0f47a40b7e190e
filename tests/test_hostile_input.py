"""Hostile input (issue 17): data that is not data, a trainer stuck before its first step,
impossible layouts and adapter folders, damaged checkpoints, and a full disk under the inbox.

Each test reproduces one reported failure with real files, real processes and the real
trainer on the tiny model, and proves it is now refused or handled with a clear reason.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import (
    fill_disk,
    make_job,
    mount_small_disk,
    reconfigure,
    run_trainer,
    trainer_command,
    trainer_env,
    unmount,
    wait_for,
)
from loractl.config import (
    ConfigError,
    DataFileError,
    adapter_path_problem,
    load_config,
    parse_config,
)
from loractl.protocol import ExitCode, JobState

# -- A: data that is not data -------------------------------------------------------------------


def _config_with_train(tiny_workspace: Path, tmp_path: Path, make_train) -> Path:
    """A job whose data folder is a copy of the tiny data with train.jsonl made by
    ``make_train(path)``."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("valid.jsonl",):
        (data / name).write_bytes((tiny_workspace / "data" / name).read_bytes())
    make_train(data / "train.jsonl")
    return make_job(tiny_workspace, tmp_path / "job", data=str(data))


def _unix_socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()


@pytest.mark.parametrize(
    ("make_train", "words"),
    [
        (lambda p: os.symlink("/dev/zero", p), "is a character device (/dev/zero), not a regular"),
        (os.mkfifo, "is a named pipe, not a regular file"),
        (_unix_socket, "is a socket, not a regular file"),
        (lambda p: os.symlink(p.with_name("gone"), p), "is a symlink to"),
    ],
    ids=["symlink-to-dev-zero", "fifo", "socket", "dangling-symlink"],
)
def test_a_data_file_that_is_not_a_regular_file_is_bad_data_at_submit(
    tiny_workspace, tmp_path, make_train, words
):
    """config validation names a device, FIFO, socket or dangling link for what it is (exit 65)."""
    config = _config_with_train(tiny_workspace, tmp_path, make_train)
    with pytest.raises(DataFileError) as caught:
        load_config(config)
    assert caught.value.exit_code == ExitCode.DATA_ERROR
    assert caught.value.key == "data"
    assert f"{tmp_path / 'data' / 'train.jsonl'} {words}" in str(caught.value)


def test_a_3gb_single_line_data_file_fails_fast_as_bad_data_not_memory(tiny_workspace, tmp_path):
    """A sparse 3 GB file of one line: the trainer exits 65 naming file, line and the limit,
    in seconds, having read at most max_record_mb (not a memory stop)."""

    def huge(path: Path) -> None:
        with open(path, "wb") as handle:
            handle.write(b'{"text": "')
            handle.truncate(3 << 30)  # sparse: no disk used, still 3 GB to read

    config = _config_with_train(tiny_workspace, tmp_path, huge)
    cfg = yaml.safe_load(config.read_text())
    cfg["max_record_mb"] = 8
    config.write_text(yaml.safe_dump(cfg))
    started = time.monotonic()
    result = run_trainer(config, timeout=120)
    assert result.returncode == ExitCode.DATA_ERROR, result.stderr
    assert f"{tmp_path / 'data' / 'train.jsonl'}:1: record is over 8 MB (max_record_mb)" in (
        result.stderr
    )
    assert time.monotonic() - started < 60


def test_max_record_mb_is_a_config_key_with_help_and_bounds(tiny_workspace, tmp_path):
    """The record limit is one schema key: defaults to 64, refuses 0, and documents itself."""
    from loractl.config import iter_fields

    info = {f.name: f for f in iter_fields()}["max_record_mb"]
    assert info.default == 64 and "line" in info.help
    with pytest.raises(ConfigError, match="key 'max_record_mb': expected an integer from 1"):
        load_config(make_job(tiny_workspace, tmp_path, max_record_mb=0))


def test_a_data_file_swapped_for_a_fifo_after_submit_is_bad_data_in_the_trainer(
    tiny_workspace, tmp_path
):
    """Valid at submit, then train.jsonl becomes a FIFO: the trainer exits 65 at once, named."""
    config = _config_with_train(
        tiny_workspace,
        tmp_path,
        lambda p: p.write_bytes((tiny_workspace / "data" / "train.jsonl").read_bytes()),
    )
    load_config(config)
    train = tmp_path / "data" / "train.jsonl"
    train.unlink()
    os.mkfifo(train)
    result = run_trainer(config, timeout=120)
    assert result.returncode == ExitCode.DATA_ERROR, result.stderr
    assert f"{train} is a named pipe, not a regular file" in result.stderr


def test_reading_a_fifo_swapped_in_after_the_check_does_not_block(tmp_path, monkeypatch):
    """Even past the type check, the open does not wait for a writer: it is refused at once."""
    import loractl.daemon.data as data_module

    fifo = tmp_path / "train.jsonl"
    os.mkfifo(fifo)
    monkeypatch.setattr(data_module, "data_file_problem", lambda path: None)  # swapped after
    with pytest.raises(data_module.DataError, match="is a named pipe, not a regular file"):
        data_module.open_data_file(fifo)


# -- B: a trainer stuck before training ---------------------------------------------------------


def test_a_fifo_data_job_fails_and_the_job_queued_behind_it_runs(
    tiny_workspace, tmp_path, inprocess_supervisor
):
    """train.jsonl replaced by a FIFO after submit: that job fails with the reason, and the
    job queued behind it completes; the queue never stalls."""
    sup = inprocess_supervisor
    reconfigure(sup, hold_queue=False, stall_min_s=5.0)
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.jsonl", "valid.jsonl"):
        (data / name).write_bytes((tiny_workspace / "data" / name).read_bytes())
    first_config = make_job(tiny_workspace, tmp_path / "first", data=str(data), iters=4)
    first = sup.queue.enqueue(first_config, load_config(first_config), priority=10)
    second_config = make_job(tiny_workspace, tmp_path / "second", iters=4)
    second = sup.queue.enqueue(second_config, load_config(second_config))
    (data / "train.jsonl").unlink()
    os.mkfifo(data / "train.jsonl")

    def both_ended() -> bool:
        sup.tick()
        states = {sup.store.get(j.id).state for j in (first, second)}
        return states <= {JobState.COMPLETED, JobState.FAILED}

    wait_for(both_ended, 180, interval=0.05)
    failed = sup.store.get(first.id)
    assert failed.state == JobState.FAILED
    assert "is a named pipe, not a regular file" in json.dumps(sup.store.events(first.id))
    assert sup.store.get(second.id).state == JobState.COMPLETED


STUCK_IN_LOADING = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(82))\n"
    "time.sleep(120)\n"
)


def test_a_trainer_heartbeating_in_loading_without_progress_is_a_hang(tmp_path):
    """Heartbeats in "loading" are no progress: past the stall timeout the attempt is hung,
    with the phase and the loading stage in the reason; a "loading" event keeps it alive."""
    from test_attempt import RecordingHooks, make_attempt

    from loractl.protocol import Heartbeat, TrainerEvent
    from loractl.supervisor.policy import StopReason

    proc = subprocess.Popen([sys.executable, "-c", STUCK_IN_LOADING])
    try:
        hooks = RecordingHooks()
        attempt = make_attempt(tmp_path, proc, hooks, stall_min_s=1.0)
        beat = Heartbeat(job_id="job-1", pid=proc.pid, phase="loading", step=0)
        attempt.on_heartbeat(beat)
        attempt.on_trainer_event(
            TrainerEvent(job_id="job-1", pid=proc.pid, kind="loading", detail={"stage": "data"})
        )
        deadline = time.monotonic() + 0.8
        while time.monotonic() < deadline:  # heartbeats alone, within the timeout: alive
            attempt.on_heartbeat(beat)
            attempt.poll()
            assert attempt.stop_reason is None
            attempt.on_trainer_event(
                TrainerEvent(job_id="job-1", pid=proc.pid, kind="loading", detail={})
            )
            time.sleep(0.05)

        def hung() -> bool:
            attempt.on_heartbeat(beat)
            attempt.poll()
            return attempt.stop_reason is not None

        wait_for(hung, 10, interval=0.05)
        assert attempt.stop_reason == StopReason.HANG
        reason = dict(hooks.events)["hang_detected"]["reason"]
        assert reason.startswith("no progress for ") and reason.endswith("s in loading (data)")
    finally:
        proc.kill()
        proc.wait()


def test_a_stop_while_loading_exits_at_once_not_after_the_grace(tiny_workspace, tmp_path):
    """A trainer blocked opening its model's config.json (a FIFO) stops within seconds of
    SIGTERM with exit 82, instead of waiting out the supervisor's 60 s grace."""
    model = tmp_path / "model"
    model.mkdir()
    for item in (tiny_workspace / "model").iterdir():
        if item.name != "config.json":
            os.symlink(item, model / item.name)
    os.mkfifo(model / "config.json")
    config = make_job(tiny_workspace, tmp_path / "job", model=str(model))
    proc = subprocess.Popen(
        trainer_command(config), env=trainer_env(), stderr=subprocess.PIPE, text=True
    )
    try:
        log = tmp_path / "job" / "adapters" / "train.log"
        wait_for(lambda: log.exists() and "attempt starting" in log.read_text(), 60)
        time.sleep(0.5)  # not ordering: give it time to reach the blocking open() itself
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == ExitCode.STOPPED, stderr
    assert "before training; the checkpoints are as they were" in stderr


# -- J: absurd numbers -------------------------------------------------------------------------


def test_absurd_processes_and_batch_size_are_refused_in_one_line(tmp_path):
    """5000 ranks on this machine, or 5000 x 2048 tokens in one micro-batch, are refused at
    submit with the limit and why; max_processes_per_host raises the rank limit."""
    (tmp_path / "model").mkdir()
    (tmp_path / "data").mkdir()
    base = {"model": "model", "data": "data"}
    cases = {
        "ranks": ({"distributed": {"processes": 5000}, "batch_size": 5000}, "5000 ranks on host"),
        "tokens": ({"batch_size": 5000}, "10240000 tokens in one micro-batch, over the 1048576"),
    }
    for values, words in cases.values():
        with pytest.raises(ConfigError) as caught:
            parse_config({**base, **values}, tmp_path)
        assert words in str(caught.value) and "\n" not in str(caught.value)
    cores = os.cpu_count() or 1
    raised = {"distributed": {"processes": cores + 1}, "batch_size": cores + 1}
    with pytest.raises(ConfigError, match=f"but this machine has {cores} CPU cores"):
        parse_config({**base, **raised}, tmp_path)
    parse_config({**base, **raised, "max_processes_per_host": cores + 1}, tmp_path)


# -- G: adapter folders in the home, or nested in another job's ---------------------------------


def test_adapter_path_in_the_home_or_nested_with_another_jobs_is_refused(tmp_path):
    """Inside loractl's home, inside another job's adapter folder, or above it: each refused
    with the reason; a folder of its own (or the very same one, the queue's call) passes."""
    home = tmp_path / "home"
    other = tmp_path / "runs" / "a" / "adapters"
    others = {"job-a": str(other)}
    assert "inside loractl's home" in adapter_path_problem(home / "inbox", home, others)
    assert "inside job job-a's adapter folder" in adapter_path_problem(
        other / "checkpoints", home, others
    )
    assert "holds job job-a's adapter folder" in adapter_path_problem(
        tmp_path / "runs", home, others
    )
    assert adapter_path_problem(tmp_path / "runs" / "b", home, others) is None
    assert adapter_path_problem(other, home, others) is None


# -- K: every checkpoint damaged ----------------------------------------------------------------


def test_all_checkpoints_damaged_is_said_and_sent_not_silent(tiny_workspace, tmp_path):
    """When no checkpoint passes its checksums the trainer says it starts over from step 0."""
    config = make_job(tiny_workspace, tmp_path, iters=4, checkpoint_every=2)
    first = run_trainer(config)
    assert first.returncode == 0, first.stderr
    root = tmp_path / "adapters" / "checkpoints"
    damaged = 0
    for folder in root.iterdir():
        target = folder / "adapters.safetensors"
        if target.is_file():
            data = bytearray(target.read_bytes())
            data[-3] ^= 0x01
            target.write_bytes(bytes(data))
            damaged += 1
    assert damaged
    again = run_trainer(config)
    assert again.returncode == 0, again.stderr
    words = f"all {damaged} checkpoints failed their checksums; starting over from step 0"
    assert words in again.stderr
    assert words in (tmp_path / "adapters" / "train.log").read_text()


# -- F: the inbox on a full disk ----------------------------------------------------------------


def test_a_config_dropped_on_a_full_home_disk_is_queued_once_space_returns(
    tiny_workspace, tmp_path
):
    """Home disk full: the dropped config waits (shown as waiting, never hidden), then is
    queued without a restart once space returns."""
    from loractl.paths import Layout
    from loractl.supervisor.inbox import Accepted, Inbox
    from loractl.supervisor.jobqueue import JobQueue
    from loractl.supervisor.store import Store, new_job_id

    disk = mount_small_disk(tmp_path / "disk", 8)
    try:
        layout = Layout(disk / "home")
        layout.ensure()
        store = Store(layout.database)
        queue = JobQueue(store, layout)
        box = Inbox(
            layout.inbox,
            layout.home,
            enqueue=queue.enqueue_claimed,
            is_known=queue.known,
            new_id=new_job_id,
            settle_s=0.05,
            rescan_s=0.2,
            retry_s=0.2,
        )
        box.start()
        try:
            source = make_job(tiny_workspace, tmp_path / "src")
            (layout.inbox / "job.yaml").write_bytes(source.read_bytes())
            filler = fill_disk(disk)
            results: list = []
            wait_for(lambda: (results.extend(box.poll()), box.waiting())[1], 20, interval=0.05)
            assert results == [] and store.list() == []
            assert box.waiting()[0][0] == "job.yaml"
            assert "waiting for disk space" in box.waiting()[0][1]
            assert os.listdir(layout.inbox / "rejected") == []
            filler.unlink()
            wait_for(lambda: (results.extend(box.poll()), results)[1], 20, interval=0.05)
            assert [type(r) for r in results] == [Accepted]
            assert len(store.list()) == 1
            assert box.waiting() == [] and box.pending_count == 0
            assert sorted(os.listdir(layout.inbox)) == ["rejected"]
        finally:
            box.stop()
            store.close()
    finally:
        unmount(disk)
