"""Distributed benchmark: loractl against ``mlx_lm.lora``, both as 2 ranks under mlx.launch.

Usage::

    .venv/bin/python bench/distributed.py [--preset tiny|ladder] [--rounds 2] [--iters N]
                                          [--processes 2] [--unsupervised]
                                          [--launcher-stdin pipe|devnull|full]
                                          [--second-host]
                                          [--checkpoint-every N] [--warmup 2] [--seed 0]
                                          [--out DIR] [--keep]

What runs. The tiny model, data and job settings of ``bench/overhead.py`` (whose functions
this script imports rather than copies), trained by ``--processes`` ranks on this machine over
the ring backend (localhost, free consecutive ports per run), side by side:

- "ours": a loractl job with ``distributed: {backend: ring, processes: 2}``. By default it is
  submitted to a real supervisor (``loractl daemon run`` with its own home folder under the
  work folder), which builds the mlx.launch command itself (``loractl.distributed
  .launch_command``) and watches the ranks' heartbeats. ``--unsupervised`` instead runs that
  same command here, ``launch_command(cfg.distributed, [python, -m, loractl.daemon.trainer,
  job.yaml, --fresh, --telemetry, ipc://..., --job-id, X])``, with the heartbeats drained by
  overhead.py's sink, as overhead.py runs ours.
- "theirs": overhead.py's ``mlx_lm.lora`` wrapper (mlx-lm's ``lora.main()`` with one
  reporting callback) under the same launcher, ``mlx.launch --backend ring --hosts 127.0.0.1
  -n 2 --starting-port P -- python wrapper.py mlx.yaml``; mlx-lm calls
  ``mx.distributed.init()`` and averages the gradients itself.

Same work. Both configs come from overhead.py's ``make_configs``; the global batch is the
preset's (tiny: 4 samples of 256 tokens per optimizer step) spread over the ranks: batch_size
``processes x preset batch`` and gradient accumulation ``preset accumulation / processes``
(tiny: batch 2, accumulation 2, one sample per rank per micro-batch). Both trainers shard
each batch the same way (rank r takes every world-size-th sample), so they train the same
tokens; the script checks the totals.

Throughput. As in overhead.py: wall clock between rank 0's per-optimizer-step records (ours:
``step`` records of ``adapters/train.log``; theirs: the callback's reports), skipping
``--warmup`` steps. Tokens are global (both trainers all-sum them over the ranks before
recording). ``throughput_ratio`` is the median over rounds of ours/theirs; the order
alternates per round.

Launcher and stdin. mlx.launch relays each rank's stdin, stdout and stderr through one thread
per rank that selects on the rank's pipes with the rank's stdin always in the write set. A
pipe with room in it is always writable, so each of those threads spins on ``select`` for as
long as the rank runs: measured here, about 0.6 cores per rank, in the launcher process, on
a machine that has 2. Its main loop also selects on its own stdin, which at EOF
(``/dev/null``) is always readable. ``--launcher-stdin`` says what the launcher's stdin is for
the runs this script starts itself (theirs, and ours with ``--unsupervised``). The supervisor
picks its own: a stream primed with 256 KiB of newlines that never reaches EOF (see
``loractl.supervisor.launcher.launcher_stdin``), the ``full`` mode below, so a supervised job's
launcher does not spin; a user's own ``mlx.launch`` from a terminal does.

- ``pipe`` (default): a pipe whose write end the launcher holds, never at EOF: as a user's
  own ``mlx.launch`` behaves (its relay threads spin);
- ``devnull``: ``/dev/null``;
- ``full``: such a pipe with 256 KiB of newlines written into it first. The launcher copies
  them into every rank's stdin pipe until that pipe is full; a full pipe is not writable, so
  the per-rank threads block in ``select`` instead of spinning. Neither trainer reads stdin.
  This shows what the spinning costs; it is not what a user's mlx.launch does.

Columns beyond overhead.py's: ``launcher``, the launcher's CPU use in cores (its relay
threads); ``sup``, the supervisor's; ``ranks``, the ranks' together; per-rank peak RSS (the
kernel's VmHWM, sampled from /proc) and MLX peak (ours: each rank's log, ``train.log`` and
``train.rank1.log``; theirs: each rank's reports). ``cpu-tok/s`` counts the CPU of the
launcher and the ranks, not the supervisor's. ``hb`` stays 0 for a supervised run: the
supervisor, not this script, receives those heartbeats.

A second host (``--second-host``, with ``--unsupervised``; Linux, root). Rank 1 of both
trainers runs on a second host made with the test suite's ``SecondHost``
(``tests/secondhost.py``): a network, PID and UTS namespace with its own sshd, joined to this
machine by a veth pair and sharing its filesystem. Both launchers get the hostfile
``[{"ssh": "127.0.0.1", "ips": [LOCAL]}, {"ssh": HOST, "ips": [HOST]}]`` (rank 0 here, started
locally by mlx.launch; rank 1 over ``ssh -tt`` through the fixture's ssh wrapper, first on
PATH), and ``--env PYTHONUNBUFFERED=1`` (and ``PYTHONPATH`` when set) so both ranks run the
same code with the same output buffering. The ring's traffic crosses the veth; ours' rank 1
heartbeats to the script's ipc:// sink through the shared filesystem. The CPUs are still this
machine's 2 cores. ``full`` stdin is 8 MiB there: rank 1's relay thread writes into ssh,
which forwards into the remote pty until ssh's channel window (2 MiB) is full too. The
remote rank is found for the CPU and RSS columns by its config path in its command line.

The script always exits 0 (a benchmark, not a test); its last line is
``throughput_ratio=<ours/theirs>``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# bench/ is not a package: overhead.py is imported as a sibling module.
sys.path.insert(0, str(Path(__file__).resolve().parent))
overhead = importlib.import_module("overhead")

# Optimizer steps per run and checkpoint cadence (steps), per preset. Tiny: 0.25-0.5 s a
# step with 2 ranks on 2 cores, so 2 rounds of both trainers take 2.5-5 minutes.
DEFAULTS = {
    "tiny": {"steps": 120, "checkpoint_every": 10},
    "ladder": {"steps": 12, "checkpoint_every": 5},
}
# Enough to fill the launcher's stdin pipe and every rank's (64 KiB each on Linux).
FILL_BYTES = 256 * 1024
# With a rank behind ssh: its pipe, ssh's channel window (2 MiB) and the remote pty.
FILL_BYTES_SSH = 8 * 1024 * 1024
TERMINAL = {"completed", "failed", "cancelled"}


@dataclass
class DistRun(overhead.Run):
    """One run's figures: overhead.py's, plus the launcher, the supervisor and each rank."""

    launcher_cpus: float = float("nan")
    supervisor_cpus: float = float("nan")
    rank_cpus: float = float("nan")
    rank_rss_mb: list[float] = field(default_factory=list)
    rank_mlx_peak_mb: list[float] = field(default_factory=list)


# -- processes -----------------------------------------------------------------------------


def vm_hwm_mb(pid: int) -> float | None:
    """The kernel's peak resident set (VmHWM) of a live process, in MiB (Linux)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


