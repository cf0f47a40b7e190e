"""The supervisor's own log: JSON lines in ``<logs>/supervisor.log``, readable text on stderr.

The file is for machines and for after the fact (``loractl logs --daemon``, Console.app on a
Mac, a bug report); stderr is for a person running ``loractl daemon run`` in a terminal, and
is what launchd and systemd capture. Size-based rotation keeps a supervisor that runs for
months from filling the disk with its own chatter.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path
from typing import TextIO

import structlog
from structlog.typing import Processor

LOG_NAME = "supervisor.log"
MAX_BYTES = 5 * 1024 * 1024
BACKUPS = 3


def configure_logging(
    logs_dir: Path,
    max_bytes: int = MAX_BYTES,
    backups: int = BACKUPS,
    stream: TextIO | None = None,
) -> Path:
    """Route every ``structlog.get_logger("loractl...")`` record to both sinks; returns the
    log file's path. Called once, by the supervisor's entry point only: tests that build a
    Supervisor in-process keep structlog's defaults."""
    logs_dir.mkdir(parents=True, exist_ok=True)
    path = logs_dir / LOG_NAME
    shared: list[Processor] = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    to_file = logging.handlers.RotatingFileHandler(
        path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
    )
    to_file.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(default=str),
            ],
        )
    )
    to_stderr = logging.StreamHandler(stream or sys.stderr)
    to_stderr.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.dev.ConsoleRenderer(colors=False),
            ],
        )
    )
    root = logging.getLogger("loractl")
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.addHandler(to_file)
    root.addHandler(to_stderr)
    root.setLevel(logging.INFO)
    root.propagate = False
    return path
