"""System memory readings for the memory guard and the crash classifier.

Each platform source has a pure parser (text in, numbers out), tested on real tool output in
``tests/fixtures``, kept apart from the few functions that touch the OS. Nothing here starts a
subprocess: the guard polls about once a second, and forking a tool that often would cost more
than the reading is worth.

On macOS the reading path asks the kernel directly: the pressure level through ``sysctl``
(``kern.memorystatus_vm_pressure_level``, the kernel's verdict that dispatch's memory-pressure
events carry) and the sizes through psutil (``host_statistics64``). ``parse_vm_stat`` and
``parse_memory_pressure_output`` are not on that path, and deliberately not its fallback: both
tools print what the same kernel interfaces (sysctl, ``host_statistics64``) report, so where
the direct read fails the tools fail too, and where it works they add a fork and nothing new.
They stay as the reference to check the direct read against: on a Mac, ``tests/test_pressure.py``
runs both tools once and compares what they print with ``read_system_memory``, and the fixtures
of their real output pin the parsers everywhere else.
"""

from __future__ import annotations

import ctypes
import re
import sys
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import psutil

MB = 1024 * 1024


class Pressure(StrEnum):
    NORMAL = "normal"
    WARN = "warn"
    CRITICAL = "critical"


# kern.memorystatus_vm_pressure_level reports the dispatch memory-pressure flags.
_MACOS_WARN = 2
_MACOS_CRITICAL = 4


def pressure_from_macos_level(level: int) -> Pressure:
    """Map ``kern.memorystatus_vm_pressure_level`` (1 normal, 2 warn, 4 critical)."""
    # The values are flag bits, so test bits: an unexpected combination errs toward the worse.
    if level & _MACOS_CRITICAL:
        return Pressure.CRITICAL
    if level & _MACOS_WARN:
        return Pressure.WARN
    return Pressure.NORMAL


def _key(label: str) -> str:
    """``Pages wired down`` -> ``pages_wired_down``; ``"Translation faults"`` likewise."""
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def parse_memory_pressure_output(text: str) -> dict[str, int]:
    """Numbers from macOS ``memory_pressure``: totals, page counts and the free percentage.

    Keys: ``total_bytes``, ``total_pages``, ``page_size``, ``free_percent`` and one per stats
    line (``pages_free``, ``swapouts``, ``pages_used_by_compressor``...). Lines carry trailing
    spaces, which are ignored.
    """
    result: dict[str, int] = {}
    header = re.search(r"The system has (\d+) \((\d+) pages with a page size of (\d+)\)", text)
    if header:
        result["total_bytes"] = int(header.group(1))
        result["total_pages"] = int(header.group(2))
        result["page_size"] = int(header.group(3))
    free = re.search(r"memory free percentage:\s*(\d+)%", text)
    if free:
        result["free_percent"] = int(free.group(1))
    for match in re.finditer(r"^([A-Za-z][A-Za-z /-]*):\s*(\d+)\s*$", text, re.MULTILINE):
        result[_key(match.group(1))] = int(match.group(2))
    return result


def parse_vm_stat(text: str) -> dict[str, int]:
    """Numbers from macOS ``vm_stat``: ``page_size`` and every counter (``pages_free``...)."""
    result: dict[str, int] = {}
    size = re.search(r"page size of (\d+) bytes", text)
    if size:
        result["page_size"] = int(size.group(1))
    for match in re.finditer(r'^"?([A-Za-z][^":]*)"?:\s*(\d+)\.?\s*$', text, re.MULTILINE):
        result[_key(match.group(1))] = int(match.group(2))
    return result


