"""Tests for the crash-proof checkpoints: the writer (loractl.daemon.checkpoint) and the
format's reader (loractl.checkpoints)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

from conftest import wait_for
from loractl.checkpoints import CheckpointReader, completed_in, verify
from loractl.daemon.checkpoint import CheckpointStore


def write_bytes(payload: bytes):
    def writer(path):
        path.write_bytes(payload)

    return writer


def save(store: CheckpointStore, step: int):
    return store.write(
        step,
        {"examples_seen": step * 4},
        {
            "adapters.safetensors": write_bytes(f"adapters {step}".encode() * 100),
            "optimizer.safetensors": write_bytes(f"optimizer {step}".encode() * 100),
        },
    )


def test_write_then_verify_round_trips_state(tmp_path):
    """A written checkpoint verifies and carries its state and file checksums."""
    store = CheckpointStore(tmp_path, keep=3)
    written = save(store, 5)
    loaded = verify(written.path)
    assert loaded.step == 5
    assert loaded.state["examples_seen"] == 20
    assert set(loaded.state["files"]) == {"adapters.safetensors", "optimizer.safetensors"}
    assert store.latest_name() == "step-00000005"


def test_keeps_only_the_last_k(tmp_path):
    """Older checkpoints are pruned down to ``keep``."""
    store = CheckpointStore(tmp_path, keep=2)
    for step in range(1, 6):
        save(store, step)
    assert [p.name for p in store.folders()] == ["step-00000005", "step-00000004"]


def test_flipped_byte_in_a_tensor_file_is_skipped_for_the_previous(tmp_path):
    """A single flipped byte fails the checksum and the previous checkpoint is used."""
    store = CheckpointStore(tmp_path, keep=3)
    save(store, 1)
    newest = save(store, 2)
    target = newest.path / "adapters.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    found, skipped = CheckpointReader(tmp_path).newest_valid()
    assert found.step == 1
    assert "adapters.safetensors fails its checksum" in skipped[0]


def test_edited_state_json_is_detected(tmp_path):
    """state.json guards itself: changing one value is caught even if it still parses."""
    store = CheckpointStore(tmp_path, keep=3)
    save(store, 1)
    newest = save(store, 2)
    state_file = newest.path / "state.json"
    edited = state_file.read_text().replace('"examples_seen": 8', '"examples_seen": 9')
    state_file.write_text(edited)
    found, skipped = CheckpointReader(tmp_path).newest_valid()
    assert found.step == 1
    assert "state.json fails its checksum" in skipped[0]


def test_dangling_latest_pointer_and_staging_leftovers_are_harmless(tmp_path):
    """A pointer to a vanished folder and a half-written staging folder are ignored."""
    store = CheckpointStore(tmp_path, keep=3)
    save(store, 3)
    (tmp_path / "latest").write_text("step-00000009")
    (tmp_path / ".step-00000004.tmp-123").mkdir()
    found, _ = CheckpointReader(tmp_path).newest_valid()
    assert found.step == 3


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from loractl.daemon.checkpoint import CheckpointStore

    root, marker = Path(sys.argv[1]), Path(sys.argv[2])
    store = CheckpointStore(root, keep=2)

    def slow(payload):
        def writer(path):
            with path.open("wb") as handle:
                for _ in range(50):
                    handle.write(payload)
                    handle.flush()
                    marker.write_text("writing")
                    time.sleep(0.01)
        return writer

    step = 0
    while True:
        step += 1
        store.write(step, {"examples_seen": step}, {
            "adapters.safetensors": slow(b"a" * 4096),
            "optimizer.safetensors": slow(b"o" * 4096),
        })
        if step == 2:
            marker.with_suffix(".ready").write_text("ok")
    """
)


def test_sigkill_during_a_write_leaves_the_previous_checkpoint_usable(tmp_path):
    """A real process killed with SIGKILL mid-write leaves a valid earlier checkpoint."""
    root = tmp_path / "ckpt"
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(marker)])
    try:
        wait_for(lambda: marker.with_suffix(".ready").exists(), timeout=60)
        # Wait until a third checkpoint is part-way through its tensor files.
        wait_for(lambda: any(root.glob(".step-00000003.tmp-*/adapters.safetensors")), 60)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    found, skipped = CheckpointReader(root).newest_valid()
    assert found is not None and found.step == 2
    assert skipped == []
    assert json.loads((found.path / "state.json").read_text())["examples_seen"] == 2


def test_completed_in_needs_every_example_and_the_matching_adapters(tmp_path):
    """A finished run is one whose newest checkpoint consumed every example and whose final
    adapters are that checkpoint's; anything short of that is not finished."""
    store = CheckpointStore(tmp_path / "checkpoints", keep=3)
    assert not completed_in(tmp_path)
    payload = b"adapters" * 100
    tensors = {
        "adapters.safetensors": write_bytes(payload),
        "optimizer.safetensors": write_bytes(b"optimizer" * 100),
    }
    store.write(1, {"examples_seen": 4, "total_examples": 8}, tensors)
    (tmp_path / "adapters.safetensors").write_bytes(payload)
    assert not completed_in(tmp_path)
    store.write(2, {"examples_seen": 8, "total_examples": 8}, tensors)
    assert completed_in(tmp_path)
    (tmp_path / "adapters.safetensors").write_bytes(b"other" * 100)
    assert not completed_in(tmp_path)


def test_the_reader_imports_neither_the_daemon_nor_mlx():
    """The supervisor reads checkpoints through loractl.checkpoints: it must stay light."""
    probe = (
        "import sys, loractl.checkpoints; "
        "print(sorted(m for m in sys.modules if m.startswith(('loractl.daemon', 'mlx'))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
