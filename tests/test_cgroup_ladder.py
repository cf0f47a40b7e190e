"""Acceptance for issue 15's "cgroup limit": the real supervisor in a memory cgroup (v1).

With the cgroup's limit between two rungs and no memory_budget_mb in the job, the default
budget (0.7 x the limit) stops rung 0 at its pre-flight, the job steps down and completes,
and the kernel never OOM-kills anything in the cgroup.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest
import yaml
from test_ladder_learning import SEQ_RUNG, preflight_peak

from conftest import make_job, wait_for
from loractl.client.harness import SupervisorProcess, measure_footprint
from loractl.daemon.tinymodel import prepare
from loractl.memory import MB

CGROUP_V1 = Path("/sys/fs/cgroup/memory")
FRACTION = 0.7  # the supervisor's default share of the memory limit


class CgroupSupervisor(SupervisorProcess):
    """The real supervisor, joined to a cgroup before it execs, so all it allocates counts."""

    def __init__(self, home: Path, cgroup: Path, **env: str):
        super().__init__(home, **env)
        self.cgroup = cgroup

    def start(self) -> CgroupSupervisor:
        """Start ``daemon run`` as SupervisorProcess does, inside the cgroup from its first byte."""
        procs = str(self.cgroup / "cgroup.procs")

        def join() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        self.home.mkdir(parents=True, exist_ok=True)
        handle = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loractl.client.cli", "--home", str(self.home), "daemon", "run"],
            env=self.env,
            stdout=handle,
            stderr=handle,
            preexec_fn=join,
        )
        handle.close()
        wait_for(self._answers, timeout=30, interval=0.05)
        return self


def members(cgroup: Path) -> list[int]:
    """The pids now in ``cgroup``."""
    return [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]


def oom_kills(cgroup: Path) -> int:
    """The cgroup's kernel OOM-kill counter (``oom_kill`` in v1's memory.oom_control)."""
    for line in (cgroup / "memory.oom_control").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    pytest.skip("memory.oom_control has no oom_kill counter (Linux < 4.13)")


def remove_cgroup(cgroup: Path) -> None:
    """Kill whatever is left in ``cgroup``, by pid, then remove it."""

    def emptied() -> bool:
        for pid in members(cgroup):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return not members(cgroup)

    wait_for(emptied, timeout=30, interval=0.1)

    def removed() -> bool:
        try:
            cgroup.rmdir()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True

    wait_for(removed, timeout=30, interval=0.1)


@pytest.fixture
def cgroup():
    """A fresh v1 memory cgroup under the hierarchy's root, removed at teardown."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a memory cgroup")
    if not (CGROUP_V1 / "memory.limit_in_bytes").exists():
        pytest.skip(f"no cgroup v1 memory hierarchy at {CGROUP_V1}")
    path = CGROUP_V1 / f"loractl-test-{uuid.uuid4().hex[:12]}"
    try:
        path.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a memory cgroup at {path}: {exc}")
    try:
        yield path
    finally:
        remove_cgroup(path)


@pytest.fixture(scope="module")
def ladder_workspace(tmp_path_factory) -> Path:
    """The ladder preset's model, data and job.yaml."""
    root = tmp_path_factory.mktemp("ladder")
    prepare(root, preset="ladder", seed=0)
    return root


def set_limit(cgroup: Path, limit: int) -> str:
    """Limit ``cgroup`` to ``limit`` bytes of memory, and of memory plus swap when it can."""
    (cgroup / "memory.limit_in_bytes").write_text(str(limit))
    memsw = cgroup / "memory.memsw.limit_in_bytes"
    if not memsw.exists():
        return "no memsw file: swap is not limited (swap accounting off)"
    memsw.write_text(str(limit))
    return "memory+swap limited too"


def test_job_under_a_cgroup_limit_between_two_rungs_steps_down_without_an_oom_kill(
    ladder_workspace, tmp_path, cgroup
):
    probe = make_job(ladder_workspace, tmp_path / "probe", iters=24, val_batches=1)
    rung0 = measure_footprint(probe, {"max_seq_length": 256})
    seq128 = measure_footprint(probe, {"max_seq_length": 128})
    rung0_preflight = preflight_peak(probe, tmp_path / "flight")
    assert rung0_preflight > seq128 * 1.04, (rung0_preflight, seq128)
    # The default budget, 0.7 x the limit, halfway between the seq-128 rung's running peak
    # and rung 0's peaks, as the squeezed-ladder test picks its explicit budget.
    budget = (min(rung0, rung0_preflight) + seq128) / 2
    limit = int(budget / FRACTION * MB) // 4096 * 4096
    swap = set_limit(cgroup, limit)
    before = oom_kills(cgroup)

    config = make_job(
        ladder_workspace, tmp_path / "src", iters=24, val_batches=1, checkpoint_every=1
    )
    assert "memory_budget_mb" not in yaml.safe_load(config.read_text())
    supervisor = CgroupSupervisor(tmp_path / "home", cgroup)
    try:
        supervisor.start()
        assert supervisor.proc.pid in members(cgroup)
        supervisor_rss = psutil.Process(supervisor.proc.pid).memory_info().rss / MB
        # The limit leaves room for the supervisor and the seq-128 trainer together.
        assert limit / MB > supervisor_rss + seq128, (limit / MB, supervisor_rss, seq128)
        job_id = supervisor.submit(config)
        job = supervisor.wait_state(job_id, {"completed", "failed"}, timeout=400)
        peak_usage = int((cgroup / "memory.max_usage_in_bytes").read_text()) / MB
        after = oom_kills(cgroup)
        print(
            f"footprints: rung 0 {rung0:.1f} MB, seq-128 {seq128:.1f} MB; rung 0 pre-flight"
            f" {rung0_preflight:.1f} MB; limit {limit / MB:.1f} MB ({swap}); default budget"
            f" {job['budget_mb']} MB (0.7 x limit {FRACTION * limit / MB:.1f}); supervisor"
            f" RSS {supervisor_rss:.1f} MB; cgroup peak usage {peak_usage:.1f} MB;"
            f" oom_kill {before} -> {after}; rung {job['rung']}; crashes {job['crashes']}"
        )
    finally:
        supervisor.stop()

    assert after == before, (before, after)
    assert job["state"] == "completed", job["reason"] + supervisor.debug()
    assert job["rung"] > 0, job["history"]
    assert job["rung"] == SEQ_RUNG, job["history"]
    assert abs(job["budget_mb"] - FRACTION * limit / MB) <= 1, (job["budget_mb"], limit / MB)
    assert all(c["cause"] == "memory" and c["step"] == 0 for c in job["crashes"]), job["crashes"]
