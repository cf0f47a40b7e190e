"""Overhead benchmark: loractl's trainer against mlx-lm's own ``mlx_lm.lora`` trainer.

Usage::

    .venv/bin/python bench/overhead.py [--preset ladder|tiny|varlen] [--rounds 3] [--iters N]
                                       [--checkpoint-every N] [--warmup 2] [--seed 0]
                                       [--ours-overrides JSON] [--out DIR] [--keep]
    .venv/bin/python bench/overhead.py --model MODEL_DIR [--data DATA_DIR] [--lora-layers 16]
                                       [--max-seq-length 512] [--batch-size 1]
                                       [--grad-accumulation-steps 1] [--rank 8] [...]

Defaults per preset: ladder 48 iterations (12 optimizer steps of about 5 s on 2 CPU cores,
a checkpoint every 5), tiny 480 iterations (120 steps of about 0.2 s, a checkpoint every 10),
varlen 128 iterations (4 epochs of 32 batches of 4 samples of 16-512 tokens, no accumulation,
a checkpoint every 10).

A given model. ``--model DIR`` benches an existing mlx-lm model folder instead of a preset's
tiny one (``bench/gpu_model.py`` writes a Mistral-7B-shaped 4-bit one for GPUs), on the text
data in ``--data`` (default: ``data/`` beside the model folder), with the job settings taken
from the flags: LoRA on the last ``--lora-layers`` layers (rank ``--rank``, scale 20, dropout
0, mlx-lm's defaults), ``--batch-size``, ``--grad-accumulation-steps`` and
``--max-seq-length``; learning rate 1e-4 with the same cosine schedule; 48 iterations and a
checkpoint every 10 optimizer steps unless ``--iters``/``--checkpoint-every`` say otherwise.
Everything else below holds as for the presets. The parent process itself stays on MLX's CPU
device and loads only the tokenizer, so the trainers have the accelerator to themselves.

What runs. One tiny random Llama model and its data set are built once with
``loractl.daemon.tinymodel.prepare``. Then, for each round, both trainers run the same job, each
in its own fresh subprocess with its own empty adapter folder: ``python -m
loractl.daemon.trainer job.yaml --fresh --telemetry ipc://...`` ("ours") and mlx-lm's
``lora.main()`` with ``-c mlx.yaml --train`` ("theirs"). The order alternates (ours first in odd
rounds, theirs first in even rounds) so slow drift of the machine hits both alike.

Same work. Both configs come from the same dict: model, data, iters, batch size, gradient
accumulation, max_seq_length, LoRA rank/scale/dropout/layers, optimizer, learning-rate
schedule and seed. The mlx-lm config keeps only the keys mlx-lm knows (``CONFIG_DEFAULTS``).
Every training sample of the tiny and ladder presets is longer than max_seq_length, so every
micro-batch of either trainer is the same 256-token shape and carries the same number of loss
tokens. The varlen preset's samples spread from 16 to 512 tokens (max_seq_length 512), so how
samples are grouped into batches decides how much of each batch is padding: loractl sorts by
token length before batching, as mlx-lm's ``iterate_batches`` means to, but in mlx-lm 0.32.2
the sort key for the ``CacheDataset`` that ``mlx_lm.lora`` passes is ``CacheDataset.itemlen``,
the number of fields of a raw sample, so its batches keep file order. The script measures both
batchings (real tokens per padded token, from each trainer's own batch code) and prints them.
Over whole epochs both trainers consume the same samples, so the script checks that both
report the same token total. Validation is off
in both (``val_batches: 0``: loractl skips it, mlx-lm runs zero batches at iterations 1 and
``iters``). Operational overhead stays ON for ours: heartbeats every second to a ZeroMQ ROUTER
that this process binds and drains in a thread, the per-step JSON log line, the memory checks
and cleanup cadence, and a full checkpoint (adapters + optimizer state + state.json, fsynced
and renamed into place, plus the adapter file) every ``--checkpoint-every`` optimizer steps.
mlx-lm saves its adapters every ``save_every = checkpoint_every * grad_accumulation_steps``
iterations, the same cadence, and reports every ``grad_accumulation_steps`` iterations, i.e.
once per optimizer step like our step record.

Throughput (tokens/s). Both are measured the same way, as wall clock inside the child between
per-optimizer-step records, so everything between two steps (checkpoints, saves, logging,
heartbeat thread, gc, cache clearing) counts:

- ours: the ``step`` records of ``train.log`` (structlog ISO timestamps); tokens of a step are
  ``tokens_per_sec * step_seconds`` as logged (rounded to an integer; exact here);
- theirs: mlx-lm's supported ``TrainingCallback`` hook, installed by a three-line wrapper that
  replaces ``mlx_lm.lora.get_reporting_callbacks`` (the wandb/swanlab factory) with a callback
  that prints ``time.time()``, the iteration, the exact ``trained_tokens`` and
  ``peak_memory``. Nothing else in mlx-lm is touched; the training loop is mlx-lm's.

The first ``--warmup`` optimizer steps (default 2: graph compilation, first allocations) are
skipped: throughput = tokens of steps warmup+1..N / (time of record N - time of record warmup).
Model loading, data loading and process start-up are therefore excluded for both.
``throughput_ratio`` is the median over rounds of the per-round ratio ours/theirs (each round
pairs two runs taken back to back).

Noise. Wall-clock throughput is only as good as the machine is quiet. For each run the script
also reports the trainer's own CPU use and ``other``: the CPU cores that everything else kept
busy meanwhile (from /proc/stat, minus the child's rusage), and, as diagnostics, tokens/s at
the median step interval (robust to bursts, blind to the odd slow checkpoint step) and tokens
per CPU-second of the trainer over the same window (the child's utime+stime, all threads,
sampled from /proc every 50 ms and interpolated at the two record times), which foreign load
disturbs much less. It warns when the median ``other`` exceeds 0.25 cores.

Memory. Peak RSS of each child from ``os.wait4`` (the kernel's ru_maxrss of that one process,
not the cumulative RUSAGE_CHILDREN), and the MLX allocator peak (``mx.get_peak_memory``): ours
from the largest ``mlx_peak_mb`` in the step records, theirs from the callback's
``peak_memory`` (reported in GB of 1e9 bytes; converted to MiB). ``peak_memory_ratio`` is
median peak RSS ours / median peak RSS theirs.

Targets: throughput_ratio >= 0.97 and peak RSS ours <= 1.05x theirs. The script always exits 0
(it is a benchmark, not a test); the last line is ``throughput_ratio=<ours/theirs>``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

MIB = 1024 * 1024
CPU_SAMPLE_SECONDS = 0.05
NOISY_OTHER_CPUS = 0.25
MARKER = "LORACTL_BENCH "
THROUGHPUT_TARGET = 0.97
MEMORY_TARGET = 1.05

# Per preset: iterations (minibatches) and checkpoint cadence in optimizer steps. A ladder
# step (4 micro-batches of 256 tokens) takes about 5 s on 2 CPU cores, a tiny one 0.15 s.
DEFAULTS = {
    "ladder": {"iters": 48, "checkpoint_every": 5},
    "tiny": {"iters": 480, "checkpoint_every": 10},
    # 4 epochs of 32 batches of 4; lengths 16-512 tokens.
    "varlen": {"iters": 128, "checkpoint_every": 10},
}
# --model: a given model folder; the same cadence as the tiny preset's, fewer iterations.
MODEL_DEFAULTS = {"iters": 48, "checkpoint_every": 10}

# Runs mlx-lm's own CLI entry point with one reporting callback. mlx_lm.lora.run() builds its
# callback with get_reporting_callbacks(); returning ours from it is the supported hook.
THEIRS_WRAPPER = f"""\
import json, os, sys, time
import mlx_lm.lora as lora

