"""The real trainer on the tiny model: exact resume, torn checkpoints, exit codes, telemetry."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
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
    assert f"{data / 'train.jsonl'}:7: invalid JSON: Invalid control character at column" in (
        result.stderr
    )
    # The reason is whole: it ends on the column, not mid-sentence.
    assert re.search(r":7: invalid JSON: [^\n]* column \d+\n", result.stderr), result.stderr
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


# --- batch size 4, lengths that vary: length-sorted batches, exact across kills and rungs ---

VARLEN_JOB = {
    "iters": 48,
    "batch_size": 4,
    "grad_accumulation_steps": 4,
    "checkpoint_every": 1,
    "steps_per_eval": 1000,
    "val_batches": 0,
}
TO_ACCUMULATION_2 = json.dumps({"grad_accumulation_steps": 2})


@pytest.fixture(scope="module")
def varlen_data(tmp_path_factory) -> Path:
    """The varlen preset's samples (16-512 words) for the tiny model's tokenizer."""
    from loractl.daemon.tinymodel import build_dataset

    return build_dataset(tmp_path_factory.mktemp("varlen"), preset="varlen")


def consumed(trace: Path) -> list[dict]:
    return [json.loads(line) for line in trace.read_text().splitlines()]


def test_varlen_batch_4_resumes_bitwise_after_sigkill(tiny_workspace, varlen_data, tmp_path):
    """Batch size 4 over samples of varied length: a SIGKILL and a resume end bitwise equal to
    an uninterrupted run."""
    baseline = make_job(tiny_workspace, tmp_path / "base", data=str(varlen_data), **VARLEN_JOB)
    result = run_trainer(baseline, "--fresh")
    assert result.returncode == 0, result.stderr
    killed = make_job(tiny_workspace, tmp_path / "killed", data=str(varlen_data), **VARLEN_JOB)
    proc = start(killed, "--fresh")
    kill_at_step(proc, tmp_path / "killed", random.Random().randrange(2, 10))
    result = run_trainer(killed)
    assert result.returncode == 0, result.stderr
    assert adapter_digest(tmp_path / "killed") == adapter_digest(tmp_path / "base")


def test_varlen_accumulation_rung_keeps_sorted_batches_and_resumes_bitwise(
    tiny_workspace, varlen_data, tmp_path
):
    """A memory stop at accumulation 4, resumed on the 4 -> 2 rung, consumes every position
    once in length-sorted batches; a SIGKILL after the rung change resumes bitwise equal."""
    from loractl.config import load_config
    from loractl.daemon.data import ExampleOrder, load_datasets
    from loractl.daemon.tinymodel import _preset

    def stepped(folder: Path, kill: bool) -> None:
        config = make_job(tiny_workspace, folder, data=str(varlen_data), **VARLEN_JOB)
        env = trainer_env(LORACTL_FAULT_OOM="5:2", LORACTL_TRACE_EXAMPLES=str(folder / "trace"))
        first = run_trainer(config, "--fresh", env=env)
        assert first.returncode == ExitCode.OUT_OF_MEMORY, first.stderr
        env = trainer_env(LORACTL_TRACE_EXAMPLES=str(folder / "trace"))
        if kill:
            proc = start(config, "--overrides", TO_ACCUMULATION_2, env=env)
            kill_at_step(proc, folder, 9)
        result = run_trainer(config, "--overrides", TO_ACCUMULATION_2, "--rung", "1", env=env)
        assert result.returncode == 0, result.stderr
        if not kill:  # the first attempt on the new rung says what changed
            assert "changed settings (ladder rung 1): grad_accumulation_steps 4 -> 2" in (
                result.stderr
            )

    stepped(tmp_path / "reference", kill=False)
    stepped(tmp_path / "killed", kill=True)
    assert adapter_digest(tmp_path / "killed") == adapter_digest(tmp_path / "reference")

    entries = consumed(tmp_path / "reference" / "trace")
    total = VARLEN_JOB["iters"] * VARLEN_JOB["batch_size"]
    starts = [e["start"] for e in entries]
    assert starts == list(range(0, total, 4)), "a micro-batch was repeated or skipped"
    # The order the trainer used: length-sorted batches of 4, shuffled per epoch.
    from mlx_lm import load

    cfg = load_config(make_job(tiny_workspace, tmp_path / "order", data=str(varlen_data)))
    _, tokenizer = load(str(tiny_workspace / "model"))
    lengths = load_datasets(cfg, tokenizer).train.lengths
    order = ExampleOrder(lengths, 4, cfg.seed)
    buckets = {tuple(sorted(b)) for b in order.batches.tolist()}
    assert all(tuple(sorted(e["indices"])) in buckets for e in entries)
    assert order.epoch_length == _preset("varlen").n_train
    epoch = [i for e in entries[: order.epoch_length // 4] for i in e["indices"]]
    assert sorted(epoch) == list(range(order.epoch_length))


# --- mlx-lm's cadences, checked against mlx_lm.lora itself ----------------------------------

# A stand-in for the wandb package: mlx-lm's WandBCallback calls init() and log(); this one
# appends each call to a file, so both trainers' reports can be compared call by call.
FAKE_WANDB = """\
import json, os

