"""Memory readings shared by the trainer and the supervisor: the cgroup limit that a default
budget must respect, read from fake /proc and /sys trees laid out as Linux lays them out; and
the trainer's fixed malloc threshold, in real processes."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from loractl.memory import MB, cgroup_memory_limit_mb, memory_limit_mb, total_mb


def lay_out(root: Path, cgroup_lines: str, files: dict[str, str]) -> tuple[str, str]:
    proc, sys = root / "proc", root / "sys"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup_lines)
    for relative, text in files.items():
        path = sys / "fs" / "cgroup" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(proc), str(sys)


def test_a_v2_limit_is_read_from_memory_max(tmp_path):
    """cgroup v2: the job's own memory.max, in MB."""
    proc, sys = lay_out(tmp_path, "0::/jobs/one\n", {"jobs/one/memory.max": f"{512 * MB}\n"})
    assert cgroup_memory_limit_mb(proc, sys) == 512


def test_the_lowest_limit_among_the_ancestors_wins(tmp_path):
    """A parent's lower limit binds the child whose own is "max"."""
    files = {"jobs/memory.max": f"{256 * MB}\n", "jobs/one/memory.max": "max\n"}
    proc, sys = lay_out(tmp_path, "0::/jobs/one\n", files)
    assert cgroup_memory_limit_mb(proc, sys) == 256


def test_a_v1_limit_and_its_unlimited_value(tmp_path):
    """cgroup v1: limit_in_bytes under the memory hierarchy; its huge "no limit" is none."""
    lines = "4:memory:/box\n0::/\n"
    proc, sys = lay_out(tmp_path, lines, {"memory/box/memory.limit_in_bytes": f"{300 * MB}"})
    assert cgroup_memory_limit_mb(proc, sys) == 300
    unlimited = {"memory/box/memory.limit_in_bytes": "9223372036854771712"}
    proc, sys = lay_out(tmp_path / "2", lines, unlimited)
    assert cgroup_memory_limit_mb(proc, sys) is None


def test_a_path_missing_under_the_mount_falls_back_to_the_mount_root(tmp_path):
    """Without a cgroup namespace /proc names a path the container cannot see: the mount's
    own limit applies."""
    lines = "4:memory:/process_api/abc\n"
    proc, sys = lay_out(tmp_path, lines, {"memory/memory.limit_in_bytes": f"{1024 * MB}"})
    assert cgroup_memory_limit_mb(proc, sys) == 1024


def test_no_cgroup_file_means_no_limit_and_ram_is_what_counts(tmp_path):
    """Off Linux (or without /proc) there is no cgroup: the machine's RAM is the limit."""
    assert cgroup_memory_limit_mb(str(tmp_path / "none"), str(tmp_path / "none")) is None
    assert 0 < memory_limit_mb() <= total_mb()


# Frees a 16 MB block once (which raises glibc's dynamic mmap threshold past 16 MB), then
# allocates, touches and frees another with a small block after it; prints the MB that stay
# resident, and whether the threshold was fixed first.
RETAINED_SCRIPT = """
import ctypes, sys
import psutil
from loractl.memory import return_freed_buffers_to_the_os
fixed = return_freed_buffers_to_the_os() if sys.argv[1] == "fix" else False
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 16 << 20
block = libc.malloc(size); ctypes.memset(block, 1, size); libc.free(block)
before = psutil.Process().memory_info().rss
block = libc.malloc(size); ctypes.memset(block, 1, size)
after_it = libc.malloc(4096)
libc.free(block)
print((psutil.Process().memory_info().rss - before) / (1 << 20), fixed)
"""


def retained_mb(mode: str, **env: str) -> tuple[float, bool]:
    out = subprocess.run(
        [sys.executable, "-c", RETAINED_SCRIPT, mode],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    ).stdout.split()
    return float(out[0]), out[1] == "True"


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's dynamic mmap threshold is a Linux glibc behaviour",
)
def test_a_fixed_mmap_threshold_hands_a_freed_large_buffer_back():
    """Without the fix a freed 16 MB buffer stays resident; with it, it leaves the footprint."""
    kept, fixed = retained_mb("leave")
    assert not fixed and kept >= 12, kept
    kept, fixed = retained_mb("fix")
    assert fixed and kept <= 2, kept


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux glibc only")
def test_a_threshold_the_user_set_is_left_alone():
    """MALLOC_MMAP_THRESHOLD_ in the environment is the user's choice: the trainer keeps it."""
    _, fixed = retained_mb("fix", MALLOC_MMAP_THRESHOLD_="33554432")
    assert not fixed
