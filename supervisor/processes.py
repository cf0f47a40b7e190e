"""The process table as the supervisor's proof: which process is a trainer, of which job.

A heartbeat can claim any pid, and a pid can be reused, so before the supervisor signals,
adopts or trusts a process it checks it here, in one place and with one rigour: alive (not a
zombie), started when we first saw it (create time within a second), and running the trainer
module for the job in question.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil

# The trainer's module: how the supervisor starts it, and how its command line is known.
TRAINER_MODULE = "loractl.daemon.trainer"

# How far apart two readings of one process's create time may be (clock rounding).
START_TIME_SLACK_S = 1.0


def start_time(pid: int) -> float | None:
    """When ``pid`` started (its create time), or None if it is gone."""
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def process_alive(pid: int, started_at: float | None = None) -> bool:
    """Whether ``pid`` still runs and, given ``started_at``, is the process first seen under
    it (not a reuse of its pid)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started_at is None or abs(proc.create_time() - started_at) <= START_TIME_SLACK_S
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def is_trainer(pid: int, job_id: str | None = None, started_at: float | None = None) -> bool:
    """Whether ``pid`` is a live loractl trainer (of ``job_id``, when given, and the very
    process that started at ``started_at``, when given)."""
    if not process_alive(pid, started_at):
        return False
    try:
        cmdline = psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    if TRAINER_MODULE not in cmdline:
        return False
    return job_id is None or job_id in cmdline


def launched_by(pid: int, launcher_pid: int) -> float | None:
    """The create time of ``pid`` if it descends from ``launcher_pid``, else None."""
    try:
        proc = psutil.Process(pid)
        if launcher_pid not in (parent.pid for parent in proc.parents()):
            return None
        return float(proc.create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def trainers_under(launcher_pid: int) -> list[int]:
    """The pids of the trainers ``launcher_pid`` started on this machine, heard from or not."""
    try:
        children = psutil.Process(launcher_pid).children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []
    pids = []
    for child in children:
        try:
            if TRAINER_MODULE in child.cmdline():
                pids.append(child.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return pids


def biggest_consumer(pids: set[int]) -> bool:
    """Whether the process using the most memory on this machine is one of ``pids``."""
    biggest = max(
        psutil.process_iter(["pid", "memory_info"]),
        key=lambda p: p.info["memory_info"].rss if p.info["memory_info"] else 0,
        default=None,
    )
    return biggest is not None and biggest.info["pid"] in pids


def other_consumers(exclude: set[int], count: int = 3) -> list[tuple[str, float]]:
    """The ``count`` largest other processes by memory, as (name, MB), largest first: what
    else holds the memory a stopped trainer needed (a browser, a video call). Their footprint
    is read as the guard reads the trainer's (phys_footprint on macOS); RSS picks the
    candidates, since reading every footprint would cost a call per process."""
    from loractl.memory import footprint_mb

    candidates = []
    for proc in psutil.process_iter(["pid", "name", "memory_info"]):
        info = proc.info
        if info["pid"] in exclude or info["memory_info"] is None:
            continue
        candidates.append((info["memory_info"].rss, info["pid"], info["name"] or "?"))
    candidates.sort(reverse=True)
    found = []
    for _rss, pid, name in candidates[: count * 3]:
        try:
            found.append((name, footprint_mb(pid)))
        except (psutil.Error, ProcessLookupError):
            continue
    found.sort(key=lambda item: item[1], reverse=True)
    return found[:count]


def describe_consumers(consumers: list[tuple[str, float]]) -> str:
    """``Google Chrome 3.1 GB, Zoom 1.2 GB, Slack 0.6 GB``."""
    return ", ".join(f"{name} {mb / 1024:.1f} GB" for name, mb in consumers)


@dataclass(frozen=True)
class LiveTrainer:
    """A trainer (or the launcher of a distributed one) found in the process table."""

    pid: int
    started_at: float
    job_id: str
    attempt: int
    rung: int


def _option(argv: list[str], name: str) -> str | None:
    try:
        return argv[argv.index(name) + 1]
    except (ValueError, IndexError):
        return None


def _number(text: str | None) -> int:
    try:
        return int(text) if text is not None else 0
    except ValueError:
        return 0


def live_trainers(jobs_folder: Path) -> dict[str, LiveTrainer]:
    """The live trainers of this home, by job id: processes running the trainer module on a
    config inside ``jobs_folder``. For a distributed job it is the launcher (the process the
    supervisor started and records), not its ranks."""
    found: dict[int, LiveTrainer] = {}
    parents: dict[int, int] = {}
    prefix = str(jobs_folder) + "/"
    for proc in psutil.process_iter(["pid", "ppid", "cmdline", "status", "create_time"]):
        info = proc.info
        argv = info["cmdline"] or []
        if TRAINER_MODULE not in argv or info["status"] == psutil.STATUS_ZOMBIE:
            continue
        job_id = _option(argv, "--job-id")
        after = argv.index(TRAINER_MODULE) + 1
        config = argv[after] if after < len(argv) else ""
        if not job_id or not config.startswith(prefix) or Path(config).parent.name != job_id:
            continue
        found[info["pid"]] = LiveTrainer(
            pid=info["pid"],
            started_at=float(info["create_time"]),
            job_id=job_id,
            attempt=_number(_option(argv, "--attempt")),
            rung=_number(_option(argv, "--rung")),
        )
        parents[info["pid"]] = info["ppid"]
    trainers: dict[str, LiveTrainer] = {}
    for pid, trainer in sorted(found.items()):
        if parents[pid] in found:
            continue  # a rank under its launcher, or a trainer's own fork
        trainers.setdefault(trainer.job_id, trainer)
    return trainers
