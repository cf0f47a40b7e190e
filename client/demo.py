"""``make demo``: a real job on a tiny model, killed, resumed, stepped down, proven exact.

Part one trains the tiny model in a child process, SIGKILLs it part-way (as the OOM killer
would), resumes it, stops it with SIGTERM (as the memory guard does), resumes it again, and
shows that the final adapter is bitwise equal to an uninterrupted run's and that mlx-lm loads
it. Part two hands the same job to the supervisor with a memory budget that only a cheaper
rung fits, kills its trainer once more, and shows the supervisor restarting it, classifying
each exit and stepping down the ladder with the peak memory it measured on every rung.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

console = Console(stderr=False, highlight=False)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _last_step(log_path: Path) -> int:
    step = 0
    if not log_path.exists():
        return 0
    for line in log_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == "step":
            step = record["step"]
    return step


def _train(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "loractl.daemon.trainer", str(config), *extra],
        stderr=subprocess.PIPE,
        text=True,
    )


def _until_step(proc: subprocess.Popen, log_path: Path, step: int, timeout: float = 600) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"trainer exited early with {proc.returncode}: {proc.stderr.read()}")
        current = _last_step(log_path)
        if current >= step:
            return current
        time.sleep(0.05)
    raise RuntimeError("trainer made no progress")


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate()
    return proc.returncode, err


class PrepareFailed(RuntimeError):
    """Building the tiny model failed; ``code`` is the builder's exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def prepare_workspace(directory: Path, preset: str = "tiny", seed: int = 0) -> dict[str, Path]:
    """Build the tiny model, data and job.yaml in ``directory`` and return their paths.

    Runs ``python -m loractl.daemon.tinymodel`` in a child of this interpreter: the client
    never imports the trainer's side (mlx and all).
    """
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "loractl.daemon.tinymodel",
            str(directory),
            "--preset",
            preset,
            "--seed",
            str(seed),
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise PrepareFailed(
            f"building the tiny model failed (exit {done.returncode}): {last}",
            done.returncode if done.returncode > 0 else 1,
        )
    # It prints the paths as the first JSON object, then the preset's settings.
    try:
        start = done.stdout.index("{")
        paths, _ = json.JSONDecoder().raw_decode(done.stdout, start)
    except ValueError:
        message = f"unexpected output from the tiny model builder: {done.stdout!r}"
        raise PrepareFailed(message, 1) from None
    return {key: Path(value) for key, value in paths.items()}