class BenchReport(lora.TrainingCallback):
    def on_train_loss_report(self, info):
        record = {{k: info[k] for k in ("iteration", "trained_tokens", "peak_memory")}}
        record["t"] = time.time()
        # Under mlx.launch (bench/distributed.py) every rank reports; MLX_RANK says which.
        record["rank"] = int(os.environ.get("MLX_RANK", "0"))
        print({MARKER!r} + json.dumps(record), flush=True)

lora.get_reporting_callbacks = lambda *args, **kwargs: BenchReport()
sys.argv = ["mlx_lm.lora", "-c", sys.argv[1], "--train"]
lora.main()
"""


@dataclass
class Run:
    """One trainer run's figures."""

    trainer: str
    round: int
    returncode: int
    wall_seconds: float
    peak_rss_mb: float
    mlx_peak_mb: float = float("nan")
    steps: int = 0
    total_tokens: int = 0
    window_steps: int = 0
    window_tokens: int = 0
    window_seconds: float = float("nan")
    tokens_per_sec: float = float("nan")
    median_step_tokens_per_sec: float = float("nan")
    cpu_tokens_per_sec: float = float("nan")
    child_cpus: float = float("nan")
    other_cpus: float = float("nan")
    saves: int = 0
    heartbeats: int = 0
    error: str = ""
    step_times: list[float] = field(default_factory=list)
    # (time.time(), CPU seconds of the child so far), sampled while it runs.
    cpu_samples: list[tuple[float, float]] = field(default_factory=list, repr=False)


