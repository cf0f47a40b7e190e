"""Issue 18's whole messages, first hour and mlx_lm.lora habits: what a new user meets first.

One real training run (flags only, no config file) is shared by the module: it is evaluated
test-only, validated for its checkpoint, and its adapters' config is read.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import make_job, put_in_state
from loractl.client.cli import main
from loractl.client.render import job_details, state_words
from loractl.config import parse_config
from loractl.protocol import JobState, Reply, RetryRequest, decode
from loractl.supervisor.policy import headline, ladder_exhausted


@dataclass
class StoredJob:
    """The fields of a stored job the ladder's failure reason reads."""

    peak_memory_mb: dict = field(default_factory=dict)


def loractl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loractl", *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def flags_run(tiny_workspace, tmp_path_factory):
    """`loractl train --model M --data D --train ...` with no config file, run once."""
    folder = tmp_path_factory.mktemp("flags")
    result = loractl(
        "train",
        "--model",
        str(tiny_workspace / "model"),
        "--data",
        str(tiny_workspace / "data"),
        "--train",
        "--num-layers",
        "-1",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--val-batches",
        "1",
        "--checkpoint-every",
        "2",
        "--max-seq-length",
        "128",
        cwd=folder,
    )
    return folder, result


def test_ladder_exhausted_headline_holds_every_peak_and_the_budget(tmp_path):
    """The first line of a no-rung-left failure is whole: each rung's peak and the budget."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"text": "x"}\n')
    cfg = parse_config({"model": "model", "data": "data", "batch_size": 1}, base_dir=tmp_path)
    job = StoredJob(peak_memory_mb={"0": 412.4, "2": 301.0})
    reason = ladder_exhausted(job, cfg, 250.0)
    assert headline(reason) == (
        "out of memory on every rung: peaks 412/-/301 MB over a 250 MB budget (-: not run)"
    )
    assert "  rung 1 (" in reason and "raise memory_budget_mb" in reason


def test_a_failed_jobs_notification_holds_its_whole_reason(
    tiny_workspace, tmp_path, inprocess_supervisor
):
    """The notification for a job that failed out of memory carries the peaks and budget."""
    sup = inprocess_supervisor
    config = make_job(tiny_workspace, tmp_path, notify=True)
    job_id = put_in_state(sup, config, JobState.QUEUED)
    sent: list[tuple[str, str]] = []

    class Recorder:
        def send(self, title: str, message: str) -> None:
            sent.append((title, message))

    sup.exits.notifier = Recorder()
    reason = "out of memory on every rung: peaks 412/398 MB over a 250 MB budget\n  rung 0: ..."
    sup.exits.fail(sup.store.get(job_id), "memory", reason)
    assert sent == [
        (f"{sup.store.get(job_id).name} failed", reason.splitlines()[0]),
    ]
    assert sent[0][1].endswith("over a 250 MB budget")


def test_show_header_says_the_state_once():
    """`show` never repeats the state in its outcome: "failed (memory)", "cancelled"."""
    assert state_words("failed", "failed:memory") == "failed (memory)"
    assert state_words("cancelled", "cancelled") == "cancelled"
    assert state_words("completed", "success") == "completed"
    job = {
        "id": "j1",
        "name": "rf",
        "state": "failed",
        "outcome": "failed:memory",
        "progress": {"examples_seen": 24, "total_examples": 64, "step": 6},
        "attempts": 2,
        "rung": 3,
        "adapter_path": "/a",
        "use_with": "mlx_lm.generate --model m --adapter-path /a --prompt Hello",
        "adapters_partial": "step 6 of 16",
    }
    text = job_details(job)
    assert text.splitlines()[0] == "job j1 (rf): failed (memory)"
    assert "24/64 examples, step 6" in text
    assert "use with (partial adapters, step 6 of 16): mlx_lm.generate" in text


def test_retry_fresh_resets_progress_and_says_from_the_start(
    tiny_workspace, tmp_path, inprocess_supervisor
):
    """`retry --fresh` on a failed job zeroes its progress and the reply says so."""
    sup = inprocess_supervisor
    job_id = put_in_state(sup, make_job(tiny_workspace, tmp_path), JobState.FAILED)
    sup.store.update(job_id, step=6, examples_seen=24, total_examples=64)
    reply = decode(
        sup.dispatch(RetryRequest(job=job_id, fresh=True).encode()).encode(), limit=1 << 26
    )
    assert isinstance(reply, Reply) and reply.ok and reply.data["start"] == "from the start"
    job = sup.store.get(job_id)
    assert (job.step, job.examples_seen) == (0, 0)


def test_a_validation_set_smaller_than_a_batch_is_refused(tmp_path):
    """valid.jsonl with fewer examples than batch_size is refused at validation, exit 65."""
    (tmp_path / "model").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"text": "a b c"}\n' * 8)
    (tmp_path / "data" / "valid.jsonl").write_text('{"text": "a b c"}\n' * 2)
    path = tmp_path / "job.yaml"
    path.write_text("model: model\ndata: data\nbatch_size: 4\n")
    result = CliRunner().invoke(main, ["config", "validate", str(path)])
    assert result.exit_code == 65, result.output
    assert "holds 2 validation examples, fewer than batch_size 4" in result.output
    assert "Traceback" not in result.output


def test_config_validate_summarizes_with_rung_lines(tiny_workspace, tmp_path):
    """`config validate` prints a summary with one line per rung; --json stays raw."""
    config = make_job(tiny_workspace, tmp_path, memory_budget_mb=900)
    result = CliRunner().invoke(main, ["config", "validate", str(config)])
    assert result.exit_code == 0, result.output
    assert "    rung 0: as submitted" in result.output
    assert "    rung 1: grad_accumulation_steps=" in result.output
    assert "memory_budget_mb 900" in result.output
    raw = CliRunner().invoke(main, ["config", "validate", "--json", str(config)])
    assert json.loads(raw.stdout)["ok"] is True


def test_flags_only_training_says_where_the_adapters_went(flags_run):
    """`loractl train --model M --data D --train` trains with no config and names the file."""
    folder, result = flags_run
    assert result.returncode == 0, result.stderr
    adapters = folder / "adapters" / "adapters.safetensors"
    assert adapters.is_file()
    assert f"adapters in {adapters}" in result.stderr
    # adapter_config.json records what ran: one epoch of 64 at batch 8 is 8 iterations.
    written = json.loads((folder / "adapters" / "adapter_config.json").read_text())
    assert written["iters"] == 8


def test_test_only_evaluates_the_adapters(tiny_workspace, flags_run):
    """`--test` without `--train` evaluates the adapters: test loss and perplexity."""
    folder, _ = flags_run
    before = (folder / "adapters" / "adapters.safetensors").stat().st_mtime_ns
    result = loractl(
        "train",
        "--model",
        str(tiny_workspace / "model"),
        "--data",
        str(tiny_workspace / "data"),
        "--test",
        "--test-batches",
        "2",
        "--batch-size",
        "8",
        cwd=folder,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Test loss ") and ", Test ppl " in result.stdout
    assert (folder / "adapters" / "adapters.safetensors").stat().st_mtime_ns == before


def test_a_job_over_an_existing_checkpoint_says_it_resumes(tiny_workspace, tmp_path, flags_run):
    """Validating a job whose adapter_path holds a checkpoint names the step it resumes at."""
    folder, _ = flags_run
    config = make_job(tiny_workspace, tmp_path, adapter_path=str(folder / "adapters"))
    result = CliRunner().invoke(main, ["config", "validate", str(config)])
    assert result.exit_code == 0, result.output
    assert "resumes from step 8; `loractl retry --fresh` starts over" in result.output


def test_train_with_neither_config_nor_model_is_a_usage_error():
    """No config and no --model is refused in one line, exit 2."""
    result = CliRunner().invoke(main, ["train"])
    assert result.exit_code == 2
    assert "--model M --data D" in result.output
