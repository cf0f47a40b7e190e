"""The one door through which loractl runs launchctl, systemctl and loginctl.

Every call to a service manager goes through a ``CommandRunner``, so tests replace the whole
outside world with one hand-written fake that answers from recorded outputs.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from typing import Protocol

# The shell's convention, kept so a missing tool reads the same as in a terminal.
COMMAND_NOT_FOUND = 127
TIMED_OUT = 124


class CommandRunner(Protocol):
    def run(self, argv: Sequence[str]) -> tuple[int, str, str]:
        """Run ``argv`` and return (returncode, stdout, stderr); never raise for a failed tool."""
        ...


class SubprocessRunner:
    """Runs the real tools, with a timeout: launchctl can hang while launchd is busy."""

    def __init__(self, timeout: float = 60.0):
        self.timeout = timeout

    def run(self, argv: Sequence[str]) -> tuple[int, str, str]:
        try:
            done = subprocess.run(
                list(argv), capture_output=True, text=True, timeout=self.timeout, check=False
            )
        except FileNotFoundError:
            return COMMAND_NOT_FOUND, "", f"{argv[0]}: command not found"
        except subprocess.TimeoutExpired:
            return TIMED_OUT, "", f"{' '.join(argv)} gave no answer within {self.timeout:g}s"
        return done.returncode, done.stdout, done.stderr
