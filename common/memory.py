"""Process memory readings shared by the trainer and the supervisor (no mlx here).

On macOS the number that matters is ``phys_footprint``: it is what Activity Monitor shows and
what the kernel's memory-pressure machinery acts on, and unlike RSS it counts compressed and
GPU-wired memory that Metal allocations land in. On Linux RSS is the honest equivalent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import psutil

MB = 1024 * 1024

_RUSAGE_INFO_V2 = 2


class _RusageInfoV2(ctypes.Structure):
    # Layout of struct rusage_info_v2 from <sys/resource.h>; phys_footprint is what we need.
    _fields_ = [
        ("ri_uuid", ctypes.c_uint8 * 16),
        ("ri_user_time", ctypes.c_uint64),
        ("ri_system_time", ctypes.c_uint64),
        ("ri_pkg_idle_wkups", ctypes.c_uint64),
        ("ri_interrupt_wkups", ctypes.c_uint64),
        ("ri_pageins", ctypes.c_uint64),
        ("ri_wired_size", ctypes.c_uint64),
        ("ri_resident_size", ctypes.c_uint64),
        ("ri_phys_footprint", ctypes.c_uint64),
        ("ri_proc_start_abstime", ctypes.c_uint64),
        ("ri_proc_exit_abstime", ctypes.c_uint64),
        ("ri_child_user_time", ctypes.c_uint64),
        ("ri_child_system_time", ctypes.c_uint64),
        ("ri_child_pkg_idle_wkups", ctypes.c_uint64),
        ("ri_child_interrupt_wkups", ctypes.c_uint64),
        ("ri_child_pageins", ctypes.c_uint64),
        ("ri_child_elapsed_abstime", ctypes.c_uint64),
        ("ri_diskio_bytesread", ctypes.c_uint64),
        ("ri_diskio_byteswritten", ctypes.c_uint64),
    ]


_libproc: ctypes.CDLL | None = None
if sys.platform == "darwin":  # pragma: no cover - exercised on macOS only
    _path = ctypes.util.find_library("proc")
    if _path:
        _libproc = ctypes.CDLL(_path, use_errno=True)


def _phys_footprint(pid: int) -> int | None:  # pragma: no cover - macOS only
    if _libproc is None:
        return None
    info = _RusageInfoV2()
    if _libproc.proc_pid_rusage(pid, _RUSAGE_INFO_V2, ctypes.byref(info)) != 0:
        return None
    return int(info.ri_phys_footprint)


def footprint_bytes(pid: int) -> int:
    """The process footprint: phys_footprint on macOS, RSS elsewhere. Raises if pid is gone."""
    if sys.platform == "darwin":  # pragma: no cover - macOS only
        value = _phys_footprint(pid)
        if value is not None:
            return value
    return int(psutil.Process(pid).memory_info().rss)


def footprint_mb(pid: int) -> float:
    return footprint_bytes(pid) / MB


def available_mb() -> float:
    return psutil.virtual_memory().available / MB


def total_mb() -> float:
    return psutil.virtual_memory().total / MB


# cgroup v1 writes "no limit" as the largest page-aligned 64-bit value.
_V1_UNLIMITED = 1 << 62


def cgroup_memory_limit_mb(proc_root: str = "/proc", sys_root: str = "/sys") -> float | None:
    """The memory limit of this process's cgroup (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``), the lowest along its ancestors, in MB; None without one.

    The Linux twin of a Mac's RAM for a job: past it the kernel OOM-kills the trainer, so a
    default budget taken from RAM alone would let the guard watch the trainer die."""
    from pathlib import Path

    try:
        lines = (Path(proc_root) / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    mounts = Path(sys_root) / "fs" / "cgroup"
    limits: list[int] = []
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if "memory" in controllers.split(","):
            root, name = mounts / "memory", "memory.limit_in_bytes"
        elif hierarchy == "0" and controllers == "":
            root, name = mounts, "memory.max"
        else:
            continue
        # Without a cgroup namespace the path may not exist under this mount: its nearest
        # ancestor that does is the one that limits us.
        folder = root / path.strip().lstrip("/")
        while True:
            try:
                text = (folder / name).read_text().strip()
            except OSError:
                text = ""
            if text.isdigit() and int(text) < _V1_UNLIMITED:
                limits.append(int(text))
            if folder == root or root not in folder.parents:
                break
            folder = folder.parent
    return min(limits) / MB if limits else None


def memory_limit_mb() -> float:
    """What a job may count on: the machine's RAM, or its cgroup's limit when lower."""
    limit = cgroup_memory_limit_mb()
    return min(total_mb(), limit) if limit is not None else total_mb()


# mallopt(3)'s parameter number for the mmap threshold (M_MMAP_THRESHOLD in <malloc.h>).
_M_MMAP_THRESHOLD = -3
# glibc's own starting threshold: allocations above it get mappings of their own.
MMAP_THRESHOLD_BYTES = 128 * 1024


def return_freed_buffers_to_the_os() -> bool:
    """Fix glibc's mmap threshold so that a freed large buffer leaves the footprint at once;
    True when it was set here.

    MLX's CPU backend allocates its arrays with malloc. glibc serves a block above the mmap
    threshold with a mapping of its own and unmaps it on free, but each such free raises the
    threshold to the block's size (up to 32 MB): later blocks of that size come from the heap
    and stay resident once freed. A trainer's footprint, which the guard holds to the budget,
    so ratcheted up over its first steps and stayed at its highest (ladder preset, seq 128: a
    flat 187 MB after the first steps, the pre-flight's peak being 171 MB; with the threshold
    fixed, 170-174 MB between steps and up to 186 MB inside one, at the same step time).
    Setting the threshold turns that adjustment off. A threshold the user set
    (``MALLOC_MMAP_THRESHOLD_``) is left alone; elsewhere (macOS: libmalloc, and Metal's
    buffers are not malloc's) there is nothing to do.
    """
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
