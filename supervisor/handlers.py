"""The control requests: one handler per request type, each mirrored by one client command,
and the one dispatch that turns a request into a reply.

Handlers work over an explicit :class:`HandlerContext` (the store, the queue, the runner
that owns the current attempt), as pueue's message handlers and circus's commands do: they
change the store or ask the runner to stop an attempt, and never block. :func:`dispatch`
turns every exception into an error reply, so no request can take the supervisor down.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from loractl import __version__
from loractl.config import ConfigError, load_config
from loractl.paths import Layout
from loractl.protocol import (
    STOPPING,
    TERMINAL,
    CancelRequest,
    CleanRequest,
    ErrorCode,
    HistoryRequest,
    JobState,
    LadderRequest,
    ListRequest,
    PauseRequest,
    PriorityRequest,
    ProtocolError,
    RemoveRequest,
    Reply,
    Request,
    ResumeRequest,
    RetryRequest,
    ShowRequest,
    ShutdownRequest,
    StatusRequest,
    SubmitRequest,
    decode,
)
from loractl.supervisor.jobqueue import JobQueue, renamed
from loractl.supervisor.jobview import (
    describe,
    recent_rejections,
    resolve,
    state_counts,
    summary,
)
from loractl.supervisor.ladder import rung_count
from loractl.supervisor.pressure import SystemMemory
from loractl.supervisor.runner import Runner
from loractl.supervisor.settings import Settings
from loractl.supervisor.store import InvalidState, Job, JobNotFound, Store, StoreFull
from loractl.wire import release_memory

log = structlog.get_logger("loractl.supervisor")

_S = JobState
_WAITING = frozenset({_S.QUEUED, _S.BACKOFF})
_TRAINING = frozenset({_S.STARTING, _S.RUNNING})

# The states each job command may be sent from; anything else is refused with a reason
# before the handler touches the job, so no command can leave a job in an impossible state.
# The last command wins: a resume takes back a pause under way, a cancel overrides it, and
# a pause overrides a cancel under way.
COMMAND_STATES: dict[str, frozenset[JobState]] = {
    "pause": _WAITING | _TRAINING | {_S.CANCELLING},
    "cancel": _WAITING | _TRAINING | {_S.PAUSED, _S.PAUSING},
    "resume": frozenset({_S.PAUSED, _S.PAUSING}),
    "retry": frozenset({_S.FAILED, _S.CANCELLED}),
    "priority": _WAITING | _TRAINING | {_S.PAUSED, _S.PAUSING},
    "remove": TERMINAL,
}
del _S

# How a refusal names what was asked, and how it names a state, in plain English.
COMMAND_PHRASES = {
    "pause": ("pause", "paused"),
    "cancel": ("cancel", "cancelled"),
    "resume": ("resume", "resumed"),
    "retry": ("retry", "retried"),
    "priority": ("change the priority of", "reprioritized"),
    "remove": ("remove", "removed"),
}
STATE_WORDS = {JobState.BACKOFF: "backed-off"}
# The order states are listed in, as a user reads the lifecycle.
_STATE_ORDER = list(JobState)


class MemoryRelief:
    """Hands the memory a burst of requests used back to the system once the burst is over.

    Every request of a flood is a new connection (the `loractl` command opens one per
    request), and libzmq's per-connection buffers and pipes, allocated on its I/O thread,
    stay in glibc's arenas after they are freed: a 50-client flood grew the supervisor by
    about 5 MB a second, and it stayed there (41 MB -> 225 MB) though Python's own heap did
    not grow (tracemalloc: 17 MB throughout). Trimming while the flood goes on gives little
    back, since those buffers are still in use; once no request has come for ``quiet_s``,
    one trim returns it all (measured: 196 MB -> 44 MB, the baseline). The loop calls
    :meth:`settle` every turn; the first request after a quiet spell settles too.
    """

    def __init__(self, quiet_s: float = 1.0, at_least: int = 64):
        self.quiet_s = quiet_s
        self.at_least = at_least  # fewer requests than this leave nothing worth a trim
        self.pending = 0
        self.last_request = 0.0
        self.releases = 0

    def served(self, now: float) -> None:
        self.settle(now)
        self.pending += 1
        self.last_request = now

    def settle(self, now: float) -> bool:
        """Hand memory back if a burst has ended; whether it did."""
        if self.pending < self.at_least or now - self.last_request < self.quiet_s:
            return False
        release_memory()
        self.pending = 0
        self.releases += 1
        return True


def english_list(words: list[str]) -> str:
    if len(words) <= 1:
        return "".join(words)
    return f"{', '.join(words[:-1])} or {words[-1]}"


def require_state(job: Job, command: str) -> None:
    """Refuse ``command`` unless ``job`` is in a state the command is allowed from."""
    allowed = COMMAND_STATES[command]
    if job.state in allowed:
        return
    verb, done = COMMAND_PHRASES[command]
    states = [STATE_WORDS.get(s, str(s)) for s in _STATE_ORDER if s in allowed]
    raise InvalidState(
        f"cannot {verb} job {job.id}: it is {STATE_WORDS.get(job.state, job.state)}; "
        f"only a {english_list(states)} job can be {done}"
    )


def still_exiting(job: Job, command: str) -> InvalidState:
    """A stopping job whose attempt is not ours to change any more (its exit is waiting to
    be recorded, or the supervisor is still recovering)."""
    return InvalidState(
        f"cannot {command} job {job.id} yet: it is {job.state} and its trainer is exiting; "
        "try again in a moment"
    )


@dataclass
class HandlerContext:
    """Everything a handler may touch, named."""

    store: Store
    layout: Layout
    settings: Settings
    queue: JobQueue
    runner: Runner
    read_system: Callable[[], SystemMemory]
    publish_state: Callable[..., None]
    request_shutdown: Callable[[], None] = lambda: None
    started_at: float = field(default_factory=time.time)
    dropped_frames: Callable[[], int] = lambda: 0
    last_ranks: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def job_reply(request: Request, warnings: list[str], **data: Any) -> Reply:
    """A job command's success, with the warnings it earned (a JOB name several jobs share)."""
    if warnings:
        data["warnings"] = warnings
    return Reply.success(request.id, **data)