class TreeSampler:
    """CPU seconds and peak RSS of a launcher and its ranks (and a supervisor), from /proc.

    The ranks are found once (mlx.launch execs each rank in the shell it starts, so a rank's
    pid is its trainer's and lasts the whole run); after that a sample is a few small /proc
    reads, cheap enough every 50 ms on 2 cores. The last value read before a process exits
    stands for its total.
    """

    def __init__(
        self,
        processes: int,
        launcher: int | None,
        job_id: str | None = None,
        marker: str | None = None,
    ):
        self.processes = processes
        self.launcher = launcher
        self.job_id = job_id
        # A rank on the second host is no child of the launcher (ssh is): it is found by
        # this string (the run's config path) in its command line.
        self.marker = marker
        self._searched = float("-inf")
        self.ranks: dict[int, int] = {}
        self.cpu: dict[int, float] = {}
        self.hwm: dict[int, float] = {}
        self.supervisor: int | None = None
        self.samples: list[tuple[float, float]] = []

    def _find_ranks(self) -> None:
        import psutil

        if self.marker is not None:
            # A scan of every process: at most twice a second, and only until all are found.
            now = time.monotonic()
            if now - self._searched < 0.5:
                return
            self._searched = now
            candidates = [
                proc
                for proc in psutil.process_iter(["cmdline"])
                if self.marker in (proc.info["cmdline"] or [])
            ]
        elif self.launcher is not None:
            try:
                candidates = psutil.Process(self.launcher).children()
            except psutil.Error:
                return
        else:
            # Under the supervisor: the rank processes of this job, whichever launched them.
            candidates = []
            for proc in psutil.process_iter(["cmdline"]):
                cmdline = proc.info["cmdline"] or []
                if "loractl.daemon.trainer" in cmdline and self.job_id in cmdline:
                    candidates.append(proc)
        for proc in candidates:
            try:
                rank = proc.environ().get("MLX_RANK")
                if rank is not None and int(rank) not in self.ranks:
                    self.ranks[int(rank)] = proc.pid
                    if self.launcher is None:
                        self.launcher = proc.ppid()
            except psutil.Error:
                continue

    def sample(self) -> None:
        if len(self.ranks) < self.processes:
            self._find_ranks()
        pids = [p for p in (self.launcher, self.supervisor, *self.ranks.values()) if p]
        for pid in pids:
            cpu = overhead.process_cpu_seconds(pid)
            if cpu is not None:
                self.cpu[pid] = cpu
        for pid in self.ranks.values():
            hwm = vm_hwm_mb(pid)
            if hwm is not None:
                self.hwm[pid] = hwm
        self.samples.append((time.time(), self.tree_cpu()))

    def tree_cpu(self) -> float:
        """CPU seconds of the launcher and the ranks (not the supervisor's)."""
        pids = (self.launcher, *self.ranks.values())
        return sum(self.cpu.get(pid, 0.0) for pid in pids if pid)

    def fill(self, run: DistRun, wall: float, busy: float, baseline: dict[int, float]) -> None:
        """CPU use in cores over ``wall`` seconds, the ranks' peak RSS, the noise indicator."""
        ranks = [self.ranks[r] for r in sorted(self.ranks)]
        rank_cpu = sum(self.cpu.get(pid, 0.0) for pid in ranks)
        launcher_cpu = self.cpu.get(self.launcher, 0.0) if self.launcher else 0.0
        run.rank_cpus = rank_cpu / wall
        run.launcher_cpus = launcher_cpu / wall
        if self.supervisor:
            spent = self.cpu.get(self.supervisor, 0.0) - baseline.get(self.supervisor, 0.0)
            run.supervisor_cpus = spent / wall
        run.rank_rss_mb = [round(self.hwm.get(pid, float("nan")), 1) for pid in ranks]
        run.peak_rss_mb = max(run.rank_rss_mb, default=float("nan"))
        run.child_cpus = (rank_cpu + launcher_cpu) / wall
        others = busy - rank_cpu - launcher_cpu
        if self.supervisor:
            others -= run.supervisor_cpus * wall
        run.other_cpus = max(0.0, others) / wall
        run.cpu_samples = self.samples


