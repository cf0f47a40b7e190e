"""The supervisor's tunables, in one frozen dataclass.

Each can be set with ``LORACTL_<NAME>`` in the environment: tests shorten the timers, and a
service definition can set what a user wants changed without a config file of its own.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass
from typing import Any


@dataclass(frozen=True)
class Settings:
    """Supervisor tunables. Each can be set with LORACTL_<NAME> (tests shorten the timers)."""

    backoff_base_s: float = 1.0
    backoff_cap_s: float = 60.0
    early_death_limit: int = 3
    stop_grace_s: float = 60.0  # SIGTERM -> SIGKILL when the trainer should checkpoint first
    # Far over budget (this many times it) or at critical pressure, the Mac is at risk: the
    # grace shrinks to what one checkpoint needs.
    runaway_factor: float = 1.5
    checkpoint_grace_s: float = 10.0
    # A trainer asked to stop that still grows by this much is not checkpointing; kill it.
    still_growing_mb: float = 256.0
    hang_grace_s: float = 5.0  # a hung trainer will not checkpoint; do not wait long
    startup_timeout_s: float = 300.0  # spawn -> first heartbeat
    stall_min_s: float = 120.0
    stall_factor: float = 10.0
    tick_s: float = 0.1
    guard_interval_s: float = 0.2
    pressure_interval_s: float = 1.0
    warn_action_interval_s: float = 30.0
    default_budget_fraction: float = 0.7
    exit_timeout_s: float = 90.0
    # A file holding a kern.memorystatus_vm_pressure_level value (1, 2 or 4): a stand-in for
    # sysctl, which cannot exist off macOS, so tests can drive the memory guard.
    pressure_level_file: str = ""
    # Accept and queue jobs but start none (maintenance, or testing the intake on its own).
    hold_queue: bool = False
    # Desktop notifications for jobs that set ``notify: true``; 0 turns them off for all.
    notifications: bool = True
    # Replaces osascript / notify-send; gets the title and the message as two arguments.
    notify_cmd: str = ""
    # Hold a power assertion (caffeinate, systemd-inhibit) while a trainer runs.
    keep_awake: bool = True
    # Replaces caffeinate / systemd-inhibit; gets the trainer's pid as its argument.
    keep_awake_cmd: str = ""
    # After the database's disk filled up, writes resume once this much is free again.
    disk_resume_mb: float = 8.0
    # The address ranks on other Macs reach this supervisor at (default: this machine's
    # address on the route to the job's first remote host).
    telemetry_address: str = ""
    # How a memory stop steps down: "learning" (the job's memory model picks the first rung
    # predicted to fit, skipping rungs that would not help) or "blind" (one rung, the recipe).
    ladder_policy: str = "learning"
    # The share of the budget a rung's predicted peak must stay under.
    ladder_margin: float = 0.10

    @classmethod
    def from_env(cls) -> Settings:
        values: dict[str, Any] = {}
        for name, spec in cls.__dataclass_fields__.items():
            raw = os.environ.get(f"LORACTL_{name.upper()}")
            if raw is None:
                continue
            default = spec.default
            assert default is not MISSING, f"setting {name} has no default"
            if isinstance(default, bool):
                values[name] = raw.strip().lower() in ("1", "true", "yes", "on")
            else:
                values[name] = type(default)(raw)
        return cls(**values)
