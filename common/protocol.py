"""The one protocol module: every message, reply and code that crosses a process boundary.

The trainer, the supervisor and the client all import this module; nothing here may import
mlx. Messages are dataclasses carrying ``type``, ``id`` and ``v`` and travel as JSON objects.
Decoding never trusts its input: anything malformed, oversized or of another version raises
``ProtocolError`` with an ``ErrorCode``, which callers turn into an error reply or a dropped
and counted frame.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from enum import IntEnum, StrEnum
from typing import Any, ClassVar, NoReturn

PROTOCOL_VERSION = 1

# A request or heartbeat is a few hundred bytes; anything near this size is garbage or an
# attack. Replies (a 500-job list, a long history) come from the trusted side and may be big.
MAX_MESSAGE_BYTES = 64 * 1024
MAX_REPLY_BYTES = 64 * 1024 * 1024


class ErrorCode(IntEnum):
    """Why a request failed; carried in the ``error`` field of a reply."""

    OK = 0
    MALFORMED = 1
    UNKNOWN_TYPE = 2
    VERSION_MISMATCH = 3
    TOO_LARGE = 4
    NOT_FOUND = 5
    INVALID_STATE = 6
    INVALID_ARGUMENT = 7
    INTERNAL = 8
    DISK_FULL = 9  # the supervisor's disk is full: reads work, writes wait for space


class ExitCode(IntEnum):
    """How a trainer process ends; the supervisor classifies crashes by these first."""

    DONE = 0
    CRASH = 1
    USAGE = 2
    DATA_ERROR = 65  # EX_DATAERR: retrying cannot help
    ADAPTER_BUSY = 73  # EX_CANTCREAT: another trainer holds the adapter folder
    DISK_FULL = 74  # EX_IOERR: no room for a checkpoint; the job pauses until there is
    OUT_OF_MEMORY = 75  # EX_TEMPFAIL: caught in-process, worth a cheaper rung
    CONFIG_ERROR = 78  # EX_CONFIG: retrying cannot help
    STOPPED = 82  # stopped on request after writing a checkpoint
    # The pre-flight of the attempt's longest batch peaked over the memory budget: nothing
    # was trained, and a cheaper rung may fit. Not a crash; costs no retry.
    DOES_NOT_FIT = 83
    # A distributed job's other Mac did not answer ssh before its ranks were launched:
    # nothing ran. Retried without spending the retry budget, until the job pauses.
    HOST_UNREACHABLE = 84


class ProtocolError(ValueError):
    """A frame that cannot be turned into a message."""

    def __init__(self, code: ErrorCode, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def new_id() -> str:
    return uuid.uuid4().hex[:12]


_REGISTRY: dict[str, type[Message]] = {}


@dataclass
class Message:
    """Base of every message. Subclasses set ``TYPE`` and are registered for decoding."""

    TYPE: ClassVar[str] = ""
    id: str = field(default_factory=new_id)
    v: int = PROTOCOL_VERSION

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if cls.TYPE:
            _REGISTRY[cls.TYPE] = cls

    @property
    def type(self) -> str:
        return self.TYPE

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["type"] = self.TYPE
        return data

    def encode(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()


@dataclass
class Heartbeat(Message):
    """Sent by the trainer about once a second from its own thread, even mid-step."""

    TYPE: ClassVar[str] = "heartbeat"
    job_id: str = ""
    attempt: int = 0
    pid: int = 0
    phase: str = "starting"  # loading | preflight | train | eval | checkpoint | done
    step: int = 0  # optimizer steps taken; the separate progress signal
    examples_seen: int = 0
    total_examples: int = 0
    epoch: int = 0
    loss: float | None = None
    tokens_per_sec: float = 0.0
    step_seconds: float | None = None
    eval_seconds: float | None = None
    mlx_active_mb: float = 0.0
    mlx_peak_mb: float = 0.0
    mlx_cache_mb: float = 0.0
    footprint_mb: float = 0.0
    last_checkpoint_step: int | None = None
    rung: int = 0
    # A distributed job's ranks each send their own; one process is rank 0 of 1.
    rank: int = 0
    world_size: int = 1
    host: str = ""
    sent_at: float = field(default_factory=time.time)


@dataclass
class TrainerEvent(Message):
    """A one-off trainer event: a checkpoint written, an evaluation, the end of the run."""

    TYPE: ClassVar[str] = "trainer_event"
    job_id: str = ""
    pid: int = 0
    # checkpoint | eval | oom_retry | preflight | done | stopped | error. A preflight event's
    # detail: peak_mb (the larger of MLX's peak and the process footprint), mlx_peak_mb,
    # footprint_mb, weights_mb (after loading), tokens, batch_size, max_seq_length, eval_peak_mb
    # and budget_mb.
    kind: str = ""
    step: int = 0
    examples_seen: int = 0
    detail: dict[str, Any] = field(default_factory=dict)
    # The attempt that sent it (0: not said): a rank is its job's, attempt's and rank's.
    attempt: int = 0
    rank: int = 0
    world_size: int = 1
    host: str = ""
    sent_at: float = field(default_factory=time.time)


TRAINER_COMMANDS = frozenset({"checkpoint_now", "clear_cache", "stop"})


@dataclass
class TrainerCommand(Message):
    """Sent by the supervisor to a trainer over the telemetry channel."""

    TYPE: ClassVar[str] = "trainer_command"
    action: str = ""

    def __post_init__(self) -> None:
        if self.action not in TRAINER_COMMANDS:
            raise ProtocolError(
                ErrorCode.INVALID_ARGUMENT,
                f"unknown trainer command {self.action!r}; "
                f"expected one of {sorted(TRAINER_COMMANDS)}",
            )


@dataclass
class Reply(Message):
    """The one reply envelope for every request."""

    TYPE: ClassVar[str] = "reply"
    ok: bool = True
    error: int = ErrorCode.OK
    reason: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def success(cls, request_id: str, **data: Any) -> Reply:
        return cls(id=request_id, ok=True, error=ErrorCode.OK, data=data)

    @classmethod
    def failure(cls, request_id: str, code: ErrorCode, reason: str) -> Reply:
        return cls(id=request_id, ok=False, error=int(code), reason=reason)


_JSON_TYPES = {
    "str": str,
    "int": int,
    "float": (int, float),
    "bool": bool,
    "list": list,
    "dict": dict,
}


def _check_type(kind: str, spec: Field[Any], value: Any) -> None:
    """Reject a field whose JSON type does not match its annotation (``int | None`` etc.)."""
    annotation = str(spec.type)
    if value is None:
        if "None" in annotation or "Any" in annotation:
            return
        raise ProtocolError(ErrorCode.MALFORMED, f"{kind}: {spec.name} may not be null")
    allowed = [
        _JSON_TYPES[part.strip().split("[")[0]]
        for part in annotation.split("|")
        if part.strip().split("[")[0] in _JSON_TYPES
    ]
    if not allowed:
        return
    if isinstance(value, bool) and bool not in allowed:
        raise ProtocolError(ErrorCode.MALFORMED, f"{kind}: {spec.name} has the wrong type")
    if not isinstance(
        value,
        tuple(t for group in allowed for t in (group if isinstance(group, tuple) else (group,))),
    ):
        raise ProtocolError(ErrorCode.MALFORMED, f"{kind}: {spec.name} has the wrong type")


class _NotJSON(ValueError):
    pass


def _refuse_constant(name: str) -> NoReturn:
    # Python's json reads NaN and Infinity, which JSON does not have; a NaN footprint would
    # quietly pass every budget comparison.
    raise _NotJSON(f"not a JSON message: {name} is not a number")


def decode(frame: bytes, limit: int = MAX_MESSAGE_BYTES) -> Message:
    """Turn one frame into a message, or raise ProtocolError saying exactly why not."""
    if len(frame) > limit:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"message of {len(frame)} bytes exceeds {limit}")
    try:
        data = json.loads(frame, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(ErrorCode.MALFORMED, f"not a JSON message: {exc}") from None
    except _NotJSON as exc:
        raise ProtocolError(ErrorCode.MALFORMED, str(exc)) from None
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.MALFORMED, "message is not a JSON object")
    version = data.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.VERSION_MISMATCH,
            f"protocol version {version!r} is not supported (this side speaks {PROTOCOL_VERSION})",
        )
    kind = data.get("type")
    if not isinstance(kind, str) or kind not in _REGISTRY:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind!r}")
    cls = _REGISTRY[kind]
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known) - {"type"}
    if unknown:
        raise ProtocolError(ErrorCode.MALFORMED, f"{kind}: unexpected fields {sorted(unknown)}")
    kwargs = {name: value for name, value in data.items() if name in known}
    missing = [
        name
        for name, spec in known.items()
        if name not in kwargs and spec.default is MISSING and spec.default_factory is MISSING
    ]
    if missing:
        raise ProtocolError(ErrorCode.MALFORMED, f"{kind}: missing fields {missing}")
    for name, value in kwargs.items():
        _check_type(kind, known[name], value)
    try:
        return cls(**kwargs)
    except ProtocolError:
        raise
    except (TypeError, ValueError) as exc:
        raise ProtocolError(ErrorCode.MALFORMED, f"{kind}: {exc}") from None


class ClientExit(IntEnum):
    """Exit codes of the loractl client, named so scripts can rely on them."""

    OK = 0
    JOB_FAILED = 1
    USAGE = 2
    DAEMON_NOT_RUNNING = 3
    NOT_FOUND = 4
    REFUSED = 5
    TIMEOUT = 124
    CONFIG_ERROR = 78


# -- control requests: one dataclass per request, one handler each in the supervisor --------

# A job's priority is a 32-bit signed number: it is stored, sorted and compared as one, and
# anything wider is a typo (SQLite's INTEGER would overflow at 64 bits in any case).
PRIORITY_MIN = -(2**31)
PRIORITY_MAX = 2**31 - 1


def check_priority(priority: int | None) -> None:
    """Refuse a priority outside the 32-bit signed range (INVALID_ARGUMENT)."""
    if priority is not None and not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise ProtocolError(
            ErrorCode.INVALID_ARGUMENT,
            f"priority {priority} is out of range: it must be between {PRIORITY_MIN} and "
            f"{PRIORITY_MAX}",
        )


@dataclass
class Request(Message):
    """Base of control requests (client -> supervisor)."""


@dataclass
class StatusRequest(Request):
    TYPE: ClassVar[str] = "status"


@dataclass
class ListRequest(Request):
    TYPE: ClassVar[str] = "list"
    states: list[str] | None = None
    rejected: bool = False  # also list the files the inbox rejected, with their reasons


@dataclass
class SubmitRequest(Request):
    TYPE: ClassVar[str] = "submit"
    config_path: str = ""
    priority: int | None = None

    def __post_init__(self) -> None:
        check_priority(self.priority)


@dataclass
class ShowRequest(Request):
    TYPE: ClassVar[str] = "show"
    job: str = ""


@dataclass
class ShutdownRequest(Request):
    TYPE: ClassVar[str] = "shutdown"


@dataclass
class JobRequest(Request):
    """A request about one job, named by id, unique id prefix or name."""

    job: str = ""


@dataclass
class CancelRequest(JobRequest):
    TYPE: ClassVar[str] = "cancel"


@dataclass
class PauseRequest(JobRequest):
    """Pause one job; with ``all`` (and no job), hold the whole queue: the running job
    checkpoints and pauses, and nothing new starts until ``resume --all``."""

    TYPE: ClassVar[str] = "pause"
    all: bool = False


@dataclass
class ResumeRequest(JobRequest):
    """Resume one job; with ``all``, release the queue and resume what ``pause --all``
    paused."""

    TYPE: ClassVar[str] = "resume"
    all: bool = False


@dataclass
class RemoveRequest(JobRequest):
    """Forget one finished job (its row and history); its adapters stay where they are."""

    TYPE: ClassVar[str] = "remove"


@dataclass
class RetryRequest(JobRequest):
    TYPE: ClassVar[str] = "retry"
    from_rung: int | None = None
    fresh: bool = False  # discard the checkpoints and train from the start


@dataclass
class PriorityRequest(JobRequest):
    TYPE: ClassVar[str] = "priority"
    priority: int = 0

    def __post_init__(self) -> None:
        check_priority(self.priority)


@dataclass
class HistoryRequest(JobRequest):
    TYPE: ClassVar[str] = "history"


@dataclass
class LadderRequest(JobRequest):
    TYPE: ClassVar[str] = "ladder"


@dataclass
class CleanRequest(Request):
    TYPE: ClassVar[str] = "clean"
    adapters: bool = False


# -- job lifecycle and the events the supervisor publishes ----------------------------------


class JobState(StrEnum):
    """Where a job is in its lifecycle; how it ended is the job's separate ``outcome``."""

    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    # A pause or cancel is being carried out: the trainer is checkpointing and exiting.
    PAUSING = "pausing"
    CANCELLING = "cancelling"
    BACKOFF = "backoff"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})
