"""Why a trainer ended, decided by one ordered table of rules.

The supervisor gathers what it knows about a dead trainer into an ``ExitEvidence`` and
``classify`` walks ``RULES`` top to bottom; the first rule whose predicate holds gives the
cause, whether to retry, and whether to step down a rung of the memory ladder.

The order carries the design: what the supervisor itself did (a hang kill, a memory-guard stop)
is certain knowledge, then the trainer's own exit code, then its stderr, and only then the
death signal, read together with memory evidence. A signal alone never proves a memory failure:
SIGKILL is also what a user's ``kill -9`` sends, and SIGSEGV is what a real bug raises.

Nothing here imports mlx or touches the OS, so it is cheap to import and trivially testable.
"""

from __future__ import annotations

import math
import re
import signal as _signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from loractl.protocol import ExitCode
from loractl.signatures import (
    DISK_FULL_PATTERNS,
    GPU_WATCHDOG_PATTERNS,
    MEMORY_ERROR_PATTERNS,
    RESOURCE_LIMIT_PATTERNS,
    is_disk_full_text,
    is_gpu_watchdog,
    is_memory_error_text,
    is_resource_limit_text,
)
from loractl.supervisor.hostwait import UNREACHABLE


class Cause(StrEnum):
    DONE = "done"
    STOPPED = "stopped"
    MEMORY = "memory"
    RESOURCE_LIMIT = "resource_limit"
    HANG = "hang"
    CRASH = "crash"
    CONFIG_ERROR = "config_error"
    DATA_ERROR = "data_error"
    KILLED_EXTERNALLY = "killed_externally"
    GPU_WATCHDOG = "gpu_watchdog"
    DISK_FULL = "disk_full"
    ADAPTER_BUSY = "adapter_busy"
    HOST_UNREACHABLE = "host_unreachable"


def split_returncode(returncode: int | None) -> tuple[int | None, int | None]:
    """``Popen.returncode`` (``-N`` = killed by signal N) as ``(exit_code, signal)``."""
    if returncode is not None and returncode < 0:
        return None, -returncode
    return returncode, None


@dataclass(frozen=True)
class ExitEvidence:
    """Everything the supervisor knows about one trainer's end."""

    exit_code: int | None  # None if killed by a signal or unknown (adopted, non-child)
    signal: int | None  # the signal that killed it, if any
    stderr_tail: str = ""
    last_footprint_mb: float | None = None  # latest reading, or the peak of the last few seconds
    budget_mb: float | None = None
    pressure: str = "normal"  # "normal" | "warn" | "critical"
    cgroup_oom_kills_delta: int = 0
    hang_detected: bool = False  # the supervisor killed it for no heartbeat / no progress
    memory_guard_stop: bool = False  # the supervisor stopped it for budget / critical pressure
    user_stop: bool = False  # a user pause, cancel or shutdown asked it to stop
    # A distributed attempt's rank blamed for its end, in words ("rank 1 (mac2 at
    # 10.0.0.2)"), and how the supervisor learned it was gone ("its ssh session ended (exit
    # 255)"): certain knowledge, where the stderr shared by every rank ends with a survivor's
    # words about its lost peer.
    culprit: str = ""
    culprit_lost: str = ""

    @classmethod
    def from_returncode(cls, returncode: int | None, **fields: Any) -> ExitEvidence:
        """Build from ``Popen.returncode`` / ``os.waitstatus_to_exitcode`` (``-N`` = signal N)."""
        exit_code, signum = split_returncode(returncode)
        return cls(exit_code=exit_code, signal=signum, **fields)


# A reading this close to the budget means the trainer was about to be, or was, out of memory.
NEAR_BUDGET_FRACTION = 0.9

