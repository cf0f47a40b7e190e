"""This machine's memory pressure, read at most once per interval and shared by every reader
(the memory guard of the running attempt, `status`)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from loractl.supervisor.pressure import SystemMemory, pressure_from_macos_level, read_system_memory


class SystemMemoryReader:
    """The last reading of the system's memory, refreshed once it is ``interval_s`` old.

    ``level_file`` holds a kern.memorystatus_vm_pressure_level value (1, 2 or 4): a
    stand-in for sysctl, which cannot exist off macOS, so tests can drive the guard.
    """

    def __init__(self, interval_s: float, level_file: str = ""):
        self.interval_s = interval_s
        self.level_file = level_file
        self._last: SystemMemory | None = None
        self._next_read = 0.0

    def __call__(self) -> SystemMemory:
        now = time.monotonic()
        if self._last is None or now >= self._next_read:
            self._next_read = now + self.interval_s
            reading = read_system_memory()
            self._last = self._with_level_file(reading) if self.level_file else reading
        return self._last

    def _with_level_file(self, system: SystemMemory) -> SystemMemory:
        try:
            level = int(Path(self.level_file).read_text().strip())
        except (OSError, ValueError):
            return system
        return replace(system, pressure=pressure_from_macos_level(level), source="level-file")