def launcher_stdin(
    mode: str, fill_bytes: int = FILL_BYTES
) -> tuple[int, tuple[int, ...], threading.Thread | None]:
    """(stdin for the launcher, fds it must inherit, a writer thread to start) for ``mode``.

    For ``pipe`` and ``full`` the launcher inherits the pipe's write end as well, so its
    stdin never reaches EOF, even after this process closes its own copies.
    """
    if mode == "devnull":
        return subprocess.DEVNULL, (), None
    read_end, write_end = os.pipe()
    writer = None
    if mode == "full":
        ours = os.dup(write_end)

        def write() -> None:
            # Blocking writes: the launcher reads its stdin as fast as it can, so this ends
            # once the bytes have gone in, whatever the ranks' pipes hold by then.
            with os.fdopen(ours, "wb") as handle:
                handle.write(b"\n" * fill_bytes)

        writer = threading.Thread(target=write, name="fill-stdin", daemon=True)
    return read_end, (write_end,), writer


def spawn_launched(
    cmd: list[str], run_dir: Path, output: Path, name: str, rnd: int, args, marker: str
):
    """Run an mlx.launch command to the end, sampling its tree; a DistRun (no records yet).
    ``marker``: the run's config path, which finds a rank on the second host."""
    host = args.host
    stdin, keep, writer = launcher_stdin(
        args.launcher_stdin, FILL_BYTES_SSH if host is not None else FILL_BYTES
    )
    env = overhead.child_env()
    if host is not None:
        env["PATH"] = host.path_env()  # the ssh wrapper that reaches the second host
    busy = overhead.busy_cpu_seconds()
    tic = time.perf_counter()
    with output.open("wb") as sink:
        proc = subprocess.Popen(
            cmd,
            cwd=run_dir,
            env=env,
            stdin=stdin,
            stdout=sink,
            stderr=subprocess.STDOUT,
            pass_fds=keep,
        )
    for fd in (stdin, *keep):
        if isinstance(fd, int) and fd >= 0:
            os.close(fd)
    if writer is not None:
        writer.start()
    sampler = TreeSampler(args.processes, proc.pid, marker=marker if host is not None else None)
    while proc.poll() is None:
        sampler.sample()
        time.sleep(overhead.CPU_SAMPLE_SECONDS)
    wall = time.perf_counter() - tic
    run = DistRun(name, rnd, proc.returncode, wall, float("nan"))
    sampler.fill(run, wall, overhead.busy_cpu_seconds() - busy, {})
    return run


