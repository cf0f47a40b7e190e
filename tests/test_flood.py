"""A short control flood against a real supervisor: no-op requests record nothing, a job
submitted meanwhile still starts at once, and the memory the flood used is handed back
(issue 17, I). The 50-client, 30 s version is bench/flood.py."""

from __future__ import annotations

import sqlite3
import threading
import time

import psutil

from conftest import make_job, wait_for
from loractl.client.control import request
from loractl.client.harness import SupervisorProcess
from loractl.protocol import (
    HistoryRequest,
    ListRequest,
    PauseRequest,
    PriorityRequest,
    ResumeRequest,
    ShowRequest,
    StatusRequest,
    SubmitRequest,
)

CLIENTS = 20
REQUESTS = 2000


def history_rows(database, job_id: str) -> int:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        return db.execute("SELECT COUNT(*) FROM events WHERE job_id = ?", (job_id,)).fetchone()[0]


def started_at(database, job_id: str) -> float | None:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        return db.execute(
            "SELECT MIN(at) FROM events WHERE job_id = ? AND to_state = 'starting'", (job_id,)
        ).fetchone()[0]


def test_a_flood_records_no_noops_delays_no_spawn_and_leaves_no_memory_behind(
    tiny_workspace, tmp_path
):
    """2,000 requests from 20 clients (a no-op priority among them) add no history row; a
    job submitted mid-flood is spawned within 2 s; RSS returns within 10 MB of before."""
    supervisor = SupervisorProcess(tmp_path / "home").start()
    try:
        layout = supervisor.layout
        # The job the flood names: paused before it could start (the queue held meanwhile).
        request(layout, PauseRequest(all=True))
        target = make_job(tiny_workspace, tmp_path / "target", iters=100000)
        target_id = request(layout, SubmitRequest(config_path=str(target))).data["id"]
        request(layout, PauseRequest(job=target_id))
        request(layout, ResumeRequest(all=True))
        rows = history_rows(layout.database, target_id)
        process = psutil.Process(supervisor.proc.pid)
        rss_before = process.memory_info().rss
        asks = [
            StatusRequest,
            ListRequest,
            lambda: ShowRequest(job=target_id),
            lambda: HistoryRequest(job=target_id),
            lambda: PriorityRequest(job=target_id, priority=0),  # the one it has
        ]
        sent = iter(range(REQUESTS))
        answered = [0]
        lock = threading.Lock()
        errors: list[Exception] = []

        def client() -> None:
            while True:
                with lock:
                    turn = next(sent, None)
                if turn is None:
                    return
                try:
                    request(layout, asks[turn % len(asks)](), timeout=30)
                except Exception as exc:  # collected: a thread's failure must fail the test
                    errors.append(exc)
                with lock:
                    answered[0] += 1

        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        for thread in threads:
            thread.start()
        # The flood is under way; then a job arrives in the middle of it.
        wait_for(lambda: answered[0] > REQUESTS // 10, timeout=30)
        job = make_job(tiny_workspace, tmp_path / "job", iters=100000)
        submitted = time.time()
        job_id = request(layout, SubmitRequest(config_path=str(job)), timeout=30).data["id"]
        spawned = wait_for(lambda: started_at(layout.database, job_id), timeout=60)
        for thread in threads:
            thread.join()
        assert errors == []
        assert spawned - submitted < 2.0, f"spawned {spawned - submitted:.1f} s after submit"
        assert history_rows(layout.database, target_id) == rows

        def settled() -> bool:
            time.sleep(1.1)  # quiet long enough for the flood to count as over
            request(layout, StatusRequest())
            return process.memory_info().rss - rss_before < 10e6

        wait_for(settled, timeout=20)
    finally:
        supervisor.stop()
