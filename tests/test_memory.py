"""Memory readings shared by the trainer and the supervisor: the cgroup limit that a default
budget must respect, read from fake /proc and /sys trees laid out as Linux lays them out."""

from __future__ import annotations

from pathlib import Path

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
