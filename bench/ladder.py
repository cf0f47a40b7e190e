"""The memory ladder, blind against learning, on one squeezed job under the real supervisor.

Usage:
    .venv/bin/python bench/ladder.py [--iters 24] [--seed 0] [--skip-no-preflight] [--out DIR]
                                     [--keep]

Method (one invocation, real processes, the ``ladder`` preset's tiny model):
- measure, as tests/test_ladder_learning.py does, the running footprint of rung 0 (seq 256)
  and of the seq-128 rung, and rung 0's pre-flight peak (the trainer held to a 1 MB budget
  stops with it); the budget is halfway between min(rung 0, its pre-flight) and the seq-128
  rung, so rung 0 cannot fit and the seq-128 rung can;
- run that same job (same config, same budget, pre-flight on) under a fresh supervisor twice:
  once with ``LORACTL_LADDER_POLICY=blind`` (the recipe's one rung per memory stop) and once
  with the learning policy (the default: the first rung the job's memory model predicts to
  fit, skipping rungs that save nothing);
- for each: memory stops (crashes with cause memory, with rung and step), kernel OOM kills
  (the memory cgroup's ``oom_kill`` counter before and after; n/a without one), rungs run,
  wall time from submit to completion, and prediction error per rung that ran: the ladder's
  ``predicted_peak_mb`` in ``show --json`` against the ``peak_mb`` of that rung's
  ``preflight`` history event. The ladder's prediction is the job's final model (it has seen
  that very pre-flight), so the prediction the step down recorded when it chose the rung
  ("rung N is predicted to peak at X MB", made before the rung ran) is printed as well;
- for reference, a third run: blind with the pre-flight off (``preflight: false``), the recipe
  as it stood before issue 15, where the guard stops each rung that does not fit while it
  trains (``--skip-no-preflight`` leaves it out). Its wall-time ratio is printed too; the
  last line compares the two runs of the same job.

Targets (issue 15): learning makes at most 1 memory stop, all at step 0, and 0 OOM kills; its
wall time is at most 0.6x the blind policy's; its prediction error is at most 10%. The last
line is ``ratio learning/blind wall time: <ratio>``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from loractl.client.harness import SupervisorProcess, measure_footprint
from loractl.daemon.tinymodel import prepare
from loractl.protocol import ExitCode
from loractl.supervisor.pressure import cgroup_oom_kill_count

# name: (LORACTL_LADDER_POLICY, pre-flight on). "blind" and "learning" run the same job; the
# third is the recipe as it stood before issue 15 (blind, no pre-flight: the guard stops each
# rung that does not fit while it trains), for reference.
VARIANTS = {
    "blind": ("blind", True),
    "learning": ("learning", True),
    "blind-no-preflight": ("blind", False),
}
DOES_NOT_FIT = re.compile(r"does not fit: peak (\d+(?:\.\d+)?) MB")
PREDICTED = re.compile(r"rung (\d+) is predicted to peak at (\d+(?:\.\d+)?) MB")


def make_job(workspace: Path, folder: Path, **overrides) -> Path:
    """A job.yaml in ``folder`` on the workspace's tiny model, with keys overridden."""
    folder.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load((workspace / "job.yaml").read_text())
    data.update(
        model=str(workspace / "model"),
        data=str(workspace / "data"),
        adapter_path=str(folder / "adapters"),
        **overrides,
    )
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def preflight_peak(config: Path, folder: Path) -> float:
    """Rung 0's pre-flight peak in MB: the real trainer held to a 1 MB budget stops with it."""
    overrides = json.dumps({"adapter_path": str(folder / "adapters")})
    env = {k: v for k, v in os.environ.items() if k not in ("LORACTL_FAULT_OOM",)}
    done = subprocess.run(
        [sys.executable, "-m", "loractl.daemon.trainer", str(config), "--fresh"]
        + ["--budget-mb", "1", "--overrides", overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    found = DOES_NOT_FIT.search(done.stderr)
    if done.returncode != ExitCode.DOES_NOT_FIT or not found:
        raise RuntimeError(f"no pre-flight peak (exit {done.returncode}): {done.stderr[-2000:]}")
    return float(found.group(1))


def events(job: dict, kind: str) -> list[dict]:
    return [e for e in job["history"] if e["kind"] == kind]


def oom_kills() -> int | None:
    try:
        return cgroup_oom_kill_count(os.getpid())
    except OSError:
        return None


def run_policy(name: str, policy: str, config: Path, root: Path, timeout: float) -> dict:
    """The squeezed job under a fresh supervisor with ``policy``; what it did."""
    env = {"LORACTL_LADDER_POLICY": policy}
    supervisor = SupervisorProcess(root / f"home-{name}", **env)
    supervisor.start()
    try:
        kills_before = oom_kills()
        began = time.monotonic()
        job_id = supervisor.submit(config)
        job = supervisor.wait_state(job_id, {"completed", "failed"}, timeout=timeout)
        wall = time.monotonic() - began
        kills_after = oom_kills()
    finally:
        supervisor.stop()
    stops = [
        {"rung": c.get("rung"), "step": c.get("step"), "rule": c.get("rule")}
        for c in job["crashes"]
        if c["cause"] == "memory"
    ]
    flights: dict[int, float] = {}
    for event in events(job, "preflight"):
        detail = event["detail"]
        if isinstance(detail.get("rung"), int) and detail.get("peak_mb"):
            flights[detail["rung"]] = float(detail["peak_mb"])  # the latest on each rung
    rungs = sorted(
        {*flights, *(int(r) for r in job["peak_memory_mb"]), job["rung"]}
        | {s["rung"] for s in stops if isinstance(s["rung"], int)}
    )
    ladder = {r["rung"]: r for r in job["ladder"]}
    why = " ".join(str(e.get("cause", "")) + " " + str(e.get("detail", "")) for e in job["history"])
    chosen = {int(r): float(mb) for r, mb in PREDICTED.findall(why)}
    errors = {}
    for rung in rungs:
        measured = flights.get(rung)
        predicted = ladder.get(rung, {}).get("predicted_peak_mb")
        before = chosen.get(rung)
        errors[rung] = {
            "preflight_mb": measured,
            "predicted_mb": predicted,
            "error": abs(predicted - measured) / measured if predicted and measured else None,
            "predicted_before_mb": before,
            "error_before": abs(before - measured) / measured if before and measured else None,
        }
    return {
        "policy": policy,
        "name": name,
        "state": job["state"],
        "reason": job.get("reason"),
        "final_rung": job["rung"],
        "memory_stops": stops,
        "crashes": len(job["crashes"]),
        "oom_kills": None if None in (kills_before, kills_after) else kills_after - kills_before,
        "rungs_run": rungs,
        "skipped": {r: v["skipped"] for r, v in ladder.items() if v.get("skipped")},
        "wall_s": wall,
        "prediction": errors,
        "peak_memory_mb": job["peak_memory_mb"],
    }


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def report(out: Path, facts: dict, results: dict[str, dict]) -> float:
    """Each policy's figures, the targets, results.json, and last the wall-time ratio."""
    print()
    for policy, r in results.items():
        stops = ", ".join(
            f"rung {s['rung']} step {s['step']} ({s['rule']})" for s in r["memory_stops"]
        )
        kills = "n/a (no cgroup oom_kill counter)" if r["oom_kills"] is None else r["oom_kills"]
        print(f"== {policy}: {r['state']} on rung {r['final_rung']}")
        print(f"  memory stops: {len(r['memory_stops'])}" + (f" [{stops}]" if stops else ""))
        print(f"  kernel OOM kills: {kills}")
        print(
            f"  rungs run: {r['rungs_run']}" + (f"; skipped {r['skipped']}" if r["skipped"] else "")
        )
        print(f"  wall time to completion: {r['wall_s']:.1f} s")
        for rung, p in r["prediction"].items():
            line = (
                f"  rung {rung}: pre-flight {p['preflight_mb']} MB, ladder predicted "
                f"{p['predicted_mb']} MB, error {pct(p['error'])}"
            )
            if p["predicted_before_mb"] is not None:
                line += (
                    f"; predicted when chosen {p['predicted_before_mb']} MB,"
                    f" error {pct(p['error_before'])}"
                )
            print(line)
    blind, learning = results["blind"], results["learning"]
    ratio = learning["wall_s"] / blind["wall_s"]
    stops = learning["memory_stops"]
    errors = [
        e
        for p in learning["prediction"].values()
        for e in (p["error_before"] if p["error_before"] is not None else p["error"],)
        if e is not None and p["preflight_mb"] is not None
    ]
    targets = {
        "learning_stops_le_1_at_step_0": len(stops) <= 1 and all(s["step"] == 0 for s in stops),
        "learning_oom_kills_0": learning["oom_kills"] in (0, None),
        "wall_ratio_le_0.6": ratio <= 0.6,
        "prediction_error_le_10pct": bool(errors) and max(errors) <= 0.10,
    }
    if "blind-no-preflight" in results:
        legacy = learning["wall_s"] / results["blind-no-preflight"]["wall_s"]
        print(f"ratio learning/blind-no-preflight wall time: {legacy:.2f}")
        summary_extra = {"ratio_no_preflight": legacy}
    else:
        summary_extra = {}
    print()
    for name, met in targets.items():
        print(f"target {name}: {'met' if met else 'NOT met'}")
    out.mkdir(parents=True, exist_ok=True)
    summary = {**facts, "results": results, "ratio": ratio, **summary_extra, "targets": targets}
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"results: {out / 'results.json'}")
    print(f"ratio learning/blind wall time: {ratio:.2f}")
    return ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=24, help="minibatches of the job")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600, help="per job, seconds")
    parser.add_argument(
        "--skip-no-preflight",
        action="store_true",
        help="skip the reference run: blind with the pre-flight off (the recipe before issue 15)",
    )
    parser.add_argument("--out", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    root = args.out or Path(tempfile.mkdtemp(prefix="loractl-ladder-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        workspace = root / "workspace"
        if not (workspace / "job.yaml").exists():
            prepare(workspace, preset="ladder", seed=args.seed)
        probe = make_job(workspace, root / "probe", iters=args.iters, val_batches=1)
        rung0 = measure_footprint(probe, {"max_seq_length": 256})
        seq128 = measure_footprint(probe, {"max_seq_length": 128})
        rung0_preflight = preflight_peak(probe, root / "flight")
        budget = int((min(rung0, rung0_preflight) + seq128) / 2)
        print(
            f"footprints: rung 0 {rung0:.1f} MB (pre-flight {rung0_preflight:.1f} MB),"
            f" seq-128 {seq128:.1f} MB; budget {budget} MB"
        )
        if not rung0_preflight > budget > seq128:
            print("warning: the budget is not between the two rungs' peaks")
        results = {}
        for name, (policy, preflight) in VARIANTS.items():
            if name == "blind-no-preflight" and args.skip_no_preflight:
                continue
            config = make_job(
                workspace,
                root / f"job-{name}",
                iters=args.iters,
                memory_budget_mb=budget,
                val_batches=1,
                checkpoint_every=1,
                **({} if preflight else {"preflight": False}),
            )
            results[name] = run_policy(name, policy, config, root, args.timeout)
            print(f"{name}: {results[name]['state']} in {results[name]['wall_s']:.1f} s")
        facts = {
            "iters": args.iters,
            "seed": args.seed,
            "budget_mb": budget,
            "rung0_mb": rung0,
            "rung0_preflight_mb": rung0_preflight,
            "seq128_mb": seq128,
        }
        report(root, facts, results)
    finally:
        if not args.keep and args.out is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
