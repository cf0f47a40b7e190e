"""The crash classifier's table, row by row, against real stderr tails from the fixtures."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import FIXTURES
from loractl.protocol import ExitCode
from loractl.supervisor.classify import (
    NEAR_BUDGET_FRACTION,
    RULES,
    Cause,
    ExitEvidence,
    classify,
    memory_evidence,
    signal_name,
)

METAL_OOM = (FIXTURES / "macos" / "metal_oom_stderr.txt").read_text()
METAL_WATCHDOG = (FIXTURES / "macos" / "metal_watchdog_stderr.txt").read_text()
# MLX's Metal buffer-count limit (mlx/backend/metal/allocator.cpp), as an uncaught C++ error.
METAL_RESOURCE_LIMIT = (FIXTURES / "macos" / "metal_resource_limit_stderr.txt").read_text()
# The same failure raised into Python and reported by loractl's trainer before it exits 1.
TRAINER_RESOURCE_LIMIT = (
    "loractl: MLX resource limit, not out of memory: [metal::malloc] Resource limit (499000) "
    "exceeded. (too many live buffers; a restart frees them)\n"
)
MLX_BUFFER_TOO_BIG = (
    "[metal::malloc] Attempting to allocate 21474836480 bytes which is greater than the maximum "
    "allowed buffer size of 17179869184 bytes."
)
MLX_MALLOC = "[malloc] Unable to allocate 1073741824 bytes."
CUDA_OOM = "RuntimeError: cudaMallocAsync(&data, size, stream) failed: out of memory"
TRACEBACK = (
    'Traceback (most recent call last):\n  File "train.py", line 10, in <module>\n    step()\n'
)


def ev(exit_code=None, sig=None, **fields) -> ExitEvidence:
    return ExitEvidence(exit_code=exit_code, signal=sig, **fields)


# (case id, evidence, expected rule). Every row of RULES must appear at least once.
CASES = [
    ("exit 0", ev(0), "done"),
    ("exit 0 while the guard was stopping it", ev(0, memory_guard_stop=True), "done"),
    (
        "pre-flight over budget",
        ev(
            ExitCode.DOES_NOT_FIT,
            stderr_tail="loractl: does not fit: peak 412 MB over the 300 MB budget on the"
            " longest batch (1024 tokens)\n",
        ),
        "preflight_over_budget",
    ),
    (
        "another Mac did not answer ssh",
        ev(
            ExitCode.HOST_UNREACHABLE,
            stderr_tail="loractl: host unreachable: mac2 did not answer ssh within 30 s "
            "(ssh exit 255: Connection refused)\n",
        ),
        "host_unreachable",
    ),
    ("hang, then SIGKILL", ev(sig=signal.SIGKILL, hang_detected=True), "hang"),
    (
        "a remote rank's ssh session ended",
        ev(
            255,
            culprit="rank 1 (mac2 at 10.0.0.2)",
            culprit_lost="its ssh session ended (exit 255)",
            stderr_tail="rank 0 was asked to stop but has been inside a collective for 13 s\n",
        ),
        "rank_lost",
    ),
    (
        "hang, then SIGKILL under pressure",
        ev(sig=signal.SIGKILL, hang_detected=True, pressure="critical"),
        "hang",
    ),
    (
        "guard stop, exit 82",
        ev(ExitCode.STOPPED, memory_guard_stop=True, last_footprint_mb=2100, budget_mb=2000),
        "memory_guard",
    ),
    (
        "guard stop, SIGKILL after grace",
        ev(sig=signal.SIGKILL, memory_guard_stop=True, pressure="critical"),
        "memory_guard",
    ),
    ("user stop, exit 82", ev(ExitCode.STOPPED, user_stop=True), "stopped"),
    ("user stop, SIGKILL after grace", ev(sig=signal.SIGKILL, user_stop=True), "stopped_by_signal"),
    (
        "user stop, SIGKILL under pressure",
        ev(sig=signal.SIGKILL, user_stop=True, pressure="critical"),
        "stopped_by_signal",
    ),
    ("exit 82 nobody asked for", ev(ExitCode.STOPPED), "stopped_externally"),
    (
        "exit 65",
        ev(ExitCode.DATA_ERROR, stderr_tail="data error: train.jsonl line 3"),
        "data_error",
    ),
    ("exit 78", ev(ExitCode.CONFIG_ERROR, stderr_tail="config: rank must be > 0"), "config_error"),
    ("exit 74", ev(ExitCode.DISK_FULL, stderr_tail="disk full: 3 MB free on /x"), "disk_full"),
    ("exit 73", ev(ExitCode.ADAPTER_BUSY, stderr_tail="in use by pid 7"), "adapter_busy"),
    (
        "ENOSPC in a traceback, exit 1",
        ev(1, stderr_tail="  File x\nOSError: [Errno 28] No space left on device: 'ck.tmp'"),
        "disk_full",
    ),
    ("exit 75", ev(ExitCode.OUT_OF_MEMORY, stderr_tail=METAL_OOM), "out_of_memory_exit"),
    (
        "buffer-count limit abort",
        ev(sig=signal.SIGABRT, stderr_tail=METAL_RESOURCE_LIMIT),
        "resource_limit_text",
    ),
    (
        "buffer-count limit, trainer exit 1",
        ev(1, stderr_tail=TRAINER_RESOURCE_LIMIT),
        "resource_limit_text",
    ),
    (
        "buffer-count limit, exit 75 of an older trainer",
        ev(ExitCode.OUT_OF_MEMORY, stderr_tail="loractl: out of memory: " + METAL_RESOURCE_LIMIT),
        "resource_limit_text",
    ),
    (
        "buffer-count limit near the budget",
        ev(1, stderr_tail=TRAINER_RESOURCE_LIMIT, last_footprint_mb=1990, budget_mb=2000),
        "resource_limit_text",
    ),
    (
        "a real OOM after an earlier buffer-count line",
        ev(1, stderr_tail=METAL_RESOURCE_LIMIT + TRACEBACK + METAL_OOM),
        "memory_error_text",
    ),
    (
        "exit 75 at low readings",
        ev(ExitCode.OUT_OF_MEMORY, last_footprint_mb=100, budget_mb=2000),
        "out_of_memory_exit",
    ),
    (
        "watchdog abort (MLX < 0.32)",
        ev(sig=signal.SIGABRT, stderr_tail=METAL_WATCHDOG),
        "gpu_watchdog_text",
    ),
    (
        "watchdog RuntimeError (MLX >= 0.32)",
        ev(1, stderr_tail=TRACEBACK + METAL_WATCHDOG),
        "gpu_watchdog_text",
    ),
    (
        "watchdog abort under pressure",
        ev(sig=signal.SIGABRT, stderr_tail=METAL_WATCHDOG, pressure="critical"),
        "gpu_watchdog_text",
    ),
    (
        "Metal OOM abort (MLX < 0.32)",
        ev(sig=signal.SIGABRT, stderr_tail=METAL_OOM),
        "memory_error_text",
    ),
    (
        "Metal OOM RuntimeError (MLX >= 0.32)",
        ev(1, stderr_tail=TRACEBACK + METAL_OOM),
        "memory_error_text",
    ),
    (
        "metal::malloc over the buffer limit",
        ev(1, stderr_tail=MLX_BUFFER_TOO_BIG),
        "memory_error_text",
    ),
    ("malloc failure", ev(1, stderr_tail=MLX_MALLOC), "memory_error_text"),
    ("CUDA OOM", ev(1, stderr_tail=TRACEBACK + CUDA_OOM), "memory_error_text"),
    ("MemoryError", ev(1, stderr_tail=TRACEBACK + "MemoryError"), "memory_error_text"),
    (
        "SIGSEGV near budget",
        ev(sig=signal.SIGSEGV, last_footprint_mb=1850, budget_mb=2000),
        "signal_with_memory_evidence",
    ),
    (
        "SIGSEGV exactly at the near-budget line",
        ev(sig=signal.SIGSEGV, last_footprint_mb=NEAR_BUDGET_FRACTION * 2000, budget_mb=2000),
        "signal_with_memory_evidence",
    ),
    (
        "SIGKILL with cgroup oom_kill rise",
        ev(sig=signal.SIGKILL, cgroup_oom_kills_delta=1),
        "signal_with_memory_evidence",
    ),
    (
        "SIGKILL under critical pressure",
        ev(sig=signal.SIGKILL, pressure="critical"),
        "signal_with_memory_evidence",
    ),
    (
        "SIGKILL under warn pressure",
        ev(sig=signal.SIGKILL, pressure="warn"),
        "signal_with_memory_evidence",
    ),
    (
        "SIGABRT near budget",
        ev(sig=signal.SIGABRT, last_footprint_mb=1990, budget_mb=2000),
        "signal_with_memory_evidence",
    ),
    (
        "SIGBUS near budget",
        ev(sig=signal.SIGBUS, last_footprint_mb=1990, budget_mb=2000),
        "signal_with_memory_evidence",
    ),
    (
        "exit 137 from a shell, cgroup oom_kill rise",
        ev(137, cgroup_oom_kills_delta=2),
        "signal_with_memory_evidence",
    ),
    ("SIGKILL alone", ev(sig=signal.SIGKILL), "external_signal"),
    (
        "SIGKILL at low readings",
        ev(sig=signal.SIGKILL, last_footprint_mb=300, budget_mb=2000),
        "external_signal",
    ),
    ("SIGTERM before handlers", ev(sig=signal.SIGTERM), "external_signal"),
    ("SIGTERM under pressure", ev(sig=signal.SIGTERM, pressure="critical"), "external_signal"),
    ("SIGINT", ev(sig=signal.SIGINT), "external_signal"),
    ("SIGHUP", ev(sig=signal.SIGHUP), "external_signal"),
    ("SIGQUIT", ev(sig=signal.SIGQUIT), "external_signal"),
    (
        "SIGSEGV at low readings",
        ev(sig=signal.SIGSEGV, last_footprint_mb=300, budget_mb=2000),
        "fault_signal",
    ),
    ("SIGSEGV with no readings", ev(sig=signal.SIGSEGV), "fault_signal"),
    (
        "SIGSEGV, footprint but no budget",
        ev(sig=signal.SIGSEGV, last_footprint_mb=1e6),
        "fault_signal",
    ),
    ("SIGABRT", ev(sig=signal.SIGABRT, stderr_tail="Assertion failed: x"), "fault_signal"),
    ("SIGILL", ev(sig=signal.SIGILL), "fault_signal"),
    ("SIGFPE", ev(sig=signal.SIGFPE), "fault_signal"),
    ("exit 139 from a shell", ev(139), "fault_signal"),
    ("adopted trainer vanished", ev(), "vanished"),
    ("exit 1 traceback", ev(1, stderr_tail=TRACEBACK + "ValueError: bad"), "other_failure"),
    ("exit 2 usage", ev(ExitCode.USAGE), "other_failure"),
    ("SIGPIPE", ev(sig=signal.SIGPIPE), "other_failure"),
]


@pytest.mark.parametrize(("evidence", "rule"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_case_is_decided_by_its_rule(evidence, rule):
    """Each evidence is decided by the expected table row, with that row's cause and policy."""
    verdict = classify(evidence)
    row = next(r for r in RULES if r.name == rule)
    assert (verdict.rule, verdict.cause, verdict.retry, verdict.step_down) == (
        row.name,
        row.cause,
        row.retry,
        row.step_down,
    )
    assert verdict.explanation and "\n" not in verdict.explanation


