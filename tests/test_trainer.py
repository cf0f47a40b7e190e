"""The real trainer on the tiny model: exact resume, torn checkpoints, exit codes, telemetry."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from conftest import make_job, run_trainer, trainer_command, trainer_env, wait_for
from loractl.protocol import ExitCode, Heartbeat, TrainerCommand, TrainerEvent, decode

# Long enough that a kill lands mid-run: 60 optimizer steps of 4 micro-batches.
JOB = {"iters": 240, "checkpoint_every": 2, "grad_accumulation_steps": 4}
STEPS = 60


def adapter_digest(folder: Path) -> str:
    return hashlib.sha256((folder / "adapters" / "adapters.safetensors").read_bytes()).hexdigest()


def logged_steps(folder: Path) -> list[int]:
    log = folder / "adapters" / "train.log"
    if not log.exists():
        return []
    steps = []
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line may be half-written when we look
        if record.get("event") == "step":
            steps.append(record["step"])
    return steps


def start(config: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        trainer_command(config, *extra),
        env=env or trainer_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_at_step(proc: subprocess.Popen, folder: Path, step: int, sig=signal.SIGKILL) -> None:
    wait_for(lambda: proc.poll() is not None or max(logged_steps(folder), default=0) >= step, 120)
    assert proc.poll() is None, f"trainer finished before step {step}"
    os.kill(proc.pid, sig)
    proc.communicate(timeout=60)


@pytest.fixture(scope="module")
def baseline(tiny_workspace, tmp_path_factory) -> str:
    """The uninterrupted run's adapter digest, and its folder."""
    folder = tmp_path_factory.mktemp("baseline")
    config = make_job(tiny_workspace, folder, **JOB)
    result = run_trainer(config, "--fresh")
    assert result.returncode == 0, result.stderr
    return adapter_digest(folder), folder


def test_sigkill_at_three_random_points_resumes_bitwise_exact(tiny_workspace, tmp_path, baseline):
    """Three real SIGKILLs at random steps, each resumed, end bitwise equal to no kills."""
    config = make_job(tiny_workspace, tmp_path, **JOB)
    points = sorted(random.Random().sample(range(3, STEPS - 3), 3))
    for index, point in enumerate(points):
        proc = start(config, *(["--fresh"] if index == 0 else []))
        kill_at_step(proc, tmp_path, point)
        assert proc.returncode == -signal.SIGKILL
    result = run_trainer(config)
    assert result.returncode == 0, result.stderr
    assert "resumed from step-" in result.stderr
    assert adapter_digest(tmp_path) == baseline[0], f"kills at steps {points}"


def test_resume_at_other_accumulation_neither_repeats_nor_skips(tiny_workspace, tmp_path):
    """Stopped at accumulation 4 and resumed at 2, every example is consumed exactly once."""
    config = make_job(tiny_workspace, tmp_path, **JOB)
    trace = tmp_path / "trace.jsonl"
    env = trainer_env(LORACTL_TRACE_EXAMPLES=str(trace))
    proc = start(config, "--fresh", env=env)
    kill_at_step(proc, tmp_path, 20, sig=signal.SIGTERM)
    assert proc.returncode == ExitCode.STOPPED
    stopped = max(logged_steps(tmp_path))
    result = run_trainer(config, "--overrides", '{"grad_accumulation_steps": 2}', env=env)
    assert result.returncode == 0, result.stderr

    entries = [json.loads(line) for line in trace.read_text().splitlines()]
    positions: dict[int, int] = {}
    for entry in entries:
        for offset, index in enumerate(entry["indices"]):
            positions[entry["start"] + offset] = index
    total = JOB["iters"]  # batch_size 1
    assert sorted(positions) == list(range(total)), "a position was skipped"
    # Each position is consumed once except the window after the last checkpoint, which a
    # graceful stop finishes, so nothing at all is consumed twice.
    starts = [entry["start"] for entry in entries]
    assert len(starts) == len(set(starts)), "an example was consumed twice"
    train_size = len((tiny_workspace / "data" / "train.jsonl").read_text().splitlines())
    for epoch_start in range(0, total - train_size + 1, train_size):
        epoch = [positions[p] for p in range(epoch_start, epoch_start + train_size)]
        assert sorted(epoch) == list(range(train_size))
    steps = logged_steps(tmp_path)
    assert steps.count(stopped + 1) == 1
    assert max(steps) == stopped + (total - 4 * stopped) // 2  # steps of 4, then of 2


def test_flipped_byte_checkpoint_is_skipped_and_resume_is_still_exact(
    tiny_workspace, tmp_path, baseline
):
    """A corrupted newest checkpoint is detected, the previous one used, and the end is exact."""
    config = make_job(tiny_workspace, tmp_path, **JOB)
    proc = start(config, "--fresh")
    kill_at_step(proc, tmp_path, 30, sig=signal.SIGTERM)
    assert proc.returncode == ExitCode.STOPPED
    root = tmp_path / "adapters" / "checkpoints"
    newest = root / (root / "latest").read_text().strip()
    target = newest / "optimizer.safetensors"
    data = bytearray(target.read_bytes())
    data[-7] ^= 0x10
    target.write_bytes(bytes(data))
    result = run_trainer(config)
    assert result.returncode == 0, result.stderr
    assert "skipping damaged checkpoint" in result.stderr
    assert "optimizer.safetensors fails its checksum" in result.stderr
    assert adapter_digest(tmp_path) == baseline[0]


