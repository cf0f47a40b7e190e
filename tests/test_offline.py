"""`list`, `show`, `history`, `ladder` and `logs` answer from the database while the
supervisor is down; every other command still says how to start it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import make_job
from loractl.client.harness import SupervisorProcess
from loractl.paths import Layout
from loractl.protocol import JobState
from loractl.supervisor.store import Store


def loractl(home: Path, *args: str) -> subprocess.CompletedProcess:
    """The real CLI in a child process, as a user runs it."""
    env = {k: v for k, v in os.environ.items() if k != "LORACTL_HOME"}
    return subprocess.run(
        [sys.executable, "-m", "loractl.client.cli", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.fixture
def stored_home(tmp_path) -> tuple[Path, str]:
    """A home whose database (made through the Store API) holds one job that ran a while and
    wrote a training log; no supervisor has ever run there."""
    layout = Layout.at(tmp_path / "home")
    (tmp_path / "model").mkdir()
    (tmp_path / "data").mkdir()
    folder = layout.job_dir("j1")
    folder.mkdir(parents=True)
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    (adapters / "train.log").write_text(
        json.dumps({"event": "step", "level": "info", "timestamp": "T", "step": 3}) + "\n"
    )
    config = folder / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(tmp_path / "model"),
                "data": str(tmp_path / "data"),
                "adapter_path": str(adapters),
                "name": "night-run",
            }
        )
    )
    with Store(layout.database) as store:
        store.add_job(job_id="j1", name="night-run", config_path=config, job_dir=folder)
        store.transition("j1", JobState.STARTING, "spawned", attempt=1)
        store.transition("j1", JobState.RUNNING, "first heartbeat")
        store.update("j1", step=3, examples_seen=12, total_examples=48)
    return layout.home, str(adapters)


def test_list_and_show_json_answer_from_the_database_without_a_supervisor(stored_home):
    """`list --json` and `show JOB --json` read the stored job, marked offline, exit 0."""
    home, adapters = stored_home
    listed = loractl(home, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert data["offline"] is True
    assert [(j["id"], j["name"], j["state"]) for j in data["jobs"]] == [
        ("j1", "night-run", "running")
    ]
    assert data["jobs"][0]["progress"] == {"examples_seen": 12, "total_examples": 48, "step": 3}
    shown = loractl(home, "show", "night-run", "--json")
    assert shown.returncode == 0, shown.stderr
    job = json.loads(shown.stdout)
    assert job["offline"] is True and job["id"] == "j1" and job["state"] == "running"
    assert job["adapter_path"] == adapters and job["trainer_pid"] is None
    assert [e["to_state"] for e in job["history"]] == ["queued", "starting", "running"]
    assert [r["rung"] for r in job["ladder"]][0] == 0


def test_text_output_is_marked_and_history_ladder_and_logs_read_too(stored_home):
    """Text answers start with "(supervisor not running)"; history, ladder and logs work."""
    home, _ = stored_home
    for args in (("list",), ("show", "j1"), ("history", "j1"), ("ladder", "j1"), ("logs", "j1")):
        result = loractl(home, *args)
        assert result.returncode == 0, (args, result.stderr)
        assert result.stdout.splitlines()[0] == "(supervisor not running)", args
    assert "night-run" in loractl(home, "list").stdout
    assert "j1 (night-run): running" in loractl(home, "show", "j1").stdout
    assert "starting -> running" in loractl(home, "history", "j1").stdout
    assert "step: step=3" in loractl(home, "logs", "j1").stdout
    history = json.loads(loractl(home, "history", "j1", "--json").stdout)
    assert history["offline"] is True and history["id"] == "j1"
    raw = loractl(home, "logs", "j1", "--json")
    assert json.loads(raw.stdout)["step"] == 3 and "(supervisor not running)" in raw.stderr


def test_an_unknown_job_is_not_found_and_writes_wait_for_the_supervisor(stored_home):
    """An unknown job exits 4; submit, pause, cancel, wait and status still exit 3 with
    how to start the supervisor, and nothing was written to the database."""
    home, _ = stored_home
    missing = loractl(home, "show", "nope")
    assert missing.returncode == 4
    assert "no job with id or name 'nope'" in missing.stderr
    assert "(supervisor not running)" in missing.stderr
    before = Path(home / "loractl.db").read_bytes()
    for args in (("pause", "j1"), ("cancel", "j1"), ("wait", "j1"), ("status",), ("remove", "j1")):
        result = loractl(home, *args)
        assert result.returncode == 3, (args, result.stdout, result.stderr)
        assert "not running" in result.stderr and "daemon run" in result.stderr, args
    assert Path(home / "loractl.db").read_bytes() == before


def test_a_home_without_a_database_keeps_the_not_running_message(tmp_path):
    """No database either: list and show exit 3 with the how-to-start line, as before."""
    for args in (("list",), ("show", "j1", "--json"), ("logs", "j1")):
        result = loractl(tmp_path / "nowhere", *args)
        assert result.returncode == 3, args
        output = result.stdout + result.stderr
        assert "not running" in output and "daemon run" in output, args
    assert not (tmp_path / "nowhere" / "loractl.db").exists()


def test_after_a_real_supervisor_is_killed_its_jobs_are_still_listed(tiny_workspace, tmp_path):
    """A supervisor that ran a job and was SIGKILLed (socket left behind): list and show
    answer from its database at once."""
    sup = SupervisorProcess(tmp_path / "home").start()
    try:
        job_id = sup.submit(make_job(tiny_workspace, tmp_path / "src", name="short", iters=8))
        sup.wait_state(job_id, {"completed"}, timeout=120)
        sup.kill()
    finally:
        sup.stop()
    listed = loractl(sup.home, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert data["offline"] and [j["id"] for j in data["jobs"]] == [job_id]
    job = json.loads(loractl(sup.home, "show", job_id, "--json").stdout)
    assert job["state"] == "completed" and job["offline"] is True
    assert job["use_with"] and "mlx_lm" in job["use_with"]


def test_show_of_a_job_whose_config_fails_never_prints_none(stored_home):
    """A job whose stored config no longer loads shows why its adapters are unknown, and
    no line of `show` (or `wait`-style text) reads "None"."""
    home, _ = stored_home
    config = Layout.at(home).job_dir("j1") / "config.yaml"
    data = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**data, "model": str(home / "moved-away")}))
    result = loractl(home, "show", "j1")
    assert result.returncode == 0, result.stderr
    assert "None" not in result.stdout
    (line,) = [ln for ln in result.stdout.splitlines() if ln.startswith("  adapters: ")]
    assert line.startswith("  adapters: unknown: its config does not load (")
    assert "moved-away" in line


def test_show_gives_the_newest_checkpoints_progress_when_the_store_lost_it(stored_home):
    """Progress the store never took (a full disk) is read back from the job's newest
    checkpoint: `show` reports the last known figures, not 0/0 examples at step 0."""
    from loractl.checkpoints import state_checksum

    home, adapters = stored_home
    with Store(Layout.at(home).database) as store:
        store.update("j1", step=0, examples_seen=0, total_examples=0)
    checkpoint = Path(adapters) / "checkpoints" / "step-00000025"
    checkpoint.mkdir(parents=True)
    state = {"step": 25, "examples_seen": 100, "total_examples": 400, "files": {}}
    state["self_sha256"] = state_checksum(state)
    (checkpoint / "state.json").write_text(json.dumps(state))
    (checkpoint.parent / "latest").write_text("step-00000025\n")
    shown = json.loads(loractl(home, "show", "j1", "--json").stdout)
    assert shown["progress"] == {
        "examples_seen": 100,
        "total_examples": 400,
        "step": 25,
        "from_checkpoint": True,
    }
    assert "progress: 100/400 examples, step 25" in loractl(home, "show", "j1").stdout
    state["step"] = 26  # a torn state.json: its checksum fails, and the store's figures stand
    (checkpoint / "state.json").write_text(json.dumps(state))
    shown = json.loads(loractl(home, "show", "j1", "--json").stdout)
    assert shown["progress"] == {"examples_seen": 0, "total_examples": 0, "step": 0}
