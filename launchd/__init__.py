"""loractl.launchd: the supervisor as a LaunchAgent (macOS) or a systemd --user unit (Linux).

``build_definition`` decides what the service runs and renders either file on any OS;
``service_manager`` picks the ``ServiceManager`` that installs, removes and starts it;
``service_state`` reports what the service manager sees. All launchctl, systemctl and loginctl
calls go through a ``CommandRunner``.

- definition.py: the plist and the unit, pure (no service manager involved);
- interface.py: ``ServiceManager``, the one interface, and what it reports;
- launchd.py: ``LaunchdService``, everything launchctl;
- systemd.py: ``SystemdService``, everything systemctl and loginctl;
- manager.py: ``service_manager`` and ``service_state``, which pick one of the two;
- runner.py: ``CommandRunner``, the one door to the outside tools.
"""

from loractl.launchd.definition import (
    DEFAULT_LABEL,
    LAUNCHD,
    SYSTEMD,
    TARGETS,
    InvalidLabel,
    ServiceDefinition,
    ServiceError,
    build_definition,
    default_target,
    definition_path,
)
from loractl.launchd.interface import OperationResult, ServiceManager, ServiceState
from loractl.launchd.launchd import LaunchdService, parse_launchctl_print
from loractl.launchd.manager import service_manager, service_state
from loractl.launchd.runner import CommandRunner, SubprocessRunner
from loractl.launchd.systemd import NoUserSystemd, SystemdService

__all__ = [
    "DEFAULT_LABEL",
    "LAUNCHD",
    "SYSTEMD",
    "TARGETS",
    "CommandRunner",
    "InvalidLabel",
    "LaunchdService",
    "NoUserSystemd",
    "OperationResult",
    "ServiceDefinition",
    "ServiceError",
    "ServiceManager",
    "ServiceState",
    "SubprocessRunner",
    "SystemdService",
    "build_definition",
    "default_target",
    "definition_path",
    "parse_launchctl_print",
    "service_manager",
    "service_state",
]