# Signals the kernel or the allocator deliver when memory runs out: the Linux OOM killer and
# macOS jetsam send SIGKILL, MLX's CPU backend segfaults when malloc fails, Metal aborts.
MEMORY_SIGNALS = frozenset({_signal.SIGKILL, _signal.SIGSEGV, _signal.SIGABRT, _signal.SIGBUS})
# Signals someone sends on purpose; the trainer traps SIGTERM and SIGINT once it is running,
# so dying of them means it was killed before its handlers were installed.
EXTERNAL_SIGNALS = frozenset(
    {_signal.SIGKILL, _signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP, _signal.SIGQUIT}
)
FAULT_SIGNALS = frozenset(
    {_signal.SIGSEGV, _signal.SIGABRT, _signal.SIGBUS, _signal.SIGILL, _signal.SIGFPE}
)

_LINE_LIMIT = 200
# A data or config error's line is the whole diagnosis (file, line, what is wrong): it is kept
# whole up to this much, so the reason never stops mid-sentence.
_ERROR_LINE_LIMIT = 2000

# The C++ runtime's preamble to an uncaught exception says nothing a reader needs.
_NOISE_PREFIX = "libc++abi: terminating due to uncaught exception of type "


def signal_name(n: int) -> str:
    """``SIGSEGV`` for 11 (on Linux); ``signal 99`` for a number this platform does not name."""
    try:
        return _signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


def _death_signal(ev: ExitEvidence) -> int | None:
    """The killing signal, also when a shell in between reported it as exit 128+N."""
    if ev.signal is not None:
        return ev.signal
    # The trainer's own codes are all below 128, so a higher one is a wrapper's relay of a signal.
    if ev.exit_code is not None and 128 < ev.exit_code < 128 + 65:
        try:
            return _signal.Signals(ev.exit_code - 128)
        except ValueError:
            return None
    return None


def _how(ev: ExitEvidence) -> str:
    """How it ended, in words: ``exit 1``, ``SIGKILL``, ``exit 137 (SIGKILL)``."""
    sig = _death_signal(ev)
    if ev.signal is not None:
        return signal_name(ev.signal)
    if ev.exit_code is not None:
        return f"exit {ev.exit_code} ({signal_name(sig)})" if sig else f"exit {ev.exit_code}"
    return "an unknown exit"


def _last_line(
    text: str, patterns: Sequence[re.Pattern[str]] | None = None, limit: int = _LINE_LIMIT
) -> str:
    """The last non-empty stderr line, or the last one matching ``patterns``, shortened."""
    for line in reversed(text.splitlines()):
        line = line.strip().removeprefix(_NOISE_PREFIX)
        if line and (patterns is None or any(p.search(line) for p in patterns)):
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return ""


def _with_tail(
    prefix: str,
    ev: ExitEvidence,
    patterns: Sequence[re.Pattern[str]] | None = None,
    sep: str = ": ",
    limit: int = _LINE_LIMIT,
) -> str:
    line = _last_line(ev.stderr_tail, patterns, limit)
    return f"{prefix}{sep}{line}" if line else prefix


def _footprint_words(ev: ExitEvidence) -> str:
    if ev.last_footprint_mb is None or not math.isfinite(ev.last_footprint_mb):
        return "footprint unknown"
    if ev.budget_mb and math.isfinite(ev.budget_mb):
        # Floored, so 99.5% never reads as a full 100%; capped, so a tiny budget cannot overflow.
        percent = math.floor(min(100 * ev.last_footprint_mb / ev.budget_mb, 1e6))
        return (
            f"footprint {ev.last_footprint_mb:.0f} MB of a {ev.budget_mb:.0f} MB budget "
            f"({percent}%)"
        )
    return f"footprint {ev.last_footprint_mb:.0f} MB (no budget)"


