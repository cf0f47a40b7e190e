"""How fast the supervisor notices a dead or hung trainer, and what a restart costs.

Method (one invocation, real processes, tiny model):
- cold start: the trainer run alone, from spawn to its first optimizer step (train.log), the
  price any restart pays;
- death-to-detection: SIGKILL the supervised trainer; the supervisor stamps the crash when it
  reaps the child (SIGCHLD wakes its loop), so latency = crash time - kill time;
- restart-to-first-step: crash time -> first step of the next attempt in train.log; with the
  backoff set to 0, minus the cold start, this is the supervisor's own overhead;
- hang detection: SIGSTOP the trainer; latency = detection time - stop time, of which
  heartbeat_timeout is policy and the rest is overhead.

The peer a user would otherwise run, mlx_lm.lora, has no supervisor at all: its recovery time
is however long until a human notices. The last line is ``recovery_overhead_s=<median>``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from loractl.client.harness import SupervisorProcess, job_config, wait_for
from loractl.daemon.tinymodel import prepare


def step_times(log: Path) -> list[float]:
    times = []
    if not log.exists():
        return times
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == "step":
            times.append(datetime.fromisoformat(record["timestamp"]).timestamp())
    return times


def first_step_after(log: Path, moment: float, timeout: float = 120) -> float:
    return wait_for(
        lambda: next((t for t in step_times(log) if t > moment), None), timeout, interval=0.02
    )


def cold_starts(workspace: Path, root: Path, rounds: int) -> list[float]:
    out = []
    for index in range(rounds):
        config = job_config(workspace, root / f"cold{index}", iters=16)
        log = root / f"cold{index}" / "adapters" / "train.log"
        began = time.time()
        proc = subprocess.Popen(
            [sys.executable, "-m", "loractl.daemon.trainer", str(config), "--fresh"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        out.append(first_step_after(log, began) - began)
        proc.wait()
    return out


def p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--hangs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="cold-start measurements")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="loractl-recovery-"))
    workspace = root / "workspace"
    prepare(workspace, preset="tiny", seed=0)

    cold = cold_starts(workspace, root, args.rounds)
    print(f"trainer cold start to first step: p50 {p50(cold):.3f} s  {[round(c, 3) for c in cold]}")

    supervisor = SupervisorProcess(
        root / "home", LORACTL_BACKOFF_BASE_S="0", LORACTL_HANG_GRACE_S="0.5"
    ).start()
    detections, restarts, hangs = [], [], []
    try:
        heartbeat_timeout = 2.0
        config = job_config(
            workspace,
            root / "job",
            iters=100_000,
            checkpoint_every=2,
            max_retries=100,
            heartbeat_timeout=heartbeat_timeout,
        )
        job_id = supervisor.submit(config)
        log_path = None
        last_checkpoint = -1
        for index in range(args.kills + args.hangs):
            job = wait_for(
                lambda after=last_checkpoint: (
                    (j := supervisor.show(job_id))["trainer_pid"]
                    and j["state"] == "running"
                    and (j["last_checkpoint_step"] or -1) > after
                    and j
                ),
                120,
                interval=0.02,
            )
            log_path = Path(job["adapter_path"]) / "train.log"
            crashes_before = len(job["crashes"])
            hang = index >= args.kills
            struck = time.time()
            os.kill(job["trainer_pid"], signal.SIGSTOP if hang else signal.SIGKILL)
            job = wait_for(
                lambda n=crashes_before: len((j := supervisor.show(job_id))["crashes"]) > n and j,
                60,
                interval=0.02,
            )
            crash = job["crashes"][-1]
            last_checkpoint = crash["checkpoint_step"] or -1
            if hang:
                detected = next(
                    e["at"] for e in reversed(job["history"]) if e["kind"] == "hang_detected"
                )
                hangs.append(detected - struck)
                print(
                    f"hang {index - args.kills + 1}: detected after {detected - struck:.3f} s "
                    f"(heartbeat_timeout {heartbeat_timeout} s, counted from the last heartbeat)"
                )
            else:
                detections.append(crash["at"] - struck)
                first = first_step_after(log_path, crash["at"])
                restarts.append(first - crash["at"])
                print(
                    f"kill {index + 1}: detected in {1000 * detections[-1]:.1f} ms, "
                    f"first step {restarts[-1]:.3f} s after detection"
                )
    finally:
        supervisor.stop()

    overhead = [r - p50(cold) for r in restarts]
    print()
    print(f"death_to_detection_p50_ms={1000 * p50(detections):.1f} (target < 100)")
    print(f"restart_to_first_step_p50_s={p50(restarts):.3f} (cold start {p50(cold):.3f} s)")
    print(f"hang_detection_p50_s={p50(hangs):.3f} (heartbeat_timeout {heartbeat_timeout} s)")
    print("peer: mlx_lm.lora has no supervisor; a crash waits for a human")
    print(f"recovery_overhead_s={p50(overhead):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
