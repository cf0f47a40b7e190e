"""The memory ladder, blind against learning, on squeezed jobs under the real supervisor.

Usage:
    .venv/bin/python bench/ladder.py [--scenario uniform,late] [--presets tiny,ladder,varlen]
                                     [--cgroup] [--seed 0] [--out DIR] [--keep]

One invocation, real processes, the tiny models this project builds. Three parts:

1. **Prediction error per preset** (``--presets``). For each preset's own job: rung 0's
   pre-flight is measured (the trainer's ``--preflight-only``, held to a 1 MB budget so that it
   reports and does not fit), the job's memory model is fitted from that one reading, as the
   supervisor's step-down is after the first stop, and every other rung's peak is predicted;
   then every rung's pre-flight is measured and compared with its prediction.
2. **Squeezed jobs** (``--scenario``), each run to completion under a fresh supervisor three
   times, side by side:
   - ``recipe``: the ladder as shipped before issue 15, blind (``LORACTL_LADDER_POLICY=blind``,
     one rung per memory stop) and with no pre-flight (``preflight: false``): the guard stops
     a rung only when the trainer's footprint crosses the budget while it trains;
   - ``blind``: the same blind ladder with the pre-flight on, so each rung that does not fit
     stops at step 0 (isolates what the pre-flight alone buys);
   - ``learning``: the pre-flight and the default learning ladder (the first rung the job's
     memory model predicts to fit, skipping rungs that save nothing).

   Scenarios (the ``ladder`` preset's model; ladder: accumulation 4->2, seq 256->128, rank 8->4):
   - ``uniform``: the preset's data, where every sample is cut at 256 tokens, so every batch is
     the longest and the recipe's guard sees the peak in the first step anyway;
   - ``late``: short samples and one long one that the data order (seed picked as the late-long
     test picks it) brings near the end of the run, with loractl's default checkpointing
     (``save_every: 100`` iterations, mlx-lm's default): the night the issue describes, where
     the peak first appears late and each blind stop loses the work since the last checkpoint.

   The budget sits halfway between rung 0's peak and the seq-128 rung's running footprint, so
   rung 0 and the accumulation rung cannot fit and the seq-128 rung can.
3. ``--cgroup`` (root, cgroup v1): each supervisor runs in a fresh memory cgroup whose limit
   puts the default budget (0.7 x the limit) where the explicit budget would be, the job has
   no ``memory_budget_mb``, and the kernel's ``oom_kill`` counter of that cgroup is read before
   and after. Without it, the OOM-kill column reads the bench's own cgroup, if any.

For each run: memory stops (crashes with cause memory, with rung and step), kernel OOM kills,
rungs run, wall time from submit to completion, and per rung that ran the prediction the step
down recorded when it chose the rung ("rung N is predicted to peak at X MB", made before the
rung ran) against that rung's pre-flight reading.

Targets (issue 15): learning makes at most 1 memory stop, all at step 0, and 0 OOM kills; its
wall time is at most 0.6x the blind policy's; its prediction error is at most 10%. With the
pre-flight on in both, blind and learning each pay one restart per stop at step 0, so their
ratio cannot go below 2/3 (2 starts against 3) however the job looks; the 0.6 target is judged
against the recipe, on the ``late`` scenario. The last line is
``ratio learning/recipe wall time (late): <ratio>``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from loractl.client.fit_cmd import measurement, run_preflight
from loractl.client.harness import (
    MemoryCgroup,
    SupervisorProcess,
    job_config,
    measure_footprint,
)
from loractl.config import load_config
from loractl.daemon.data import ExampleOrder
from loractl.daemon.tinymodel import prepare
from loractl.memory import MB
from loractl.supervisor.ladder import describe_rung, rung_count
from loractl.supervisor.memorymodel import MemoryModel, ladder_predictions, ladder_shapes
from loractl.supervisor.pressure import cgroup_oom_kill_count

# name: (LORACTL_LADDER_POLICY, pre-flight on)
VARIANTS = {
    "recipe": ("blind", False),
    "blind": ("blind", True),
    "learning": ("learning", True),
}
PREDICTED = re.compile(r"rung (\d+) is predicted to peak at (\d+(?:\.\d+)?) MB")
FRACTION = 0.7  # the supervisor's default share of a cgroup's memory limit
SEQ_RUNG = 2  # the recipe's seq 256->128 rung


def workspace_for(root: Path, preset: str, seed: int) -> Path:
    workspace = root / f"workspace-{preset}"
    if not (workspace / "job.yaml").exists():
        prepare(workspace, preset=preset, seed=seed)
    return workspace


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


# -- part 1: prediction error per preset ---------------------------------------------------


def predict_preset(root: Path, preset: str, seed: int) -> dict:
    """Every rung's peak predicted from rung 0's pre-flight alone, against its own pre-flight."""
    workspace = workspace_for(root, preset, seed)
    config = job_config(workspace, root / f"predict-{preset}", val_batches=1)
    cfg = load_config(config)
    shapes = ladder_shapes(cfg)
    readings = {rung: run_preflight(config, cfg, rung, 1.0) for rung in range(rung_count(cfg))}
    model = MemoryModel.fit([measurement(readings[0], shapes[0])])
    predicted = ladder_predictions(model, shapes)
    rows = []
    for rung, reading in readings.items():
        guess = predicted[rung]
        rows.append(
            {
                "rung": rung,
                "change": describe_rung(cfg, rung),
                "preflight_mb": round(reading.peak_mb, 1),
                "predicted_mb": None if guess is None else round(guess, 1),
                "error": None
                if guess is None or rung == 0
                else abs(guess - reading.peak_mb) / reading.peak_mb,
            }
        )
    worst = max((r["error"] for r in rows if r["error"] is not None), default=None)
    print(f"== prediction, preset {preset} (from rung 0's pre-flight alone)")
    for r in rows:
        print(
            f"  rung {r['rung']} ({r['change']}): pre-flight {r['preflight_mb']} MB, predicted"
            f" {r['predicted_mb']} MB, error {pct(r['error'])}"
        )
    print(f"  worst error: {pct(worst)}")
    return {"preset": preset, "rungs": rows, "worst_error": worst}


# -- part 2: squeezed jobs -------------------------------------------------------------------


class Scenario:
    """A squeezed job: its config for a variant, and the budget between two rungs."""

    name = ""

    def __init__(self, root: Path, seed: int):
        self.root = root
        self.seed = seed
        self.workspace = workspace_for(root, "ladder", seed)
        self.keys: dict = {}
        self.facts: dict = {}
        self.budget = 0

    def config(self, variant: str, preflight: bool, explicit_budget: bool) -> Path:
        keys = dict(self.keys)
        if explicit_budget:
            keys["memory_budget_mb"] = self.budget
        if not preflight:
            keys["preflight"] = False
        return job_config(self.workspace, self.root / f"{self.name}-{variant}", **keys)

    def squeeze(self, rung0_peak: float, seq128_peak: float) -> None:
        self.budget = int((rung0_peak + seq128_peak) / 2)
        self.facts.update(rung0_mb=rung0_peak, seq128_mb=seq128_peak, budget_mb=self.budget)
        print(
            f"{self.name}: rung 0 {rung0_peak:.1f} MB, seq-128 rung {seq128_peak:.1f} MB;"
            f" budget {self.budget} MB"
        )
        if not rung0_peak > self.budget > seq128_peak:
            print(f"warning: {self.name}: the budget is not between the two rungs' peaks")


class Uniform(Scenario):
    """The ``ladder`` preset's own data: every sample is cut at 256 tokens."""

    name = "uniform"

    def __init__(self, root: Path, seed: int, iters: int):
        super().__init__(root, seed)
        self.keys = {"iters": iters, "val_batches": 1, "checkpoint_every": 1}
        probe = job_config(self.workspace, root / "uniform-probe", **self.keys)
        cfg = load_config(probe)
        rung0 = measure_footprint(probe, {"max_seq_length": 256})
        seq128 = measure_footprint(probe, {"max_seq_length": 128})
        flight = run_preflight(probe, cfg, 0, 1.0).peak_mb
        self.facts.update(rung0_running_mb=rung0, rung0_preflight_mb=flight)
        self.squeeze(min(rung0, flight), seq128)