class RequestHandlers:
    """One ``handle_<type>`` per request, and the table that routes to them."""

    def __init__(self, ctx: HandlerContext):
        self.ctx = ctx
        self.relief = MemoryRelief()
        self.table: dict[type[Request], Callable[[Any], Reply]] = {
            StatusRequest: self.handle_status,
            ListRequest: self.handle_list,
            SubmitRequest: self.handle_submit,
            ShowRequest: self.handle_show,
            ShutdownRequest: self.handle_shutdown,
            CancelRequest: self.handle_cancel,
            PauseRequest: self.handle_pause,
            ResumeRequest: self.handle_resume,
            RetryRequest: self.handle_retry,
            PriorityRequest: self.handle_priority,
            HistoryRequest: self.handle_history,
            LadderRequest: self.handle_ladder,
            CleanRequest: self.handle_clean,
            RemoveRequest: self.handle_remove,
        }

    # -- reads ------------------------------------------------------------------------------

    def handle_status(self, request: StatusRequest) -> Reply:
        ctx = self.ctx
        view = ctx.runner.view()
        return Reply.success(
            request.id,
            version=__version__,
            pid=os.getpid(),
            home=str(ctx.layout.home),
            uptime_s=round(time.time() - ctx.started_at, 1),
            jobs=state_counts(ctx.store.list()),
            running=view.job_id if view else None,
            trainer_pid=view.pid if view else None,
            queue_held=ctx.queue.held,
            dropped_frames=ctx.dropped_frames(),
            pressure=str(ctx.read_system().pressure),
            inbox=str(ctx.layout.inbox),
            logs=str(ctx.layout.logs),
            rejected=recent_rejections(ctx.layout.inbox, limit=5),
        )

    def handle_list(self, request: ListRequest) -> Reply:
        states = {JobState(s) for s in request.states} if request.states else None
        extra = {}
        if request.rejected:
            extra["rejected"] = recent_rejections(self.ctx.layout.inbox, limit=None)
        jobs = [summary(job) for job in self.ctx.store.list(states)]
        return Reply.success(request.id, jobs=jobs, **extra)

    def describe(self, job: Job) -> dict[str, Any]:
        """`show`'s view, with the live attempt's pid and ranks while it runs."""
        view = self.ctx.runner.view()
        live = view is not None and view.job_id == job.id
        return describe(
            job,
            self.ctx.store,
            trainer_pid=view.pid if live and view else None,
            ranks=view.ranks if live and view else self.ctx.last_ranks.get(job.id),
            default_budget_fraction=self.ctx.settings.default_budget_fraction,
        )

    def resolve(self, ref: str) -> tuple[Job, list[str]]:
        return resolve(self.ctx.store, ref)

    def handle_show(self, request: ShowRequest) -> Reply:
        job, warnings = self.resolve(request.job)
        return job_reply(request, warnings, job=self.describe(job))

    def handle_history(self, request: HistoryRequest) -> Reply:
        job, warnings = self.resolve(request.job)
        return job_reply(request, warnings, id=job.id, events=self.ctx.store.events(job.id))

    def handle_ladder(self, request: LadderRequest) -> Reply:
        job, warnings = self.resolve(request.job)
        described = self.describe(job)
        return job_reply(request, warnings, id=job.id, rung=job.rung, ladder=described["ladder"])

    # -- the queue --------------------------------------------------------------------------

    def handle_submit(self, request: SubmitRequest) -> Reply:
        source = Path(request.config_path)
        cfg = load_config(source)
        job = self.ctx.queue.enqueue(source, cfg, priority=request.priority)
        self.ctx.publish_state(job.id)
        warnings = [renamed(cfg.name, job)] if job.name != cfg.name else []
        return job_reply(request, warnings, id=job.id, name=job.name, state=str(job.state))

    def handle_priority(self, request: PriorityRequest) -> Reply:
        job, warnings = self.resolve(request.job)
        require_state(job, "priority")
        if job.priority != request.priority:  # a request that changes nothing records nothing
            job = self.ctx.store.set_priority(job.id, request.priority)
        return job_reply(request, warnings, id=job.id, priority=job.priority)

    def handle_retry(self, request: RetryRequest) -> Reply:
        store = self.ctx.store
        job, warnings = self.resolve(request.job)
        require_state(job, "retry")
        rung = job.rung if request.from_rung is None else request.from_rung
        cfg = load_config(job.config_path)
        if not 0 <= rung < rung_count(cfg):
            raise ValueError(
                f"rung {rung} does not exist; this job has rungs 0-{rung_count(cfg) - 1}"
            )
        if request.fresh:
            # Read by the runner: this attempt's trainer discards the checkpoints.
            store.record(job.id, "fresh_start_requested", attempt=job.attempt + 1)
        # A fresh start trains from step 0: `show` must not carry the old run's figures.
        fresh = (
            {"step": 0, "examples_seen": 0, "last_checkpoint_step": None} if request.fresh else {}
        )
        job = store.transition(
            job.id,
            JobState.QUEUED,
            f"retried by the user from rung {rung}" + (", from the start" if request.fresh else ""),
            rung=rung,
            retries_on_rung=0,
            early_deaths=0,
            outcome=None,
            reason="",
            **fresh,
        )
        self.ctx.publish_state(job.id)
        return job_reply(
            request,
            warnings,
            id=job.id,
            state=str(job.state),
            rung=rung,
            start="from the start" if request.fresh else "from its checkpoint",
        )

    # -- stopping and resuming --------------------------------------------------------------

    def _stop(self, job: Job, wish: str) -> JobState:
        """Pause or cancel one job: through its attempt when it runs, else at once."""
        runner = self.ctx.runner
        if runner.running(job.id):
            return runner.user_stop(job, wish)
        if job.state in STOPPING:
            raise still_exiting(job, wish)
        if wish == "cancel":
            state = self.ctx.store.transition(
                job.id, JobState.CANCELLED, "cancelled by the user", outcome="cancelled"
            ).state
        else:
            state = self.ctx.store.transition(job.id, JobState.PAUSED, "paused by the user").state
        self.ctx.publish_state(job.id)
        return state

    def handle_cancel(self, request: CancelRequest) -> Reply:
        job, warnings = self.resolve(request.job)
        require_state(job, "cancel")
        state = self._stop(job, "cancel")
        return job_reply(request, warnings, id=job.id, state=str(state))

    def handle_pause(self, request: PauseRequest) -> Reply:
        if request.all:
            return self._pause_all(request)
        job, warnings = self.resolve(request.job)
        require_state(job, "pause")
        state = self._stop(job, "pause")
        return job_reply(request, warnings, id=job.id, state=str(state))

    def _resume(self, job: Job) -> JobState:
        if job.state == JobState.PAUSING:
            if not self.ctx.runner.running(job.id):
                raise still_exiting(job, "resume")
            return self.ctx.runner.take_back_pause(job)
        job = self.ctx.store.transition(
            job.id, JobState.QUEUED, "resumed by the user; continues from its checkpoint"
        )
        self.ctx.publish_state(job.id)
        return job.state

    def handle_resume(self, request: ResumeRequest) -> Reply:
        if request.all:
            return self._resume_all(request)
        job, warnings = self.resolve(request.job)
        require_state(job, "resume")
        state = self._resume(job)
        return job_reply(request, warnings, id=job.id, state=str(state))

    def _pause_all(self, request: PauseRequest) -> Reply:
        """Hold the queue: nothing new starts, and whatever is running or about to restart
        pauses (the running attempt checkpoints first)."""
        if request.job:
            raise ValueError("give a job or --all, not both")
        paused = []
        for job in self.ctx.store.list({JobState.STARTING, JobState.RUNNING, JobState.BACKOFF}):
            self._stop(job, "pause")
            paused.append(job.id)
        already = self.ctx.queue.held
        if paused or not already:  # holding a held queue again changes nothing: no write
            self.ctx.queue.hold(paused)
        return Reply.success(request.id, held=True, already_held=already, paused=paused)

    def _resume_all(self, request: ResumeRequest) -> Reply:
        """Release the queue, and resume the jobs the hold paused; a job paused on its own
        stays paused."""
        if request.job:
            raise ValueError("give a job or --all, not both")
        was_held = self.ctx.queue.held
        resumed: list[str] = []
        if not was_held:  # nothing to release, and no write for it
            return Reply.success(request.id, held=False, was_held=False, resumed=resumed)
        for job_id in self.ctx.queue.release():
            try:
                job = self.ctx.store.get(job_id)
            except JobNotFound:
                continue
            if job.state in COMMAND_STATES["resume"]:
                self._resume(job)
                resumed.append(job.id)
        return Reply.success(request.id, held=False, was_held=was_held, resumed=resumed)

    # -- forgetting -------------------------------------------------------------------------

    def _forget(self, job: Job, keep_adapters: bool) -> None:
        """Remove a finished job's folder (but its adapters, unless told) and its row."""
        folder = Path(job.job_dir)
        if folder.is_dir() and folder.parent == self.ctx.layout.jobs:
            for entry in folder.iterdir():
                if entry.name == "adapters" and keep_adapters:
                    continue  # the adapters are what the user trained for
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
            if not keep_adapters or not any(folder.iterdir()):
                shutil.rmtree(folder, ignore_errors=True)
        self.ctx.store.delete(job.id)
        self.ctx.last_ranks.pop(job.id, None)

    def handle_clean(self, request: CleanRequest) -> Reply:
        removed = []
        for job in self.ctx.store.list(set(TERMINAL)):
            self._forget(job, keep_adapters=not request.adapters)
            removed.append(job.id)
        return Reply.success(request.id, removed=removed, adapters_removed=request.adapters)

    def handle_remove(self, request: RemoveRequest) -> Reply:
        job, warnings = self.resolve(request.job)
        require_state(job, "remove")
        try:
            adapter_path: str | None = str(load_config(job.config_path).adapter_path)
        except ConfigError:
            adapter_path = None
        self._forget(job, keep_adapters=True)
        kept = adapter_path if adapter_path and Path(adapter_path).exists() else None
        return job_reply(request, warnings, id=job.id, name=job.name, adapter_path=kept)

    def handle_shutdown(self, request: ShutdownRequest) -> Reply:
        self.ctx.request_shutdown()
        view = self.ctx.runner.view()
        return Reply.success(
            request.id, pid=os.getpid(), checkpointing=view.job_id if view else None
        )


