"""A real out-of-memory under the real supervisor: the job steps down its ladder and completes.

Usage::

    python bench/gpu_oom.py --model MODEL_DIR [--work DIR] [--batch-size 16]
                            [--max-seq-length 8192] [--ladder JSON] [--iters 2]
                            [--lora-layers -1] [--words 8500] [--timeout 900]
                            [--host-budget-mb 65536] [--simulate-budget-mb MB|auto]

What runs. A text data set whose every sample is longer than ``--max-seq-length`` tokens
(``bench/gpu_model.py``'s ``write_data``; about 1.13 tokens a word at vocabulary 32000), a job
on ``MODEL_DIR`` (a Mistral-7B-shaped 4-bit model from ``bench/gpu_model.py`` on the GPU) at
batch 16 x 8192 tokens with LoRA (rank 8, every linear layer, mlx-lm's default keys) on every
layer, and a custom ladder that shrinks it (default: sequence 4096, then batch 2 x 512; rungs
accumulate). The real supervisor (``python -m loractl.supervisor --home WORK/home``) runs it;
the script submits the job through the client API, polls ``show`` until the job completes or
fails, and prints each crash (cause, rule, exit code, the stderr line that decided it), each
ladder step, the peak memory of each rung (the supervisor's process footprint, which on CUDA
is host memory only, and MLX's allocator peak, i.e. GPU memory, from the trainer's step
records) and the final state.

Why the default rungs 0 and 1 cannot fit on an H200 (about 139 GiB usable), and rung 2 does.
A LoRA layer keeps its activations for the backward pass: the inputs of its seven adapted
linear layers, the two norms' inputs, q/k/v and the attention output, and the SwiGLU's two
14336-wide inputs, about 130 KB a token in bfloat16, 90 KB at the very least (DESIGN.md's H100
figures, 14.2 GB at batch 2 x 512 against 11.0 GB at batch 1 with LoRA on 16 layers, put the
whole model's cost at about 6 MB a token). Rung 0, 16 x 8191 = 131,056 tokens a step, needs
12-17 GB a layer, 380-550 GB over 32 layers; rung 1, 16 x 4095 = 65,520 tokens, 190-275 GB.
Both die in ``cudaMallocAsync`` ("out of memory") part-way through the first step's forward
pass; the trainer retries the step once after clearing the cache, exits 75, and the supervisor
classifies the crash as memory (exit code, stderr line) and steps down. LoRA on every layer
makes the saved activations start at layer 0, so a failing try takes seconds, not a forward
through 16 frozen layers first; batch 16 keeps every array under 2^31 elements (the widest,
131,056 x 14336, is 1.9e9), so nothing but memory can stop rung 0. Rung 2, 2 x 511 tokens,
peaks near 15-20 GB and trains.

The run length is ``iters`` x the submitted batch size in examples (loractl keeps the examples
of the run fixed across rungs): ``--iters 2`` is 32 examples, i.e. 16 steps of batch 2 on
rung 2.

Without a GPU. ``--simulate-budget-mb`` sets ``memory_budget_mb`` so the supervisor's memory
guard, not the allocator, stops the over-large rungs (``auto``: 1.5 x the footprint measured
at the last rung's settings). With a tiny model and small shapes this proves the script's
control flow on a CPU; the check that the crash came from ``cudaMalloc`` is then skipped.

Exit 0 only if the job completed after at least one ladder step, every crash before the
last rung was a memory crash and, unless simulating, at least one crash's stderr says
``cudaMalloc...failed: out of memory``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_LADDER = [
    {"max_seq_length": 4096},
    {"batch_size": 2, "max_seq_length": 512},
]
CUDA_OOM = re.compile(r"cudaMalloc\w*\(.*\) failed: out of memory", re.IGNORECASE)
DONE_STATES = {"completed", "failed", "cancelled"}
# The service's own timers, except: a first step on a new shape may spend minutes in CUDA
# kernel compilation, which must not read as a stall; no desktop or power-assertion helpers.
SUPERVISOR_ENV = {
    "LORACTL_BACKOFF_BASE_S": "1",
    "LORACTL_BACKOFF_CAP_S": "5",
    "LORACTL_STALL_MIN_S": "600",
    "LORACTL_KEEP_AWAKE": "0",
    "LORACTL_NOTIFICATIONS": "0",
}


class Supervisor:
    """``python -m loractl.supervisor --home HOME`` in the background, driven through the
    client API (``loractl.client.control.request``)."""

    def __init__(self, home: Path):
        from loractl.paths import Layout

        self.home = home
        self.layout = Layout.at(home)
        self.log = home.parent / "supervisor.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> Supervisor:
        from loractl.protocol import StatusRequest

        self.home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "LORACTL_HOME"}
        env.update(SUPERVISOR_ENV)
        with self.log.open("ab") as handle:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "loractl.supervisor", "--home", str(self.home)],
                env=env,
                stdout=handle,
                stderr=handle,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"supervisor exited {self.proc.returncode}: {self.tail()}")
            try:
                self.request(StatusRequest(), timeout=0.5)
                return self
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def request(self, message, timeout: float = 10.0):
        from loractl.client.control import request

        return request(self.layout, message, timeout=timeout).data

    def submit(self, config: Path) -> str:
        from loractl.protocol import SubmitRequest

        return self.request(SubmitRequest(config_path=str(config)))["id"]

    def show(self, job_id: str) -> dict:
        from loractl.protocol import ShowRequest

        return self.request(ShowRequest(job=job_id))["job"]

    def stop(self, trainer_pid: int | None = None) -> None:
        """SIGTERM (the supervisor checkpoints and stops its trainer), SIGKILL after 30 s;
        then ``trainer_pid``, a trainer of ours in its own session, if it outlived it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if trainer_pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(trainer_pid, signal.SIGKILL)
                print(f"killed trainer pid {trainer_pid}, left by the supervisor")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