class LateLong(Scenario):
    """Short samples and one long one that the data order brings near the end of the run;
    loractl's default checkpointing (``save_every: 100``)."""

    name = "late"
    SHORT_WORDS, LONG_WORDS, COUNT = 40, 400, 128

    def __init__(self, root: Path, seed: int):
        super().__init__(root, seed)
        data = self.write_data(root / "late-data")
        position, order_seed = self.late_position()
        self.keys = {
            "data": data,
            "iters": self.COUNT,  # one epoch
            "val_batches": 1,
            "checkpoint_every": None,
            "seed": order_seed,
        }
        probe = job_config(self.workspace, root / "late-probe", **self.keys)
        cfg = load_config(probe)
        steps = self.COUNT // cfg.grad_accumulation_steps
        flight = run_preflight(probe, cfg, 0, 1.0).peak_mb
        seq128 = measure_footprint(probe, {"max_seq_length": 128}, steps=steps)
        self.facts.update(
            long_position=position,
            order_seed=order_seed,
            checkpoint_every_steps=cfg.checkpoint_interval,
            rung0_preflight_mb=flight,
        )
        print(f"late: the long sample comes at position {position} of {self.COUNT}")
        self.squeeze(flight, seq128)

    def write_data(self, folder: Path) -> Path:
        lines = (self.workspace / "data" / "train.jsonl").read_text().splitlines()
        words = " ".join(json.loads(line)["text"] for line in lines).split()
        folder.mkdir(parents=True, exist_ok=True)

        def samples(counts: list[int]) -> str:
            out = []
            for number, count in enumerate(counts):
                begin = (number * 37) % (len(words) - count)
                out.append(json.dumps({"text": " ".join(words[begin : begin + count])}) + "\n")
            return "".join(out)

        counts = [self.SHORT_WORDS] * (self.COUNT - 1) + [self.LONG_WORDS]
        (folder / "train.jsonl").write_text(samples(counts))
        (folder / "valid.jsonl").write_text(samples([self.SHORT_WORDS] * 4))
        return folder

    def late_position(self) -> tuple[int, int]:
        """The first order seed from ``self.seed`` on whose run brings the long sample (the
        last, and the only long one) into the last quarter: (position, seed)."""
        lengths = [self.SHORT_WORDS] * (self.COUNT - 1) + [self.LONG_WORDS]
        for seed in range(self.seed, self.seed + 1000):
            position = ExampleOrder(lengths, 1, seed).permutation(0).tolist().index(self.COUNT - 1)
            if position >= 0.75 * self.COUNT:
                return position, seed
        raise RuntimeError("no seed brings the long sample late")