def parse_psi(text: str) -> dict[str, dict[str, float]]:
    """``/proc/pressure/memory`` -> ``{"some": {"avg10", "avg60", "avg300", "total"}, "full": …}``.

    The averages are percentages of wall time stalled; ``total`` is microseconds, an int.
    """
    result: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        kind, _, rest = line.strip().partition(" ")
        if kind not in ("some", "full"):
            continue
        values: dict[str, float] = {}
        for item in rest.split():
            name, _, value = item.partition("=")
            values[name] = int(value) if name == "total" else float(value)
        result[kind] = values
    return result


# Thresholds for Linux, where no kernel verdict exists. PSI "full" means every task was stalled
# on memory at once; 10% of the last 10 s is a machine that is thrashing. "some" at 10% is the
# first sign of reclaim hurting. Available memory catches the case PSI misses: no swap, so the
# OOM killer strikes before any stall builds up.
PSI_FULL_CRITICAL = 10.0
PSI_SOME_WARN = 10.0
AVAILABLE_CRITICAL_FRACTION = 0.05
AVAILABLE_WARN_FRACTION = 0.15


def pressure_from_available(mem_available_mb: float | None, mem_total_mb: float | None) -> Pressure:
    """Pressure judged from available memory alone: under 5% critical, under 15% warn."""
    if mem_available_mb is None or not mem_total_mb:
        return Pressure.NORMAL
    share = mem_available_mb / mem_total_mb
    if share < AVAILABLE_CRITICAL_FRACTION:
        return Pressure.CRITICAL
    if share < AVAILABLE_WARN_FRACTION:
        return Pressure.WARN
    return Pressure.NORMAL


def pressure_from_psi(
    psi: dict[str, dict[str, float]], mem_available_mb: float | None, mem_total_mb: float | None
) -> Pressure:
    """Critical if full avg10 >= 10 or available < 5%; warn if some avg10 >= 10 or < 15%."""
    full = psi.get("full", {}).get("avg10", 0.0)
    some = psi.get("some", {}).get("avg10", 0.0)
    by_available = pressure_from_available(mem_available_mb, mem_total_mb)
    if full >= PSI_FULL_CRITICAL or by_available is Pressure.CRITICAL:
        return Pressure.CRITICAL
    if some >= PSI_SOME_WARN or by_available is Pressure.WARN:
        return Pressure.WARN
    return Pressure.NORMAL


def parse_meminfo(text: str) -> dict[str, float]:
    """``/proc/meminfo`` -> MB for every ``kB`` line (``MemTotal``, ``MemAvailable``…).

    Unitless lines (``HugePages_Total``) are counts, not sizes, and are left out.
    """
    result: dict[str, float] = {}
    for match in re.finditer(r"^([\w()]+):\s+(\d+) kB\s*$", text, re.MULTILINE):
        result[match.group(1)] = int(match.group(2)) / 1024
    return result


def parse_cgroup_oom_kills(text: str) -> int:
    """The ``oom_kill`` counter of cgroup v2 ``memory.events`` or v1 ``memory.oom_control``.

    Raises ValueError when the line is missing (v1 before Linux 4.13 has no such counter).
    """
    for line in text.splitlines():
        parts = line.split()
        # Exact match: ``oom_kill_disable`` and ``oom_group_kill`` are other counters.
        if len(parts) == 2 and parts[0] == "oom_kill":
            return int(parts[1])
    raise ValueError("no oom_kill line")