class HeartbeatSink:
    """A ZeroMQ ROUTER in a thread that counts and drops whatever the trainer sends."""

    def __init__(self, endpoint: str):
        import zmq

        self.endpoint = endpoint
        self._context = zmq.Context()
        self._sock = self._context.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(endpoint)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._count = 0
        self._thread = threading.Thread(target=self._drain, name="heartbeat-sink", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(200):
                continue
            while True:
                try:
                    self._sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                with self._lock:
                    self._count += 1

    def take(self) -> int:
        """Messages received since the last call."""
        with self._lock:
            count, self._count = self._count, 0
        return count

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()
        self._context.term()


# -- configs -------------------------------------------------------------------------------


def make_configs(base: dict, args, paths: dict[str, Path]) -> tuple[dict, dict]:
    """The shared job settings, as our job config and as an mlx_lm.lora-only config."""
    from mlx_lm.lora import CONFIG_DEFAULTS

    ga = int(base["grad_accumulation_steps"])
    common = dict(base)
    common.update(
        model=str(paths["model"].resolve()),
        data=str(paths["data"].resolve()),
        iters=args.iters,
        lr_schedule={
            "name": "cosine_decay",
            "arguments": [float(base["learning_rate"]), args.iters // ga],
        },
        val_batches=0,
        steps_per_eval=10**6,
        steps_per_report=ga,
        save_every=args.checkpoint_every * ga,
        seed=args.seed,
    )
    ours = dict(common)
    ours.update(
        name=f"bench-{args.preset}",
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=3,
        heartbeat_interval=1.0,
    )
    ours.update(args.ours_overrides)
    theirs = {k: v for k, v in common.items() if k in CONFIG_DEFAULTS}
    return ours, theirs


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# -- running -------------------------------------------------------------------------------


def alternating_runs(out: Path, rounds: int):
    """``(round, trainer, run folder)`` for every run: ours first in odd rounds, theirs first
    in even ones, so slow drift of the machine hits both alike; each folder starts empty."""
    for rnd in range(1, rounds + 1):
        for trainer in ("ours", "theirs") if rnd % 2 else ("theirs", "ours"):
            run_dir = out / f"round{rnd}-{trainer}"
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            yield rnd, trainer, run_dir


def job_file(run_dir: Path, trainer: str, ours_cfg: dict, theirs_cfg: dict) -> Path:
    """The run's config file (ours: job.yaml, theirs: mlx.yaml), adapters in the run folder."""
    cfg = ours_cfg if trainer == "ours" else theirs_cfg
    name = "job.yaml" if trainer == "ours" else "mlx.yaml"
    return write_yaml(run_dir / name, dict(cfg, adapter_path=str(run_dir / f"adapters-{trainer}")))


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORACTL_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot (Linux), else nan."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    # user nice system idle iowait irq softirq steal ...: everything but idle and iowait.
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process, all threads (Linux /proc), else None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            text = handle.read()
        fields = text[text.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def spawn(cmd: list[str], cwd: Path, output: Path, trainer: str, rnd: int) -> Run:
    """Run ``cmd`` to the end; a Run with its exit code, wall time, peak RSS and CPU use."""
    busy = busy_cpu_seconds()
    tic = time.perf_counter()
    samples: list[tuple[float, float]] = []
    with output.open("wb") as sink:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=child_env(), stdout=sink, stderr=subprocess.STDOUT
        )
        while True:
            # wait4 gives this child's own ru_maxrss (KiB on Linux, bytes on macOS), not the
            # running maximum over all children that RUSAGE_CHILDREN would give.
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            cpu = process_cpu_seconds(proc.pid)
            if cpu is not None:
                samples.append((time.time(), cpu))
            time.sleep(CPU_SAMPLE_SECONDS)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - tic
    busy = busy_cpu_seconds() - busy
    child_cpu = usage.ru_utime + usage.ru_stime
    scale = 1 if sys.platform == "darwin" else 1024
    return Run(
        trainer,
        rnd,
        proc.returncode,
        wall,
        usage.ru_maxrss * scale / MIB,
        child_cpus=child_cpu / wall,
        # Whatever else kept the CPUs busy meanwhile (other processes, this one's threads):
        # the noise indicator. On an idle machine it stays near 0.
        other_cpus=max(0.0, busy - child_cpu) / wall,
        cpu_samples=samples,
    )


def cpu_at(samples: list[tuple[float, float]], t: float) -> float:
    """The child's CPU seconds at wall time ``t``, interpolated between samples."""
    for (t0, c0), (t1, c1) in zip(samples, samples[1:], strict=False):
        if t0 <= t <= t1:
            return c0 + (c1 - c0) * (t - t0) / (t1 - t0) if t1 > t0 else c1
    return float("nan")


def window(records: list[tuple[float, int]], warmup: int) -> tuple[int, int, float, float]:
    """(steps, tokens, start, end) from the end of step ``warmup`` to the last step."""
    if len(records) < warmup + 2:
        raise ValueError(f"only {len(records)} step records; need at least {warmup + 2}")
    start = records[warmup - 1][0] if warmup > 0 else records[0][0]
    body = records[warmup:] if warmup > 0 else records[1:]
    return len(body), sum(tokens for _, tokens in body), start, records[-1][0]


def run_ours(cfg: Path, run_dir: Path, sink: HeartbeatSink, rnd: int, warmup: int) -> Run:
    cmd = [
        sys.executable, "-m", "loractl.daemon.trainer", str(cfg), "--fresh",
        "--telemetry", sink.endpoint, "--job-id", f"bench-{rnd}",
    ]  # fmt: skip
    sink.take()
    result = spawn(cmd, run_dir, run_dir / "ours.out", "ours", rnd)
    result.heartbeats = sink.take()
    records, peak, result.saves = ours_records(run_dir / "adapters-ours" / "train.log")
    return finish(result, records, peak, warmup, run_dir / "ours.out")


def ours_records(log: Path) -> tuple[list[tuple[float, int]], float, int]:
    """From our trainer's log: (time, tokens) per step record, the largest mlx_peak_mb, and
    the number of checkpoints."""
    records: list[tuple[float, int]] = []
    peaks: list[float] = []
    saves = 0
    for line in log.read_text(encoding="utf-8").splitlines() if log.exists() else []:
        event = json.loads(line)
        kind = event.get("event")
        if kind == "step":
            t = datetime.fromisoformat(event["timestamp"]).timestamp()
            tokens = event.get("tokens")
            if tokens is None:  # logs from before the exact count was recorded
                tokens = round(event["tokens_per_sec"] * event["step_seconds"])
            records.append((t, tokens))
            peaks.append(event["mlx_peak_mb"])
        elif kind == "checkpoint":
            saves += 1
    return records, max(peaks, default=float("nan")), saves


def run_theirs(cfg: Path, run_dir: Path, rnd: int, warmup: int) -> Run:
    cmd = [sys.executable, "-c", THEIRS_WRAPPER, str(cfg)]
    result = spawn(cmd, run_dir, run_dir / "theirs.out", "theirs", rnd)
    text = (run_dir / "theirs.out").read_text(encoding="utf-8", errors="replace")
    records, peak, result.saves = theirs_records(text)
    return finish(result, records, peak, warmup, run_dir / "theirs.out")


def theirs_records(text: str, rank: int = 0) -> tuple[list[tuple[float, int]], float, int]:
    """From THEIRS_WRAPPER's output: (time, tokens) per report of ``rank``, its last MLX peak
    in MiB, and the number of adapter saves (mlx-lm saves on rank 0 only)."""
    records: list[tuple[float, int]] = []
    peak = float("nan")
    previous = 0
    # Each record is one JSON object after MARKER. mlx.launch relays the ranks' output chunk
    # by chunk, and print() writes the newline separately, so another rank's chunk may land
    # right after a record on the same line: read each object on its own.
    decoder = json.JSONDecoder()
    at = text.find(MARKER)
    while at != -1:
        event, end = decoder.raw_decode(text, at + len(MARKER))
        at = text.find(MARKER, end)
        if event.get("rank", 0) != rank:
            continue
        records.append((event["t"], event["trained_tokens"] - previous))
        previous = event["trained_tokens"]
        peak = event["peak_memory"] * 1e9 / MIB
    saves = sum("save" in line and "_adapters.safetensors" in line for line in text.splitlines())
    return records, peak, saves


def finish(result: Run, records, mlx_peak: float, warmup: int, output: Path) -> Run:
    result.mlx_peak_mb = mlx_peak
    result.steps = len(records)
    result.total_tokens = sum(tokens for _, tokens in records)
    result.step_times = [round(b[0] - a[0], 4) for a, b in zip(records, records[1:], strict=False)]
    try:
        result.window_steps, result.window_tokens, start, end = window(records, warmup)
        result.window_seconds = end - start
        result.tokens_per_sec = result.window_tokens / result.window_seconds
        cpu = cpu_at(result.cpu_samples, end) - cpu_at(result.cpu_samples, start)
        if cpu > 0:
            result.cpu_tokens_per_sec = result.window_tokens / cpu
        # Robust to bursts of foreign load, but blind to the occasional slow step (a
        # checkpoint): shown for diagnosis, not used for the ratio.
        intervals = result.step_times[max(warmup - 1, 0) :]
        result.median_step_tokens_per_sec = (
            result.window_tokens / result.window_steps / statistics.median(intervals)
        )
    except ValueError as exc:
        result.error = str(exc)
    if result.returncode != 0 or result.error:
        tail = output.read_text(encoding="utf-8", errors="replace")[-2000:]
        result.error = (result.error + f" (exit {result.returncode})\n{tail}").strip()
    return result


# -- reporting -----------------------------------------------------------------------------


def fmt(value: float, digits: int = 1) -> str:
    return "nan" if value != value else f"{value:,.{digits}f}"


def print_table(runs: list[Run]) -> None:
    head = (
        f"{'round':>5}  {'trainer':<7}  {'tok/s':>8}  {'med-step':>8}  {'cpu-tok/s':>9}  "
        f"{'window':>13}  "
        f"{'tokens':>7}  {'RSS MiB':>7}  {'MLX MiB':>7}  {'wall s':>6}  {'saves':>5}  "
        f"{'hb':>3}  {'cpu':>4}  {'other':>5}"
    )
    print(head)
    print("-" * len(head))
    for r in runs:
        span = f"{r.window_steps} st/{fmt(r.window_seconds)}s"
        print(
            f"{r.round:>5}  {r.trainer:<7}  {fmt(r.tokens_per_sec):>8}  "
            f"{fmt(r.median_step_tokens_per_sec):>8}  {fmt(r.cpu_tokens_per_sec):>9}  "
            f"{span:>13}  {r.total_tokens:>7}  "
            f"{fmt(r.peak_rss_mb):>7}  {fmt(r.mlx_peak_mb):>7}  {fmt(r.wall_seconds):>6}  "
            f"{r.saves:>5}  {r.heartbeats if r.trainer == 'ours' else '-':>3}  "
            f"{fmt(r.child_cpus, 2):>4}  {fmt(r.other_cpus, 2):>5}"
        )
    print(
        "tok/s: tokens / wall time over the timed window (the figure compared); med-step: "
        "the same\nat the median step interval; cpu-tok/s: tokens per CPU-second of the "
        "trainer process\n(all threads) over the same window, which foreign load disturbs "
        "far less; saves:\ncheckpoints (ours) or adapter saves (theirs); hb: heartbeats "
        "received; cpu: the\ntrainer's CPU use in cores; other: CPU cores kept busy by "
        "everything else meanwhile\n(the noise indicator; ~0 on an idle machine)."
    )


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def summarize(runs: list[Run], rounds: int) -> dict:
    by = {t: [r for r in runs if r.trainer == t] for t in ("ours", "theirs")}
    med = {
        t: {
            key: median([getattr(r, key) for r in rs])
            for key in (
                "tokens_per_sec",
                "median_step_tokens_per_sec",
                "cpu_tokens_per_sec",
                "peak_rss_mb",
                "mlx_peak_mb",
                "wall_seconds",
                "other_cpus",
            )
        }
        for t, rs in by.items()
    }
    paired, paired_steps, paired_cpu = [], [], []
    for rnd in range(1, rounds + 1):
        pair = {r.trainer: r for r in runs if r.round == rnd}
        if len(pair) == 2:
            paired.append(pair["ours"].tokens_per_sec / pair["theirs"].tokens_per_sec)
            paired_cpu.append(pair["ours"].cpu_tokens_per_sec / pair["theirs"].cpu_tokens_per_sec)
            paired_steps.append(
                pair["ours"].median_step_tokens_per_sec / pair["theirs"].median_step_tokens_per_sec
            )
    return {
        "medians": med,
        "round_ratios": paired,
        "throughput_ratio": median(paired),
        "median_step_ratios": paired_steps,
        "median_step_ratio": median(paired_steps),
        "cpu_ratios": paired_cpu,
        "cpu_ratio": median(paired_cpu),
        "throughput_ratio_of_medians": med["ours"]["tokens_per_sec"]
        / med["theirs"]["tokens_per_sec"],
        "peak_memory_ratio": med["ours"]["peak_rss_mb"] / med["theirs"]["peak_rss_mb"],
        "mlx_peak_ratio": med["ours"]["mlx_peak_mb"] / med["theirs"]["mlx_peak_mb"],
    }


def report(
    out: Path,
    args: argparse.Namespace,
    runs: list[Run],
    facts: dict,
    ranks: Callable[[], None] | None = None,
) -> None:
    """The end of a bench, single-process or distributed: the table of runs (then ``ranks``,
    a distributed bench's table of its ranks), each trainer's medians, the ratios, the
    targets, results.json (``facts`` first, then the arguments, the runs and the summary) and
    last the key=value lines that readers of the output take, throughput_ratio the very last.

    A distributed bench (``ranks`` given) reports peak RSS per rank and the global token count,
    and is held to the throughput target only.
    """
    distributed = ranks is not None
    summary = summarize(runs, args.rounds)
    print()
    print_table(runs)
    if ranks is not None:
        print()
        ranks()
    print("-" * 20)
    for trainer, med in summary["medians"].items():
        print(
            f"median {trainer:<6}: {fmt(med['tokens_per_sec'])} tok/s "
            f"(median step {fmt(med['median_step_tokens_per_sec'])}, per CPU-second "
            f"{fmt(med['cpu_tokens_per_sec'])}), peak RSS{' per rank' if distributed else ''} "
            f"{fmt(med['peak_rss_mb'])} MiB, MLX peak {fmt(med['mlx_peak_mb'])} MiB, "
            f"wall {fmt(med['wall_seconds'])} s, other load {fmt(med['other_cpus'], 2)} cores"
        )
    totals = {r.trainer: r.total_tokens for r in runs}
    same = len({r.total_tokens for r in runs}) == 1
    print(
        f"{'global ' if distributed else ''}tokens trained per run: {totals} "
        f"({'equal' if same else 'DIFFERENT'})"
    )
    print("per-round throughput ratios: " + ", ".join(fmt(x, 4) for x in summary["round_ratios"]))
    print(f"throughput ratio of medians: {fmt(summary['throughput_ratio_of_medians'], 4)}")
    print(
        "median-step ratios (diagnostic): "
        + ", ".join(fmt(x, 4) for x in summary["median_step_ratios"])
        + f" (median {fmt(summary['median_step_ratio'], 4)})"
    )
    print(
        "tokens per CPU-second ratios (diagnostic): "
        + ", ".join(fmt(x, 4) for x in summary["cpu_ratios"])
        + f" (median {fmt(summary['cpu_ratio'], 4)})"
    )
    busy = max(med["other_cpus"] for med in summary["medians"].values())
    if busy > NOISY_OTHER_CPUS:
        print(
            f"WARNING: other processes kept {fmt(busy, 2)} cores busy (median) during the "
            "runs;\nwall-clock figures are noisy, trust the per-CPU-second ratio more."
        )
    print(f"mlx_peak_ratio={fmt(summary['mlx_peak_ratio'], 4)}")
    tp_ok = summary["throughput_ratio"] >= THROUGHPUT_TARGET
    targets = f"throughput >= {THROUGHPUT_TARGET}: {'MET' if tp_ok else 'NOT MET'}"
    if not distributed:
        mem_ok = summary["peak_memory_ratio"] <= MEMORY_TARGET
        targets += f"; peak RSS <= {MEMORY_TARGET}x: {'MET' if mem_ok else 'NOT MET'}"
    print(f"target{'s' if not distributed else ''}: {targets}")
    record = {
        **facts,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "runs": [{k: v for k, v in asdict(r).items() if k != "cpu_samples"} for r in runs],
        "summary": summary,
    }
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"peak_memory_ratio={fmt(summary['peak_memory_ratio'], 4)}")
    print(f"throughput_ratio={fmt(summary['throughput_ratio'], 4)}")


def machine() -> dict:
    import mlx.core as mx
    from mlx_lm import __version__ as mlx_lm_version

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        ram = f"{psutil.virtual_memory().total / 2**30:.1f} GiB"
    except ImportError:
        ram = "?"
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "ram": ram,
        "os": platform.platform(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm_version,
    }


# -- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/overhead.py",
        description="Throughput and peak memory of loractl's trainer against mlx_lm.lora.",
    )
    parser.add_argument("--preset", default="ladder", choices=sorted(DEFAULTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, help="minibatches per run (preset default)")
    parser.add_argument(
        "--checkpoint-every", type=int, help="optimizer steps between checkpoints/saves"
    )
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps not timed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ours-overrides",
        type=json.loads,
        default={},
        metavar="JSON",
        help="extra keys for our job config only, for experiments: '{\"cleanup_every\": 50}'",
    )
    parser.add_argument("--out", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    given = parser.add_argument_group(
        "a given model (instead of a preset's tiny one)",
        "mlx-lm's model folder and text data; the job settings come from these flags",
    )
    given.add_argument("--model", type=Path, help="model folder (e.g. from bench/gpu_model.py)")
    given.add_argument(
        "--data", type=Path, help="folder with {train,valid}.jsonl (default: MODEL/../data)"
    )
    given.add_argument("--lora-layers", type=int, default=16, help="num_layers (default 16)")
    given.add_argument("--max-seq-length", type=int, default=512)
    given.add_argument("--batch-size", type=int, default=1)
    given.add_argument("--grad-accumulation-steps", type=int, default=1)
    given.add_argument("--rank", type=int, default=8, help="LoRA rank")
    args = parser.parse_args(argv)
    if args.model is not None:
        args.preset = "model"
        args.model = args.model.resolve()
        args.data = (args.data or args.model.parent / "data").resolve()
        for what, folder in (("model", args.model), ("data", args.data)):
            if not folder.is_dir():
                parser.error(f"--{what} {folder}: no such folder")
    defaults = MODEL_DEFAULTS if args.model is not None else DEFAULTS[args.preset]
    args.iters = args.iters or defaults["iters"]
    args.checkpoint_every = args.checkpoint_every or defaults["checkpoint_every"]
    return args


def main(argv: list[str] | None = None) -> int:
    from loractl.daemon.tinymodel import prepare

    args = parse_args(argv)
    if args.out is None:
        out = Path(tempfile.mkdtemp(prefix="loractl-bench-"))
        keep = args.keep
    else:
        out = args.out.resolve()
        out.mkdir(parents=True, exist_ok=True)
        keep = True
    print(f"work folder: {out} ({'kept' if keep else 'removed at the end'})")
    try:
        return bench(args, out, prepare)
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)