def test_final_adapter_works_with_mlx_lm(tiny_workspace, baseline):
    """mlx_lm.load(model, adapter_path=...) accepts the output and generates; fuse works."""
    from mlx_lm import generate, load

    folder = baseline[1] / "adapters"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora"
    assert config["lora_parameters"]["rank"] == 8
    model, tokenizer = load(str(tiny_workspace / "model"), adapter_path=str(folder))
    text = generate(model, tokenizer, prompt="the river", max_tokens=5)
    assert isinstance(text, str)
    fused = baseline[1] / "fused"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "fuse",
            "--model",
            str(tiny_workspace / "model"),
            "--adapter-path",
            str(folder),
            "--save-path",
            str(fused),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (fused / "config.json").exists()


def test_bad_dataset_line_exits_65_naming_file_and_line(tiny_workspace, tmp_path):
    """A malformed JSONL line stops the trainer with exit 65 and names the file and line."""
    data = tmp_path / "data"
    data.mkdir()
    lines = (tiny_workspace / "data" / "train.jsonl").read_text().splitlines()
    lines[6] = lines[6][:-3]
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    config = make_job(tiny_workspace, tmp_path / "job", data=str(data))
    result = run_trainer(config)
    assert result.returncode == ExitCode.DATA_ERROR
    assert f"{data / 'train.jsonl'}:7: invalid JSON" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_model_exits_78_without_traceback(tiny_workspace, tmp_path):
    """A model folder that is not a model is a config error (78), said in one line."""
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    config = make_job(tiny_workspace, tmp_path / "job", model=str(empty))
    result = run_trainer(config)
    assert result.returncode == ExitCode.CONFIG_ERROR
    assert "cannot load model" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"batch_size": -2}, "batch_size"),
        ({"lora_parameters": {"rnak": 4}}, "rank"),
        ({"learnig_rate": 1e-4}, "learning_rate"),
        ({"num_layers": 99}, "num_layers is 99"),
    ],
)
def test_bad_config_exits_78_without_traceback(tiny_workspace, tmp_path, override, needle):
    """Config mistakes found at load time or against the model exit 78 with a clear line."""
    config = make_job(tiny_workspace, tmp_path, **override)
    result = subprocess.run(
        [sys.executable, "-m", "loractl.client.cli", "train", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == ExitCode.CONFIG_ERROR, result.stderr
    assert needle in result.stderr
    assert "Traceback" not in result.stderr


def test_heartbeats_flow_and_commands_are_obeyed(tiny_workspace, tmp_path):
    """Heartbeats carry progress and memory; checkpoint_now and stop commands take effect."""
    config = make_job(tiny_workspace, tmp_path, iters=4000, checkpoint_every=1000)
    endpoint = f"ipc://{tmp_path}/telemetry"
    context = zmq.Context.instance()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    proc = start(config, "--fresh", "--telemetry", endpoint, "--job-id", "job-7")
    peers: list[bytes] = []
    seen: list = []

    def receive_until(predicate, timeout=60):
        def poll():
            if router.poll(50):
                peer, frame = router.recv_multipart()[:2]
                peers.append(peer)
                seen.append(decode(frame))
                return predicate(seen[-1])
            return False

        return wait_for(poll, timeout, interval=0)

    try:
        receive_until(lambda m: isinstance(m, Heartbeat) and m.step >= 3)
        beat = [m for m in seen if isinstance(m, Heartbeat)][-1]
        assert beat.job_id == "job-7" and beat.pid == proc.pid
        assert beat.examples_seen >= 12 and beat.total_examples == 4000
        assert beat.footprint_mb > 10 and beat.mlx_peak_mb > 0 and beat.loss is not None
        router.send_multipart([peers[-1], TrainerCommand(action="checkpoint_now").encode()])
        receive_until(lambda m: isinstance(m, TrainerEvent) and m.kind == "checkpoint")
        router.send_multipart([peers[-1], TrainerCommand(action="stop").encode()])
        receive_until(lambda m: isinstance(m, TrainerEvent) and m.kind == "stopped")
        proc.communicate(timeout=60)
        assert proc.returncode == ExitCode.STOPPED
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        router.close()


def test_one_allocation_failure_is_retried_and_changes_nothing(tiny_workspace, tmp_path, baseline):
    """A Metal out-of-memory error in a step frees the cache, retries, and stays exact."""
    config = make_job(tiny_workspace, tmp_path, **JOB)
    result = run_trainer(config, "--fresh", env=trainer_env(LORACTL_FAULT_OOM="5:1"))
    assert result.returncode == 0, result.stderr
    assert "retrying step" in (tmp_path / "adapters" / "train.log").read_text()
    assert adapter_digest(tmp_path) == baseline[0]


def test_two_allocation_failures_checkpoint_and_exit_75(tiny_workspace, tmp_path, baseline):
    """A step that fails twice checkpoints the last boundary, exits 75, and resumes exactly."""
    config = make_job(tiny_workspace, tmp_path, **JOB)
    result = run_trainer(config, "--fresh", env=trainer_env(LORACTL_FAULT_OOM="8:2"))
    assert result.returncode == ExitCode.OUT_OF_MEMORY
    assert "kIOGPUCommandBufferCallbackErrorOutOfMemory" in result.stderr
    root = tmp_path / "adapters" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-00000007"
    result = run_trainer(config)
    assert result.returncode == 0, result.stderr
    assert adapter_digest(tmp_path) == baseline[0]
