"""Shared test helpers: a wait_for poller, the tiny model built once, and trainer runners."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loractl.client.harness import wait_for  # noqa: F401  (re-exported for tests)

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory) -> Path:
    """The tiny preset's model, data and job.yaml, built once for the whole session."""
    from loractl.daemon.tinymodel import prepare

    root = tmp_path_factory.mktemp("tiny")
    prepare(root, preset="tiny", seed=0)
    return root


def make_job(workspace: Path, folder: Path, **overrides) -> Path:
    """A job.yaml in ``folder`` using the shared tiny model, with keys overridden."""
    folder.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load((workspace / "job.yaml").read_text())
    data["model"] = str(workspace / "model")
    data["data"] = str(workspace / "data")
    data["adapter_path"] = str(folder / "adapters")
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def trainer_command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "loractl.daemon.trainer", str(config), *extra]


def trainer_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LORACTL_FAULT_OOM", None)
    env.pop("LORACTL_TRACE_EXAMPLES", None)
    env.update(extra)
    return env


def run_trainer(config: Path, *extra: str, env: dict | None = None, timeout: float = 240):
    """Run the real trainer to completion in a child process."""
    return subprocess.run(
        trainer_command(config, *extra),
        env=env or trainer_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# A stand-in trainer: a real process that exits 82 on SIGTERM, as the trainer does after
# its final checkpoint.
STAND_IN = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(82))\n"
    "time.sleep(120)\n"
)


class NoInbox:
    """In-process supervisor tests are about the loop; the inbox has its own tests."""

    def poll(self):
        return []


@pytest.fixture
def inprocess_supervisor(tmp_path):
    """A Supervisor in this process (handlers and tick, no sockets bound) over a real store."""
    import zmq

    from loractl.supervisor.service import Settings, Supervisor
    from loractl.supervisor.store import Store

    sup = Supervisor(tmp_path / "home", Settings(hold_queue=True, stop_grace_s=10))
    sup.keep_awake.enabled = False
    sup.layout.ensure()
    events = zmq.Context.instance().socket(zmq.PUB)
    telemetry = zmq.Context.instance().socket(zmq.ROUTER)
    telemetry.setsockopt(zmq.ROUTER_MANDATORY, 1)  # as bound: unknown peers raise
    for sock in (events, telemetry):
        sock.setsockopt(zmq.LINGER, 0)
    sup.wire(Store(sup.layout.database), telemetry, events)
    sup.inbox = NoInbox()
    sup.recover()  # nothing to recover in a new home; the loop starts jobs only after it
    yield sup
    attempt = sup.runner.attempt
    if attempt is not None and attempt.popen is not None:
        attempt.popen.kill()
        attempt.popen.wait()
    sup.channels.close_remote()
    events.close()
    telemetry.close()
    sup.store.close()


def reconfigure(sup, **changes):
    """The in-process supervisor with other settings, before any attempt runs."""
    from dataclasses import replace

    assert sup.runner.attempt is None, "change settings before a trainer runs"
    sup.settings = replace(sup.settings, **changes)
    backoff = dict(sup.queue.backoff_until)
    sup.wire(sup.store, sup.channels.local, sup.publisher.events)
    sup.queue.backoff_until.update(backoff)
    sup.runner.recovered = True
    return sup


def put_in_state(sup, config, state, script: str = STAND_IN, budget_mb: float = 1e9) -> str:
    """A job in ``state``, reached through allowed transitions only, with a live stand-in
    trainer (``STAND_IN`` or ``script``) where the state needs one."""
    from loractl.config import load_config
    from loractl.supervisor.attempt import Attempt, AttemptSpec
    from loractl.supervisor.store import JobState

    job = sup.queue.enqueue(config, load_config(config))
    store = sup.store
    live = (JobState.STARTING, JobState.RUNNING, JobState.PAUSING, JobState.CANCELLING)
    if state in (*live, JobState.COMPLETED, JobState.BACKOFF):
        # Named as a trainer of this job in its argv, as the process table proves a trainer.
        argv = [sys.executable, "-c", script, "-m", "loractl.daemon.trainer", "--job-id", job.id]
        popen = subprocess.Popen(argv)
        store.transition(job.id, JobState.STARTING, "test", trainer_pid=popen.pid, attempt=1)
        if state in (JobState.COMPLETED, JobState.BACKOFF):
            popen.kill()
            popen.wait()
            store.transition(job.id, state, "test", trainer_pid=None)
            if state == JobState.BACKOFF:
                sup.queue.arm_backoff(job.id, 3600.0)
        else:
            spec = AttemptSpec(
                job_id=job.id,
                attempt=1,
                rung=0,
                stderr_path=sup.runner.stderr_path(job.id, 1),
                budget_mb=budget_mb,
                heartbeat_timeout=600,
            )
            sup.runner.attempt = Attempt(
                spec,
                pid=popen.pid,
                popen=popen,
                settings=sup.settings,
                hooks=sup.runner,
                read_system=sup.read_system,
                step=0,
                heard=True,
            )
            if state != JobState.STARTING:
                store.transition(job.id, JobState.RUNNING, "test")
            if state in (JobState.PAUSING, JobState.CANCELLING):
                wish = "pause" if state == JobState.PAUSING else "cancel"
                sup.runner.user_stop(store.get(job.id), wish)
    elif state != JobState.QUEUED:
        store.transition(job.id, state, "test")
    assert store.get(job.id).state == state
    return job.id


def mount_small_disk(folder: Path, size_mb: int) -> Path:
    """A real tmpfs of ``size_mb`` at ``folder`` (root only; the test skips otherwise)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small disk needs root")
    folder.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    return folder


def unmount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], check=False)


def fill_disk(disk: Path) -> Path:
    """Write until the disk refuses; returns the filler file (unlink it to free the space)."""
    filler = disk / "filler"
    # Unbuffered: a buffered file would fail again when closing, flushing what did not fit.
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
        except OSError:
            pass
    return filler


# Exit code, stdout and stderr of a command that succeeded.
OK = (0, "", "")


class FakeRunner:
    """A stand-in for launchctl/systemctl: answers each call from a queue per subcommand
    (then success) and records every argv."""

    def __init__(self, **answers: list[tuple[int, str, str]]):
        self.answers = {verb.replace("_", "-"): list(queue) for verb, queue in answers.items()}
        self.calls: list[list[str]] = []

    def run(self, argv):
        self.calls.append(list(argv))
        verb = next(word for word in argv[1:] if word != "--user")
        queue = self.answers.get(verb)
        return queue.pop(0) if queue else OK

    def verbs(self) -> list[str]:
        return [" ".join(word for word in argv if word != "--user") for argv in self.calls]


@pytest.fixture
def user_home_folder(tmp_path, monkeypatch) -> Path:
    """Every path the service layer derives from $HOME lands in the test's folder."""
    home = tmp_path / "user"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_STATE_HOME", str(home / ".local" / "state"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("LORACTL_HOME", raising=False)
    return home