class GpuSampler:
    """The GPU's memory in use (nvidia-smi, every half second), as a maximum per rung: what the
    trainer's own records cannot show for a rung whose first step never finished."""

    def __init__(self, interval: float = 0.5):
        self.rung = 0
        self.peaks_mb: dict[int, float] = {}
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
        self.available = shutil.which("nvidia-smi") is not None
        if self.available:
            self._thread.start()

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            try:
                out = subprocess.run(query, capture_output=True, text=True, timeout=5)
                used = float(out.stdout.split()[0])
            except (OSError, subprocess.SubprocessError, ValueError, IndexError):
                used = None
            if used is not None:
                rung = self.rung
                self.peaks_mb[rung] = max(self.peaks_mb.get(rung, 0.0), used)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self.available:
            self._thread.join(10)


def measure_footprint(config: Path, overrides: dict, steps: int = 2) -> float:
    """Peak footprint (MB) of the trainer alone on ``config`` with ``overrides`` over its
    first steps, from the test harness (its home has moved before, so look in both)."""
    try:
        from loractl.client.harness import measure_footprint as measure
    except ImportError:
        from loractl.supervisor.harness import measure_footprint as measure
    return measure(config, overrides, steps=steps)


def write_job(args, work: Path, data: Path, budget_mb: int | None) -> Path:
    job = {
        "name": "gpu-oom",
        "model": str(args.model),
        "data": str(data),
        "fine_tune_type": "lora",
        "optimizer": "adamw",
        "num_layers": args.lora_layers,
        "batch_size": args.batch_size,
        "iters": args.iters,
        "learning_rate": 1.0e-4,
        "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0},
        "max_seq_length": args.max_seq_length,
        "grad_accumulation_steps": 1,
        "steps_per_report": 1,
        "steps_per_eval": 10**6,
        "val_batches": 0,
        "seed": 0,
        "adapter_path": str(work / "adapters"),
        "checkpoint_every": 8,
        "ladder": args.ladder,
    }
    if budget_mb is not None:
        job["memory_budget_mb"] = budget_mb
    path = work / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    return path


def rung_settings(args, rung: int) -> dict:
    settings = {"batch_size": args.batch_size, "max_seq_length": args.max_seq_length}
    for step in args.ladder[:rung]:
        settings.update({k: v for k, v in step.items() if k in settings})
    return settings


