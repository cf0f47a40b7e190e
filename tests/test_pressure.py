"""System memory parsers on real tool output, and the Linux readers on fake /proc trees."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import FIXTURES
from loractl.supervisor.pressure import (
    MB,
    Pressure,
    SystemMemory,
    cgroup_oom_kill_count,
    linux_system_memory,
    macos_pressure_level,
    oom_kill_counter_file,
    parse_cgroup_oom_kills,
    parse_meminfo,
    parse_memory_pressure_output,
    parse_psi,
    parse_vm_stat,
    pressure_from_available,
    pressure_from_macos_level,
    pressure_from_psi,
    read_oom_kill_counter,
    read_system_memory,
)

MACOS = FIXTURES / "macos"
LINUX = FIXTURES / "linux"


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        (1, Pressure.NORMAL),
        (2, Pressure.WARN),
        (4, Pressure.CRITICAL),
        (0, Pressure.NORMAL),
        (6, Pressure.CRITICAL),
    ],
)
def test_macos_level_mapping(level, expected):
    """sysctl levels 1/2/4 map to normal/warn/critical, and odd values err toward the worse."""
    assert pressure_from_macos_level(level) is expected


def test_memory_pressure_output_fixture():
    """Every number of the real `memory_pressure` output is read, trailing spaces and all."""
    data = parse_memory_pressure_output((MACOS / "memory_pressure.txt").read_text())
    assert data["total_bytes"] == 34359738368
    assert data["total_pages"] == 2097152
    assert data["page_size"] == 16384
    assert data["total_pages"] * data["page_size"] == data["total_bytes"]
    assert data["free_percent"] == 86
    assert data["pages_free"] == 130619
    assert data["pages_purgeable"] == 21054
    assert data["pages_purged"] == 2022830
    assert data["swapins"] == 0 and data["swapouts"] == 0
    assert data["pages_active"] == 823439
    assert data["pages_inactive"] == 805512
    assert data["pages_speculative"] == 21899
    assert data["pages_throttled"] == 0
    assert data["pages_wired_down"] == 127722
    assert data["pages_used_by_compressor"] == 153447
    assert data["pages_decompressed"] == 5343241
    assert data["pages_compressed"] == 12544038
    assert data["pageins"] == 35398821
    assert data["pageouts"] == 847858
    assert len(data) == 19


def test_vm_stat_fixture():
    """The real `vm_stat` output gives its 16 KiB page size and every counter, quoted ones too."""
    data = parse_vm_stat((MACOS / "vm_stat.txt").read_text())
    assert data["page_size"] == 16384
    assert data["pages_free"] == 130912
    assert data["pages_active"] == 823431
    assert data["pages_inactive"] == 805511
    assert data["pages_wired_down"] == 127718
    assert data["translation_faults"] == 5220385534
    assert data["file_backed_pages"] == 438304
    assert data["anonymous_pages"] == 1212532
    assert data["pages_occupied_by_compressor"] == 153447
    assert data["pageins"] == 35398820
    assert data["swapouts"] == 0
    assert len(data) == 23


def test_the_two_macos_fixtures_read_the_same_counters():
    """memory_pressure and vm_stat, captured together, agree on their shared counters."""
    pressure_data = parse_memory_pressure_output((MACOS / "memory_pressure.txt").read_text())
    vm = parse_vm_stat((MACOS / "vm_stat.txt").read_text())
    assert pressure_data["page_size"] == vm["page_size"]
    assert pressure_data["pages_used_by_compressor"] == vm["pages_occupied_by_compressor"]
    assert pressure_data["pages_compressed"] == vm["compressions"]
    assert pressure_data["pages_decompressed"] == vm["decompressions"]
    assert pressure_data["pages_purged"] == vm["pages_purged"]
    assert pressure_data["pages_wired_down"] == pytest.approx(vm["pages_wired_down"], abs=100)


def test_psi_fixture():
    """The real /proc/pressure/memory gives both lines' averages as floats and totals as ints."""
    psi = parse_psi((LINUX / "pressure_memory.txt").read_text())
    assert psi == {
        "some": {"avg10": 0.0, "avg60": 0.16, "avg300": 0.19, "total": 2768896},
        "full": {"avg10": 0.0, "avg60": 0.16, "avg300": 0.19, "total": 2660415},
    }
    assert isinstance(psi["some"]["total"], int)


def test_psi_without_full_line():
    """A PSI file with only a `some` line still parses."""
    assert parse_psi("some avg10=1.50 avg60=0.00 avg300=0.00 total=7\n") == {
        "some": {"avg10": 1.5, "avg60": 0.0, "avg300": 0.0, "total": 7}
    }


def psi(some: float = 0.0, full: float = 0.0) -> dict:
    return {"some": {"avg10": some}, "full": {"avg10": full}}