def memory_evidence(ev: ExitEvidence) -> list[str]:
    """The reasons, each a short phrase, to believe memory ran out; empty if there are none.

    Only what the supervisor observes: its footprint readings, the system pressure and the
    cgroup's oom_kill counter. macOS jetsam's own mark (kqueue's NOTE_EXIT_MEMORY) reaches
    only a parent that watches its child's exit through kqueue, and no part of the supervisor
    does (an adopted trainer or a rank under mlx.launch is not its child anyway), so a jetsam
    kill is known by its SIGKILL and the memory pressure that came with it.
    """
    reasons = []
    if (
        ev.last_footprint_mb is not None
        and math.isfinite(ev.last_footprint_mb)
        and ev.budget_mb
        and ev.budget_mb > 0
        and ev.last_footprint_mb >= NEAR_BUDGET_FRACTION * ev.budget_mb
    ):
        reasons.append(_footprint_words(ev))
    if ev.pressure in ("warn", "critical"):
        reasons.append(f"memory pressure {ev.pressure}")
    if ev.cgroup_oom_kills_delta > 0:
        reasons.append(f"cgroup oom_kill counter up by {ev.cgroup_oom_kills_delta}")
    return reasons


def _evidence_words(ev: ExitEvidence) -> str:
    return " and ".join(memory_evidence(ev))


def _no_evidence_words(ev: ExitEvidence) -> str:
    return f"no memory evidence; {_footprint_words(ev)}; pressure {ev.pressure}"


def _external_words(ev: ExitEvidence) -> str:
    if memory_evidence(ev):
        # Only SIGTERM, SIGINT, SIGHUP and SIGQUIT get here with evidence, and those are sent on
        # purpose, never by the kernel for lack of memory.
        return (
            f"{_how(ev)}, killed from outside (a deliberate signal, despite {_evidence_words(ev)})"
        )
    return f"{_how(ev)}, killed from outside: {_no_evidence_words(ev)}"


@dataclass(frozen=True)
class Rule:
    """One row of the table: when ``predicate`` holds, the trainer ended for ``cause``."""

    name: str
    predicate: Callable[[ExitEvidence], bool]
    cause: Cause
    retry: bool
    step_down: bool
    explain: Callable[[ExitEvidence], str]


@dataclass(frozen=True)
class Verdict:
    cause: Cause
    rule: str  # the name of the table row that decided
    retry: bool
    step_down: bool
    explanation: str  # one human line


def _sig_in(signals: frozenset[int]) -> Callable[[ExitEvidence], bool]:
    def predicate(ev: ExitEvidence) -> bool:
        sig = _death_signal(ev)
        return sig is not None and sig in signals

    return predicate


def _guard_words(ev: ExitEvidence) -> str:
    reasons = memory_evidence(ev)
    if ev.last_footprint_mb is not None and not any("footprint" in r for r in reasons):
        reasons.insert(0, _footprint_words(ev))
    detail = "; ".join(reasons) if reasons else "over budget"
    return f"stopped by the memory guard, then {_how(ev)}: {detail}"


# The trainer's pre-flight verdict line: "does not fit: peak X MB over the Y MB budget ...".
_DOES_NOT_FIT = re.compile(r"does not fit: ")
_HOST_UNREACHABLE = re.compile(re.escape(UNREACHABLE))