def given_model(args) -> tuple[dict[str, Path], dict]:
    """``--model``: the paths and the shared job settings, as a preset's job.yaml gives them."""
    paths = {"model": args.model, "data": args.data}
    base = {
        "name": "bench-model",
        "model": str(args.model),
        "data": str(args.data),
        "fine_tune_type": "lora",
        "optimizer": "adamw",
        "num_layers": args.lora_layers,
        "batch_size": args.batch_size,
        "iters": args.iters,
        "learning_rate": 1.0e-4,
        "lora_parameters": {"rank": args.rank, "scale": 20.0, "dropout": 0.0},
        "max_seq_length": args.max_seq_length,
        "grad_accumulation_steps": args.grad_accumulation_steps,
        "val_batches": 0,
        "seed": args.seed,
    }
    return paths, base


def batching_efficiency(paths: dict[str, Path], base: dict, epochs: int = 4) -> dict:
    """Real tokens per padded token in each trainer's training batches, over a few epochs.

    Theirs is measured on mlx-lm's own ``iterate_batches`` over the ``CacheDataset`` that
    ``mlx_lm.lora`` hands it; ours on loractl's ``ExampleOrder`` and ``make_batch``. Both pad
    a batch to one plus a multiple of 32 tokens, so padded tokens are what a step computes.
    """
    import numpy as np
    from mlx_lm import load
    from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset
    from mlx_lm.tuner.trainer import iterate_batches

    from loractl.daemon.data import ExampleOrder, make_batch, tokenize

    batch_size, max_seq = int(base["batch_size"]), int(base["max_seq_length"])
    if "config" not in paths:
        # --model: a given model may be 4 GB; its tokenizer is all this needs, built as load()
        # builds it.
        from mlx_lm.utils import load_config, load_tokenizer

        eos = load_config(Path(paths["model"])).get("eos_token_id")
        tokenizer = load_tokenizer(
            Path(paths["model"]), eos_token_ids=[eos] if isinstance(eos, int) else eos
        )
    else:
        _, tokenizer = load(str(paths["model"]))
    raw, _, _ = load_local_dataset(paths["data"], tokenizer, None)
    theirs_real = theirs_padded = 0
    batches = iterate_batches(CacheDataset(raw), batch_size, max_seq, loop=True, seed=0)
    per_epoch = len(raw) // batch_size
    # iterate_batches prints a truncation warning for every batch that needs one.
    with contextlib.redirect_stdout(io.StringIO()):
        for _, (batch, lengths) in zip(range(epochs * per_epoch), batches, strict=False):
            theirs_padded += batch.size
            theirs_real += int(np.array(lengths)[:, 1].sum())
    ours_data = tokenize(raw, str)
    order = ExampleOrder(ours_data.lengths, batch_size, int(base["seed"]))
    ours_real = ours_padded = 0
    for start in range(0, epochs * order.epoch_length, batch_size):
        batch, lengths = make_batch(ours_data, order.indices(start, batch_size), max_seq)
        ours_padded += batch.size
        ours_real += int(np.array(lengths)[:, 1].sum())
    return {"ours": ours_real / ours_padded, "theirs": theirs_real / theirs_padded}