@pytest.mark.parametrize(
    ("reading", "available", "total", "expected"),
    [
        (psi(), 8000, 16000, Pressure.NORMAL),
        (psi(some=9.99), 8000, 16000, Pressure.NORMAL),
        (psi(some=10.0), 8000, 16000, Pressure.WARN),
        (psi(some=50, full=9.99), 8000, 16000, Pressure.WARN),
        (psi(full=10.0), 8000, 16000, Pressure.CRITICAL),
        (psi(), 0.14 * 16000, 16000, Pressure.WARN),
        (psi(), 0.15 * 16000, 16000, Pressure.NORMAL),
        (psi(), 0.04 * 16000, 16000, Pressure.CRITICAL),
        (psi(some=20), 0.04 * 16000, 16000, Pressure.CRITICAL),
        (psi(), None, None, Pressure.NORMAL),
        ({}, 8000, 16000, Pressure.NORMAL),
    ],
)
def test_pressure_from_psi_thresholds(reading, available, total, expected):
    """full avg10 >= 10 or < 5% available is critical; some avg10 >= 10 or < 15% is warn."""
    assert pressure_from_psi(reading, available, total) is expected


def test_pressure_from_the_psi_fixture_is_normal():
    """The real, nearly idle PSI reading on a roomy machine is normal."""
    reading = parse_psi((LINUX / "pressure_memory.txt").read_text())
    assert pressure_from_psi(reading, 20000, 24000) is Pressure.NORMAL


def test_pressure_from_available_without_total():
    """Without a total there is no share to judge, so the reading stays normal."""
    assert pressure_from_available(10, 0) is Pressure.NORMAL
    assert pressure_from_available(10, 1000) is Pressure.CRITICAL


def test_meminfo_fixture():
    """The real /proc/meminfo gives kB sizes in MB and leaves unitless counts out."""
    data = parse_meminfo((LINUX / "meminfo.txt").read_text())
    assert data["MemTotal"] == 24683656 / 1024
    assert data["MemFree"] == 23425344 / 1024
    assert data["MemAvailable"] == 23867748 / 1024
    assert data["Cached"] == 598216 / 1024
    assert data["Active(anon)"] == 1548 / 1024
    assert data["VmallocTotal"] == 34359738367 / 1024
    assert data["Hugepagesize"] == 2.0
    assert "HugePages_Total" not in data


@pytest.mark.parametrize(
    ("fixture", "count"),
    [("cgroup_v1_memory.oom_control.txt", 0), ("cgroup_v2_memory.events.txt", 2)],
)
def test_cgroup_oom_kill_fixtures(fixture, count):
    """v1 oom_control and v2 memory.events give the exact oom_kill counter, not its neighbours."""
    assert parse_cgroup_oom_kills((LINUX / fixture).read_text()) == count


def test_cgroup_counter_missing_is_an_error():
    """An old v1 kernel without the oom_kill line is reported, not read as zero."""
    with pytest.raises(ValueError):
        parse_cgroup_oom_kills("oom_kill_disable 0\nunder_oom 0\n")


def fake_tree(tmp_path, cgroup_lines: str, files: dict[str, str]):
    proc, sys_root = tmp_path / "proc", tmp_path / "sys"
    (proc / "4242").mkdir(parents=True)
    (proc / "4242" / "cgroup").write_text(cgroup_lines)
    for rel, text in files.items():
        path = sys_root / "fs" / "cgroup" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return proc, sys_root


def test_cgroup_count_unified_v2(tmp_path):
    """A pure v2 process ("0::/path") is read from <path>/memory.events."""
    proc, sys_root = fake_tree(
        tmp_path,
        "0::/user.slice/loractl.service\n",
        {
            "user.slice/loractl.service/memory.events": (
                LINUX / "cgroup_v2_memory.events.txt"
            ).read_text()
        },
    )
    assert cgroup_oom_kill_count(4242, proc_root=proc, sys_root=sys_root) == 2


def test_cgroup_count_hybrid_prefers_v1_memory(tmp_path):
    """In a hybrid setup the v1 memory hierarchy holds the counter, not the unified one."""
    proc, sys_root = fake_tree(
        tmp_path,
        "5:cpu,cpuacct:/\n4:memory:/jobs/7\n0::/\n",
        {"memory/jobs/7/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"},
    )
    path = oom_kill_counter_file(4242, proc_root=proc, sys_root=sys_root)
    assert path == sys_root / "fs" / "cgroup" / "memory" / "jobs" / "7" / "memory.oom_control"
    assert read_oom_kill_counter(path) == 3
    path.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 4\n")
    assert read_oom_kill_counter(path) == 4


def test_cgroup_count_unavailable(tmp_path):
    """No such pid, no memory controller file, or no counter line all give None."""
    proc, sys_root = fake_tree(tmp_path, "0::/x\n", {})
    assert cgroup_oom_kill_count(4242, proc_root=proc, sys_root=sys_root) is None
    assert cgroup_oom_kill_count(999, proc_root=proc, sys_root=sys_root) is None
    proc, sys_root = fake_tree(
        tmp_path / "old", "3:memory:/\n", {"memory/memory.oom_control": "under_oom 0\n"}
    )
    assert cgroup_oom_kill_count(4242, proc_root=proc, sys_root=sys_root) is None
    assert read_oom_kill_counter(None) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads this machine's /proc")
