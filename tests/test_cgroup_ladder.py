"""Acceptance for issue 15's "cgroup limit": the real supervisor in a memory cgroup (v1).

The job has no memory_budget_mb, so its budget is the default one, 0.7 x the cgroup's limit,
and the limit is chosen so that this budget falls between two rungs: rung 0's pre-flight is
over it, the job steps down and completes, and the kernel never OOM-kills anything in the
cgroup. The limit itself is above rung 0's peak: the pre-flight measures the longest batch by
running it, so a limit below that peak would be reached by the pre-flight itself (on this
machine the kernel then reclaims the group's file pages and the trainer thrashes until the
guard stops it, rather than OOM-killing it).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import psutil
import pytest
import yaml
from test_ladder_learning import SEQ_RUNG, preflight_peak

from conftest import make_job
from loractl.client.harness import MemoryCgroup, SupervisorProcess, measure_footprint
from loractl.daemon.tinymodel import prepare
from loractl.memory import MB

FRACTION = 0.7  # the supervisor's default share of the memory limit


@pytest.fixture
def cgroup():
    """A fresh v1 memory cgroup under the hierarchy's root, removed at teardown."""
    why = MemoryCgroup.unavailable()
    if why:
        pytest.skip(why)
    group = MemoryCgroup(f"loractl-test-{uuid.uuid4().hex[:12]}")
    try:
        group.create()
    except OSError as exc:
        pytest.skip(f"cannot create a memory cgroup at {group.path}: {exc}")
    try:
        yield group
    finally:
        group.remove()


@pytest.fixture(scope="module")
def ladder_workspace(tmp_path_factory) -> Path:
    """The ladder preset's model, data and job.yaml."""
    root = tmp_path_factory.mktemp("ladder")
    prepare(root, preset="ladder", seed=0)
    return root


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
    swap = cgroup.set_limit(limit)
    before = cgroup.oom_kills()
    if before is None:
        pytest.skip("memory.oom_control has no oom_kill counter (Linux < 4.13)")

    config = make_job(
        ladder_workspace, tmp_path / "src", iters=24, val_batches=1, checkpoint_every=1
    )
    assert "memory_budget_mb" not in yaml.safe_load(config.read_text())
    supervisor = SupervisorProcess(tmp_path / "home")
    supervisor.preexec = cgroup.join_function()
    try:
        supervisor.start()
        assert supervisor.proc.pid in cgroup.members()
        supervisor_rss = psutil.Process(supervisor.proc.pid).memory_info().rss / MB
        # The limit leaves room for the supervisor and the seq-128 trainer together.
        assert limit / MB > supervisor_rss + seq128, (limit / MB, supervisor_rss, seq128)
        job_id = supervisor.submit(config)
        job = supervisor.wait_state(job_id, {"completed", "failed"}, timeout=400)
        peak_usage = cgroup.peak_usage_bytes() / MB
        after = cgroup.oom_kills()
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
