"""Text signatures of memory failures, shared by the trainer (to catch them in-process) and the
supervisor (to classify a dead trainer's stderr tail). One list, never copied."""

from __future__ import annotations

import errno
import re

# Each pattern is a failure to get memory, on Metal, CUDA or the CPU allocator.
MEMORY_ERROR_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        r"\bMemoryError\b",
        r"\[metal::malloc\]",
        r"\[malloc\]",
        r"Insufficient Memory",
        r"kIOGPUCommandBufferCallbackErrorOutOfMemory",
        r"cudaMalloc\w*\(.*\) failed: out of memory",
        r"\bout of memory\b",
        r"Unable to allocate",
        r"std::bad_alloc",
    )
)

# The GPU watchdog kills long command buffers; it looks like a Metal error but is not memory.
GPU_WATCHDOG_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (r"Impacting Interactivity", r"kIOGPUCommandBufferCallbackErrorTimeout")
)


def is_gpu_watchdog(text: str) -> bool:
    return any(p.search(text) for p in GPU_WATCHDOG_PATTERNS)


def is_memory_error_text(text: str) -> bool:
    if is_gpu_watchdog(text):
        return False
    return any(p.search(text) for p in MEMORY_ERROR_PATTERNS)


def is_memory_exception(exc: BaseException) -> bool:
    """Whether an exception raised inside a training step is an allocation failure."""
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and is_memory_error_text(str(exc))


# MLX's Metal allocator refuses a new buffer once the process holds iogpu.rsrc_limit of them
# (499000 by default), whatever memory is free: "[metal::malloc] Resource limit (499000)
# exceeded." (mlx/backend/metal/allocator.cpp; mlx issue #4464). It counts buffers, not bytes,
# so a cheaper rung does not help; a restart, which frees every buffer, does.
RESOURCE_LIMIT_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"\[metal::malloc\] Resource limit \(\d+\) exceeded", re.IGNORECASE),
)


# ENOSPC and EDQUOT as Python, SQLite and safetensors word them.
DISK_FULL_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"No space left on device|Disk quota exceeded|\[Errno (28|122|69)\]"),
    re.compile(r"database or disk is full", re.IGNORECASE),
)


def is_disk_full_text(text: str) -> bool:
    """Whether the last error line in ``text`` says the disk (or the quota) is full."""
    lines = [line for line in text.splitlines() if line.strip()]
    return any(p.search(line) for line in lines[-3:] for p in DISK_FULL_PATTERNS)


def is_disk_full_error(exc: BaseException) -> bool:
    """Whether an exception (or its message: MLX's savers raise RuntimeError) means ENOSPC."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(p.search(str(exc)) for p in DISK_FULL_PATTERNS)


def is_resource_limit_text(text: str) -> bool:
    """Whether the last allocation failure in ``text`` is MLX's buffer-count limit."""
    for line in reversed(text.splitlines()):
        if any(p.search(line) for p in RESOURCE_LIMIT_PATTERNS):
            return True
        if is_memory_error_text(line):
            return False
    return False