# A trainer process may exist for the job.
ACTIVE = frozenset({JobState.STARTING, JobState.RUNNING, JobState.PAUSING, JobState.CANCELLING})
# A user's pause or cancel is being carried out: the trainer is checkpointing and exiting.
STOPPING = frozenset({JobState.PAUSING, JobState.CANCELLING})
# The scheduler owns the job: a trainer exists or is about to be restarted.
IN_FLIGHT = ACTIVE | {JobState.BACKOFF}
# Waiting for, or holding, its turn: the queue has not drained while one of these is left.
PENDING = IN_FLIGHT | {JobState.QUEUED}

_S = JobState
# Every state change the store allows; :meth:`Store.transition` checks each against it.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    # -> failed: its config no longer loads (model moved, stored copy edited), so it cannot
    # even start; failing it with the reason is the only move that keeps the queue going.
    _S.QUEUED: frozenset({_S.STARTING, _S.PAUSED, _S.CANCELLED, _S.FAILED}),
    # -> queued: a restarted supervisor found no live trainer to adopt.
    _S.STARTING: frozenset(
        {
            _S.RUNNING,
            _S.PAUSING,
            _S.CANCELLING,
            _S.BACKOFF,
            _S.FAILED,
            _S.COMPLETED,
            _S.PAUSED,
            _S.CANCELLED,
            _S.QUEUED,
        }
    ),
    _S.RUNNING: frozenset(
        {
            _S.PAUSING,
            _S.CANCELLING,
            _S.BACKOFF,
            _S.COMPLETED,
            _S.FAILED,
            _S.PAUSED,
            _S.CANCELLED,
            _S.QUEUED,
        }
    ),
    # -> running (or starting, if it never reported): `resume` while the pause is carried
    # out (the last command wins); the exit of that attempt then goes straight back to the
    # queue. The rest: however the trainer ended while it was being paused.
    _S.PAUSING: frozenset(
        {
            _S.RUNNING,
            _S.STARTING,
            _S.PAUSED,
            _S.CANCELLING,
            _S.BACKOFF,
            _S.COMPLETED,
            _S.FAILED,
            _S.CANCELLED,
            _S.QUEUED,
        }
    ),
    # -> pausing: `pause` while the cancel is carried out (the last command wins).
    _S.CANCELLING: frozenset({_S.PAUSING, _S.CANCELLED, _S.COMPLETED, _S.FAILED}),
    _S.BACKOFF: frozenset({_S.STARTING, _S.FAILED, _S.PAUSED, _S.CANCELLED, _S.QUEUED}),
    _S.PAUSED: frozenset({_S.QUEUED, _S.CANCELLED}),
    # -> queued: `loractl retry`, from the checkpoint the job stopped at.
    _S.FAILED: frozenset({_S.QUEUED}),
    _S.COMPLETED: frozenset(),
    _S.CANCELLED: frozenset({_S.QUEUED}),
}
del _S