def _write_job(base: Path, folder: Path, adapter: str) -> Path:
    import yaml

    data = yaml.safe_load((base / "job.yaml").read_text())
    data["model"] = str(base / "model")
    data["data"] = str(base / "data")
    data["adapter_path"] = str(folder / adapter)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_demo(directory: Path, preset: str | None = None, seed: int = 0, as_json=False) -> int:
    preset = preset or "ladder"
    directory = Path(directory).resolve()
    console.rule("[bold]loractl demo")
    console.print(f"building a tiny [bold]{preset}[/] model, tokenizer and data in {directory}")
    tic = time.perf_counter()
    try:
        paths = prepare_workspace(directory / "workspace", preset=preset, seed=seed)
    except PrepareFailed as exc:
        console.print(str(exc), style="red", markup=False)
        return exc.code
    base = Path(paths["config"]).parent
    console.print(f"  built in {time.perf_counter() - tic:.1f} s")

    interrupted = _write_job(base, directory / "interrupted", "adapters")
    reference = _write_job(base, directory / "reference", "adapters")
    log_path = directory / "interrupted" / "adapters" / "train.log"
    log_path.unlink(missing_ok=True)

    import yaml

    job = yaml.safe_load(interrupted.read_text())
    total_steps = job["iters"] // job["grad_accumulation_steps"]
    kill_at = max(2, total_steps // 3)
    stop_at = max(kill_at + 2, (2 * total_steps) // 3)

    console.rule("1. train, then SIGKILL the trainer (what the OOM killer does)")
    proc = _train(interrupted, "--fresh")
    reached = _until_step(proc, log_path, kill_at)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _plain(f"  SIGKILLed pid {proc.pid} after step {reached} (exit {proc.returncode})")

    console.rule("2. resume: adapters, optimizer, LR schedule, data order and RNG come back")
    proc = _train(interrupted)
    reached = _until_step(proc, log_path, stop_at)
    os.kill(proc.pid, signal.SIGTERM)
    code, err = _finish(proc)
    for line in err.splitlines():
        if "resumed" in line:
            _plain(f"  {line}")
    # The trainer finishes the step it is in before it stops: the step it names is the one
    # it checkpointed, and the only one said here.
    stopped = _stopped_step(err)
    where = f"at step {stopped}" if stopped is not None else f"after step {reached}"
    _plain(f"  SIGTERM: the trainer finished its step, checkpointed {where}, exited {code}")

    console.rule("3. resume again and finish")
    code, err = _finish(_train(interrupted))
    for line in err.splitlines():
        if "resumed" in line:
            _plain(f"  {line}")
    if code != 0:
        console.print(f"[red]trainer failed ({code}):[/]\n{err}")
        return code

    console.rule("4. the same job, never interrupted")
    code, err = _finish(_train(reference, "--fresh"))
    if code != 0:
        console.print(f"[red]reference run failed ({code}):[/]\n{err}")
        return code
    ours = _sha(directory / "interrupted" / "adapters" / "adapters.safetensors")
    theirs = _sha(directory / "reference" / "adapters" / "adapters.safetensors")
    same = ours == theirs
    console.print(f"  interrupted run adapters: {ours}")
    console.print(f"  uninterrupted adapters:   {theirs}")
    console.print("  [bold green]bitwise equal[/]" if same else "  [bold red]DIFFERENT[/]")

    console.rule("5. mlx-lm loads the adapter and generates")
    # mlx-lm's own command, in a child: the client never imports mlx.
    generate = [
        sys.executable,
        "-m",
        "mlx_lm",
        "generate",
        "--model",
        str(base / "model"),
        "--adapter-path",
        str(directory / "interrupted" / "adapters"),
        "--prompt",
        "the quiet river",
        "--max-tokens",
        "12",
        "--ignore-chat-template",
        "--verbose",
        "False",
    ]
    done = subprocess.run(generate, capture_output=True, text=True)
    if done.returncode != 0:
        console.print(f"mlx_lm.generate failed ({done.returncode}):", style="red")
        console.print(done.stderr, markup=False)
        return done.returncode
    _plain(f"  mlx_lm.generate: {done.stdout.strip()!r}")
    _plain(
        "  (a tiny random model writes nonsense: this shows that mlx-lm loads the adapter, "
        "not that it learned language)"
    )
    _plain(f"  try: {try_command(base / 'model', directory / 'interrupted' / 'adapters')}")
    if not same:
        return 1
    code = _supervised(base, directory)
    if code == 0:
        _summary(directory)
    return code


def _plain(text: str) -> None:
    """One line as it is: no markup, no highlighting and never wrapped, so a command in it
    can be pasted whole at any terminal width."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _stopped_step(stderr: str) -> int | None:
    """The step the trainer says it stopped at ("stopped at step 11 after a checkpoint")."""
    import re

    found = re.search(r"stopped at step (\d+)", stderr)
    return int(found.group(1)) if found else None


def try_command(model: Path, adapters: Path) -> str:
    """mlx_lm.generate on the demo's adapters, as `show` prints it: a command that exists
    here (the bare name on PATH, else the one beside this interpreter), shell-quoted."""
    from loractl.supervisor.jobview import use_with
    from loractl.terminal import shell_join

    command = use_with(str(model), str(adapters))
    if command:
        return command.replace("--prompt Hello", shell_join(["--prompt", "the quiet river"]))
    return shell_join(
        [sys.executable, "-m", "mlx_lm", "generate", "--model", str(model), "--adapter-path",
         str(adapters), "--prompt", "the quiet river"]
    )  # fmt: skip


def _summary(directory: Path) -> None:
    console.rule("what this proved")
    for line in (
        "a SIGKILLed trainer resumed from its last checkpoint, and a SIGTERMed one stopped "
        "after a checkpoint and resumed;",
        "the interrupted run's adapters are bitwise equal to an uninterrupted run's;",
        "mlx-lm loads the adapters as they are;",
        "under the supervisor, a killed trainer was restarted and a job over its memory "
        "budget stepped down the ladder to a rung that fits, and completed.",
    ):
        _plain(f"  - {line}")
    _plain(f"  everything is in {directory}; `loractl demo --prepare DIR` builds a job to try")


def _supervised(base: Path, directory: Path) -> int:
    from loractl.client.harness import SupervisorProcess, measure_footprint, wait_for
    from loractl.client.render import job_details

    console.rule("6. the same job under the supervisor, with a memory budget")
    job = _write_job(base, directory / "supervised", "adapters")
    import yaml

    # A budget between the footprints at max_seq_length 256 and 128, measured here because
    # they differ from machine to machine: only the ladder's seq-128 rung fits under it.
    long_seq = measure_footprint(job, {"max_seq_length": 256, "val_batches": 1})
    short_seq = measure_footprint(job, {"max_seq_length": 128, "val_batches": 1})
    budget = int((long_seq + short_seq) / 2)
    console.print(
        f"  measured footprint: {long_seq:.0f} MB at seq 256, {short_seq:.0f} MB at seq 128"
    )
    data = yaml.safe_load(job.read_text())
    data.update(memory_budget_mb=budget, checkpoint_every=1, val_batches=1)
    job.write_text(yaml.safe_dump(data, sort_keys=False))
    home = directory / "home"
    supervisor = SupervisorProcess(home, LORACTL_BACKOFF_BASE_S="0.5").start()
    _plain(f"  supervisor pid {supervisor.proc.pid}, home {home}")
    try:
        job_id = supervisor.submit(job)
        console.print(f"  submitted {job_id} with memory_budget_mb {budget}")
        for _ in range(5):
            # The memory guard may retire a trainer at any moment; kill whichever is live.
            state = wait_for(
                lambda: (
                    (j := supervisor.show(job_id))["trainer_pid"]
                    and j["progress"]["step"] >= 2
                    and j
                ),
                600,
                interval=0.1,
            )
            try:
                os.kill(state["trainer_pid"], signal.SIGKILL)
            except ProcessLookupError:
                continue
            _plain(
                f"  SIGKILLed trainer pid {state['trainer_pid']} on rung {state['rung']}; "
                "the supervisor restarts it"
            )
            break
        done = supervisor.wait_state(job_id, {"completed", "failed"}, timeout=900)
    finally:
        supervisor.stop()
    _plain(job_details(done))
    return 0 if done["state"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(run_demo(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-run")))
