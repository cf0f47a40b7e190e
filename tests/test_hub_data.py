"""Hugging Face datasets through mlx-lm's load_dataset: cached ones offline, missing ones fast.

This machine reaches no network but the package registries, so these tests see what a user
without a connection sees: a dataset in the local Hugging Face cache loads, one that is not
fails within seconds as a data error, and the supervisor does not retry it.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_job, trainer_command, trainer_env
from loractl.client.harness import SupervisorProcess
from loractl.daemon.hub import endpoint_reachable
from loractl.protocol import ExitCode

CACHED = "loractl-test/tiny-set"


def cache_hub_dataset(hf_home: Path, repo_id: str, source: Path) -> None:
    """Leave ``source``'s train/valid JSONL in a Hugging Face cache as a download of
    ``repo_id`` would: Arrow files under ``datasets/<org>___<name>/default/0.0.0/<hash>``."""
    from datasets.packaged_modules.json.json import Json

    org, name = repo_id.split("/")
    cache = hf_home / "datasets"
    builder = Json(
        cache_dir=str(cache),
        dataset_name=name,
        config_name="default",
        hash="0123456789abcdef",
        data_files={split: str(source / f"{split}.jsonl") for split in ("train", "valid")},
    )
    builder.download_and_prepare()
    target = cache / f"{org}___{name}" / "default" / "0.0.0"
    target.mkdir(parents=True)
    shutil.move(builder.cache_dir, target)
    shutil.rmtree(cache / name)


@pytest.fixture(scope="module")
def hf_home(tiny_workspace, tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("hf")
    cache_hub_dataset(home, CACHED, tiny_workspace / "data")
    return home


def train(config: Path, hf_home: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = trainer_env(HF_HOME=str(hf_home))
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        env.pop(name, None)
    began = time.monotonic()
    result = subprocess.run(
        trainer_command(config), env=env, capture_output=True, text=True, timeout=240
    )
    return result, time.monotonic() - began


def logged(folder: Path, kind: str) -> list[dict]:
    lines = (folder / "adapters" / "train.log").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == kind]


def test_probe_answers_within_its_timeout():
    """A closed port is unreachable at once; a listening one is reachable."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert endpoint_reachable(f"http://127.0.0.1:{port}", timeout=2)
    began = time.monotonic()
    assert not endpoint_reachable(f"http://127.0.0.1:{port}", timeout=2)
    assert time.monotonic() - began < 2.5


@pytest.mark.parametrize(
    "data", [{"data": "loractl-test/not-cached"}, {"hf_dataset": {"path": "loractl-test/absent"}}]
)
def test_hub_dataset_without_network_fails_fast_as_a_data_error(
    tiny_workspace, tmp_path, hf_home, data
):
    """A Hub dataset that is not cached fails within seconds, exit 65, naming it, no traceback."""
    # make_job also writes the local 'data'; hf_dataset wins over it, as in mlx-lm.
    config = make_job(tiny_workspace, tmp_path, **data)
    result, seconds = train(config, hf_home)
    assert result.returncode == ExitCode.DATA_ERROR, result.stderr
    name = data.get("data") or data["hf_dataset"]["path"]
    assert f"cannot load Hugging Face dataset {name}" in result.stderr
    assert "not in the local cache" in result.stderr
    assert "Traceback" not in result.stderr
    # Start-up (imports, model) takes a few seconds; the libraries' own retries take 25 more.
    assert seconds < 15, seconds


def test_cached_hub_dataset_trains_offline(tiny_workspace, tmp_path, hf_home):
    """`data: org/name` already in the local cache trains with no network."""
    config = make_job(tiny_workspace, tmp_path, data=CACHED, iters=8)
    result, _ = train(config, hf_home)
    assert result.returncode == 0, result.stderr
    assert "cannot be reached; using the local cache" in result.stderr
    training = logged(tmp_path, "training")[0]
    assert training["data"] == CACHED and training["epoch_examples"] == 64
    assert logged(tmp_path, "step")[-1]["examples_seen"] == 8


def test_cached_hf_dataset_with_its_splits_trains_offline(tiny_workspace, tmp_path, hf_home):
    """`hf_dataset` with split slices loads through mlx-lm from the cache, as it would online."""
    config = make_job(
        tiny_workspace,
        tmp_path,
        hf_dataset={"path": CACHED, "train_split": "train[:50%]", "valid_split": "valid"},
        epochs=1,
        grad_accumulation_steps=2,
    )
    result, _ = train(config, hf_home)
    assert result.returncode == 0, result.stderr
    assert logged(tmp_path, "training")[0]["epoch_examples"] == 32
    assert logged(tmp_path, "eval"), "the valid split was not used"


def test_supervisor_does_not_retry_an_unreachable_hub_dataset(tiny_workspace, tmp_path, hf_home):
    """Under the supervisor the same failure is a data error on the first attempt."""
    supervisor = SupervisorProcess(tmp_path / "home", HF_HOME=str(hf_home))
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        supervisor.env.pop(name, None)
    supervisor.start()
    try:
        config = make_job(tiny_workspace, tmp_path / "src", data="loractl-test/not-cached")
        job_id = supervisor.submit(config)
        job = supervisor.wait_state(job_id, {"failed", "completed"}, timeout=120)
    finally:
        supervisor.stop()
    assert job["state"] == "failed" and job["outcome"] == "failed:data_error"
    assert job["attempts"] == 1
    assert "loractl-test/not-cached" in job["reason"]


def test_datasets_import_stays_out_of_local_training():
    """Training from a local folder never imports datasets (pyarrow, pandas: ~100 MB)."""
    code = (
        "import sys, loractl.daemon.data, loractl.daemon.trainer; print('datasets' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