def dispatch(handlers: RequestHandlers, payload: bytes, on_malformed: Callable[[], None]) -> Reply:
    """The one place a request becomes a reply; no exception escapes it."""
    handlers.relief.served(time.monotonic())
    try:
        request = decode(payload)
    except ProtocolError as exc:
        # A well-formed request with a value out of range (a 30-digit priority) is the
        # user's mistake, refused with the reason; only garbage counts as a dropped frame.
        if exc.code != ErrorCode.INVALID_ARGUMENT:
            on_malformed()
        return Reply.failure("", exc.code, exc.reason)
    handler = handlers.table.get(type(request))  # type: ignore[arg-type]
    if handler is None:
        return Reply.failure(request.id, ErrorCode.UNKNOWN_TYPE, f"{request.type} is not a request")
    try:
        return handler(request)
    except StoreFull as exc:
        return Reply.failure(request.id, ErrorCode.DISK_FULL, str(exc))
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return Reply.failure(
                request.id, ErrorCode.DISK_FULL, f"disk full: {exc}; free some space"
            )
        log.exception("handler failed", request=request.type)
        return Reply.failure(request.id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
    except JobNotFound as exc:
        return Reply.failure(request.id, ErrorCode.NOT_FOUND, str(exc))
    except InvalidState as exc:
        return Reply.failure(request.id, ErrorCode.INVALID_STATE, str(exc))
    except (ConfigError, ValueError) as exc:
        return Reply.failure(request.id, ErrorCode.INVALID_ARGUMENT, str(exc))
    except Exception as exc:  # a handler bug must not take the daemon down
        log.exception("handler failed", request=request.type)
        return Reply.failure(request.id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
