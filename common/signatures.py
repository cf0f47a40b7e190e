"""Text signatures of memory failures, shared by the trainer (to catch them in-process) and the
supervisor (to classify a dead trainer's stderr tail). One list, never copied."""

from __future__ import annotations

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