# -- the two trainers ----------------------------------------------------------------------


def two_rank_records(run: DistRun, rank0, rank1, warmup: int, output: Path) -> DistRun:
    """Finish a run from rank 0's (records, MLX peak, saves) and rank 1's MLX peak."""
    records, peak0, run.saves = rank0
    run.rank_mlx_peak_mb = [round(peak0, 1), round(rank1[1], 1)]
    # Launcher and rank failures alike: mlx.launch exits 0 when a rank dies, so a short
    # record list is the reliable sign.
    run = overhead.finish(run, records, max(peak0, rank1[1]), warmup, output)
    return run


def run_theirs(cfg: Path, run_dir: Path, rnd: int, args) -> DistRun:
    from loractl.distributed import free_port_range, launch_command

    wrapper = run_dir / "theirs_wrapper.py"
    wrapper.write_text(overhead.THEIRS_WRAPPER, encoding="utf-8")
    port = free_port_range(args.processes)
    cmd = launch_command(args.section, [sys.executable, str(wrapper), str(cfg)], starting_port=port)
    output = run_dir / "theirs.out"
    run = spawn_launched(cmd, run_dir, output, "theirs", rnd, args, str(cfg))
    text = output.read_text(encoding="utf-8", errors="replace")
    return two_rank_records(
        run,
        overhead.theirs_records(text, rank=0),
        overhead.theirs_records(text, rank=1),
        args.warmup,
        output,
    )


def ours_logs(run: DistRun, adapters: Path, warmup: int, output: Path) -> DistRun:
    from loractl.distributed import RANK_LOG_PATTERN

    return two_rank_records(
        run,
        overhead.ours_records(adapters / "train.log"),
        overhead.ours_records(adapters / RANK_LOG_PATTERN.format(rank=1)),
        warmup,
        output,
    )


def run_ours_unsupervised(cfg: Path, run_dir: Path, sink, rnd: int, args) -> DistRun:
    from loractl.config import load_config
    from loractl.distributed import free_port_range, launch_command

    trainer = [
        sys.executable, "-m", "loractl.daemon.trainer", str(cfg), "--fresh",
        "--telemetry", sink.endpoint, "--job-id", f"bench-{rnd}",
    ]  # fmt: skip
    cmd = launch_command(
        load_config(cfg).distributed, trainer, starting_port=free_port_range(args.processes)
    )
    sink.take()
    output = run_dir / "ours.out"
    run = spawn_launched(cmd, run_dir, output, "ours", rnd, args, str(cfg))
    run.heartbeats = sink.take()
    return ours_logs(run, run_dir / "adapters-ours", args.warmup, output)


