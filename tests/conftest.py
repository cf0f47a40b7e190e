"""Shared test helpers: a wait_for poller, the tiny model built once, and trainer runners."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loractl.supervisor.harness import wait_for  # noqa: F401  (re-exported for tests)

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
