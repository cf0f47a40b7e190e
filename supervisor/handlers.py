"""The control requests: one handler per request type, each mirrored by one client command.

Handlers only change the store or ask the loop to act (stop a trainer, shut down); every
exception becomes an error reply in ``Supervisor.dispatch``. A mixin of
:class:`loractl.supervisor.service.Supervisor`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import structlog
import yaml

from loractl import __version__
from loractl.config import ConfigError, JobConfig, load_config
from loractl.protocol import (
    CancelRequest,
    CleanRequest,
    HistoryRequest,
    LadderRequest,
    ListRequest,
    PauseRequest,
    PriorityRequest,
    RejectedEvent,
    Reply,
    ResumeRequest,
    RetryRequest,
    ShowRequest,
    ShutdownRequest,
    StatusRequest,
    SubmitRequest,
)
from loractl.supervisor.ladder import (
    describe_rung,
    effective_config,
    rung_count,
)
from loractl.supervisor.store import (
    TERMINAL,
    InvalidState,
    Job,
    JobNotFound,
    JobState,
    new_job_id,
)

log = structlog.get_logger("loractl.supervisor")


_LIVE = frozenset({JobState.QUEUED, JobState.STARTING, JobState.RUNNING, JobState.BACKOFF})


# The states each job command may be sent from; anything else is refused with a reason
# before the handler touches the job, so no command can leave a job in an impossible state
# (a `resume` of a running job once queued it under its live trainer).
COMMAND_STATES: dict[str, frozenset[JobState]] = {
    "pause": _LIVE,
    "cancel": _LIVE | {JobState.PAUSED},
    "resume": frozenset({JobState.PAUSED}),
    "retry": frozenset({JobState.FAILED, JobState.CANCELLED}),
    "priority": _LIVE | {JobState.PAUSED},
}


def require_state(job: Job, command: str) -> None:
    """Refuse ``command`` unless ``job`` is in a state the command is allowed from."""
    allowed = COMMAND_STATES[command]
    if job.state not in allowed:
        names = " or ".join(sorted(str(state) for state in allowed))
        raise InvalidState(f"cannot {command} job {job.id}: it is {job.state}, not {names}")


def recent_rejections(inbox: Path, limit: int | None) -> list[dict[str, Any]]:
    """Files the inbox turned away, newest first, each with the reason it wrote for it."""
    from loractl.supervisor.inbox import REJECTED

    found = []
    try:
        entries = list(os.scandir(inbox / REJECTED))
    except OSError:
        return []
    for entry in entries:
        if not entry.name.endswith(".error.txt") or entry.name.startswith("."):
            continue
        try:
            at = entry.stat().st_mtime
            with open(entry.path, encoding="utf-8", errors="replace") as handle:
                reason = handle.read(4096).strip()
        except OSError:
            continue
        found.append({"name": entry.name.removesuffix(".error.txt"), "reason": reason, "at": at})
    found.sort(key=lambda item: item["at"], reverse=True)
    return found if limit is None else found[:limit]


def _use_with(model: str | None, adapter_path: str | None) -> str | None:
    """How to try the adapters, once there are any, with a command that exists: the bare
    name when it is on PATH, else the one installed beside this interpreter."""
    import shutil

    if not model or not adapter_path:
        return None
    if not (Path(adapter_path) / "adapters.safetensors").is_file():
        return None
    command = "mlx_lm.generate"
    if shutil.which(command) is None:
        beside = Path(sys.executable).parent / command
        command = str(beside) if beside.is_file() else f"{sys.executable} -m mlx_lm generate"
    return f"{command} --model {model} --adapter-path {adapter_path} --prompt 'Hello'"


def _sets_key(path: Path, key: str) -> bool:
    """Whether the user's file names ``key`` itself (rather than taking its default)."""
    import tomllib

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