def test_cgroup_count_of_this_process_is_the_real_counter():
    """On Linux our count is the oom_kill line of the real cgroup file it resolves to."""
    path = oom_kill_counter_file(os.getpid())
    if path is None:
        pytest.skip("no memory cgroup counter file here (no cgroup fs, or no memory controller)")
    assert path.is_relative_to("/sys/fs/cgroup")
    assert path.name in ("memory.oom_control", "memory.events")
    # Read before and after: an OOM kill in the cgroup between the reads cannot make it flaky.
    try:
        before = parse_cgroup_oom_kills(path.read_text())
    except ValueError:  # v1 before Linux 4.13 has no oom_kill line
        assert cgroup_oom_kill_count(os.getpid()) is None
        return
    count = cgroup_oom_kill_count(os.getpid())
    after = parse_cgroup_oom_kills(path.read_text())
    assert isinstance(count, int) and before <= count <= after


def write_proc(tmp_path, meminfo: str, psi_text: str | None):
    (tmp_path / "pressure").mkdir(parents=True, exist_ok=True)
    (tmp_path / "meminfo").write_text(meminfo)
    if psi_text is not None:
        (tmp_path / "pressure" / "memory").write_text(psi_text)
    return tmp_path


def test_linux_reading_from_fixtures(tmp_path):
    """The fixture /proc tree yields meminfo's numbers and PSI as the source."""
    root = write_proc(
        tmp_path,
        (LINUX / "meminfo.txt").read_text(),
        (LINUX / "pressure_memory.txt").read_text(),
    )
    assert linux_system_memory(root) == SystemMemory(
        Pressure.NORMAL, 23867748 / 1024, 24683656 / 1024, "psi+meminfo"
    )


def test_linux_reading_under_stall_and_without_psi(tmp_path):
    """A stalled PSI reads critical; without PSI, low MemAvailable alone reads warn."""
    meminfo = "MemTotal: 1000000 kB\nMemAvailable: 100000 kB\n"
    stalled = (
        "some avg10=80.00 avg60=1 avg300=1 total=1\nfull avg10=40.00 avg60=1 avg300=1 total=1\n"
    )
    assert linux_system_memory(write_proc(tmp_path / "a", meminfo, stalled)).pressure is (
        Pressure.CRITICAL
    )
    reading = linux_system_memory(write_proc(tmp_path / "b", meminfo, None))
    assert (reading.pressure, reading.source) == (Pressure.WARN, "meminfo")


def test_linux_reading_unavailable(tmp_path):
    """No meminfo, or one without MemAvailable, gives None so the caller falls back to psutil."""
    assert linux_system_memory(tmp_path / "nothing") is None
    assert linux_system_memory(write_proc(tmp_path, "MemTotal: 1000 kB\n", None)) is None


def test_read_system_memory_is_sane_here():
    """The real reading on this machine has a known pressure and 0 < available <= total."""
    reading = read_system_memory()
    assert reading.pressure in set(Pressure)
    assert 0 < reading.available_mb <= reading.total_mb
    assert reading.total_mb > 100
    if sys.platform.startswith("linux"):
        assert reading.source in ("psi+meminfo", "meminfo")
    elif sys.platform == "darwin":
        assert reading.source in ("sysctl", "psutil")


def test_macos_pressure_level_is_none_elsewhere_and_valid_on_macos():
    """Off macOS there is no sysctl to read; on macOS the level is one of 1, 2, 4."""
    level = macos_pressure_level()
    if sys.platform == "darwin":
        assert level in (1, 2, 4)
    else:
        assert level is None


@pytest.mark.skipif(sys.platform != "darwin", reason="runs macOS's memory_pressure and vm_stat")
def test_macos_reading_agrees_with_memory_pressure_and_vm_stat():
    """On a Mac the direct reading agrees with what memory_pressure and vm_stat print."""
    tools = {
        name: subprocess.run([f"/usr/bin/{name}"], capture_output=True, text=True, timeout=30)
        for name in ("memory_pressure", "vm_stat")
    }
    assert all(proc.returncode == 0 for proc in tools.values())
    pressure_data = parse_memory_pressure_output(tools["memory_pressure"].stdout)
    vm = parse_vm_stat(tools["vm_stat"].stdout)
    reading = read_system_memory()
    assert reading.source == "sysctl"
    assert reading.total_mb * MB == pytest.approx(pressure_data["total_bytes"], rel=0.01)
    assert pressure_data["page_size"] == vm["page_size"]
    # vm_stat's "Pages free" leaves out the speculative pages, which psutil counts as free.
    pages = vm["pages_free"] + vm["pages_speculative"] + vm["pages_inactive"]
    available_mb = pages * vm["page_size"] / MB
    assert abs(reading.available_mb - available_mb) < reading.total_mb / 10