def test_every_rule_is_exercised():
    """The cases above reach every row of RULES, so no rule is untested."""
    assert {rule.name for rule in RULES} == {c[2] for c in CASES}


def test_rule_names_are_unique_and_the_last_rule_catches_everything():
    """Rule names identify rows unambiguously and no evidence can fall off the table."""
    names = [rule.name for rule in RULES]
    assert len(names) == len(set(names))
    assert RULES[-1].predicate(ev(3))


@pytest.mark.parametrize(
    ("evidence", "cause", "retry", "step_down"),
    [
        (ev(0), Cause.DONE, False, False),
        (ev(ExitCode.STOPPED, user_stop=True), Cause.STOPPED, False, False),
        (ev(ExitCode.DATA_ERROR), Cause.DATA_ERROR, False, False),
        (ev(ExitCode.CONFIG_ERROR), Cause.CONFIG_ERROR, False, False),
        (ev(ExitCode.OUT_OF_MEMORY), Cause.MEMORY, True, True),
        (ev(sig=signal.SIGKILL, hang_detected=True), Cause.HANG, True, False),
        (ev(sig=signal.SIGABRT, stderr_tail=METAL_WATCHDOG), Cause.GPU_WATCHDOG, True, False),
        (ev(sig=signal.SIGABRT, stderr_tail=METAL_OOM), Cause.MEMORY, True, True),
        (ev(sig=signal.SIGKILL), Cause.KILLED_EXTERNALLY, True, False),
        (ev(sig=signal.SIGSEGV), Cause.CRASH, True, False),
    ],
    ids=[
        "done",
        "stopped",
        "data",
        "config",
        "oom-exit",
        "hang",
        "watchdog",
        "metal-oom",
        "killed",
        "crash",
    ],
)
def test_policy_per_cause(evidence, cause, retry, step_down):
    """Config/data errors and stops are never retried; only memory steps down a rung."""
    verdict = classify(evidence)
    assert (verdict.cause, verdict.retry, verdict.step_down) == (cause, retry, step_down)


