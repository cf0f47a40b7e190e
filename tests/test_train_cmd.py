"""`loractl train` as mlx_lm.lora users type it: flags, -c, python -m, mlx-lm-style configs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import psutil
import pytest
import yaml

from conftest import make_job, wait_for
from loractl import __version__
from loractl.client.train_cmd import schema_flags
from loractl.daemon.tinymodel import build_dataset
from loractl.protocol import ExitCode


def loractl(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loractl", *args], capture_output=True, text=True, timeout=timeout
    )


def log_events(adapters: Path, kind: str) -> list[dict]:
    records = [json.loads(line) for line in (adapters / "train.log").read_text().splitlines()]
    return [r for r in records if r.get("event") == kind]


def test_python_m_loractl_runs_the_cli():
    """`python -m loractl version` is the loractl command."""
    result = loractl("version")
    assert result.returncode == 0, result.stderr
    assert __version__ in result.stdout


def test_iters_flag_trains_exactly_that_many_iterations(tiny_workspace, tmp_path):
    """`loractl train -c job.yaml --iters 8` trains 8 iterations of the 48 the config says."""
    config = make_job(tiny_workspace, tmp_path)
    result = loractl("train", "-c", str(config), "--iters", "8")
    assert result.returncode == 0, result.stderr
    steps = log_events(tmp_path / "adapters", "step")
    assert steps[-1]["iteration"] == 8 and steps[-1]["examples_seen"] == 8
    assert log_events(tmp_path / "adapters", "training")[0]["total_examples"] == 8
    again = loractl("train", str(config), "--iters", "8")
    assert again.returncode == 0, again.stderr
    assert "already complete" in again.stderr and "8 of 8 examples" in again.stderr
    assert len(log_events(tmp_path / "adapters", "step")) == len(steps)


def test_epochs_flag_replaces_iters_and_iters_flag_replaces_epochs(tiny_workspace, tmp_path):
    """--epochs 1 runs one pass; --iters wins over a config's epochs."""
    config = make_job(tiny_workspace, tmp_path / "a", epochs=3)
    result = loractl("train", str(config), "--iters", "4", "--grad-accumulation-steps", "1")
    assert result.returncode == 0, result.stderr
    assert log_events(tmp_path / "a" / "adapters", "training")[0]["total_examples"] == 4
    config = make_job(tiny_workspace, tmp_path / "b", iters=1000)
    result = loractl("train", str(config), "--epochs", "1", "--batch-size", "8")
    assert result.returncode == 0, result.stderr
    assert log_events(tmp_path / "b" / "adapters", "training")[0]["total_examples"] == 64
    # adapter_config.json records what ran: the 8 iterations one epoch of 64 came to.
    written = json.loads((tmp_path / "b" / "adapters" / "adapter_config.json").read_text())
    assert written["iters"] == 8 and written["batch_size"] == 8


def test_config_given_twice_differently_is_a_usage_error(tiny_workspace, tmp_path):
    """CONFIG and -c naming different files is refused; no config at all too."""
    config = make_job(tiny_workspace, tmp_path)
    result = loractl("train", str(config), "-c", str(tmp_path / "other.yaml"))
    assert result.returncode == ExitCode.USAGE and "two configs given" in result.stderr
    result = loractl("train")
    assert result.returncode == ExitCode.USAGE and "no config given" in result.stderr