def events(job: dict, kind: str) -> list[dict]:
    return [e for e in job["history"] if e["kind"] == kind]


def run_variant(scenario: Scenario, variant: str, use_cgroup: bool, timeout: float) -> dict:
    """The scenario's job under a fresh supervisor with ``variant``'s policy; what it did."""
    policy, preflight = VARIANTS[variant]
    config = scenario.config(variant, preflight, explicit_budget=not use_cgroup)
    supervisor = SupervisorProcess(
        scenario.root / f"home-{scenario.name}-{variant}", LORACTL_LADDER_POLICY=policy
    )
    group = None
    if use_cgroup:
        group = MemoryCgroup(f"loractl-bench-{uuid.uuid4().hex[:12]}").create()
        group.set_limit(int(scenario.budget / FRACTION * MB) // 4096 * 4096)
        supervisor.preexec = group.join_function()
    kills: Callable[[], int | None] = group.oom_kills if group else own_oom_kills
    try:
        supervisor.start()
        kills_before = kills()
        began = time.monotonic()
        job_id = supervisor.submit(config)
        job = supervisor.wait_state(job_id, {"completed", "failed"}, timeout=timeout)
        wall = time.monotonic() - began
        kills_after = kills()
    finally:
        supervisor.stop()
        if group is not None:
            group.remove()
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
    why = " ".join(str(e.get("cause", "")) + " " + str(e.get("detail", "")) for e in job["history"])
    chosen = {int(r): float(mb) for r, mb in PREDICTED.findall(why)}
    prediction = {
        rung: {
            "preflight_mb": measured,
            "predicted_when_chosen_mb": chosen.get(rung),
            "error": abs(chosen[rung] - measured) / measured if rung in chosen else None,
        }
        for rung, measured in sorted(flights.items())
    }
    ladder = {r["rung"]: r for r in job["ladder"]}
    return {
        "variant": variant,
        "policy": policy,
        "preflight": preflight,
        "state": job["state"],
        "reason": job.get("reason"),
        "final_rung": job["rung"],
        "memory_stops": stops,
        "crashes": len(job["crashes"]),
        "oom_kills": None if None in (kills_before, kills_after) else kills_after - kills_before,
        "rungs_run": sorted(
            {*flights, *(int(r) for r in job["peak_memory_mb"]), job["rung"]}
            | {s["rung"] for s in stops if isinstance(s["rung"], int)}
        ),
        "skipped": {r: v["skipped"] for r, v in ladder.items() if v.get("skipped")},
        "wall_s": wall,
        "prediction": prediction,
        "peak_memory_mb": job["peak_memory_mb"],
    }


def own_oom_kills() -> int | None:
    try:
        return cgroup_oom_kill_count(os.getpid())
    except OSError:
        return None


def print_run(scenario: str, r: dict) -> None:
    stops = ", ".join(f"rung {s['rung']} step {s['step']} ({s['rule']})" for s in r["memory_stops"])
    kills = "n/a (no cgroup oom_kill counter)" if r["oom_kills"] is None else r["oom_kills"]
    print(f"== {scenario}/{r['variant']}: {r['state']} on rung {r['final_rung']}")
    print(f"  memory stops: {len(r['memory_stops'])}" + (f" [{stops}]" if stops else ""))
    print(f"  kernel OOM kills: {kills}")
    skipped = f"; skipped {r['skipped']}" if r["skipped"] else ""
    print(f"  rungs run: {r['rungs_run']}{skipped}")
    print(f"  wall time to completion: {r['wall_s']:.1f} s")
    for rung, p in r["prediction"].items():
        if p["predicted_when_chosen_mb"] is not None:
            print(
                f"  rung {rung}: pre-flight {p['preflight_mb']} MB, predicted when chosen"
                f" {p['predicted_when_chosen_mb']} MB, error {pct(p['error'])}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="uniform,late", help="comma-separated; or none")
    parser.add_argument("--presets", default="tiny,ladder,varlen", help="comma-separated; or none")
    parser.add_argument("--iters", type=int, default=24, help="the uniform job's minibatches")
    parser.add_argument("--cgroup", action="store_true", help="each supervisor in a memory cgroup")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900, help="per job, seconds")
    parser.add_argument("--out", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    if args.cgroup and (why := MemoryCgroup.unavailable()):
        parser.error(f"--cgroup: {why}")
    wanted = [s for s in args.scenario.split(",") if s and s != "none"]
    presets = [p for p in args.presets.split(",") if p and p != "none"]
    root = args.out or Path(tempfile.mkdtemp(prefix="loractl-ladder-"))
    root.mkdir(parents=True, exist_ok=True)
    summary: dict = {"cgroup": args.cgroup, "seed": args.seed, "predictions": [], "scenarios": {}}
    try:
        for preset in presets:
            summary["predictions"].append(predict_preset(root, preset, args.seed))
        builders = {
            "uniform": lambda: Uniform(root, args.seed, args.iters),
            "late": lambda: LateLong(root, args.seed),
        }
        for name in wanted:
            scenario = builders[name]()
            results = {}
            for variant in VARIANTS:
                results[variant] = run_variant(scenario, variant, args.cgroup, args.timeout)
                print(
                    f"{name}/{variant}: {results[variant]['state']}"
                    f" in {results[variant]['wall_s']:.1f} s"
                )
            summary["scenarios"][name] = {"facts": scenario.facts, "results": results}
        report(root, summary)
    finally:
        if not args.keep and args.out is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def report(out: Path, summary: dict) -> None:
    """Each run's figures, the targets, results.json, and last the wall-time ratio."""
    print()
    errors = [p["worst_error"] for p in summary["predictions"] if p["worst_error"] is not None]
    targets: dict[str, bool] = {}
    ratios: dict[str, dict[str, float]] = {}
    for name, scenario in summary["scenarios"].items():
        results = scenario["results"]
        for r in results.values():
            print_run(name, r)
        learning = results["learning"]
        stops = learning["memory_stops"]
        targets[f"{name}: learning stops <= 1, at step 0"] = len(stops) <= 1 and all(
            s["step"] == 0 for s in stops
        )
        targets[f"{name}: learning OOM kills 0"] = learning["oom_kills"] in (0, None)
        errors += [p["error"] for p in learning["prediction"].values() if p["error"] is not None]
        ratios[name] = {
            other: learning["wall_s"] / results[other]["wall_s"] for other in ("recipe", "blind")
        }
        for other, ratio in ratios[name].items():
            print(f"{name}: ratio learning/{other} wall time: {ratio:.2f}")
    if errors:
        targets["prediction error <= 10%"] = max(errors) <= 0.10
    if "late" in ratios:
        targets["late: wall <= 0.6x the recipe's"] = ratios["late"]["recipe"] <= 0.6
    print()
    for name, met in targets.items():
        print(f"target {name}: {'met' if met else 'NOT met'}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({**summary, "ratios": ratios, "targets": targets}, indent=2, default=str)
    )
    print(f"results: {out / 'results.json'}")
    for name, by in ratios.items():
        if name != "late":
            print(f"ratio learning/recipe wall time ({name}): {by['recipe']:.2f}")
    if "late" in ratios:
        print(f"ratio learning/recipe wall time (late): {ratios['late']['recipe']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