def oom_kill_counter_file(
    pid: int, proc_root: str | Path = "/proc", sys_root: str | Path = "/sys"
) -> Path | None:
    """The file holding the oom_kill counter of ``pid``'s memory cgroup, or None.

    Resolve it while the process is alive: once it exits, cgroup v1 shows the zombie in the
    root cgroup, whose counter is a different one.
    """
    try:
        lines = (Path(proc_root) / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return None
    cgroup = Path(sys_root) / "fs" / "cgroup"
    v1 = v2 = None
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        rel = path.strip().lstrip("/")
        if "memory" in controllers.split(","):
            v1 = cgroup / "memory" / rel / "memory.oom_control"
        elif hierarchy == "0" and controllers == "":
            v2 = cgroup / rel / "memory.events"
    # In a hybrid setup both lines exist, and only the v1 hierarchy has the memory controller.
    for candidate in (v1, v2):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def read_oom_kill_counter(path: Path | None) -> int | None:
    """The counter in a file from ``oom_kill_counter_file``; None if it cannot be read."""
    if path is None:
        return None
    try:
        return parse_cgroup_oom_kills(path.read_text())
    except (OSError, ValueError):
        return None


def cgroup_oom_kill_count(
    pid: int, proc_root: str | Path = "/proc", sys_root: str | Path = "/sys"
) -> int | None:
    """OOM kills so far in ``pid``'s memory cgroup (Linux); None where there is no such counter.

    The supervisor wants the rise across a trainer's life, so it should keep the path from
    ``oom_kill_counter_file`` at spawn and re-read that: see the note there about zombies.
    """
    return read_oom_kill_counter(oom_kill_counter_file(pid, proc_root, sys_root))


_SYSCTL_PRESSURE = b"kern.memorystatus_vm_pressure_level"
_libc = None


def macos_pressure_level() -> int | None:
    """``kern.memorystatus_vm_pressure_level`` read through libc; None off macOS or on error."""
    if sys.platform != "darwin":
        return None
    global _libc
    try:  # pragma: no cover - macOS only
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.sysctlbyname.argtypes = [
                ctypes.c_char_p,
                ctypes.c_void_p,
                ctypes.POINTER(ctypes.c_size_t),
                ctypes.c_void_p,
                ctypes.c_size_t,
            ]
            _libc.sysctlbyname.restype = ctypes.c_int
        value = ctypes.c_int(0)
        size = ctypes.c_size_t(ctypes.sizeof(value))
        if _libc.sysctlbyname(_SYSCTL_PRESSURE, ctypes.byref(value), ctypes.byref(size), None, 0):
            return None
        return int(value.value)
    except (OSError, AttributeError):  # pragma: no cover - macOS only
        return None


@dataclass
class SystemMemory:
    pressure: Pressure
    available_mb: float
    total_mb: float
    source: str  # where the pressure verdict came from, for logs and the status view


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        # PSI can exist yet refuse reads (EOPNOTSUPP) when the kernel boots with psi=0.
        return None


def linux_system_memory(proc_root: str | Path = "/proc") -> SystemMemory | None:
    """Linux reading from ``/proc/meminfo`` and, if readable, ``/proc/pressure/memory``."""
    root = Path(proc_root)
    meminfo_text = _read(root / "meminfo")
    if meminfo_text is None:
        return None
    meminfo = parse_meminfo(meminfo_text)
    total = meminfo.get("MemTotal")
    available = meminfo.get("MemAvailable")
    if total is None or available is None:
        return None
    psi_text = _read(root / "pressure" / "memory")
    psi = parse_psi(psi_text) if psi_text else {}
    if psi:
        return SystemMemory(
            pressure_from_psi(psi, available, total), available, total, "psi+meminfo"
        )
    return SystemMemory(pressure_from_available(available, total), available, total, "meminfo")


def read_system_memory() -> SystemMemory:
    """System-wide pressure and memory: the kernel's own verdict on macOS, PSI on Linux."""
    if sys.platform == "darwin":  # pragma: no cover - macOS only
        vm = psutil.virtual_memory()
        available, total = vm.available / MB, vm.total / MB
        level = macos_pressure_level()
        if level is not None:
            return SystemMemory(pressure_from_macos_level(level), available, total, "sysctl")
        return SystemMemory(pressure_from_available(available, total), available, total, "psutil")
    if sys.platform.startswith("linux"):
        reading = linux_system_memory()
        if reading is not None:
            return reading
    vm = psutil.virtual_memory()
    available, total = vm.available / MB, vm.total / MB
    return SystemMemory(pressure_from_available(available, total), available, total, "psutil")
