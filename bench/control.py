"""Wall time of `loractl status --json`, the whole process, against a running daemon.

The target is a p50 under 150 ms. mlx_lm.lora has no status command at all (a user would
run `ps` or read the log), so the reference printed beside it is the floor any Python CLI
pays: `python -c pass` on the same interpreter. The last line is ``status_p50_ms=<float>``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loractl.client.harness import SupervisorProcess


def timed(command: list[str], rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        began = time.perf_counter()
        result = subprocess.run(command, capture_output=True)
        out.append((time.perf_counter() - began) * 1000)
        if result.returncode != 0:
            raise SystemExit(f"{command} failed: {result.stderr.decode()}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="loractl-control-")) / "home"
    supervisor = SupervisorProcess(home).start()
    try:
        loractl = str(Path(sys.executable).with_name("loractl"))
        status = timed([loractl, "--home", str(home), "status", "--json"], args.rounds)
        floor = timed([sys.executable, "-c", "pass"], args.rounds)
    finally:
        supervisor.stop()
    p50, p90 = statistics.median(status), statistics.quantiles(status, n=10)[-1]
    print(f"loractl status --json: p50 {p50:.1f} ms, p90 {p90:.1f} ms over {args.rounds} runs")
    print(f"python -c pass (floor): p50 {statistics.median(floor):.1f} ms")
    print(f"status_vs_floor_ratio={p50 / statistics.median(floor):.2f}")
    print(f"target p50 < 150 ms: {'met' if p50 < 150 else 'NOT met'}")
    print(f"status_p50_ms={p50:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
