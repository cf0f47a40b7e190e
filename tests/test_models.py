"""Other model kinds on the real trainer: a mixture of experts (3-D SwitchLinear LoRA tensors)
and a 4-bit quantized model (QLoRA), each trained, interrupted, resumed and stepped down."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import mlx.core as mx
import pytest

from conftest import make_job, run_trainer, trainer_command, trainer_env, wait_for
from loractl.daemon.tinymodel import prepare, quantize_model
from loractl.protocol import ExitCode

RANK_4 = json.dumps({"lora_parameters": {"rank": 4}})


@pytest.fixture(scope="module")
def moe_workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("moe")
    prepare(root, preset="moe", seed=0)
    return root


@pytest.fixture(scope="module")
def quantized_workspace(tiny_workspace, tmp_path_factory) -> Path:
    """The tiny workspace with its model 4-bit quantized by mlx-lm's convert."""
    root = tmp_path_factory.mktemp("q4")
    quantize_model(tiny_workspace / "model", root / "model", bits=4, group_size=32)
    (root / "data").symlink_to(tiny_workspace / "data")
    (root / "job.yaml").write_text((tiny_workspace / "job.yaml").read_text())
    return root


def adapters(folder: Path) -> dict[str, mx.array]:
    return dict(mx.load(str(folder / "adapters" / "adapters.safetensors")))


def digest(folder: Path) -> str:
    return hashlib.sha256((folder / "adapters" / "adapters.safetensors").read_bytes()).hexdigest()


def last_step(folder: Path) -> int:
    log = folder / "adapters" / "train.log"
    step = 0
    for line in log.read_text().splitlines() if log.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if record.get("event") == "step":
            step = record["step"]
    return step


def generates(model_dir: Path, adapter_dir: Path) -> None:
    from mlx_lm import generate, load

    model, tokenizer = load(str(model_dir), adapter_path=str(adapter_dir))
    assert isinstance(generate(model, tokenizer, prompt="the river", max_tokens=4), str)


def test_moe_lora_trains_and_steps_rank_down_expert_by_expert(moe_workspace, tmp_path):
    """LoRA on a Mixtral-shaped model covers its SwitchLinear experts (3-D tensors); a rank
    step-down converts them by per-expert SVD and the result loads in mlx-lm."""
    config = make_job(moe_workspace, tmp_path, iters=48, checkpoint_every=2)
    # Stop at step 7 of 12 as a memory crash does: exit 75 after checkpointing step 6.
    first = run_trainer(config, "--fresh", env=trainer_env(LORACTL_FAULT_OOM="7:2"))
    assert first.returncode == ExitCode.OUT_OF_MEMORY, first.stderr
    switch = {k: v.shape for k, v in adapters(tmp_path).items() if "switch_mlp" in k}
    assert switch["model.layers.0.block_sparse_moe.switch_mlp.up_proj.lora_a"] == (4, 8, 32)
    assert switch["model.layers.0.block_sparse_moe.switch_mlp.up_proj.lora_b"] == (4, 64, 8)

    resumed = run_trainer(config, "--overrides", RANK_4, "--rung", "3")
    assert resumed.returncode == 0, resumed.stderr
    assert "lora_rank 8 -> 4" in resumed.stderr and "by SVD" in resumed.stderr
    log = (tmp_path / "adapters" / "train.log").read_text()
    assert "block_sparse_moe.switch_mlp.down_proj: rank 8 -> 4 by SVD" in log
    final = {k: v.shape for k, v in adapters(tmp_path).items()}
    assert final["model.layers.1.block_sparse_moe.switch_mlp.down_proj.lora_a"] == (4, 4, 64)
    assert final["model.layers.1.block_sparse_moe.switch_mlp.down_proj.lora_b"] == (4, 32, 4)
    assert final["model.layers.1.self_attn.q_proj.lora_a"] == (32, 4)
    generates(moe_workspace / "model", tmp_path / "adapters")


QLORA_JOB = {"iters": 64, "checkpoint_every": 2}


def test_qlora_resumes_bitwise_after_sigkill_and_steps_rank_down(quantized_workspace, tmp_path):
    """On a 4-bit model a SIGKILLed run resumes bitwise equal to an uninterrupted one, and a
    rank step-down from its checkpoint trains on to an adapter mlx-lm loads."""
    model_config = json.loads((quantized_workspace / "model" / "config.json").read_text())
    assert model_config["quantization"]["bits"] == 4

    baseline = make_job(quantized_workspace, tmp_path / "baseline", **QLORA_JOB)
    result = run_trainer(baseline, "--fresh")
    assert result.returncode == 0, result.stderr

    killed = make_job(quantized_workspace, tmp_path / "killed", **QLORA_JOB)
    proc = subprocess.Popen(
        trainer_command(killed, "--fresh"),
        env=trainer_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: proc.poll() is not None or last_step(tmp_path / "killed") >= 7, 120)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    result = run_trainer(killed)
    assert result.returncode == 0, result.stderr
    assert "resumed from step-" in result.stderr
    assert digest(tmp_path / "killed") == digest(tmp_path / "baseline")

    stepped = make_job(quantized_workspace, tmp_path / "stepped", **QLORA_JOB)
    first = run_trainer(stepped, "--fresh", env=trainer_env(LORACTL_FAULT_OOM="9:2"))
    assert first.returncode == ExitCode.OUT_OF_MEMORY, first.stderr
    result = run_trainer(stepped, "--overrides", RANK_4, "--rung", "3")
    assert result.returncode == 0, result.stderr
    assert "adapter converted" in result.stderr
    shapes = {k: v.shape for k, v in adapters(tmp_path / "stepped").items()}
    assert all(s[-1] == 4 for k, s in shapes.items() if k.endswith("lora_a"))
    generates(quantized_workspace / "model", tmp_path / "stepped" / "adapters")