def train_log_by_rung(log: Path) -> dict[int, dict]:
    """Per rung, from the trainer's own log: attempts, steps, MLX peak, allocation failures."""
    out: dict[int, dict] = {}
    rung = 0
    if not log.exists():
        return out
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        kind = event.get("event")
        if kind == "attempt starting":
            rung = int(event.get("rung", 0))
            out.setdefault(rung, {"attempts": 0, "steps": 0, "mlx_peak_mb": 0.0, "errors": []})
            out[rung]["attempts"] += 1
            continue
        entry = out.setdefault(rung, {"attempts": 0, "steps": 0, "mlx_peak_mb": 0.0, "errors": []})
        if kind == "step":
            entry["steps"] += 1
            entry["mlx_peak_mb"] = max(entry["mlx_peak_mb"], float(event.get("mlx_peak_mb", 0)))
            entry["step_seconds"] = event.get("step_seconds")
            entry["tokens"] = event.get("tokens")
        elif event.get("level") in ("error", "warning") and kind in (
            "attempt failed",
            "allocation failed; cache cleared, retrying step",
        ):
            entry["errors"].append(f"{kind}: {event.get('reason') or event.get('error')}")
    return out


def oom_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if CUDA_OOM.search(line)]


def report(job: dict, args, work: Path, simulate: bool, gpu: GpuSampler) -> int:
    print("\n== result ==")
    print(f"job {job['id']}: state={job['state']} outcome={job['outcome']} rung={job['rung']}")
    if job.get("reason"):
        print("reason: " + job["reason"].splitlines()[0][:400])
    print(
        f"attempts={job['attempts']} step={job['progress']['step']} "
        f"examples={job['progress']['examples_seen']}/{job['progress']['total_examples']}"
    )

    print("\n-- crashes --")
    attempts_dir = Path(job["job_dir"]) / "attempts"
    cuda_ooms = 0
    for crash in job["crashes"]:
        stderr = attempts_dir / f"{crash['attempt']:04d}.stderr"
        text = stderr.read_text(encoding="utf-8", errors="replace") if stderr.exists() else ""
        found = oom_lines(text) or oom_lines(crash.get("explanation", ""))
        cuda_ooms += bool(found)
        print(
            f"attempt {crash['attempt']} rung {crash['rung']}: cause={crash['cause']} "
            f"rule={crash['rule']} exit={crash['exit_code']} signal={crash['signal']} "
            f"step={crash['step']} footprint={crash.get('footprint_mb')} MB"
        )
        print(f"  explanation: {crash['explanation'][:300]}")
        for line in found[-2:]:
            print(f"  stderr: {line[:300]}")
    if not job["crashes"]:
        print("(none)")

    print("\n-- ladder steps --")
    steps = [e for e in job["history"] if e["kind"] == "ladder_step"]
    for event in steps:
        detail = event["detail"]
        print(f"rung {detail['from_rung']} -> {detail['to_rung']}: {detail['change']}")
    if not steps:
        print("(none)")

    print("\n-- peak memory per rung --")
    by_rung = train_log_by_rung(work / "adapters" / "train.log")
    for entry in job["ladder"]:
        rung = entry["rung"]
        settings = rung_settings(args, rung)
        log = by_rung.get(rung, {})
        footprint = entry.get("peak_memory_mb")
        shown = f"{footprint:,.0f} MB" if footprint else "no reading"
        mlx = log.get("mlx_peak_mb")
        mlx_shown = f"{mlx / 1024:,.2f} GiB" if mlx else "no completed step"
        used = gpu.peaks_mb.get(rung)
        gpu_shown = f", GPU in use (nvidia-smi) up to {used / 1024:,.1f} GiB" if used else ""
        print(
            f"rung {rung} ({entry['change']}; batch {settings['batch_size']} x seq "
            f"{settings['max_seq_length']}): process footprint {shown}, MLX peak {mlx_shown}"
            f"{gpu_shown}, attempts {log.get('attempts', 0)}, steps {log.get('steps', 0)}"
            + (f", last step {log['step_seconds']} s" if log.get("step_seconds") else "")
        )
        for error in log.get("errors", [])[-2:]:
            print(f"  trainer: {error[:300]}")

    memory_crashes = [c for c in job["crashes"] if c["cause"] == "memory"]
    checks = {
        "completed": job["state"] == "completed",
        "stepped down": bool(steps),
        "every crash was memory": bool(memory_crashes)
        and len(memory_crashes) == len(job["crashes"]),
    }
    if not simulate:
        checks["a crash came from cudaMalloc out of memory"] = cuda_ooms > 0
    print("\n-- checks --")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    ok = all(checks.values())
    print(f"gpu_oom={'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/gpu_oom.py",
        description="A real out-of-memory under the supervisor: step down and complete.",
    )
    parser.add_argument("--model", type=Path, required=True, help="mlx-lm model folder")
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-seq-length", type=int, default=8192)
    parser.add_argument(
        "--ladder",
        type=json.loads,
        default=DEFAULT_LADDER,
        metavar="JSON",
        help=f"the job's rungs (default: {json.dumps(DEFAULT_LADDER)})",
    )
    parser.add_argument("--iters", type=int, default=2, help="iterations at the submitted batch")
    parser.add_argument(
        "--lora-layers", type=int, default=-1, help="num_layers (default -1: every layer)"
    )
    parser.add_argument("--words", type=int, default=8500, help="words per sample")
    parser.add_argument("--n-train", type=int, help="training samples (default: batch size)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for the job")
    parser.add_argument(
        "--host-budget-mb",
        type=int,
        default=65536,
        help="memory_budget_mb (host memory) when not simulating (default 65536)",
    )
    parser.add_argument(
        "--simulate-budget-mb",
        help="no GPU: set memory_budget_mb to this (or 'auto') so the memory guard stops the "
        "large rungs instead of a real out-of-memory",
    )
    args = parser.parse_args(argv)
    args.model = args.model.resolve()
    if not (args.model / "config.json").exists():
        parser.error(f"--model {args.model}: no config.json there")
    args.n_train = args.n_train or args.batch_size
    return args


