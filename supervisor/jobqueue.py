"""The queue: how a job gets in, and which job runs next.

A job enters as a normalized copy of its config in a job folder of its own, then a row in the
store. The next job to run is a backed-off job whose delay is over (it had its turn and keeps
it), else the first queued one by priority. ``pause --all`` holds the whole queue, across
restarts, until ``resume --all``.

A job's name is unique: a name another job already has (two files named ``rf.yaml``, or
``-rf.yaml`` and ``rf.yaml``) gets a suffix, ``rf-2``, so that a command naming a job never
has to guess which one is meant; the submitter is told the name it got.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import tomllib
from pathlib import Path

import yaml

from loractl.config import ConfigError, JobConfig, adapter_path_problem, load_config
from loractl.paths import Layout
from loractl.protocol import TERMINAL, JobState
from loractl.supervisor.store import Job, JobNotFound, Store, new_job_id

# The store setting that holds the queue, and the jobs `pause --all` paused.
HOLD_SETTING = "queue_held"
HELD_JOBS_SETTING = "paused_by_hold"
# The longest job name the config allows; a suffix shortens the base to keep within it.
MAX_NAME_CHARS = 64


def unique_name(wanted: str, taken: set[str]) -> str:
    """``wanted``, or ``wanted-N`` with the smallest N from 2 that no job has yet."""
    if wanted not in taken:
        return wanted
    number = 2
    while True:
        suffix = f"-{number}"
        name = wanted[: MAX_NAME_CHARS - len(suffix)] + suffix
        if name not in taken:
            return name
        number += 1


def renamed(wanted: str, job: Job) -> str:
    """The warning a submitter gets when its job's name was taken."""
    return (
        f"another job is already named {wanted!r}: this one is named {job.name!r} "
        f"(id {job.id}); use either to name it"
    )


def sets_key(path: Path, key: str) -> bool:
    """Whether the user's file names ``key`` itself (rather than taking its default)."""
    try:
        text = path.read_text()
        if path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and key in data


