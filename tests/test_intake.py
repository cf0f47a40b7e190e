"""Jobs arriving through the watched inbox of a real, running supervisor."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import yaml

from conftest import wait_for
from loractl.client.control import request
from loractl.client.harness import SupervisorProcess
from loractl.protocol import ListRequest, StatusRequest

COUNT = 500


@pytest.fixture
def held(tmp_path):
    """A supervisor that queues jobs but starts none, so 500 jobs cost no training."""
    sup = SupervisorProcess(tmp_path / "home", LORACTL_HOLD_QUEUE="1")
    yield sup
    sup.stop()


def config_text(tmp_path: Path, index: int) -> str:
    for folder in ("model", "data"):
        (tmp_path / folder).mkdir(exist_ok=True)
    return yaml.safe_dump(
        {
            "name": f"job-{index:03d}",
            "model": str(tmp_path / "model"),
            "data": str(tmp_path / "data"),
            "iters": 10 + index,
        }
    )


def drop(inbox: Path, tmp_path: Path, rng: random.Random) -> None:
    """Write configs the ways real tools do: in pieces, or as .tmp renamed into place."""
    for index in range(COUNT):
        text = config_text(tmp_path, index).encode()
        target = inbox / f"job-{index:03d}.yaml"
        if index % 5 == 0:
            tmp = inbox / f"job-{index:03d}.yaml.tmp"
            tmp.write_bytes(text)
            os.rename(tmp, target)
        else:
            with target.open("wb") as handle:
                half = rng.randrange(1, len(text))
                handle.write(text[:half])
                handle.flush()
                handle.write(text[half:])


def queued_names(sup: SupervisorProcess) -> list[str]:
    return [job["name"] for job in request(sup.layout, ListRequest(), timeout=10).data["jobs"]]


def test_five_hundred_configs_at_once_queue_exactly_five_hundred_jobs(tmp_path, held):
    """500 configs written non-atomically into the live inbox become 500 jobs, none twice."""
    held.start()
    drop(held.layout.inbox, tmp_path, random.Random(1))
    names = wait_for(lambda: len(n := queued_names(held)) >= COUNT and n, 120, interval=0.5)
    wait_for(lambda: not any(p.is_file() for p in held.layout.inbox.iterdir()), 60)
    names = queued_names(held)
    assert len(names) == COUNT
    assert sorted(names) == [f"job-{i:03d}" for i in range(COUNT)]


def test_configs_dropped_while_the_daemon_is_down_are_queued_at_start(tmp_path, held):
    """Files waiting in the inbox before the supervisor starts are all picked up once."""
    held.layout.inbox.mkdir(parents=True)
    drop(held.layout.inbox, tmp_path, random.Random(2))
    held.start()
    wait_for(lambda: len(queued_names(held)) >= COUNT, 120, interval=0.5)
    wait_for(lambda: not any(p.is_file() for p in held.layout.inbox.iterdir()), 60)
    names = queued_names(held)
    assert sorted(names) == [f"job-{i:03d}" for i in range(COUNT)]


def test_invalid_configs_are_rejected_with_a_reason_and_the_daemon_keeps_serving(tmp_path, held):
    """Bad files land in rejected/ with an .error.txt naming the problem; status still works."""
    held.start()
    inbox = held.layout.inbox
    cases = {
        "typo.yaml": ("model: m\ndata: d\nlearnig_rate: 1\n", "learning_rate"),
        "garbage.json": (b"\x00\xff\xfe binary", "binary data"),
        "huge.yaml": ("# pad\n" * 400_000, "1 MB"),
        "negative.yaml": (config_text(tmp_path, 1) + "batch_size: -4\n", "batch_size"),
    }
    for name, (content, _) in cases.items():
        data = content if isinstance(content, bytes) else content.encode()
        (inbox / name).write_bytes(data)
    os.symlink("/etc/passwd", inbox / "passwd.yaml")
    rejected = inbox / "rejected"
    for name, (_, needle) in cases.items():
        error = wait_for(lambda n=name: (rejected / f"{n}.error.txt").exists(), 60)
        assert error
        assert needle in (rejected / f"{name}.error.txt").read_text(), name
    wait_for(lambda: (rejected / "passwd.yaml.error.txt").exists(), 60)
    assert "outside" in (rejected / "passwd.yaml.error.txt").read_text()
    assert Path("/etc/passwd").exists()
    assert request(held.layout, StatusRequest()).ok
    (inbox / "fine.yaml").write_text(config_text(tmp_path, 7))
    wait_for(lambda: "job-007" in queued_names(held), 30)
