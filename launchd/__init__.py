"""loractl.launchd: the supervisor as a LaunchAgent (macOS) or a systemd --user unit (Linux).

``build_definition`` decides what the service runs and renders either file on any OS;
``service_manager`` installs, removes and starts it; ``service_state`` reports what the service
manager sees. All launchctl, systemctl and loginctl calls go through a ``CommandRunner``.
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
from loractl.launchd.manager import (
    LaunchdService,
    NoUserSystemd,
    OperationResult,
    ServiceState,
    SystemdService,
    parse_launchctl_print,
    service_manager,
    service_state,
)
from loractl.launchd.runner import CommandRunner, SubprocessRunner

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