class RequestHandlers:
    """One ``handle_<type>`` per request."""

    def handle_status(self, request: StatusRequest) -> Reply:
        jobs = self.store.list()
        counts: dict[str, int] = {}
        for job in jobs:
            counts[str(job.state)] = counts.get(str(job.state), 0) + 1
        running = self.trainer.job_id if self.trainer else None
        return Reply.success(
            request.id,
            version=__version__,
            pid=os.getpid(),
            home=str(self.layout.home),
            uptime_s=round(time.time() - self.started_at, 1),
            jobs=counts,
            running=running,
            trainer_pid=self.trainer.pid if self.trainer else None,
            dropped_frames=self.dropped_frames,
            pressure=str(self.system_memory().pressure),
            inbox=str(self.layout.inbox),
            logs=str(self.layout.logs),
            rejected=recent_rejections(self.layout.inbox, limit=5),
        )

    def handle_list(self, request: ListRequest) -> Reply:
        states = {JobState(s) for s in request.states} if request.states else None
        extra = {}
        if request.rejected:
            extra["rejected"] = recent_rejections(self.layout.inbox, limit=None)
        return Reply.success(
            request.id, jobs=[self._summary(job) for job in self.store.list(states)], **extra
        )

    def handle_submit(self, request: SubmitRequest) -> Reply:
        source = Path(request.config_path)
        cfg = load_config(source)
        job = self.enqueue(source, cfg, priority=request.priority)
        return Reply.success(request.id, id=job.id, name=job.name, state=str(job.state))

    def _known_job(self, job_id: str) -> bool:
        try:
            self.store.get(job_id)
            return True
        except JobNotFound:
            return False

    def enqueue_claimed(self, job_id: str, claimed: Path, cfg: JobConfig) -> None:
        """The inbox's way in: idempotent per job id, so a crash mid-intake never doubles."""
        if not self._known_job(job_id):
            self.enqueue(claimed, cfg, job_id=job_id)

    def _report_intake(self, result) -> None:
        from loractl.supervisor.inbox import Accepted

        if isinstance(result, Accepted):
            log.info("inbox: queued", job=result.job_id, source=result.source)
            self.publish_state(result.job_id, source=result.source)
        else:
            log.warning("inbox: rejected", name=result.name, reason=result.reason)
            self.publish("rejected", RejectedEvent(name=result.name, reason=result.reason))

    def enqueue(
        self, source: Path, cfg: JobConfig, priority: int | None = None, job_id: str | None = None
    ) -> Job:
        """Store a normalized copy of the config in a job folder, then queue the job.

        Paths in the copy are absolute (the loader resolved them against the source's folder),
        so the job no longer depends on where its file came from.
        """
        import shutil

        job_id = job_id or new_job_id()
        folder = self.layout.job_dir(job_id)
        staging = folder.with_name(f".{job_id}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        if folder.exists():
            shutil.rmtree(folder)  # left by a crash before the row was written: no job yet
        data = cfg.to_dict()
        if not _sets_key(source, "adapter_path"):
            data["adapter_path"] = str(folder / "adapters")
        self._check_adapter_folder_free(Path(data["adapter_path"]), source)
        staging.mkdir(parents=True)
        (staging / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        os.replace(staging, folder)
        return self.store.add_job(
            job_id=job_id,
            name=cfg.name,
            config_path=str(folder / "config.yaml"),
            job_dir=str(folder),
            priority=cfg.priority if priority is None else priority,
        )

    def _check_adapter_folder_free(self, adapter_path: Path, source: Path) -> None:
        """Refuse a job whose adapter folder belongs to a job that has not ended: the second
        would train on (or "complete" with) the first's checkpoints."""
        wanted = adapter_path.resolve()
        for job in self.store.list(set(JobState) - TERMINAL):
            if job.id not in self._adapter_paths:  # a job's stored config never moves it
                try:
                    path = Path(self._load_job_config(job).adapter_path).resolve()
                except (ConfigError, OSError):
                    continue
                self._adapter_paths[job.id] = path
            if self._adapter_paths[job.id] == wanted:
                raise ConfigError(
                    f"adapter_path {wanted} is already used by job {job.id} ({job.name}, "
                    f"{job.state}); give this job its own adapter_path",
                    key="adapter_path",
                    source=str(source),
                )

    def handle_show(self, request: ShowRequest) -> Reply:
        job = self.store.resolve(request.job)
        return Reply.success(request.id, job=self.describe(job))

    def _running(self, job: Job) -> bool:
        return self.trainer is not None and self.trainer.job_id == job.id

    def handle_cancel(self, request: CancelRequest) -> Reply:
        job = self.store.resolve(request.job)
        require_state(job, "cancel")
        if self._running(job):
            self.user_stop("cancel")
            return Reply.success(request.id, id=job.id, state="stopping")
        job = self.store.transition(
            job.id, JobState.CANCELLED, "cancelled by the user", outcome="cancelled"
        )
        self.publish_state(job.id)
        return Reply.success(request.id, id=job.id, state=str(job.state))

    def handle_pause(self, request: PauseRequest) -> Reply:
        job = self.store.resolve(request.job)
        require_state(job, "pause")
        if self._running(job):
            self.user_stop("pause")
            return Reply.success(request.id, id=job.id, state="stopping")
        job = self.store.transition(job.id, JobState.PAUSED, "paused by the user")
        return Reply.success(request.id, id=job.id, state=str(job.state))

    def handle_resume(self, request: ResumeRequest) -> Reply:
        job = self.store.resolve(request.job)
        require_state(job, "resume")
        job = self.store.transition(
            job.id, JobState.QUEUED, "resumed by the user; continues from its checkpoint"
        )
        return Reply.success(request.id, id=job.id, state=str(job.state))

    def handle_retry(self, request: RetryRequest) -> Reply:
        job = self.store.resolve(request.job)
        require_state(job, "retry")
        rung = job.rung if request.from_rung is None else request.from_rung
        cfg = self._load_job_config(job)
        if not 0 <= rung < rung_count(cfg):
            raise ValueError(
                f"rung {rung} does not exist; this job has rungs 0-{rung_count(cfg) - 1}"
            )
        if request.fresh:
            # Read by spawn(): this attempt's trainer discards the checkpoints and starts over.
            self.store.record(job.id, "fresh_start_requested", attempt=job.attempt + 1)
        job = self.store.transition(
            job.id,
            JobState.QUEUED,
            f"retried by the user from rung {rung}" + (", from the start" if request.fresh else ""),
            rung=rung,
            retries_on_rung=0,
            early_deaths=0,
            outcome=None,
            reason="",
        )
        return Reply.success(request.id, id=job.id, state=str(job.state), rung=rung)

    def handle_priority(self, request: PriorityRequest) -> Reply:
        job = self.store.resolve(request.job)
        require_state(job, "priority")
        job = self.store.set_priority(job.id, request.priority)
        return Reply.success(request.id, id=job.id, priority=job.priority)

    def handle_history(self, request: HistoryRequest) -> Reply:
        job = self.store.resolve(request.job)
        return Reply.success(request.id, id=job.id, events=self.store.events(job.id))

    def handle_ladder(self, request: LadderRequest) -> Reply:
        job = self.store.resolve(request.job)
        described = self.describe(job)
        return Reply.success(request.id, id=job.id, rung=job.rung, ladder=described["ladder"])

    def handle_clean(self, request: CleanRequest) -> Reply:
        import shutil

        removed = []
        for job in self.store.list(set(TERMINAL)):
            folder = Path(job.job_dir)
            if folder.is_dir() and folder.parent == self.layout.jobs:
                for entry in folder.iterdir():
                    if entry.name == "adapters" and not request.adapters:
                        continue  # the adapters are what the user trained for
                    if entry.is_dir():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
                if request.adapters or not any(folder.iterdir()):
                    shutil.rmtree(folder, ignore_errors=True)
            self.store.delete(job.id)
            removed.append(job.id)
        return Reply.success(request.id, removed=removed, adapters_removed=request.adapters)

    def handle_shutdown(self, request: ShutdownRequest) -> Reply:
        self.shutdown_requested = True
        running = self.trainer.job_id if self.trainer else None
        return Reply.success(request.id, pid=os.getpid(), checkpointing=running)

    def _summary(self, job: Job) -> dict[str, Any]:
        return {
            "id": job.id,
            "name": job.name,
            "state": str(job.state),
            "outcome": job.outcome,
            "priority": job.priority,
            "rung": job.rung,
            "attempts": job.attempt,
            "progress": {
                "examples_seen": job.examples_seen,
                "total_examples": job.total_examples,
                "step": job.step,
            },
        }

    def _ranks(self, job: Job) -> list[dict[str, Any]]:
        """A distributed job's ranks: live while it runs, else as its last attempt ended."""
        trainer = self.trainer
        if trainer is not None and trainer.job_id == job.id and trainer.distributed:
            return trainer.describe_ranks()
        return self.last_ranks.get(job.id, [])

    def describe(self, job: Job) -> dict[str, Any]:
        try:
            cfg = self._load_job_config(job)
            effective = effective_config(cfg, job.rung).to_dict()
            ladder = [
                {
                    "rung": rung,
                    "change": describe_rung(cfg, rung),
                    "peak_memory_mb": job.peak_memory_mb.get(str(rung)),
                }
                for rung in range(rung_count(cfg))
            ]
        except ConfigError as exc:
            effective, ladder = {"error": str(exc)}, []
        adapter_path = effective.get("adapter_path")
        return {
            **self._summary(job),
            "reason": job.reason,
            "effective_config": effective,
            "trainer_pid": self.trainer.pid
            if self.trainer and self.trainer.job_id == job.id
            else None,
            "ranks": self._ranks(job),
            "crashes": job.crashes,
            "peak_memory_mb": job.peak_memory_mb,
            "ladder": ladder,
            "adapter_path": adapter_path,
            "use_with": _use_with(effective.get("model"), adapter_path),
            "job_dir": job.job_dir,
            "budget_mb": round(self._budget(cfg), 1) if "error" not in effective else None,
            "last_checkpoint_step": job.last_checkpoint_step,
            "history": self.store.events(job.id),
        }