def test_buffer_count_limit_restarts_on_the_same_rung():
    """MLX's '[metal::malloc] Resource limit' is retried without a step-down, unlike an OOM."""
    verdict = classify(ev(sig=signal.SIGABRT, stderr_tail=METAL_RESOURCE_LIMIT))
    assert (verdict.cause, verdict.retry, verdict.step_down) == (Cause.RESOURCE_LIMIT, True, False)
    assert "Resource limit (499000) exceeded" in verdict.explanation
    assert classify(ev(sig=signal.SIGABRT, stderr_tail=METAL_OOM)).step_down


def test_data_error_reasons_are_kept_whole():
    """A long data-error line (file, line, JSON error with its column) is not cut short."""
    line = (
        "loractl: data error: /" + "deep/" * 40 + "train.jsonl:7: invalid JSON: Invalid "
        "control character at column 17"
    )
    verdict = classify(ev(ExitCode.DATA_ERROR, stderr_tail=line + "\n"))
    assert verdict.explanation.endswith("Invalid control character at column 17")


def test_watchdog_fixture_is_not_memory_even_though_it_is_a_metal_error():
    """The watchdog's Metal command-buffer failure never reads as memory, so no step-down."""
    verdict = classify(ev(1, stderr_tail=METAL_WATCHDOG, last_footprint_mb=1990, budget_mb=2000))
    assert verdict.cause is Cause.GPU_WATCHDOG
    assert not verdict.step_down
    assert "Impacting Interactivity" in verdict.explanation