def run_ours_supervised(cfg: Path, run_dir: Path, supervisor, rnd: int, args) -> DistRun:
    busy = overhead.busy_cpu_seconds()
    tic = time.perf_counter()
    job_id = supervisor.submit(cfg)
    sampler = TreeSampler(args.processes, None, job_id)
    sampler.supervisor = supervisor.proc.pid
    sampler.sample()
    baseline = dict(sampler.cpu)
    job: dict = {}
    last_poll = 0.0
    while True:
        sampler.sample()
        now = time.perf_counter()
        # A status request costs the supervisor some CPU: ask twice a second, not at 20 Hz.
        if now - last_poll >= 0.5:
            last_poll = now
            job = supervisor.show(job_id)
            if job["state"] in TERMINAL:
                break
        time.sleep(overhead.CPU_SAMPLE_SECONDS)
    wall = time.perf_counter() - tic
    returncode = 0 if job["state"] == "completed" else 1
    run = DistRun("ours", rnd, returncode, wall, float("nan"))
    sampler.fill(run, wall, overhead.busy_cpu_seconds() - busy, baseline)
    output = run_dir / "ours.out"
    # The job's record stands for the trainer's output: the supervisor keeps the ranks'
    # stderr in its own job folder.
    output.write_text(
        json.dumps(job, indent=2, default=str) + "\n" + supervisor.debug()[-4000:],
        encoding="utf-8",
    )
    return ours_logs(run, run_dir / "adapters-ours", args.warmup, output)


# -- reporting -----------------------------------------------------------------------------


def print_ranks(runs: list[DistRun]) -> None:
    fmt = overhead.fmt
    head = (
        f"{'round':>5}  {'trainer':<7}  {'launcher':>8}  {'sup':>5}  {'ranks':>5}  "
        f"{'rank RSS MiB':>15}  {'rank MLX MiB':>13}"
    )
    print(head)
    print("-" * len(head))
    for r in runs:
        rss = " / ".join(fmt(x) for x in r.rank_rss_mb)
        mlx = " / ".join(fmt(x) for x in r.rank_mlx_peak_mb)
        print(
            f"{r.round:>5}  {r.trainer:<7}  {fmt(r.launcher_cpus, 2):>8}  "
            f"{fmt(r.supervisor_cpus, 2):>5}  {fmt(r.rank_cpus, 2):>5}  {rss:>15}  {mlx:>13}"
        )
    print(
        "launcher, sup, ranks: CPU cores used by mlx.launch, the supervisor (supervised ours "
        "only)\nand the ranks together over the run; rank RSS / MLX: peak per rank, rank 0 "
        "first."
    )