# Topics of the events socket (PUB): each frame pair is [topic, message.encode()].
EVENT_TOPICS = ("heartbeat", "job", "crash", "trainer_event", "rejected")


@dataclass
class JobEvent(Message):
    """A job changed state (published on the ``job`` topic)."""

    TYPE: ClassVar[str] = "job_event"
    job_id: str = ""
    state: str = ""
    reason: str = ""
    pid: int | None = None
    source: str = ""  # the inbox file a queued job came from


@dataclass
class CrashEvent(Message):
    """A trainer ended in a crash (published on the ``crash`` topic); also the crash record
    kept in the job's history."""

    TYPE: ClassVar[str] = "crash"
    job_id: str = ""
    cause: str = ""
    rule: str = ""
    explanation: str = ""
    exit_code: int | None = None
    signal: str | None = None
    step: int = 0
    checkpoint_step: int | None = None
    rung: int = 0
    attempt: int = 0
    pid: int = 0
    footprint_mb: float | None = None
    # The rank that failed (a distributed job's first to fail; a single process is rank 0).
    rank: int = 0
    host: str = ""
    at: float = field(default_factory=time.time)

    def record(self) -> dict[str, Any]:
        """The crash as stored with the job: the event's fields, without the envelope."""
        data = asdict(self)
        for envelope in ("id", "v", "job_id"):
            data.pop(envelope)
        return data


@dataclass
class RejectedEvent(Message):
    """The inbox turned a file away (published on the ``rejected`` topic)."""

    TYPE: ClassVar[str] = "rejected"
    name: str = ""
    reason: str = ""
