"""Which service manager runs the supervisor here: the factory over launchd.py and systemd.py.

Callers hold a ``ServiceManager`` (interface.py) and never name an implementation: launchd on
macOS, systemd --user elsewhere, unless a target is given.
"""

from __future__ import annotations

from loractl.launchd.definition import DEFAULT_LABEL, LAUNCHD, TARGETS, ServiceError, default_target
from loractl.launchd.interface import ServiceManager, ServiceState
from loractl.launchd.launchd import LaunchdService
from loractl.launchd.runner import CommandRunner
from loractl.launchd.systemd import SystemdService
from loractl.paths import Layout


def service_manager(
    target: str | None = None,
    label: str | None = None,
    runner: CommandRunner | None = None,
) -> ServiceManager:
    """The manager for ``target`` (default: this OS's service manager)."""
    target = target or default_target()
    if target not in TARGETS:
        raise ServiceError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    manager = LaunchdService if target == LAUNCHD else SystemdService
    return manager(label or DEFAULT_LABEL, runner)


def service_state(
    layout: Layout,
    target: str | None = None,
    label: str | None = None,
    runner: CommandRunner | None = None,
) -> ServiceState:
    """The service manager's view of the supervisor service for ``layout`` (never raises for
    a missing or broken service manager: that is reported in ``detail``)."""
    return service_manager(target, label, runner).state(layout)