class JobQueue:
    """Submissions in, the next job out, and the timers of jobs waiting to restart."""

    def __init__(self, store: Store, layout: Layout):
        self.store = store
        self.layout = layout
        # When each backed-off job may restart (monotonic); the history keeps the wall clock.
        self.backoff_until: dict[str, float] = {}
        self._adapter_paths: dict[str, Path] = {}
        self._held: bool | None = None

    # -- getting in -------------------------------------------------------------------------

    def known(self, job_id: str) -> bool:
        try:
            self.store.get(job_id)
            return True
        except JobNotFound:
            return False

    def enqueue(
        self, source: Path, cfg: JobConfig, priority: int | None = None, job_id: str | None = None
    ) -> Job:
        """Store a normalized copy of the config in a job folder, then queue the job.

        Paths in the copy are absolute (the loader resolved them against the source's folder),
        so the job no longer depends on where its file came from.
        """
        job_id = job_id or new_job_id()
        folder = self.layout.job_dir(job_id)
        staging = folder.with_name(f".{job_id}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        if folder.exists():
            shutil.rmtree(folder)  # left by a crash before the row was written: no job yet
        data = cfg.to_dict()
        if sets_key(source, "adapter_path"):
            self._check_adapter_path_chosen(data["adapter_path"], source)
        else:
            data["adapter_path"] = str(folder / "adapters")
        self._check_adapter_folder_free(Path(data["adapter_path"]), source)
        name = unique_name(cfg.name, {job.name for job in self.store.list()})
        if name != cfg.name:
            data["name"] = name  # the stored copy names the job as the store does
        staging.mkdir(parents=True)
        (staging / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        os.replace(staging, folder)
        job = self.store.add_job(
            job_id=job_id,
            name=name,
            config_path=str(folder / "config.yaml"),
            job_dir=str(folder),
            priority=cfg.priority if priority is None else priority,
        )
        if name != cfg.name:
            # Said in its history too: a job from the inbox has no submitter to tell.
            self.store.record(job.id, "renamed", cause="name taken", wanted=cfg.name, name=name)
        return job

    def enqueue_claimed(self, job_id: str, claimed: Path, cfg: JobConfig) -> None:
        """The inbox's way in: idempotent per job id, so a crash mid-intake never doubles."""
        if not self.known(job_id):
            self.enqueue(claimed, cfg, job_id=job_id)

    def _adapter_path_of(self, job: Job) -> Path | None:
        if job.id not in self._adapter_paths:  # a job's stored config never moves it
            try:
                self._adapter_paths[job.id] = Path(load_config(job.config_path).adapter_path)
            except (ConfigError, OSError):
                return None
        return self._adapter_paths[job.id]

    def _check_adapter_path_chosen(self, adapter_path: str, source: Path) -> None:
        """Refuse an adapter_path the user chose inside loractl's home, or inside or above
        any other job's adapter folder (see ``adapter_path_problem``)."""
        others = {}
        for job in self.store.list():
            path = self._adapter_path_of(job)
            if path is not None:
                others[job.id] = path
        problem = adapter_path_problem(adapter_path, self.layout.home, others)
        if problem:
            raise ConfigError(problem, key="adapter_path", source=str(source))

    def _check_adapter_folder_free(self, adapter_path: Path, source: Path) -> None:
        """Refuse a job whose adapter folder belongs to a job that has not ended: the second
        would train on (or "complete" with) the first's checkpoints."""
        wanted = adapter_path.resolve()
        for job in self.store.list(set(JobState) - TERMINAL):
            path = self._adapter_path_of(job)
            if path is not None and path.resolve() == wanted:
                raise ConfigError(
                    f"adapter_path {wanted} is already used by job {job.id} ({job.name}, "
                    f"{job.state}); give this job its own adapter_path",
                    key="adapter_path",
                    source=str(source),
                )

    # -- what runs next ---------------------------------------------------------------------

    def next_job(self, now: float) -> Job | None:
        """A job in backoff had its turn and keeps it: the queue waits out its delay."""
        if self.held:
            return None
        waiting = self.store.list({JobState.BACKOFF})
        if waiting:
            job = min(waiting, key=lambda j: self.backoff_until.get(j.id, 0.0))
            return job if now >= self.backoff_until.get(job.id, 0.0) else None
        return self.store.next_queued()

    def arm_backoff(self, job_id: str, delay: float) -> None:
        """Set the restart time, in memory for the loop and in the history (wall clock) so a
        restarted supervisor keeps the same deadline instead of restarting at once."""
        self.backoff_until[job_id] = time.monotonic() + delay
        self.store.record(job_id, "backoff", resume_at=time.time() + delay, delay_s=delay)

    def rearm_backoff(self, job: Job) -> None:
        """After a restart: the deadline the history recorded for a backed-off job."""
        recorded = [e for e in self.store.events(job.id) if e["kind"] == "backoff"]
        resume_at = recorded[-1]["detail"].get("resume_at") if recorded else None
        remaining = max(0.0, resume_at - time.time()) if isinstance(resume_at, float) else 0.0
        self.backoff_until[job.id] = time.monotonic() + remaining

    def ensure_backoff_timer(self, job_id: str) -> None:
        """A backed-off job whose timer was lost (a write the disk refused) restarts now."""
        self.backoff_until.setdefault(job_id, time.monotonic())

    # -- holding the whole queue ------------------------------------------------------------

    @property
    def held(self) -> bool:
        # Read once, then kept: the loop asks every tick, and only this queue writes it.
        if self._held is None:
            self._held = bool(self.store.setting(HOLD_SETTING, False))
        return self._held

    def hold(self, paused: list[str]) -> None:
        """Start nothing new until :meth:`release`; remember the jobs the hold paused."""
        earlier = list(self.store.setting(HELD_JOBS_SETTING, []))
        self.store.set_setting(HELD_JOBS_SETTING, [*earlier, *paused])
        self.store.set_setting(HOLD_SETTING, True)
        self._held = True

    def release(self) -> list[str]:
        """Let the queue run again; the jobs the hold paused, for resuming."""
        paused = list(self.store.setting(HELD_JOBS_SETTING, []))
        self.store.set_setting(HELD_JOBS_SETTING, [])
        self.store.set_setting(HOLD_SETTING, False)
        self._held = False
        return paused
