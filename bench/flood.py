"""A control flood against a real supervisor: does its loop still spawn, record progress
and hand memory back?

Method (one invocation, real processes, the tiny model):
- one supervisor (``SupervisorProcess``) serves both phases;
- baseline: no flood; a job is submitted, and we measure the spawn delay (the bench's clock
  before `submit` -> the job's "starting" event, stamped by the supervisor when it spawned
  the trainer), how often its stored progress (the jobs row) changes while it trains, and
  the supervisor's RSS; the job is then cancelled;
- flood: ``--clients`` clients (threads over a few processes, each request on a fresh
  DEALER socket, as the `loractl` command sends it) ask status, list, show, history and a
  no-op priority as fast as answers come, for ``--seconds``. A second job is submitted a
  few seconds in, and the same figures are taken, with the RSS sampled throughout and again
  ``--settle`` seconds after the flood;
- the stored progress is read from the database directly (read-only), so measuring does
  not queue behind the flood.

Targets (issue 17): the spawn delay stays near the baseline's, progress is recorded during
the flood, RSS returns near its baseline, and the no-op priorities add no history rows.
The last line is ``flood_spawn_delay_ratio=<flood / baseline>``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from loractl.client.harness import SupervisorProcess, job_config, wait_for
from loractl.paths import Layout

SAMPLE_S = 0.1


# -- the flood clients -------------------------------------------------------------------------


def flood_process(home: str, job_ref: str, threads: int, until: float, counts) -> None:
    """One process of the flood: ``threads`` clients, each asking in a loop until ``until``
    (wall clock). Adds (answered, refused_or_timed_out) to ``counts``."""
    from loractl.client.control import request
    from loractl.protocol import (
        HistoryRequest,
        ListRequest,
        PriorityRequest,
        ShowRequest,
        StatusRequest,
    )

    layout = Layout.at(home)
    asks = [
        lambda: StatusRequest(),
        lambda: ListRequest(),
        lambda: ShowRequest(job=job_ref),
        lambda: HistoryRequest(job=job_ref),
        lambda: PriorityRequest(job=job_ref, priority=0),  # the priority it has: a no-op
    ]
    answered = [0] * threads
    failed = [0] * threads

    def client(index: int) -> None:
        turn = index
        while time.time() < until:
            try:
                request(layout, asks[turn % len(asks)](), timeout=5.0)
                answered[index] += 1
            except Exception:
                failed[index] += 1
            turn += 1

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    with counts.get_lock():
        counts[0] += sum(answered)
        counts[1] += sum(failed)


# -- measuring ---------------------------------------------------------------------------------


class Watcher:
    """Samples the supervisor's RSS and one job's stored progress, from outside its loop."""

    def __init__(self, database: Path, pid: int):
        self.db = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)
        self.proc = psutil.Process(pid)

    def rss_mb(self) -> float:
        return self.proc.memory_info().rss / 1e6

    def row(self, job_id: str) -> tuple | None:
        return self.db.execute(
            "SELECT state, step, examples_seen FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()

    def started_at(self, job_id: str) -> float | None:
        found = self.db.execute(
            "SELECT MIN(at) FROM events WHERE job_id = ? AND to_state = 'starting'", (job_id,)
        ).fetchone()
        return found[0] if found else None

    def history_rows(self, job_id: str) -> int:
        return self.db.execute(
            "SELECT COUNT(*) FROM events WHERE job_id = ?", (job_id,)
        ).fetchone()[0]

    def progress_during(self, job_id: str, until: float) -> dict:
        """Watch the stored progress until ``until`` (wall clock): how many times it moved
        once the job was running (its trainer heartbeating; loading the model comes first),
        the longest it then stood still, and the peak RSS meanwhile."""
        changes, last, last_change, longest, peak = 0, None, None, 0.0, 0.0
        while time.time() < until:
            now = time.time()
            peak = max(peak, self.rss_mb())
            row = self.row(job_id)
            figures = (row[1], row[2]) if row else None
            if row and row[0] == "running" and figures != last:
                if last is not None:
                    changes += 1
                    longest = max(longest, now - last_change)
                last, last_change = figures, now
            time.sleep(SAMPLE_S)
        if last_change is not None:
            longest = max(longest, time.time() - last_change)
        return {"changes": changes, "longest_still_s": longest, "peak_rss_mb": peak}


def run_job(supervisor: SupervisorProcess, watcher: Watcher, config: Path, seconds: float):
    """Submit ``config`` now, then watch it for ``seconds``; its figures, then cancel it."""
    from loractl.client.control import request
    from loractl.protocol import CancelRequest, SubmitRequest

    submitted = time.time()
    job_id = request(supervisor.layout, SubmitRequest(config_path=str(config)), timeout=120).data[
        "id"
    ]
    started = wait_for(lambda: watcher.started_at(job_id), timeout=120, interval=0.05)
    progress = watcher.progress_during(job_id, until=submitted + seconds)
    request(supervisor.layout, CancelRequest(job=job_id), timeout=120)
    supervisor.wait_state(job_id, {"cancelled", "completed", "failed"}, timeout=120)
    return job_id, {"spawn_delay_s": started - submitted, **progress}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--processes", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--submit-after", type=float, default=5.0)
    parser.add_argument("--settle", type=float, default=10.0)
    args = parser.parse_args()

    from loractl.daemon.tinymodel import prepare

    root = Path(tempfile.mkdtemp(prefix="loractl-flood-"))
    prepare(root / "ws", preset="tiny", seed=0)
    supervisor = SupervisorProcess(root / "home").start()
    watcher = Watcher(supervisor.layout.database, supervisor.proc.pid)
    watch_s = args.seconds - args.submit_after
    try:
        # The job the flood's shows, histories and no-op priorities name: paused, so it
        # never runs, and at priority 0, which every priority request sets again.
        from loractl.client.control import request
        from loractl.protocol import PauseRequest, ResumeRequest, StatusRequest, SubmitRequest

        request(supervisor.layout, PauseRequest(all=True), timeout=30)  # so it cannot start
        target = job_config(root / "ws", root / "target", iters=100000)
        target_id = request(
            supervisor.layout, SubmitRequest(config_path=str(target), priority=0), timeout=30
        ).data["id"]
        request(supervisor.layout, PauseRequest(job=target_id), timeout=30)
        request(supervisor.layout, ResumeRequest(all=True), timeout=30)
        rss_start = watcher.rss_mb()

        config = job_config(root / "ws", root / "baseline", iters=100000)
        _, baseline = run_job(supervisor, watcher, config, watch_s)
        time.sleep(args.settle)
        rss_before = watcher.rss_mb()
        rows_before = watcher.history_rows(target_id)

        context = multiprocessing.get_context("spawn")
        counts = context.Array("q", 2)
        until = time.time() + args.seconds
        per_process = max(1, args.clients // args.processes)
        flood = [
            context.Process(
                target=flood_process,
                args=(str(supervisor.home), target_id, per_process, until, counts),
            )
            for _ in range(args.processes)
        ]
        for proc in flood:
            proc.start()
        time.sleep(args.submit_after)
        config = job_config(root / "ws", root / "flooded", iters=100000)
        _, flooded = run_job(supervisor, watcher, config, watch_s)
        for proc in flood:
            proc.join()
        flood_end = time.time()
        rows_after = watcher.history_rows(target_id)
        time.sleep(args.settle)
        rss_after = watcher.rss_mb()
        # The first request after a quiet spell hands a burst's memory back even where the
        # loop does not settle it by itself.
        request(supervisor.layout, StatusRequest(), timeout=30)
        time.sleep(0.5)
        rss_after_request = watcher.rss_mb()
        answered, failed = counts[0], counts[1]
    finally:
        supervisor.stop()

    clients = per_process * args.processes
    print(f"supervisor RSS: {rss_start:.0f} MB at start, {rss_before:.0f} MB before the flood")
    print(
        f"baseline: spawn delay {baseline['spawn_delay_s']:.2f} s; stored progress moved "
        f"{baseline['changes']} times in {watch_s:.0f} s, longest still "
        f"{baseline['longest_still_s']:.1f} s; peak RSS {baseline['peak_rss_mb']:.0f} MB"
    )
    print(
        f"flood ({clients} clients, {args.seconds:.0f} s): {answered} requests answered "
        f"({answered / max(flood_end - (until - args.seconds), 1e-9):.0f}/s), "
        f"{failed} refused or timed out"
    )
    print(
        f"flood: spawn delay {flooded['spawn_delay_s']:.2f} s; stored progress moved "
        f"{flooded['changes']} times in {watch_s:.0f} s, longest still "
        f"{flooded['longest_still_s']:.1f} s; peak RSS {flooded['peak_rss_mb']:.0f} MB"
    )
    print(
        f"RSS {args.settle:.0f} s after the flood: {rss_after:.0f} MB "
        f"({rss_after - rss_before:+.0f} MB against before it); after one more request: "
        f"{rss_after_request:.0f} MB ({rss_after_request - rss_before:+.0f} MB)"
    )
    print(
        f"history rows added to the flood's target by no-op priorities: {rows_after - rows_before}"
    )
    ratio = flooded["spawn_delay_s"] / max(baseline["spawn_delay_s"], 1e-3)
    print(f"flood_spawn_delay_ratio={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