RULES: tuple[Rule, ...] = (
    # A finished run is finished, whatever the supervisor was doing to it at that moment.
    Rule(
        "done",
        lambda ev: ev.exit_code == ExitCode.DONE,
        Cause.DONE,
        retry=False,
        step_down=False,
        explain=lambda ev: "exit 0: training finished",
    ),
    # The pre-flight measured the attempt's longest batch over the budget before training: a
    # memory stop at step 0, in the trainer's own words, and nothing lost.
    Rule(
        "preflight_over_budget",
        lambda ev: ev.exit_code == ExitCode.DOES_NOT_FIT,
        Cause.MEMORY,
        retry=True,
        step_down=True,
        explain=lambda ev: (
            "exit 83: " + (_last_line(ev.stderr_tail, [_DOES_NOT_FIT]) or "does not fit")
        ),
    ),
    # The other Mac did not answer ssh, so no rank was started: wait for it, without
    # spending the retry budget (policy.after_exit), then pause.
    Rule(
        "host_unreachable",
        lambda ev: ev.exit_code == ExitCode.HOST_UNREACHABLE,
        Cause.HOST_UNREACHABLE,
        retry=True,
        step_down=False,
        explain=lambda ev: _with_tail("exit 84", ev, [_HOST_UNREACHABLE], limit=_ERROR_LINE_LIMIT),
    ),
    # The supervisor's own actions are certain knowledge and outrank any guess from the symptoms.
    Rule(
        "hang",
        lambda ev: ev.hang_detected,
        Cause.HANG,
        retry=True,
        step_down=False,
        explain=lambda ev: (
            (f"{ev.culprit}: " if ev.culprit else "")
            + f"killed by the supervisor for no heartbeat or no progress, then {_how(ev)}"
        ),
    ),
    Rule(
        "memory_guard",
        lambda ev: ev.memory_guard_stop,
        Cause.MEMORY,
        retry=True,
        step_down=True,
        explain=_guard_words,
    ),
    Rule(
        "stopped",
        lambda ev: ev.exit_code == ExitCode.STOPPED and ev.user_stop,
        Cause.STOPPED,
        retry=False,
        step_down=False,
        explain=lambda ev: "exit 82: stopped on request after a checkpoint",
    ),
    # Asked to stop, it did not make it to a clean exit in the grace period and was killed.
    Rule(
        "stopped_by_signal",
        lambda ev: ev.user_stop and ev.exit_code is None,
        Cause.STOPPED,
        retry=False,
        step_down=False,
        explain=lambda ev: f"stopped on request, ended by {_how(ev)}",
    ),
    # Exit 82 is the trainer's SIGTERM handler; nobody here asked, so someone else sent it.
    Rule(
        "stopped_externally",
        lambda ev: ev.exit_code == ExitCode.STOPPED,
        Cause.KILLED_EXTERNALLY,
        retry=True,
        step_down=False,
        explain=lambda ev: "exit 82: stopped by a SIGTERM that loractl did not send",
    ),
    Rule(
        "data_error",
        lambda ev: ev.exit_code == ExitCode.DATA_ERROR,
        Cause.DATA_ERROR,
        retry=False,
        step_down=False,
        explain=lambda ev: _with_tail("exit 65 (data error)", ev, limit=_ERROR_LINE_LIMIT),
    ),
    Rule(
        "config_error",
        lambda ev: ev.exit_code == ExitCode.CONFIG_ERROR,
        Cause.CONFIG_ERROR,
        retry=False,
        step_down=False,
        explain=lambda ev: _with_tail("exit 78 (config error)", ev, limit=_ERROR_LINE_LIMIT),
    ),
    # A full disk is not the trainer's fault and a restart cannot help until space is freed:
    # the job pauses with the free space in the reason (policy.after_exit), keeping its
    # last checkpoint.
    Rule(
        "disk_full",
        lambda ev: (
            ev.exit_code == ExitCode.DISK_FULL
            or (ev.exit_code not in (0, None) and is_disk_full_text(ev.stderr_tail))
        ),
        Cause.DISK_FULL,
        retry=False,
        step_down=False,
        explain=lambda ev: _with_tail(f"{_how(ev)}: the disk is full", ev, DISK_FULL_PATTERNS),
    ),
    # Another trainer (a foreground `loractl train`, an orphan) holds the adapter folder: wait
    # and try again; never two writers of one folder's checkpoints.
    Rule(
        "adapter_busy",
        lambda ev: ev.exit_code == ExitCode.ADAPTER_BUSY,
        Cause.ADAPTER_BUSY,
        retry=True,
        step_down=False,
        explain=lambda ev: _with_tail("exit 73 (adapter folder busy)", ev),
    ),
    # Before every memory rule: MLX's buffer-count limit reads like an allocation failure
    # ("[metal::malloc]") but is not one; the trainer exits 1 on it, an older one 75, and an
    # uncaught one aborts. Restart on the same rung.
    Rule(
        "resource_limit_text",
        lambda ev: is_resource_limit_text(ev.stderr_tail),
        Cause.RESOURCE_LIMIT,
        retry=True,
        step_down=False,
        explain=lambda ev: _with_tail(
            f"{_how(ev)} at MLX's buffer-count limit, not out of memory; a restart frees the"
            " buffers",
            ev,
            RESOURCE_LIMIT_PATTERNS,
        ),
    ),
    Rule(
        "out_of_memory_exit",
        lambda ev: ev.exit_code == ExitCode.OUT_OF_MEMORY,
        Cause.MEMORY,
        retry=True,
        step_down=True,
        explain=lambda ev: (
            "exit 75: the trainer caught an allocation failure"
            + ("" if ev.last_footprint_mb is None else f"; {_footprint_words(ev)}")
        ),
    ),
    # Checked before the memory text: the watchdog is also a Metal command-buffer failure, and a
    # smaller rung would not make a too-long command buffer any shorter.
    Rule(
        "gpu_watchdog_text",
        lambda ev: is_gpu_watchdog(ev.stderr_tail),
        Cause.GPU_WATCHDOG,
        retry=True,
        step_down=False,
        explain=lambda ev: _with_tail(
            f"{_how(ev)} after the GPU watchdog killed a command buffer",
            ev,
            GPU_WATCHDOG_PATTERNS,
        ),
    ),
    Rule(
        "memory_error_text",
        lambda ev: is_memory_error_text(ev.stderr_tail),
        Cause.MEMORY,
        retry=True,
        step_down=True,
        explain=lambda ev: _with_tail(
            f"{_how(ev)} after an allocation failure", ev, MEMORY_ERROR_PATTERNS
        ),
    ),
    Rule(
        "signal_with_memory_evidence",
        lambda ev: _sig_in(MEMORY_SIGNALS)(ev) and bool(memory_evidence(ev)),
        Cause.MEMORY,
        retry=True,
        step_down=True,
        explain=lambda ev: f"{_how(ev)} with {_evidence_words(ev)}",
    ),
    # A rank the supervisor saw go (its ssh session ended, its process vanished, it said it
    # failed): its own end, never the survivors' words about losing it.
    Rule(
        "rank_lost",
        lambda ev: bool(ev.culprit_lost),
        Cause.CRASH,
        retry=True,
        step_down=False,
        explain=lambda ev: f"{ev.culprit or 'a rank'} lost: {ev.culprit_lost}",
    ),
    Rule(
        "external_signal",
        _sig_in(EXTERNAL_SIGNALS),
        Cause.KILLED_EXTERNALLY,
        retry=True,
        step_down=False,
        explain=_external_words,
    ),
    Rule(
        "fault_signal",
        _sig_in(FAULT_SIGNALS),
        Cause.CRASH,
        retry=True,
        step_down=False,
        explain=lambda ev: _with_tail(
            f"{_how(ev)}, a crash: {_no_evidence_words(ev)}", ev, sep="; last stderr: "
        ),
    ),
    # An adopted trainer is not our child, so its exit status cannot be collected.
    Rule(
        "vanished",
        lambda ev: ev.exit_code is None and ev.signal is None,
        Cause.KILLED_EXTERNALLY,
        retry=True,
        step_down=False,
        explain=lambda ev: "the trainer vanished and its exit status is unknown",
    ),
    # Last, and always true, so every exit gets a verdict.
    Rule(
        "other_failure",
        lambda ev: True,
        Cause.CRASH,
        retry=True,
        step_down=False,
        explain=lambda ev: _with_tail(f"{_how(ev)}, a crash", ev),
    ),
)


def classify(ev: ExitEvidence) -> Verdict:
    """The verdict of the first rule in ``RULES`` that matches ``ev``."""
    for rule in RULES:
        if rule.predicate(ev):
            return Verdict(
                cause=rule.cause,
                rule=rule.name,
                retry=rule.retry,
                step_down=rule.step_down,
                explanation=rule.explain(ev),
            )
    raise AssertionError("the last rule matches everything")  # pragma: no cover
