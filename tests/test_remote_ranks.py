"""A distributed attempt's ranks on another Mac, followed by the attempt alone: who joins
(job, attempt and rank; never host names), how a remote rank's end is seen at once (mlx.launch's
log, a dropped telemetry connection), who is blamed and in whose words, and a rank that never
reports. A real process stands in for mlx.launch and writes its real log lines."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
from test_attempt import RecordingHooks, calm

from conftest import wait_for
from loractl.distributed import RankHost
from loractl.protocol import Heartbeat, TrainerEvent
from loractl.supervisor.attempt import Attempt, AttemptSpec
from loractl.supervisor.classify import classify
from loractl.supervisor.exits import evidence_of
from loractl.supervisor.hostwait import LAUNCHING
from loractl.supervisor.policy import StopReason
from loractl.supervisor.settings import Settings

HERE = RankHost("127.0.0.1", "127.0.0.1", True)
MAC2 = RankHost("mac2.local", "10.0.0.2", False)
# What a stand-in launcher does until told otherwise: nothing, for a long time.
IDLE = "import time; time.sleep(120)"


@pytest.fixture
def launcher():
    proc = subprocess.Popen([sys.executable, "-c", IDLE])
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def remote_attempt(tmp_path, launcher, hooks, *, startup_timeout=None, hang_grace_s=30.0):
    spec = AttemptSpec(
        job_id="job-1",
        attempt=3,
        rung=0,
        stderr_path=tmp_path / "0003.stderr",
        budget_mb=1e9,
        heartbeat_timeout=600,
        world_size=2,
        remote=True,
        rank_hosts=(HERE, MAC2),
        startup_timeout=startup_timeout,
    )
    return Attempt(
        spec,
        pid=launcher.pid,
        popen=launcher,
        settings=Settings(hang_grace_s=hang_grace_s),
        hooks=hooks,
        read_system=calm,
    )


def beat(rank: int, pid: int, host: str, attempt: int = 3, step: int = 1) -> Heartbeat:
    return Heartbeat(job_id="job-1", attempt=attempt, pid=pid, rank=rank, host=host, step=step)


def launcher_says(attempt: Attempt, *lines: str) -> None:
    with attempt.spec.stderr_path.open("a") as log:
        log.write("".join(f"{line}\n" for line in lines))


def test_ranks_join_by_job_attempt_and_rank_never_by_host_name(tmp_path, launcher):
    """A remote rank joins whatever host name it reports (this Mac's own included) and is
    shown with it and its config address; a claim to be the local rank from a process the
    launcher did not start, and a rank of an earlier attempt, are refused."""
    hooks = RecordingHooks()
    attempt = remote_attempt(tmp_path, launcher, hooks)
    same_name = socket.gethostname()
    assert not attempt.accepts(beat(1, 4242, same_name, attempt=2))
    assert attempt.accepts(beat(1, 4242, same_name))
    assert not attempt.accepts(beat(0, os.getpid(), same_name))
    shown = attempt.describe_ranks()
    assert shown == [
        {
            "rank": 1,
            "host": "mac2.local",
            "hostname": same_name,
            "local": False,
            "pid": 4242,
            "step": 0,
            "footprint_mb": None,
        }
    ]
    assert attempt.ranks[1].label == f"rank 1 ({same_name} at mac2.local)"


def test_a_remote_rank_killed_is_seen_from_the_launchers_log_and_blamed_in_its_own_words(
    tmp_path, launcher
):
    """mlx.launch's "Node with rank 1 exited with code 255" is read on the next poll: rank 1
    is recorded lost ("its ssh session ended"), the rest are told to stop, and the exit names
    rank 1 with those words, not rank 0's about its lost peer."""
    hooks = RecordingHooks(deliver=True)
    attempt = remote_attempt(tmp_path, launcher, hooks)
    launcher_says(attempt, LAUNCHING)
    assert attempt.accepts(beat(1, 77, "mac2"))
    attempt.on_heartbeat(beat(1, 77, "mac2", step=4))
    attempt.poll()
    assert attempt.stop_reason is None
    started = time.monotonic()
    launcher_says(
        attempt,
        "loractl: rank 0 was asked to stop but has been inside a collective for 13 s",
        "\x1b[33m[WARN] Node with rank 1 exited with code 255 \x1b[0m",
    )
    attempt.poll()
    assert time.monotonic() - started < 2
    assert attempt.stop_reason == StopReason.RANK_LOST
    lost = [detail for kind, detail in hooks.events if kind == "rank_lost"]
    assert len(lost) == 1 and lost[0]["rank"] == 1
    assert lost[0]["words"] == "rank 1 (mac2 at mac2.local) lost: its ssh session ended (exit 255)"
    launcher.kill()
    ended = wait_for(lambda: attempt.poll(), 20)
    assert ended.culprit is not None and ended.culprit.rank == 1
    verdict = classify(evidence_of(ended))
    assert verdict.rule == "rank_lost", verdict
    assert verdict.explanation == lost[0]["words"]


def test_a_dropped_connection_then_silence_is_a_lost_rank_but_a_reconnect_is_not(
    tmp_path, launcher
):
    """A dropped telemetry connection from the rank's address makes it lost once it has been
    silent for three heartbeat intervals; a heartbeat after the drop clears it."""
    hooks = RecordingHooks(deliver=True)
    attempt = remote_attempt(tmp_path, launcher, hooks)
    assert attempt.accepts(beat(1, 77, "mac2"))
    attempt.peer_disconnected("10.0.0.2", time.monotonic())
    attempt.on_heartbeat(beat(1, 77, "mac2", step=2))  # the link came back at once
    attempt.check_liveness(time.monotonic() + 10)
    assert attempt.stop_reason is None
    attempt.peer_disconnected("10.0.0.9", time.monotonic())  # another Mac's connection
    attempt.check_liveness(time.monotonic() + 10)
    assert attempt.stop_reason is None
    dropped_at = time.monotonic()
    attempt.peer_disconnected("10.0.0.2", dropped_at)
    attempt.check_liveness(dropped_at + 1.0)
    assert attempt.stop_reason is None, "a reconnect gets its time"
    attempt.check_liveness(dropped_at + 3.5)
    assert attempt.stop_reason == StopReason.RANK_LOST and attempt.culprit == 1
    assert attempt.culprit_lost.startswith("its telemetry connection closed")


def test_a_rank_that_never_reports_fails_the_start_naming_its_host(tmp_path, launcher):
    """The start-up allowance counts from hostwait's LAUNCHING line, not the spawn: after it,
    a remote rank still silent is a start-up failure naming its host and what to check."""
    hooks = RecordingHooks(deliver=True)
    attempt = remote_attempt(tmp_path, launcher, hooks, startup_timeout=2.0)
    attempt.check_liveness(time.monotonic() + 60)
    assert attempt.stop_reason is None, "still waiting for the host to answer ssh"
    launcher_says(attempt, "loractl: mac2.local does not answer ssh (try 1): refused", LAUNCHING)
    attempt.poll()
    assert attempt.launched_at is not None
    attempt.check_liveness(attempt.launched_at + 1.0)
    assert attempt.stop_reason is None
    attempt.check_liveness(attempt.launched_at + 2.5)
    assert attempt.stop_reason == StopReason.RANK_LOST and attempt.culprit == 1
    assert attempt.culprit_lost == (
        "rank 1 on mac2.local never reported in the 2 s after launch: check that the keys "
        "are copied and the port is reachable"
    )


def test_a_rank_whose_ssh_fails_before_it_reports_is_blamed_for_the_start(tmp_path, launcher):
    """mlx.launch logging rank 1's end before rank 1 ever spoke stops the attempt at once,
    blaming rank 1 on its host."""
    hooks = RecordingHooks(deliver=True)
    attempt = remote_attempt(tmp_path, launcher, hooks)
    launcher_says(attempt, LAUNCHING, "[WARN] Node with rank 1 exited with code 255")
    attempt.poll()
    assert attempt.stop_reason == StopReason.RANK_LOST and attempt.culprit == 1
    assert attempt.culprit_lost == "its ssh session ended (exit 255) before it reported"
    assert attempt.culprit_rank().host == "mac2.local"


def test_a_remote_ranks_announced_exit_is_its_end(tmp_path, launcher):
    """A remote rank that announces done is not lost when its ssh session then ends."""
    hooks = RecordingHooks(deliver=True)
    attempt = remote_attempt(tmp_path, launcher, hooks)
    assert attempt.accepts(beat(1, 77, "mac2"))
    attempt.on_trainer_event(
        TrainerEvent(job_id="job-1", attempt=3, pid=77, rank=1, kind="done", step=9)
    )
    launcher_says(attempt, "[WARN] Node with rank 1 exited with code 0")
    attempt.poll()
    assert attempt.stop_reason is None and "rank_lost" not in hooks.kinds()


def test_a_local_rank_slow_to_start_gets_the_trainers_allowance(tmp_path, launcher):
    """Only a silent rank on another Mac fails the short start-up allowance: a local one is
    in the process table, and a loaded Mac may take longer to start it."""
    hooks = RecordingHooks(deliver=True)
    attempt = remote_attempt(tmp_path, launcher, hooks, startup_timeout=2.0)
    launcher_says(attempt, LAUNCHING)
    attempt.poll()
    assert attempt.accepts(beat(1, 77, "mac2"))
    attempt.on_heartbeat(beat(1, 77, "mac2"))
    attempt.check_liveness(attempt.launched_at + 10)
    assert attempt.stop_reason is None
    attempt.check_liveness(attempt.launched_at + attempt.settings.startup_timeout_s + 1)
    assert attempt.stop_reason == StopReason.RANK_LOST and attempt.culprit == 0
