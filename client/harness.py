"""Drive a real supervisor process from tests and benchmarks (never used by the daemon)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from loractl.client.control import request
from loractl.paths import Layout
from loractl.protocol import ShowRequest, StatusRequest, SubmitRequest


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.02):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


# Short timers so tests run in seconds; every one is a supervisor setting users can set too.
FAST = {
    "LORACTL_BACKOFF_BASE_S": "0.2",
    "LORACTL_BACKOFF_CAP_S": "2",
    "LORACTL_HANG_GRACE_S": "1",
    "LORACTL_STOP_GRACE_S": "30",
    "LORACTL_EXIT_TIMEOUT_S": "20",
    "LORACTL_STALL_MIN_S": "60",
}


def kill_tree(proc: psutil.Process) -> None:
    """SIGKILL ``proc`` and every process under it; those already gone are skipped."""
    try:
        family = [*proc.children(recursive=True), proc]
    except psutil.NoSuchProcess:
        return
    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass


class SupervisorProcess:
    def __init__(self, home: Path, **env: str):
        self.home = home
        self.layout = Layout.at(home)
        self.env = {**os.environ, **FAST, **env}
        self.env.pop("LORACTL_HOME", None)
        self.proc: subprocess.Popen | None = None
        self.log = home.parent / f"{home.name}-supervisor.log"
        # Run in the child before it execs (joining a cgroup, say), so all it allocates counts.
        self.preexec: Callable[[], None] | None = None

    def start(self) -> SupervisorProcess:
        self.home.mkdir(parents=True, exist_ok=True)
        handle = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loractl.client.cli", "--home", str(self.home), "daemon", "run"],
            env=self.env,
            stdout=handle,
            stderr=handle,
            preexec_fn=self.preexec,
        )
        handle.close()
        wait_for(self._answers, timeout=30, interval=0.05)
        return self

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"supervisor exited: {self.log.read_text()}")
        try:
            request(self.layout, StatusRequest(), timeout=0.5)
            return True
        except Exception:
            return False

    def submit(self, config: Path) -> str:
        return request(self.layout, SubmitRequest(config_path=str(config))).data["id"]

    def show(self, job_id: str) -> dict:
        return request(self.layout, ShowRequest(job=job_id), timeout=10).data["job"]

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> dict:
        return wait_for(
            lambda: (job := self.show(job_id))["state"] in states and job, timeout, interval=0.1
        )

    def trainer_pid(self, job_id: str, timeout: float = 60) -> int:
        return wait_for(lambda: self.show(job_id)["trainer_pid"], timeout, interval=0.05)

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for proc in trainers_of(self.home):
            # A distributed job's launcher first: its ranks are its children.
            kill_tree(proc)

    def debug(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def job_config(workspace: Path, folder: Path, **overrides: object) -> Path:
    """A job.yaml in ``folder`` on a tinymodel workspace's model and data (``prepare``), with
    keys overridden (``data`` included); its adapters go to ``folder``/adapters."""
    import yaml

    data = yaml.safe_load((workspace / "job.yaml").read_text())
    data.update(
        model=str(workspace / "model"),
        data=str(workspace / "data"),
        adapter_path=str(folder / "adapters"),
    )
    data.update(overrides)
    data["data"] = str(data["data"])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def trainers_of(home: Path) -> list[psutil.Process]:
    """Live trainer processes whose config lives under ``home``.

    A process forked by a trainer carries the trainer's command line until it execs (a
    library's helper, caught in that instant); it is part of that trainer, not a second one.
    """
    found = []
    for proc in psutil.process_iter(["cmdline", "status", "ppid"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "loractl.daemon.trainer" in cmdline and str(home) in cmdline:
            found.append(proc)
    pids = {proc.pid for proc in found}
    return [proc for proc in found if proc.info["ppid"] not in pids]


def measure_footprint(config: Path, overrides: dict, steps: int = 3, timeout: float = 300) -> float:
    """Peak footprint (MB) of the real trainer on ``config`` with ``overrides``, from its own
    heartbeats over its first ``steps`` optimizer steps. Footprints differ from machine to
    machine (library versions, allocator), so budgets in tests and the demo are set from
    this rather than hard-coded."""
    import json
    import tempfile

    import zmq

    from loractl.protocol import Heartbeat, decode

    with tempfile.TemporaryDirectory(prefix="lc-fp-", dir="/tmp") as folder:
        endpoint = f"ipc://{folder}/t"
        context = zmq.Context.instance()
        router = context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(endpoint)
        scratch = {"adapter_path": f"{folder}/adapters", **overrides}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "loractl.daemon.trainer",
                str(config),
                "--fresh",
                "--telemetry",
                endpoint,
                "--overrides",
                json.dumps(scratch),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        peak = 0.0
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if not router.poll(200):
                    continue
                message = decode(router.recv_multipart()[-1])
                if isinstance(message, Heartbeat):
                    peak = max(peak, message.footprint_mb)
                    if message.step >= steps:
                        break
        finally:
            proc.kill()
            proc.wait()
            router.close()
    if not peak:
        raise RuntimeError(f"no footprint measured for {config} with {overrides}")
    return peak


CGROUP_V1 = Path("/sys/fs/cgroup/memory")


class MemoryCgroup:
    """A fresh cgroup v1 memory group under the hierarchy's root (root only): the Linux twin of
    jetsam for tests and benches. ``remove()`` kills whatever is left in it, then removes it."""

    def __init__(self, name: str):
        self.path = CGROUP_V1 / name

    @staticmethod
    def unavailable() -> str | None:
        """Why no memory cgroup can be made here, or None when one can."""
        if os.geteuid() != 0:
            return "needs root to create a memory cgroup"
        if not (CGROUP_V1 / "memory.limit_in_bytes").exists():
            return f"no cgroup v1 memory hierarchy at {CGROUP_V1}"
        return None

    def create(self) -> MemoryCgroup:
        self.path.mkdir()
        return self

    def join_function(self) -> Callable[[], None]:
        """A preexec function that moves the calling (forked) process into this group."""
        procs = str(self.path / "cgroup.procs")

        def join() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        return join

    def members(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def set_limit(self, limit: int) -> str:
        """Limit the group to ``limit`` bytes of memory, and of memory plus swap when it can;
        what was limited, in words."""
        (self.path / "memory.limit_in_bytes").write_text(str(limit))
        memsw = self.path / "memory.memsw.limit_in_bytes"
        if not memsw.exists():
            return "no memsw file: swap is not limited (swap accounting off)"
        memsw.write_text(str(limit))
        return "memory+swap limited too"

    def oom_kills(self) -> int | None:
        """The kernel's OOM-kill counter for the group (None before Linux 4.13)."""
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return None

    def peak_usage_bytes(self) -> int:
        return int((self.path / "memory.max_usage_in_bytes").read_text())

    def remove(self) -> None:
        def emptied() -> bool:
            for pid in self.members():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return not self.members()

        wait_for(emptied, timeout=30, interval=0.1)

        def removed() -> bool:
            try:
                self.path.rmdir()
            except FileNotFoundError:
                return True
            except OSError:
                return False
            return True

        wait_for(removed, timeout=30, interval=0.1)
