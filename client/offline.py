"""Read-only answers while the supervisor is down: `list`, `show`, `history`, `ladder` and
`logs` read the job database and the job folders themselves.

The replies have the shape the supervisor's own have (both are built by
``loractl.supervisor.jobview``), plus ``"offline": true``. Nothing is created, migrated or
written: the database is opened read-only, and a home without one has nothing to show.
Nothing here imports mlx or the trainer.
"""

from __future__ import annotations

from typing import Any

from loractl.paths import Layout
from loractl.protocol import (
    HistoryRequest,
    JobState,
    LadderRequest,
    ListRequest,
    Request,
    ShowRequest,
)

# What text output says above an answer read from the database.
MARK = "(supervisor not running)"

READABLE = (ListRequest, ShowRequest, HistoryRequest, LadderRequest)


class Unreadable(RuntimeError):
    """The database exists but cannot be read (another schema version, corrupt, locked)."""


def available(layout: Layout) -> bool:
    """Whether there is a job database to answer from."""
    return layout.database.is_file()


def answer(layout: Layout, message: Request) -> dict[str, Any]:
    """The reply data the supervisor would give ``message``, read from the database.

    Raises ``FileNotFoundError`` when the home has no database, ``JobNotFound`` (a
    ``KeyError``) for an unknown job, and ``Unreadable`` when the database cannot be read.
    """
    import sqlite3

    from loractl.supervisor import jobview
    from loractl.supervisor.store import JobNotFound, Store

    if not isinstance(message, READABLE):
        raise TypeError(f"{message.type} needs the supervisor")
    try:
        store = Store(layout.database, readonly=True)
    except FileNotFoundError:
        raise
    except (sqlite3.Error, RuntimeError, ValueError) as exc:
        raise Unreadable(f"cannot read {layout.database}: {exc}") from None
    warnings: list[str] = []  # a JOB name that several jobs share, said with the answer
    try:
        with store:
            if isinstance(message, ListRequest):
                states = {JobState(s) for s in message.states} if message.states else None
                data: dict[str, Any] = {
                    "jobs": [jobview.summary(job) for job in store.list(states)]
                }
                if message.rejected:
                    data["rejected"] = jobview.recent_rejections(layout.inbox, limit=None)
            elif isinstance(message, HistoryRequest):
                job, warnings = jobview.resolve(store, message.job)
                data = {"id": job.id, "events": store.events(job.id)}
            else:
                job, warnings = jobview.resolve(store, message.job)
                described = {**jobview.describe(job, store), "offline": True}
                if isinstance(message, ShowRequest):
                    data = {"job": described}
                else:
                    data = {"id": job.id, "rung": job.rung, "ladder": described["ladder"]}
            if warnings:
                data["warnings"] = warnings
    except JobNotFound:
        raise
    except sqlite3.Error as exc:
        raise Unreadable(f"cannot read {layout.database}: {exc}") from None
    return {**data, "offline": True}