def _write(record):
    with open(os.environ["FAKE_WANDB_LOG"], "a") as handle:
        handle.write(json.dumps(record) + "\\n")

def init(**kwargs):
    _write({"call": "init", "project": kwargs.get("project")})

def log(data, step=None):
    _write({"call": "log", "step": step, "keys": sorted(data)})
"""

CADENCE_JOB = {
    "iters": 26,
    "steps_per_report": 5,
    "steps_per_eval": 7,
    "save_every": 10,
    "val_batches": 2,
    "report_to": "wandb",
    "project_name": "cadence",
}


def test_report_eval_and_save_cadence_match_mlx_lm(tiny_workspace, tmp_path):
    """Loss reports, validations and <iteration>_adapters.safetensors saves come at the same
    iterations, with the same keys, as mlx_lm.lora's with the same config."""
    from mlx_lm.lora import CONFIG_DEFAULTS

    site = tmp_path / "site" / "wandb"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text(FAKE_WANDB)
    ours = make_job(tiny_workspace, tmp_path / "ours", **CADENCE_JOB)
    theirs_cfg = {
        k: v
        for k, v in yaml.safe_load(ours.read_text()).items()
        if k in CONFIG_DEFAULTS and k != "adapter_path"
    }
    theirs_cfg["adapter_path"] = str(tmp_path / "theirs" / "adapters")
    theirs = tmp_path / "theirs.yaml"
    theirs.write_text(yaml.safe_dump(theirs_cfg))

    def run(command: list[str], log: Path) -> list[tuple]:
        env = trainer_env(FAKE_WANDB_LOG=str(log), PYTHONPATH=str(tmp_path / "site"))
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stdout + result.stderr
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        return [tuple(c.get(k) and str(c[k]) for k in ("call", "step", "keys")) for c in calls]

    our_calls = run(trainer_command(ours), tmp_path / "ours.calls")
    their_calls = run(
        [sys.executable, "-m", "mlx_lm", "lora", "-c", str(theirs), "--train"],
        tmp_path / "theirs.calls",
    )
    assert our_calls == their_calls
    steps = [int(step) for call, step, _ in our_calls if call == "log"]
    assert {0, 6, 13, 20, 25} <= set(steps) and {5, 10, 15, 20, 26} <= set(steps)

    def saves(folder: Path) -> list[str]:
        return sorted(p.name for p in folder.glob("*_adapters.safetensors"))

    assert saves(tmp_path / "ours" / "adapters") == [
        "0000010_adapters.safetensors",
        "0000020_adapters.safetensors",
    ]
    assert saves(tmp_path / "ours" / "adapters") == saves(tmp_path / "theirs" / "adapters")

    # An intermediate save is an adapter file mlx-lm's resume_adapter_file takes as it is.
    intermediate = tmp_path / "ours" / "adapters" / "0000020_adapters.safetensors"
    again = make_job(
        tiny_workspace, tmp_path / "again", iters=4, resume_adapter_file=str(intermediate)
    )
    result = run_trainer(again, "--fresh")
    assert result.returncode == 0, result.stderr