def bench(args, out: Path) -> int:
    from loractl.client.harness import SupervisorProcess
    from loractl.daemon.tinymodel import prepare

    info = overhead.machine()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    paths = prepare(out / "fixture", preset=args.preset, seed=args.seed)
    base = yaml.safe_load(paths["config"].read_text(encoding="utf-8"))
    # The preset's global batch, spread over the ranks: each rank's share of a micro-batch
    # is the preset's batch, and the accumulation shrinks to keep samples per step equal.
    ga = max(1, int(base["grad_accumulation_steps"]) // args.processes)
    base["batch_size"] = int(base["batch_size"]) * args.processes
    base["grad_accumulation_steps"] = ga
    args.iters = args.iters or DEFAULTS[args.preset]["steps"] * ga
    args.iters -= args.iters % ga
    args.host = None
    args.section = {"backend": "ring", "processes": args.processes}
    where = "ring, localhost"
    if args.second_host:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from secondhost import SecondHost

        args.host = SecondHost(out / "second-host")
        env = {"PYTHONUNBUFFERED": "1"}
        if os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        args.section = {
            "backend": "ring",
            "hostfile": str(args.host.hostfile(out / "hosts.json")),
            "env": env,
        }
        where = f"ring, rank 1 on {args.host.address} over a veth pair"
    args.ours_overrides = {"distributed": args.section}
    ours_cfg, theirs_cfg = overhead.make_configs(base, args, paths)
    mode = "unsupervised" if args.unsupervised else "supervised"
    print(
        f"preset={args.preset} processes={args.processes} ({where}) ours={mode} "
        f"launcher_stdin={args.launcher_stdin} rounds={args.rounds} iters={args.iters} "
        f"batch_size={base['batch_size']} (global) grad_accumulation_steps={ga} "
        f"optimizer_steps={args.iters // ga} max_seq_length={base['max_seq_length']} "
        f"checkpoint_every={args.checkpoint_every} steps warmup={args.warmup} steps"
    )
    sink = supervisor = None
    if args.unsupervised:
        sink = overhead.HeartbeatSink(f"ipc://{out / 'hb.sock'}")
    else:
        supervisor = SupervisorProcess(out / "home").start()
    runs: list[DistRun] = []
    try:
        for rnd, trainer, run_dir in overhead.alternating_runs(out, args.rounds):
            path = overhead.job_file(run_dir, trainer, ours_cfg, theirs_cfg)
            if trainer == "theirs":
                result = run_theirs(path, run_dir, rnd, args)
            elif supervisor is not None:
                result = run_ours_supervised(path, run_dir, supervisor, rnd, args)
            else:
                result = run_ours_unsupervised(path, run_dir, sink, rnd, args)
            runs.append(result)
            print(
                f"  round {rnd} {trainer:<6}: {overhead.fmt(result.tokens_per_sec)} tok/s, "
                f"launcher {overhead.fmt(result.launcher_cpus, 2)} cores, "
                f"wall {overhead.fmt(result.wall_seconds)} s",
                flush=True,
            )
            if result.error:
                print(f"  ERROR in {trainer}: {result.error}", flush=True)
    finally:
        if sink is not None:
            sink.close()
        if supervisor is not None:
            supervisor.stop()
        if args.host is not None:
            args.host.close()
            args.host = args.host.address  # for results.json

    overhead.report(out, args, runs, {"machine": info}, ranks=lambda: print_ranks(runs))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/distributed.py",
        description="Throughput of loractl against mlx_lm.lora, both as ranks of mlx.launch.",
    )
    parser.add_argument("--preset", default="tiny", choices=sorted(DEFAULTS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iters", type=int, help="minibatches per run (preset default)")
    parser.add_argument("--processes", type=int, default=2, help="ranks (default 2)")
    parser.add_argument(
        "--checkpoint-every", type=int, help="optimizer steps between checkpoints/saves"
    )
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps not timed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--unsupervised",
        action="store_true",
        help="run ours under mlx.launch from here, without a supervisor",
    )
    parser.add_argument(
        "--launcher-stdin",
        default="pipe",
        choices=("pipe", "devnull", "full"),
        help="stdin of the launchers this script starts (see the module docstring)",
    )
    parser.add_argument(
        "--second-host",
        action="store_true",
        help="rank 1 on a second host (a network namespace with sshd, over a veth pair; "
        "Linux, root; needs --unsupervised and 2 processes)",
    )
    parser.add_argument("--out", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    args.checkpoint_every = args.checkpoint_every or DEFAULTS[args.preset]["checkpoint_every"]
    if args.second_host and (not args.unsupervised or args.processes != 2):
        parser.error("--second-host runs 2 ranks, unsupervised: add --unsupervised")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out is None:
        out = Path(tempfile.mkdtemp(prefix="loractl-dist-", dir="/tmp"))
        keep = args.keep
    else:
        out = args.out.resolve()
        out.mkdir(parents=True, exist_ok=True)
        keep = True
    print(f"work folder: {out} ({'kept' if keep else 'removed at the end'})")
    try:
        return bench(args, out)
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