def test_mlx_lm_style_config_with_an_ignored_key_trains_and_a_typo_does_not(
    tiny_workspace, tmp_path
):
    """An extra key mlx_lm.lora ignores trains with a warning naming it; a typo is refused."""
    data = yaml.safe_load((tiny_workspace / "job.yaml").read_text())
    keys = ("model", "data", "fine_tune_type", "optimizer", "num_layers", "lora_parameters")
    mlx_style = {key: data[key] for key in keys}
    mlx_style.update(
        train=True,
        iters=4,
        batch_size=1,
        adapter_path=str(tmp_path / "adapters"),
        learning_rate=1e-4,
        train_mode="sft",  # the mlx-lm-lora fork's key; mlx_lm.lora ignores it
    )
    config = tmp_path / "lora_config.yaml"
    config.write_text(yaml.safe_dump(mlx_style))
    result = loractl("train", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert "warning" in result.stderr and "key 'train_mode'" in result.stderr
    config.write_text(yaml.safe_dump({**mlx_style, "learnig_rate": 1e-4}))
    result = loractl("train", "-c", str(config))
    assert result.returncode == ExitCode.CONFIG_ERROR
    assert "did you mean 'learning_rate'" in result.stderr and "Traceback" not in result.stderr


def test_report_to_without_the_package_fails_before_training(tiny_workspace, tmp_path):
    """--report-to wandb with wandb missing exits 78 at once, naming the package."""
    config = make_job(tiny_workspace, tmp_path)
    result = loractl("train", str(config), "--report-to", "wandb")
    assert result.returncode == ExitCode.CONFIG_ERROR
    assert "wandb is not installed" in result.stderr
    assert not (tmp_path / "adapters" / "train.log").exists()


def completions_data(workspace: Path, folder: Path) -> Path:
    """The tiny data set as completions under the keys 'question' and 'answer'."""
    build_dataset(folder, preset="tiny", fmt="completions")
    for path in folder.glob("*.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        lines = [json.dumps({"question": r["prompt"], "answer": r["completion"]}) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    return folder


def test_every_flag_reaches_the_trainer(tiny_workspace, tmp_path):
    """Each `loractl train` flag, set to a non-default value, is what the trainer runs with.

    The config names a model and data that do not exist and another adapter folder: only the
    flags make the run possible, and the trainer logs the config it ran with."""
    data = completions_data(tiny_workspace, tmp_path / "data")
    start = tmp_path / "start.safetensors"
    mx.save_safetensors(str(start), {"unrelated.weight": mx.zeros((1,))})
    out = tmp_path / "out"
    config = make_job(tiny_workspace, tmp_path / "job", model="missing/model", data="missing/data")
    flags = {
        "model": str(tiny_workspace / "model"),
        "data": str(data),
        "test": True,
        "test_batches": 2,
        "fine_tune_type": "dora",
        "optimizer": "sgd",
        "seed": 3,
        "num_layers": 1,
        "batch_size": 2,
        "iters": 7,
        "val_batches": 1,
        "learning_rate": 2e-4,
        "steps_per_report": 3,
        "steps_per_eval": 7,
        "resume_adapter_file": str(start),
        "adapter_path": str(out),
        "save_every": 5,
        "max_seq_length": 64,
        "grad_checkpoint": True,
        "grad_accumulation_steps": 2,
        "clear_cache_threshold": "1MB",
        "mask_prompt": True,
        "project_name": "night",
        "trust_remote_code": True,
        "prompt_feature": "question",
        "completion_feature": "answer",
        "chat_feature": "conversation",
        "text_feature": "body",
        "wandb": "legacy",
        "name": "flagged",
        "priority": 5,
        "epochs": 1,
        "memory_budget_mb": 4096,
        "checkpoint_every": 3,
        "keep_checkpoints": 2,
        "max_retries": 1,
        "heartbeat_interval": 0.5,
        "heartbeat_timeout": 20.0,
        "cleanup_every": 4,
        "low_memory_mb": 1,
        "notify": True,
        "preflight": False,
        "max_record_mb": 32,
        "max_processes_per_host": 2,
        "startup_timeout": 40.0,
        "host_unreachable_minutes": 12.0,
    }
    # report_to needs its package installed; the test above covers that flag.
    assert set(flags) | {"report_to"} == {info.name for info in schema_flags()}
    args = ["train", str(config), "--train"]
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if value is False:
            args.append("--no-" + name.replace("_", "-"))
        else:
            args += [flag] if value is True else [flag, str(value)]
    result = loractl(*args)
    assert result.returncode == 0, result.stderr
    ran = log_events(out, "attempt starting")[0]["config"]
    expected = {**flags, "clear_cache_threshold": 1_000_000}
    for name, value in expected.items():
        assert ran[name] == value, name
    assert log_events(out, "training")[0]["total_examples"] == 64  # one epoch of 64
    assert (out / "0000005_adapters.safetensors").exists()
    assert "test loss" in result.stderr


def logged_steps(adapters: Path) -> int:
    """Steps in a train.log that is still being written (a torn last line is skipped)."""
    path = adapters / "train.log"
    if not path.exists():
        return 0
    steps = 0
    for line in path.read_text().splitlines():
        try:
            steps += json.loads(line).get("event") == "step"
        except json.JSONDecodeError:
            continue
    return steps


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_to_loractl_train_reaches_the_trainer(tiny_workspace, tmp_path, sig):
    """SIGTERM (or a SIGINT not from a terminal) sent to `loractl train` reaches its trainer
    child: it checkpoints and exits 82, which is the command's exit code and --json outcome,
    and no trainer is left behind."""
    config = make_job(tiny_workspace, tmp_path, iters=4000, checkpoint_every=1000)
    proc = subprocess.Popen(
        [sys.executable, "-m", "loractl", "train", str(config), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: proc.poll() is not None or logged_steps(tmp_path / "adapters") >= 2, 120)
        assert proc.poll() is None, proc.communicate()
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("loractl.daemon.trainer" in " ".join(c.cmdline()) for c in children)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == ExitCode.STOPPED, err
    assert json.loads(out) == {"exit_code": 82, "outcome": "stopped"}
    assert "stopped at step" in err and "run the same command again" in err
    assert log_events(tmp_path / "adapters", "stopped on request")
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


# The child claims the pty as its controlling terminal (so ^C there becomes SIGINT for the
# foreground process group), then runs the command.
CLAIM_TTY = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


def test_ctrl_c_on_a_terminal_stops_the_trainer_with_a_checkpoint(tiny_workspace, tmp_path):
    """^C typed on the terminal stops the trainer after a checkpoint; `loractl train` exits 82."""
    import os
    import select

    config = make_job(tiny_workspace, tmp_path, iters=4000, checkpoint_every=1000)
    master, slave = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", CLAIM_TTY, "-m", "loractl", "train", str(config)],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    screen = b""

    def drain() -> None:
        nonlocal screen
        while select.select([master], [], [], 0)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child side is gone
                return
            if not chunk:
                return
            screen += chunk

    try:
        wait_for(
            lambda: drain() or proc.poll() is not None or logged_steps(tmp_path / "adapters") >= 2,
            120,
        )
        assert proc.poll() is None, screen.decode(errors="replace")
        os.write(master, b"\x03")
        wait_for(lambda: drain() or proc.poll() is not None, 120)
        drain()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(master)
    text = screen.decode(errors="replace")
    assert proc.returncode == ExitCode.STOPPED, text
    assert "stopped at step" in text and "Traceback" not in text
    assert log_events(tmp_path / "adapters", "stopped on request")