def test_segfault_near_budget_vs_low_readings():
    """The same SIGSEGV is memory at 92% of the budget and a plain crash at 15%."""
    near = classify(ev(sig=signal.SIGSEGV, last_footprint_mb=1850, budget_mb=2000))
    low = classify(ev(sig=signal.SIGSEGV, last_footprint_mb=300, budget_mb=2000))
    assert near.cause is Cause.MEMORY and near.step_down
    assert near.explanation == "SIGSEGV with footprint 1850 MB of a 2000 MB budget (92%)"
    assert low.cause is Cause.CRASH and not low.step_down
    assert "no memory evidence" in low.explanation and "15%" in low.explanation


def test_explanations_quote_the_deciding_stderr_line():
    """A memory verdict from stderr names the allocation line, not the traceback around it."""
    verdict = classify(ev(1, stderr_tail=TRACEBACK + MLX_MALLOC + "\n\n"))
    assert verdict.explanation == f"exit 1 after an allocation failure: {MLX_MALLOC}"
    assert classify(ev(sig=signal.SIGKILL, cgroup_oom_kills_delta=2)).explanation == (
        "SIGKILL with cgroup oom_kill counter up by 2"
    )


def test_long_stderr_lines_are_shortened():
    """A huge last stderr line is cut so the explanation stays one readable line."""
    verdict = classify(ev(1, stderr_tail="x" * 5000))
    assert len(verdict.explanation) < 300 and verdict.explanation.endswith("...")


def test_memory_evidence_lists_every_reason():
    """Budget, pressure and the cgroup counter each add a reason; none gives an empty list."""
    assert memory_evidence(ev(sig=signal.SIGKILL)) == []
    reasons = memory_evidence(
        ev(
            sig=signal.SIGKILL,
            last_footprint_mb=1900,
            budget_mb=2000,
            pressure="critical",
            cgroup_oom_kills_delta=1,
        )
    )
    assert reasons == [
        "footprint 1900 MB of a 2000 MB budget (95%)",
        "memory pressure critical",
        "cgroup oom_kill counter up by 1",
    ]


def test_memory_evidence_ignores_readings_below_the_line_or_without_budget():
    """Just under 90% of the budget, or a zero/absent budget, is not evidence."""
    assert memory_evidence(ev(last_footprint_mb=1799, budget_mb=2000)) == []
    assert memory_evidence(ev(last_footprint_mb=1799, budget_mb=0)) == []
    assert memory_evidence(ev(last_footprint_mb=1799)) == []


def test_from_returncode_splits_signals_from_exit_codes():
    """Popen's -N becomes signal N, other codes stay exit codes, None stays unknown."""
    assert ExitEvidence.from_returncode(-signal.SIGKILL) == ev(sig=signal.SIGKILL)
    assert ExitEvidence.from_returncode(0) == ev(0)
    assert ExitEvidence.from_returncode(137) == ev(137)  # a shell's relay: classify reads it
    assert ExitEvidence.from_returncode(75, pressure="warn") == ev(75, pressure="warn")
    assert ExitEvidence.from_returncode(None) == ev()
    assert ExitEvidence.from_returncode(-signal.SIGTERM, user_stop=True).user_stop


