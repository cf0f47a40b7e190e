"""MLX's Metal buffer-count limit is not out of memory: the trainer checkpoints and exits 1, and
the supervisor restarts it on the same rung instead of stepping down the ladder."""

from __future__ import annotations

from conftest import make_job, run_trainer, trainer_env
from loractl.client.harness import SupervisorProcess
from loractl.protocol import ExitCode
from loractl.supervisor.classify import Cause, ExitEvidence, classify

JOB = {"iters": 48, "checkpoint_every": 1}


def test_trainer_checkpoints_and_exits_1_naming_the_limit(tiny_workspace, tmp_path):
    """The limit hit twice in one step checkpoints the last boundary and exits 1, not 75."""
    config = make_job(tiny_workspace, tmp_path, **JOB)
    env = trainer_env(LORACTL_FAULT_RESOURCE_LIMIT="0:6")
    result = run_trainer(config, "--fresh", env=env)
    assert result.returncode == ExitCode.CRASH, result.stderr
    assert "[metal::malloc] Resource limit (499000) exceeded." in result.stderr
    assert "Traceback" not in result.stderr
    latest = (tmp_path / "adapters" / "checkpoints" / "latest").read_text().strip()
    assert latest == "step-00000005"
    verdict = classify(
        ExitEvidence(exit_code=result.returncode, signal=None, stderr_tail=result.stderr)
    )
    assert (verdict.cause, verdict.retry, verdict.step_down) == (Cause.RESOURCE_LIMIT, True, False)


def test_supervisor_restarts_on_the_same_rung(tiny_workspace, tmp_path):
    """Under the supervisor the first attempt's buffer-count failure is retried on rung 0."""
    supervisor = SupervisorProcess(tmp_path / "home", LORACTL_FAULT_RESOURCE_LIMIT="1:6")
    supervisor.start()
    try:
        job_id = supervisor.submit(make_job(tiny_workspace, tmp_path / "src", **JOB))
        job = supervisor.wait_state(job_id, {"completed", "failed"}, timeout=180)
    finally:
        supervisor.stop()
    assert job["state"] == "completed", job["reason"]
    assert [c["cause"] for c in job["crashes"]] == ["resource_limit"]
    assert job["crashes"][0]["checkpoint_step"] == 5
    assert job["rung"] == 0 and job["attempts"] == 2
    assert not [e for e in job["history"] if e["kind"] == "ladder_step"]