def main(argv: list[str] | None = None) -> int:
    from gpu_model import write_data

    args = parse_args(argv)
    # A SIGTERM (timeout(1) running out) unwinds through the finally below, which stops the
    # supervisor and with it the trainer it started in a session of its own.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = (args.work or Path(tempfile.mkdtemp(prefix="loractl-gpu-oom-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}")
    tic = time.perf_counter()
    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    data = write_data(
        work / "data", words=args.words, n_train=args.n_train, n_valid=2, vocab_size=vocab
    )
    took = time.perf_counter() - tic
    print(f"data: {args.n_train} samples of about {args.words} words ({took:.1f} s)")
    simulate = args.simulate_budget_mb is not None
    # The supervisor's guard watches host memory (on CUDA the GPU's is not in the process
    # footprint). A fixed budget keeps its default, 70% of the RAM the VM reports, out of the
    # picture, so only the GPU allocator can end a rung.
    budget = args.host_budget_mb
    if simulate:
        if args.simulate_budget_mb == "auto":
            probe = write_job(args, work, data, None)
            last = rung_settings(args, len(args.ladder))
            footprint = measure_footprint(probe, last)
            budget = int(1.5 * footprint)
            print(f"simulated budget: {budget} MB (1.5 x {footprint:.0f} MB measured at {last})")
        else:
            budget = int(args.simulate_budget_mb)
            print(f"simulated budget: {budget} MB")
    job_path = write_job(args, work, data, budget)
    print(f"job: {job_path} (memory_budget_mb {budget}, lora num_layers {args.lora_layers})")
    for rung in range(len(args.ladder) + 1):
        print(f"rung {rung}: {rung_settings(args, rung)}")

    supervisor = Supervisor(work / "home").start()
    print(f"supervisor pid {supervisor.proc.pid}, home {supervisor.home}, log {supervisor.log}")
    gpu = GpuSampler()
    job = None
    try:
        job_id = supervisor.submit(job_path)
        print(f"submitted {job_id}")
        seen: tuple = ()
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            job = supervisor.show(job_id)
            gpu.rung = job["rung"]
            now = (job["state"], job["rung"], job["attempts"], len(job["crashes"]))
            if now != seen:
                seen = now
                print(
                    f"  t={time.perf_counter() - tic:6.1f}s state={job['state']} "
                    f"rung={job['rung']} attempt={job['attempts']} "
                    f"step={job['progress']['step']} crashes={len(job['crashes'])}",
                    flush=True,
                )
            if job["state"] in DONE_STATES:
                break
            time.sleep(0.5)
        else:
            print(f"TIMEOUT: job still {job['state']} after {args.timeout:.0f} s")
    finally:
        running = job is not None and job["state"] not in DONE_STATES
        supervisor.stop(job["trainer_pid"] if running else None)
        gpu.stop()
    if os.environ.get("LORACTL_GPU_OOM_DEBUG"):
        print(supervisor.tail())
    print(f"total {time.perf_counter() - tic:.1f} s")
    return report(job, args, work, simulate, gpu)


if __name__ == "__main__":
    raise SystemExit(main())