@given(st.one_of(st.none(), st.integers(-64, 255)))
def test_from_returncode_keeps_exactly_what_popen_said(returncode):
    """Every returncode maps to at most one of exit code and signal, and back to itself."""
    evidence = ExitEvidence.from_returncode(returncode)
    assert evidence.exit_code is None or evidence.signal is None
    if returncode is None:
        assert (evidence.exit_code, evidence.signal) == (None, None)
    elif evidence.signal is not None:
        assert -evidence.signal == returncode
    else:
        assert evidence.exit_code == returncode


def test_real_child_exits_read_through_from_returncode():
    """Real children's returncodes classify as done, data error and killed externally."""
    script = {
        "0": "raise SystemExit(0)",
        "65": "raise SystemExit(65)",
        "kill": "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
    }
    causes = {}
    for name, code in script.items():
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
        causes[name] = classify(ExitEvidence.from_returncode(proc.returncode)).cause
    assert causes == {
        "0": Cause.DONE,
        "65": Cause.DATA_ERROR,
        "kill": Cause.KILLED_EXTERNALLY,
    }


def test_real_segfaulting_child_classifies_as_crash():
    """A real child killed by SIGSEGV, read through Popen, is a crash when memory was fine."""
    proc = subprocess.run(
        [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    verdict = classify(ExitEvidence.from_returncode(proc.returncode, stderr_tail=proc.stderr))
    assert verdict.cause is Cause.CRASH and verdict.rule == "fault_signal"


def test_signal_name():
    """Known signals get their name, unknown numbers a readable fallback."""
    assert signal_name(signal.SIGSEGV) == "SIGSEGV"
    assert signal_name(int(signal.SIGKILL)) == "SIGKILL"
    assert signal_name(999) == "signal 999"


@given(
    exit_code=st.one_of(st.none(), st.integers(-5, 300)),
    sig=st.one_of(st.none(), st.integers(1, 40)),
    stderr_tail=st.sampled_from(["", METAL_OOM, METAL_WATCHDOG, CUDA_OOM, "boom", "x" * 400]),
    footprint=st.one_of(st.none(), st.floats(min_value=0), st.just(float("nan"))),
    budget=st.one_of(st.none(), st.floats(min_value=0), st.just(5e-324)),
    pressure=st.sampled_from(["normal", "warn", "critical"]),
    delta=st.integers(0, 3),
    flags=st.lists(st.booleans(), min_size=3, max_size=3),
)
def test_any_evidence_gets_a_consistent_verdict(
    exit_code, sig, stderr_tail, footprint, budget, pressure, delta, flags
):
    """Any evidence gets one verdict; only memory steps down; only a user stop is STOPPED."""
    hang_detected, memory_guard_stop, user_stop = flags
    verdict = classify(
        ExitEvidence(
            exit_code,
            sig,
            stderr_tail,
            footprint,
            budget,
            pressure,
            delta,
            hang_detected=hang_detected,
            memory_guard_stop=memory_guard_stop,
            user_stop=user_stop,
        )
    )
    assert verdict.explanation and "\n" not in verdict.explanation
    if verdict.cause is Cause.STOPPED:  # never for a hang, a memory stop or a lost rank
        assert user_stop
    if verdict.step_down:
        assert verdict.cause is Cause.MEMORY
    if verdict.cause in (Cause.DONE, Cause.STOPPED, Cause.DATA_ERROR, Cause.CONFIG_ERROR):
        assert not verdict.retry
    if exit_code == 0:
        assert verdict.cause is Cause.DONE


def test_a_lost_remote_rank_is_explained_in_its_own_words_not_the_survivors():
    """A remote rank's end is told as the supervisor saw it, never as rank 0's lost peer."""
    verdict = classify(
        ev(
            255,
            culprit="rank 1 (mac2 at 10.0.0.2)",
            culprit_lost="its ssh session ended (exit 255)",
            stderr_tail="loractl: rank 0 was asked to stop but has been inside a collective\n",
        )
    )
    assert verdict.explanation == "rank 1 (mac2 at 10.0.0.2) lost: its ssh session ended (exit 255)"
    assert "rank 0" not in verdict.explanation and verdict.retry and not verdict.step_down