def bench(args, out: Path, prepare) -> int:
    info = machine()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    if args.model is not None:
        import mlx.core as mx

        # Batching arrays stay off the accelerator: the trainers get it to themselves.
        mx.set_default_device(mx.cpu)
        paths, base = given_model(args)
    else:
        paths = prepare(out / "fixture", preset=args.preset, seed=args.seed)
        base = yaml.safe_load(paths["config"].read_text(encoding="utf-8"))
    ga = int(base["grad_accumulation_steps"])
    args.iters -= args.iters % ga
    ours_cfg, theirs_cfg = make_configs(base, args, paths)
    if args.model is not None:
        print(
            f"model={paths['model']} data={paths['data']} num_layers={base['num_layers']} "
            f"rank={base['lora_parameters']['rank']}"
        )
    print(
        f"preset={args.preset} rounds={args.rounds} iters={args.iters} "
        f"batch_size={base['batch_size']} grad_accumulation_steps={ga} "
        f"optimizer_steps={args.iters // ga} max_seq_length={base['max_seq_length']} "
        f"checkpoint_every={args.checkpoint_every} steps (save_every={args.checkpoint_every * ga}"
        f" iters) warmup={args.warmup} steps"
        + (f" ours_overrides={json.dumps(args.ours_overrides)}" if args.ours_overrides else "")
    )
    efficiency = batching_efficiency(paths, base)
    print(
        f"real tokens per padded token: ours {efficiency['ours']:.3f} (length-sorted batches), "
        f"theirs {efficiency['theirs']:.3f} (mlx-lm's iterate_batches as mlx_lm.lora calls it)"
    )
    endpoint = f"ipc://{out / 'hb.sock'}"
    sink = HeartbeatSink(endpoint)
    runs: list[Run] = []
    try:
        for rnd, trainer, run_dir in alternating_runs(out, args.rounds):
            path = job_file(run_dir, trainer, ours_cfg, theirs_cfg)
            if trainer == "ours":
                result = run_ours(path, run_dir, sink, rnd, args.warmup)
            else:
                result = run_theirs(path, run_dir, rnd, args.warmup)
            runs.append(result)
            print(
                f"  round {rnd} {trainer:<6}: {fmt(result.tokens_per_sec)} tok/s, "
                f"peak RSS {fmt(result.peak_rss_mb)} MiB, wall {fmt(result.wall_seconds)} s",
                flush=True,
            )
            if result.error:
                print(f"  ERROR in {trainer}: {result.error}", flush=True)
    finally:
        sink.close()

    report(out, args, runs, {"machine": info, "padding_efficiency": efficiency})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
