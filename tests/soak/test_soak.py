"""Soak: the real supervisor, kept alive by a restart loop as launchd's KeepAlive would, runs a
stream of tiny-model jobs for LORACTL_SOAK_SECONDS (default 300) while a seeded injector
(LORACTL_SOAK_SEED, printed) kills and freezes trainers, kills the supervisor, squeezes memory
budgets, fills a disk, drops hostile files in the inbox, sends every control command, submits
jobs whose data is a device or a FIFO, storms the supervisor with signals, and rolls its store
back (a SIGKILL, then the WAL's last frames lost).

At the end every job is brought to completion and must be bitwise equal to one uninterrupted
reference run; no job may be lost or run twice at once; every fault must show in the history
with its cause; the supervisor's memory and open files must stay flat.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import make_job, run_trainer, wait_for
from loractl.client.control import DaemonNotRunning, RequestFailed, request
from loractl.client.harness import FAST, trainers_of
from loractl.paths import Layout
from loractl.protocol import (
    ACTIVE,
    CancelRequest,
    ErrorCode,
    HistoryRequest,
    ListRequest,
    PauseRequest,
    PriorityRequest,
    RemoveRequest,
    Request,
    ResumeRequest,
    RetryRequest,
    ShowRequest,
    ShutdownRequest,
    StatusRequest,
    SubmitRequest,
)

pytestmark = pytest.mark.soak

SOAK_SECONDS = float(os.environ.get("LORACTL_SOAK_SECONDS", "300"))

# What launchd does with KeepAlive {SuccessfulExit: false}: start it again unless it exited 0.
KEEP_ALIVE_LOOP = (
    'while true; do "$@"; rc=$?; echo "$rc" >> "$EXITS"; [ "$rc" -eq 0 ] && exit 0; sleep 0.3; done'
)

ITERS = 120
# One config for every job (only name and adapter_path differ, and neither is part of the
# run's identity hash), so one uninterrupted run is the reference for all of them.
JOB = {
    "iters": ITERS,
    "lr_schedule": {"name": "cosine_decay", "arguments": [1.0e-4, ITERS]},
    "grad_accumulation_steps": 4,
    "checkpoint_every": 2,
    # Dropout 0: with dropout, grad_checkpoint's recomputation draws fresh masks, so a rung that
    # turns it on changes the result (measured: a whole run with it differs from one without).
    # Without dropout the rung is bitwise neutral, so squeezed jobs stay in the comparison.
    "lora_parameters": {"dropout": 0.0},
    "ladder": [{"grad_checkpoint": True} for _ in range(6)],
    # Short, so a frozen trainer is found in seconds.
    "heartbeat_timeout": 5.0,
    # Faults arrive faster than checkpoints at times; the retry budget is not under test here.
    "max_retries": 20,
}

TRAINER_KINDS = ("trainer_kill", "trainer_hang", "disk_full")
WEIGHTS = {
    "trainer_kill": 3.0,
    "trainer_hang": 2.0,
    "disk_full": 4.0,  # only possible while a job on the small disk runs
    "supervisor_kill": 2.0,
    "memory_squeeze": 1.5,
    "hostile_inbox": 2.0,
    "command": 3.0,
    "bad_data_job": 1.0,
    "signal_storm": 1.0,
    "store_rollback": 1.0,
}
# Faults that kill the supervisor: only in the first half, so that one incarnation lives long
# enough to show a leak.
SUPERVISOR_KILLS = ("supervisor_kill", "store_rollback")
# Writes a store rollback may take back: faults this recent may be missing from the history.
ROLLBACK_REACH_S = 30.0
EXPECTED_CAUSE = {
    "trainer_kill": "killed_externally",
    "trainer_hang": "hang",
    "disk_full": "disk_full",
    "memory_squeeze": "memory",
}
HOSTILE = ("broken_yaml", "two_megabytes", "symlink_out", "long_name", "folder", "fifo", "near_key")
COMMANDS = ("pause", "resume", "cancel", "retry", "priority", "show", "history")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Fault:
    kind: str
    at: float  # wall clock, as the history's timestamps
    job: str | None = None
    pid: int | None = None
    detail: dict = field(default_factory=dict)
    landed: bool = False  # its effect was seen while the soak ran
    problem: str = ""  # set when the history does not show it as it should


class Soak:
    """The supervisor under a keep-alive loop, the jobs it was given and what was done to it."""

    def __init__(self, workspace: Path, root: Path, seed: int):
        self.workspace = workspace
        self.root = root
        self.home = root / "home"
        self.layout = Layout.at(self.home)
        self.rng = random.Random(seed)
        self.exits = root / "exits.txt"
        self.loop: subprocess.Popen | None = None
        self.submitted: dict[str, str | None] = {}  # job name -> id (None until the inbox says)
        self.adapter_paths: dict[str, Path] = {}  # job name -> adapter_path
        self.faults: list[Fault] = []
        self.commands: Counter = Counter()
        self.internal_errors: list[str] = []
        self.failures_seen: dict[str, str] = {}  # job id -> reason of a failure on the way
        self.notes: list[str] = []
        self.squeezes: dict[str, dict] = {}  # job id -> pending squeeze
        self.squeeze_budget: int | None = None
        self.disk: Path | None = None
        self.filler: Path | None = None
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.most_trainers_per_job = 0
        self.most_trainers = 0
        self.doubled: list[str] = []
        self.trainer_rss: list[float] = []
        self.supervisor_samples: dict[int, list[tuple[float, float, int]]] = defaultdict(list)
        self.hostile_count = 0
        self.first_seen_stuck: dict[tuple[str, str], float] = {}
        # Jobs whose data is not data (id -> the fault): never retried, checked, then removed.
        self.bad_jobs: dict[str, Fault] = {}

    # -- the supervisor ---------------------------------------------------------------------

    def start(self) -> None:
        env = {**os.environ, **FAST, "EXITS": str(self.exits), "LORACTL_KEEP_AWAKE": "0"}
        env.pop("LORACTL_HOME", None)
        command = [
            sys.executable, "-m", "loractl.supervisor", "--home", str(self.home),
            "--wait-for-lock",
        ]  # fmt: skip
        with (self.root / "supervisor.err").open("ab") as err:
            self.loop = subprocess.Popen(
                ["bash", "-c", KEEP_ALIVE_LOOP, "keep-alive", *command],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        wait_for(self.status, 60, interval=0.1)

    def status(self) -> dict | None:
        try:
            return request(self.layout, StatusRequest(), timeout=2).data
        except (DaemonNotRunning, OSError):
            return None

    def ask(self, message: Request, timeout: float = 30):
        """One request once the supervisor answers; a refusal raises RequestFailed. Sent
        once only: a resend after a timeout could act twice."""
        wait_for(self.status, 60, interval=0.1)
        try:
            return request(self.layout, message, timeout=timeout)
        except RequestFailed as exc:
            if exc.code in (None, ErrorCode.INTERNAL):
                with self.lock:
                    self.internal_errors.append(f"{message.type}: {exc}")
            raise

    def show(self, job: str) -> dict:
        return self.ask(ShowRequest(job=job)).data["job"]

    def jobs(self) -> list[dict]:
        return self.ask(ListRequest()).data["jobs"]

    def supervisor_pid(self) -> int | None:
        try:
            children = psutil.Process(self.loop.pid).children()
        except psutil.NoSuchProcess:
            return None
        for child in children:
            try:
                if "loractl.supervisor" in " ".join(child.cmdline()):
                    return child.pid
            except psutil.Error:
                continue
        return None

    # -- jobs -------------------------------------------------------------------------------

    def new_job(self) -> None:
        number = len(self.submitted)
        name = f"soak-{number:03d}"
        folder = self.root / "src" / name
        overrides = dict(JOB, name=name)
        # Every third job writes its checkpoints and adapters to the small disk, if any.
        if self.disk is not None and number % 3 == 2:
            overrides["adapter_path"] = str(self.disk / name)
        config = make_job(self.workspace, folder, **overrides)
        self.adapter_paths[name] = Path(yaml.safe_load(config.read_text())["adapter_path"])
        if number % 2:
            reply = self.ask(SubmitRequest(config_path=str(config)))
            with self.lock:
                self.submitted[name] = reply.data["id"]
        else:
            # Through the inbox, as a user would, written under a temporary name first.
            staging = self.layout.inbox / f"{name}.yaml.part"
            staging.write_text(config.read_text())
            staging.rename(self.layout.inbox / f"{name}.yaml")
            with self.lock:
                self.submitted[name] = None

    def resolve_inbox_ids(self) -> None:
        if None not in self.submitted.values():
            return
        by_name = {job["name"]: job["id"] for job in self.jobs()}
        for name, job_id in self.submitted.items():
            if job_id is None and name in by_name:
                with self.lock:
                    self.submitted[name] = by_name[name]

    def known_ids(self) -> list[str]:
        self.resolve_inbox_ids()
        return [job_id for job_id in self.submitted.values() if job_id]

    def top_up(self) -> None:
        """Keep one job waiting behind the running one, so faults always have targets."""
        waiting = [j for j in self.jobs() if j["state"] == "queued"]
        pending_inbox = [n for n, i in self.submitted.items() if i is None]
        if not waiting and not pending_inbox:
            self.new_job()

    def janitor(self, patience: float) -> None:
        """Bring back jobs left paused, cancelled or failed for ``patience`` seconds, as a user
        would: resume the paused, retry the others."""
        now = time.monotonic()
        for job in self.jobs():
            state = job["state"]
            key = (job["id"], state)
            if state not in ("paused", "cancelled", "failed") or job["id"] in self.bad_jobs:
                continue
            if state == "failed" and job["id"] not in self.failures_seen:
                self.failures_seen[job["id"]] = self.show(job["id"])["reason"]
            if now - self.first_seen_stuck.setdefault(key, now) < patience:
                continue
            message = (
                ResumeRequest(job=job["id"]) if state == "paused" else RetryRequest(job=job["id"])
            )
            try:
                self.ask(message)
                self.commands[f"{message.type} (janitor)"] += 1
            except RequestFailed:
                pass  # it moved on meanwhile
            self.first_seen_stuck.pop(key, None)

    def running(self) -> tuple[str, int] | None:
        """The running job and its trainer, once the trainer has heartbeated."""
        status = self.status()
        if not status or not status.get("running") or not status.get("trainer_pid"):
            return None
        job = self.show(status["running"])
        if job["state"] != "running" or job["trainer_pid"] != status["trainer_pid"]:
            return None
        # A trainer the guard is already stopping (a squeeze landed) keeps running through its
        # grace period; a fault then would be its memory stop, not a fault of its own.
        # So is one that may still be on a squeezed budget (the keeper can lose its race with
        # the restart); a kill near the budget would rightly be called memory.
        stops = [e["at"] for e in job["history"] if e["kind"] == "memory_guard"]
        crashes = [c.get("at", 0) for c in job["crashes"]]
        if stops and (max(stops) > max(crashes, default=0) or max(stops) > time.time() - 8):
            return None
        return job["id"], job["trainer_pid"]

    def on_small_disk(self, job_id: str) -> bool:
        if self.disk is None:
            return False
        names = [n for n, i in self.submitted.items() if i == job_id]
        return bool(names) and self.disk in self.adapter_paths[names[0]].parents

    # -- watchers ---------------------------------------------------------------------------

    def watch(self, work) -> None:
        """Run one watcher thread; its exception is a finding to report, not a thread that
        silently stopped watching."""
        try:
            work()
        except Exception as exc:
            with self.lock:
                self.internal_errors.append(f"{work.__name__} stopped: {exc!r}")

    def census(self) -> None:
        """Never two trainers for one job: look at the process table ten times a second."""
        while not self.stop.is_set():
            per_job: dict[str, list[str]] = defaultdict(list)
            live = trainers_of(self.home)
            pids = {proc.pid for proc in live}
            for proc in live:
                try:
                    cmdline = proc.cmdline()
                    parent = proc.ppid()
                    age = time.time() - proc.create_time()
                    rss = proc.memory_info().rss / 2**20
                except psutil.Error:
                    continue
                if parent in pids:
                    # A trainer's own child between fork and exec still shows the trainer's
                    # command line (MLX runs g++ through sh when it compiles); not a trainer.
                    continue
                job = cmdline[cmdline.index("--job-id") + 1] if "--job-id" in cmdline else "?"
                per_job[job].append(f"pid {proc.pid} (parent {parent}, age {age:.1f} s)")
                if age > 4:
                    with self.lock:
                        self.trainer_rss.append(rss)
                        del self.trainer_rss[:-200]
            with self.lock:
                self.most_trainers = max(self.most_trainers, sum(map(len, per_job.values())))
                for job, procs in per_job.items():
                    self.most_trainers_per_job = max(self.most_trainers_per_job, len(procs))
                    if len(procs) > 1:
                        self.doubled.append(f"{job} at {time.time():.1f}: {procs}")
            time.sleep(0.1)

    def sampler(self) -> None:
        """The supervisor's RSS and open files, once a second, per incarnation."""
        while not self.stop.is_set():
            pid = self.supervisor_pid()
            if pid:
                try:
                    proc = psutil.Process(pid)
                    sample = (time.monotonic(), proc.memory_info().rss / 2**20, proc.num_fds())
                    self.supervisor_samples[pid].append(sample)
                except psutil.Error:
                    pass
            self.stop.wait(1.0)

    def reader(self) -> None:
        """A `loractl watch`-like client: read-only requests all the time, from another
        thread, while the injector works."""
        rng = random.Random(self.rng.random())
        while not self.stop.is_set():
            with self.lock:
                ids = [i for i in self.submitted.values() if i]
            kind = rng.choice(("status", "list", "show", "history"))
            try:
                if kind == "status":
                    request(self.layout, StatusRequest(), timeout=5)
                elif kind == "list":
                    request(self.layout, ListRequest(rejected=True), timeout=5)
                elif ids:
                    message = ShowRequest if kind == "show" else HistoryRequest
                    request(self.layout, message(job=rng.choice(ids)), timeout=5)
            except RequestFailed as exc:
                if exc.code in (None, ErrorCode.INTERNAL):
                    with self.lock:
                        self.internal_errors.append(f"reader {kind}: {exc}")
            except (DaemonNotRunning, OSError):
                pass  # between a supervisor kill and its restart
            self.stop.wait(rng.uniform(0.3, 1.0))

    def keeper(self) -> None:
        """Undo each memory squeeze as soon as the guard has acted on it, so the job steps
        down one rung rather than all of them."""
        while not self.stop.is_set():
            with self.lock:
                pending = list(self.squeezes.items())
            for job_id, squeeze in pending:
                try:
                    events = request(self.layout, HistoryRequest(job=job_id), timeout=5)
                except (DaemonNotRunning, RequestFailed, OSError):
                    continue
                # The guard stopped it while it trained, or its pre-flight did at step 0.
                acted = [
                    e
                    for e in events.data["events"]
                    if e["at"] >= squeeze["at"]
                    and (
                        (e["kind"] == "memory_guard" and e["detail"].get("action") == "stop")
                        or e["detail"].get("rule") == "preflight_over_budget"
                    )
                ]
                if acted:
                    write_atomically(squeeze["config"], squeeze["original"])
                    with self.lock:
                        squeeze["fault"].landed = True
                        del self.squeezes[job_id]
            self.stop.wait(0.05)

    # -- faults -----------------------------------------------------------------------------

    def record(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    def trainer_kill(self, job_id: str, pid: int) -> None:
        time.sleep(self.rng.uniform(0, 1.0))
        self.signal_trainer("trainer_kill", job_id, pid, signal.SIGKILL, 60)

    def trainer_hang(self, job_id: str, pid: int) -> None:
        time.sleep(self.rng.uniform(0, 1.0))
        # Frozen, not dead: heartbeats stop; nobody sends SIGCONT, the supervisor kills it.
        self.signal_trainer(
            "trainer_hang", job_id, pid, signal.SIGSTOP, JOB["heartbeat_timeout"] + 60
        )

    def signal_trainer(self, kind: str, job_id: str, pid: int, signum: int, timeout: float):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            return  # it finished first: nothing was injected
        fault = self.record(Fault(kind, time.time(), job_id, pid))
        fault.landed = self.wait_crash(fault, timeout)

    def wait_crash(self, fault: Fault, timeout: float) -> bool:
        """Whether the trainer's crash was recorded. A trainer that had already finished (a
        zombie not yet reaped takes a signal without complaint) injected nothing."""

        def effect():
            job = self.show(fault.job)
            crash = [c for c in job["crashes"] if c.get("pid") == fault.pid]
            done = [e["at"] for e in job["history"] if e.get("to_state") == "completed"]
            return crash or (done and done[-1] <= fault.at + 0.5 and ["finished first"])

        try:
            seen = wait_for(effect, timeout, interval=0.2)
        except AssertionError:
            return False
        if seen == ["finished first"]:
            self.faults.remove(fault)
            self.notes.append(f"{fault.kind} on {fault.job}: it had just finished; not counted")
        return True

    def supervisor_kill(self) -> None:
        status = self.status()
        if not status:
            return
        old = status["pid"]
        os.kill(old, signal.SIGKILL)
        fault = self.record(
            Fault(
                "supervisor_kill",
                time.time(),
                status.get("running"),
                status.get("trainer_pid"),
                {"supervisor_pid": old},
            )
        )
        wait_for(lambda: (s := self.status()) and s["pid"] != old, 60, interval=0.1)
        fault.landed = True

    def memory_squeeze(self) -> None:
        """Pause a job, set its stored budget below a trainer's footprint, resume it: when it
        next runs, the memory guard must stop it and step it down a rung."""
        with self.lock:
            budget = self.squeeze_budget
        candidates = [
            j
            for j in self.jobs()
            if j["state"] in ("queued", "running", "paused")
            and j["id"] not in self.squeezes
            and j["id"] not in self.bad_jobs
        ]
        if budget is None or not candidates:
            return
        job = self.rng.choice(candidates)
        if job["state"] != "paused":
            try:
                self.ask(PauseRequest(job=job["id"]))
            except RequestFailed:
                return  # it moved on between the list and the pause
            self.commands["pause (squeeze)"] += 1
            try:
                wait_for(lambda: self.show(job["id"])["state"] not in ACTIVE, 60, interval=0.1)
            except AssertionError:
                self.notes.append(f"squeeze: {job['id']} never stopped after pause")
                return
            if self.show(job["id"])["state"] != "paused":
                return  # it ended before the pause landed
        config = Path(self.show(job["id"])["job_dir"]) / "config.yaml"
        original = config.read_text()
        data = yaml.safe_load(original)
        data["memory_budget_mb"] = budget
        fault = Fault("memory_squeeze", time.time(), job["id"], detail={"budget_mb": budget})
        with self.lock:
            self.squeezes[job["id"]] = {
                "at": fault.at,
                "config": config,
                "original": original,
                "fault": fault,
            }
        write_atomically(config, yaml.safe_dump(data, sort_keys=False))
        self.record(fault)
        self.ask(ResumeRequest(job=job["id"]))
        self.commands["resume (squeeze)"] += 1

    def disk_full(self, job_id: str, pid: int) -> None:
        """Fill the small disk under the running job, wait for its trainer to give up, free
        the space and resume the job."""
        self.filler = self.disk / "filler"
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for size in (1 << 20, 4096, 1):  # down to the last byte
                try:
                    while True:
                        os.write(fd, b"\0" * size)
                except OSError:
                    pass
        finally:
            os.close(fd)
        fault = self.record(Fault("disk_full", time.time(), job_id, pid))
        fault.landed = self.wait_crash(fault, 60)
        self.filler.unlink()
        self.filler = None
        try:
            wait_for(lambda: self.show(job_id)["state"] not in ACTIVE, 30)
        except AssertionError:
            pass
        if self.show(job_id)["state"] == "paused":
            self.ask(ResumeRequest(job=job_id))
            self.commands["resume (disk freed)"] += 1

    def hostile_inbox(self) -> None:
        kind = self.rng.choice(HOSTILE)
        self.hostile_count += 1
        stem = f"hostile-{self.hostile_count:03d}-{kind}"
        inbox = self.layout.inbox
        rejected = inbox / "rejected"
        before = len(list(rejected.glob("*.error.txt"))) if rejected.is_dir() else 0
        path = inbox / f"{stem}.yaml"
        detail: dict = {"what": kind}
        if kind == "broken_yaml":
            path.write_text("model: [unclosed\nname: {\n")
        elif kind == "two_megabytes":
            path.write_text("# padding\n" * (2 * 2**20 // 10))
        elif kind == "symlink_out":
            path.symlink_to("/etc/passwd")
        elif kind == "long_name":
            path = self.long_name(inbox, detail)
            path.write_text(make_job(self.workspace, self.root / "long").read_text())
        elif kind == "folder":
            path = inbox / f"{stem}-x.yaml"
            path.mkdir()
            (path / "inside.txt").write_text("a folder named like a config\n")
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "near_key":
            # A near miss of a real key is an error that names the key meant.
            text = make_job(self.workspace, self.root / "near").read_text()
            path.write_text(text.replace("learning_rate:", "learning_rat:"))
        fault = self.record(Fault("hostile_inbox", time.time(), detail=detail))

        def handled() -> bool:
            gone = not os.path.lexists(path)
            count = len(list(rejected.glob("*.error.txt"))) if rejected.is_dir() else 0
            return gone and count > before

        try:
            wait_for(handled, 60, interval=0.2)
            fault.landed = True
        except AssertionError:
            fault.problem = f"{kind}: {path.name[:60]} neither rejected nor gone after 60 s"

    def bad_data_job(self) -> None:
        """A job whose train.jsonl is a symlink to a device (refused at submit, exit 65's
        words), or one that becomes a FIFO right after it is queued (it fails as bad data when
        its turn comes, and the queue behind it goes on)."""
        number = len(self.bad_jobs) + sum(f.kind == "bad_data_job" for f in self.faults)
        name = f"bad-data-{number:03d}"
        folder = self.root / "bad" / name
        data = folder / "data"
        data.mkdir(parents=True)
        for split in ("train.jsonl", "valid.jsonl"):
            shutil.copy(self.workspace / "data" / split, data / split)
        kind = self.rng.choice(("device", "fifo"))
        if kind == "device":
            (data / "train.jsonl").unlink()
            (data / "train.jsonl").symlink_to("/dev/zero")
        config = make_job(self.workspace, folder, **dict(JOB, name=name, data=str(data)))
        fault = self.record(Fault("bad_data_job", time.time(), detail={"data": kind}))
        try:
            reply = self.ask(SubmitRequest(config_path=str(config)))
        except RequestFailed as exc:
            if kind == "device" and "character device" in str(exc):
                fault.landed = True
            else:
                fault.problem = f"{kind}: refused at submit for another reason: {exc}"
            return
        fault.job = reply.data["id"]
        if kind == "device":
            fault.problem = "a data file linked to /dev/zero was queued"
        else:
            # Swapped in at once: the trainer of a job started this instant is still loading
            # Python when it is done.
            (data / "train.jsonl").unlink()
            os.mkfifo(data / "train.jsonl")
        with self.lock:
            self.bad_jobs[fault.job] = fault

    def check_bad_jobs(self) -> None:
        """Each FIFO job ended failed for its data (or, having read its data before the swap,
        completed: nothing injected); then it is removed, so it counts for nothing else."""
        for job_id, fault in list(self.bad_jobs.items()):
            job = self.show(job_id)
            if job["state"] == "failed" and "named pipe" in (job["reason"] or ""):
                fault.landed = True
            elif job["state"] == "completed":
                self.faults.remove(fault)
                self.notes.append(f"bad_data_job {job_id}: read its data before the swap")
            else:
                fault.problem = f"ended {job['state']}: {job['reason']}"
            if job["state"] in ("failed", "completed"):
                self.ask(RemoveRequest(job=job_id))
            del self.bad_jobs[job_id]

    def bad_jobs_settled(self) -> bool:
        """Whether every bad-data job has ended. One a supervisor kill or a store rollback left
        paused (or cancelled) is sent on, as the janitor does for the others: its data must
        still fail it."""
        settled = True
        for job_id in list(self.bad_jobs):
            state = self.show(job_id)["state"]
            if state in ("failed", "completed"):
                continue
            settled = False
            if state in ("paused", "cancelled"):
                message = ResumeRequest if state == "paused" else RetryRequest
                try:
                    self.ask(message(job=job_id))
                except RequestFailed:
                    pass  # it moved on meanwhile
        return settled

    def signal_storm(self) -> None:
        """SIGHUP, SIGUSR1 and SIGUSR2, many of each, at the supervisor: it ignores or answers
        them (a state dump for USR1) and stays the same process."""
        status = self.status()
        if not status:
            return
        pid = status["pid"]
        signals = [signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGPIPE]
        sent = [self.rng.choice(signals) for _ in range(self.rng.randint(5, 40))]
        fault = self.record(Fault("signal_storm", time.time(), detail={"signals": len(sent)}))
        for signum in sent:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                fault.problem = f"supervisor {pid} gone during the storm"
                return
        after = self.status()
        if after and after["pid"] == pid:
            fault.landed = True
        else:
            fault.problem = f"supervisor {pid} did not survive: now {after and after['pid']}"

    def store_rollback(self) -> None:
        """SIGKILL the supervisor and take the last WAL frames away before the keep-alive loop
        restarts it, as a disk that lost its unsynced tail would: the store forgets its latest
        writes. No job may be lost, run twice at once, or run again once completed."""
        status = self.status()
        if not status:
            return
        old = status["pid"]
        wal = self.layout.database.with_name(self.layout.database.name + "-wal")
        # Stop the loop from restarting it until the WAL is cut: freeze the keep-alive shell.
        self.loop.send_signal(signal.SIGSTOP)
        try:
            os.kill(old, signal.SIGKILL)
            wait_for(lambda: not psutil.pid_exists(old) or zombie(old), 30, interval=0.02)
            frames = cut_wal_tail(wal, self.rng)
        finally:
            self.loop.send_signal(signal.SIGCONT)
        self.record(
            Fault(
                "store_rollback",
                time.time(),
                status.get("running"),
                status.get("trainer_pid"),
                {"supervisor_pid": old, "frames_lost": frames},
                landed=True,
            )
        )
        wait_for(lambda: (s := self.status()) and s["pid"] != old, 60, interval=0.1)

    def long_name(self, inbox: Path, detail: dict) -> Path:
        """300 bytes, or the longest name the file system takes (Linux: 255 bytes)."""
        for size in (300, os.pathconf(inbox, "PC_NAME_MAX")):
            path = inbox / ("n" * (size - len(".yaml")) + ".yaml")
            try:
                path.touch()
                detail["bytes"] = size
                return path
            except OSError as exc:
                detail["refused"] = f"{size} bytes: {exc.strerror}"
        raise AssertionError("no long name could be created")

    def command(self) -> None:
        ids = self.known_ids()
        if not ids:
            return
        name = self.rng.choice(COMMANDS)
        job_id = self.rng.choice(ids)
        if name in ("show", "history") and self.rng.random() < 0.3:
            # Sometimes through the real command line, as a user would type it.
            args = [name, job_id] + (["--json"] if self.rng.random() < 0.5 else [])
            result = subprocess.run(
                [sys.executable, "-m", "loractl.client.cli", "--home", str(self.home), *args],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if result.returncode != 0:
                self.internal_errors.append(f"loractl {' '.join(args)}: {result.stderr}")
            self.commands[f"{name} (cli)"] += 1
            return
        message = {
            "pause": lambda: PauseRequest(job=job_id),
            "resume": lambda: ResumeRequest(job=job_id),
            "cancel": lambda: CancelRequest(job=job_id),
            "retry": lambda: RetryRequest(job=job_id, fresh=self.rng.random() < 0.2),
            "priority": lambda: PriorityRequest(job=job_id, priority=self.rng.randint(-5, 5)),
            "show": lambda: ShowRequest(job=job_id),
            "history": lambda: HistoryRequest(job=job_id),
        }[name]()
        try:
            reply = self.ask(message)
        except RequestFailed as exc:
            self.commands[f"{name} refused"] += 1
            if exc.code not in (ErrorCode.INVALID_STATE, ErrorCode.INVALID_ARGUMENT):
                self.internal_errors.append(f"{name} {job_id} refused oddly: {exc}")
            return
        self.commands[name] += 1
        if reply.data.get("state") in ("pausing", "cancelling"):
            # Let the trainer checkpoint and stop before the next fault, so each fault's
            # effect is its own.
            wait_for(lambda: self.show(job_id)["state"] not in ACTIVE, 60)

    def inject(self, kind: str, target: tuple[str, int] | None) -> None:
        if kind in TRAINER_KINDS:
            getattr(self, kind)(*target)
        else:
            getattr(self, kind)()


# Where a restarted supervisor puts a job whose trainer is gone: back in the queue, or where a
# pause or cancel under way was taking it.
RESTARTED = ("queued", "paused", "cancelled")


def zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def cut_wal_tail(wal: Path, rng: random.Random) -> int:
    """Drop the last 1-30 frames of a SQLite WAL (cut on a frame boundary, as a disk that
    loses its unsynced tail leaves it); the frames dropped."""
    if not wal.exists() or wal.stat().st_size <= 32:
        return 0
    header = wal.read_bytes()[:32]
    page_size = int.from_bytes(header[8:12], "big")
    frame = 24 + page_size
    frames = (wal.stat().st_size - 32) // frame
    lost = min(frames, rng.randint(1, 30))
    with wal.open("r+b") as handle:
        handle.truncate(32 + (frames - lost) * frame)
    return lost


def write_atomically(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.soak")
    staging.write_text(text)
    os.replace(staging, path)


def mount_small_disk(folder: Path) -> tuple[bool, str]:
    folder.mkdir()
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    if result.returncode != 0:
        return False, (result.stderr or result.stdout).strip()
    return True, ""


def finished_first(fault: Fault, job: dict | None) -> bool:
    """Whether the squeezed job completed before the guard's stop could take effect (a short
    job on a loaded machine): a race the fault lost, not a record the supervisor got wrong."""
    if job is None:
        return False
    after = [e for e in job["history"] if e["at"] >= fault.at]
    for event in after:
        if event["kind"] in ("ladder_step", "crash"):
            return False
        if event.get("to_state") == "completed":
            return True
    return False


def verify(soak: Soak, fault: Fault, jobs: dict[str, dict]) -> str:
    """Why ``fault`` does not show in the history as it should; "" when it does."""
    if not fault.landed:
        return fault.problem or "its effect was never seen"
    if fault.kind in ("hostile_inbox", "bad_data_job", "signal_storm", "store_rollback"):
        return ""
    job = jobs.get(fault.job) if fault.job else None
    if fault.kind == "supervisor_kill":
        if job is None or not fault.pid:
            return ""  # no trainer was running: the restart itself is the record
        for event in job["history"]:
            if event["at"] < fault.at:
                continue
            if event["kind"] == "adopted" and event["detail"].get("pid") == fault.pid:
                return ""
            # Or, the trainer gone by then, the restarted supervisor requeued the job.
            if event["from_state"] in ACTIVE and event["to_state"] in RESTARTED:
                return ""
        done = [e for e in job["history"] if e.get("to_state") == "completed"]
        if done and done[0]["at"] <= fault.at + 1:
            return ""  # it finished as the supervisor died
        return f"no adoption or restart of trainer {fault.pid} after the kill"
    crashes = [c for c in job["crashes"] if c.get("at", 0) >= fault.at - 1]
    expected = EXPECTED_CAUSE[fault.kind]
    if fault.kind == "memory_squeeze":
        # The guard stops it mid-run, or its pre-flight stops it before the first step.
        guard = [
            e
            for e in job["history"]
            if e["at"] >= fault.at
            and (e["kind"] == "memory_guard" or e["detail"].get("rule") == "preflight_over_budget")
        ]
        steps = [e for e in job["history"] if e["kind"] == "ladder_step" and e["at"] >= fault.at]
        if not guard or not steps or not [c for c in crashes if c["cause"] == "memory"]:
            return f"guard {len(guard)}, ladder steps {len(steps)}, crashes {crashes}"
        return ""
    mine = [c for c in job["crashes"] if c.get("pid") == fault.pid]
    if len(mine) != 1 or mine[0]["cause"] != expected:
        return f"expected one {expected} crash of pid {fault.pid}, got {mine}"
    if fault.kind == "trainer_hang":
        hangs = [
            e
            for e in job["history"]
            if e["kind"] == "hang_detected" and e["detail"].get("pid") == fault.pid
        ]
        if not hangs:
            return f"no hang_detected event for pid {fault.pid}"
    return ""


def rolled_back(soak: Soak, fault: Fault) -> bool:
    """Whether a store rollback soon after ``fault`` may have taken its record back."""
    if fault.kind not in EXPECTED_CAUSE and fault.kind != "supervisor_kill":
        return False
    return any(
        f.kind == "store_rollback" and 0 <= f.at - fault.at <= ROLLBACK_REACH_S for f in soak.faults
    )


def attributed(soak: Soak, job_id: str, crash: dict) -> bool:
    for fault in soak.faults:
        if fault.job != job_id:
            continue
        if fault.pid and crash.get("pid") == fault.pid and fault.kind in EXPECTED_CAUSE:
            return True
        if (
            fault.kind == "memory_squeeze"
            and crash["cause"] == "memory"
            and crash.get("at", 0) >= fault.at
        ):
            return True
    return False


def leak_check(soak: Soak) -> list[str]:
    """Compare the early and late windows of the longest supervisor incarnation."""
    spans = {
        pid: samples[-1][0] - samples[0][0]
        for pid, samples in soak.supervisor_samples.items()
        if samples
    }
    if not spans:
        return ["no supervisor samples"]
    pid = max(spans, key=spans.get)
    samples = soak.supervisor_samples[pid]
    start = samples[0][0]
    early = [s for s in samples if start + 10 <= s[0] <= start + 40]
    late = [s for s in samples if s[0] >= samples[-1][0] - 30]
    lines = [f"longest incarnation: pid {pid}, {spans[pid]:.0f} s, {len(samples)} samples"]
    if spans[pid] < 100 or not early or not late:
        lines.append("too short to compare windows; leak check skipped")
        return lines
    rss_early = statistics.median(s[1] for s in early)
    rss_late = statistics.median(s[1] for s in late)
    fds_early = max(s[2] for s in early)
    fds_late = max(s[2] for s in late)
    lines.append(f"rss {rss_early:.1f} -> {rss_late:.1f} MB, open files {fds_early} -> {fds_late}")
    assert rss_late - rss_early <= 50, lines
    assert fds_late - fds_early <= 20, lines
    return lines


@pytest.fixture
def soak_rig(tiny_workspace, tmp_path, capsys):
    seed = int(os.environ.get("LORACTL_SOAK_SEED") or random.SystemRandom().randrange(2**32))
    with capsys.disabled():
        print(f"\nsoak: LORACTL_SOAK_SEED={seed} LORACTL_SOAK_SECONDS={SOAK_SECONDS:.0f}")
    soak = Soak(tiny_workspace, tmp_path, seed)
    mounted, why = mount_small_disk(tmp_path / "disk")
    if mounted:
        soak.disk = tmp_path / "disk"
    else:
        soak.notes.append(f"disk_full skipped: cannot mount a tmpfs ({why})")
    try:
        yield soak
    finally:
        soak.stop.set()
        if soak.loop is not None and soak.loop.poll() is None:
            soak.loop.kill()
            soak.loop.wait()
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if str(soak.home) in " ".join(proc.info["cmdline"] or []):
                    proc.kill()
            except psutil.Error:
                pass
        if mounted:
            subprocess.run(["umount", "-l", str(tmp_path / "disk")], check=False)


def test_soak_faults_of_every_kind_lose_nothing_and_change_no_bit(soak_rig, capsys):
    """Kills, hangs, squeezes, full disk, hostile files, commands: no job lost, doubled, altered."""
    soak = soak_rig
    began = time.monotonic()
    reference = make_job(soak.workspace, soak.root / "reference", **dict(JOB, name="reference"))
    result = run_trainer(reference, "--fresh")
    assert result.returncode == 0, result.stderr
    expected = digest(soak.root / "reference" / "adapters" / "adapters.safetensors")

    soak.start()
    threads = [
        threading.Thread(target=soak.watch, args=(work,), daemon=True)
        for work in (soak.census, soak.sampler, soak.reader, soak.keeper)
    ]
    for thread in threads:
        thread.start()
    start = time.monotonic()
    # LORACTL_SOAK_SECONDS is the soak's whole span: faults, then bringing every job home.
    end = start + SOAK_SECONDS - min(60, 0.2 * SOAK_SECONDS)
    # The second half has no supervisor kills, so one incarnation lives long enough to show a
    # leak.
    supervisor_kills_until = start + 0.5 * (end - start)
    submissions_until = end - 20
    try:
        while time.monotonic() < end:
            time.sleep(soak.rng.uniform(0.3, 2.5))  # a random moment for the next fault
            if time.monotonic() < submissions_until:
                soak.top_up()
            soak.janitor(patience=15)
            with soak.lock:
                if len(soak.trainer_rss) >= 20:
                    soak.squeeze_budget = max(64, int(0.85 * statistics.median(soak.trainer_rss)))
            target = soak.running()
            kinds = {
                kind: weight
                for kind, weight in WEIGHTS.items()
                if (kind not in TRAINER_KINDS or target)
                and (kind != "disk_full" or (target and soak.on_small_disk(target[0])))
                and (kind not in SUPERVISOR_KILLS or time.monotonic() < supervisor_kills_until)
                and (kind != "memory_squeeze" or soak.squeeze_budget)
            }
            if target and target[0] in soak.squeezes:
                # A kill near a squeezed budget is rightly called memory; keep causes apart.
                kinds = {k: w for k, w in kinds.items() if k not in TRAINER_KINDS}
            kind = soak.rng.choices(list(kinds), weights=list(kinds.values()))[0]
            soak.inject(kind, target)
        fault_phase = time.monotonic() - start

        # Bring every job home: resume the paused, retry the cancelled and failed.
        def all_completed() -> bool:
            soak.janitor(patience=0)
            jobs = [j for j in soak.jobs() if j["id"] not in soak.bad_jobs]
            return len(jobs) >= len(soak.submitted) and all(j["state"] == "completed" for j in jobs)

        wait_for(all_completed, 600, interval=1.0)
        wait_for(soak.bad_jobs_settled, 120, interval=1.0)
        soak.check_bad_jobs()
        drain = time.monotonic() - start - fault_phase
    finally:
        soak.stop.set()
        for thread in threads:
            thread.join(timeout=30)

    soak.resolve_inbox_ids()
    listed = soak.jobs()
    jobs = {j["id"]: soak.show(j["id"]) for j in listed}
    problems: list[str] = []

    # No job lost, none doubled: every submission is there exactly once, nothing else is.
    names = Counter(j["name"] for j in listed)
    for name, job_id in soak.submitted.items():
        if names[name] != 1 or job_id not in jobs:
            problems.append(f"job {name} ({job_id}) appears {names[name]} times")
    extra = set(names) - set(soak.submitted)
    if extra:
        problems.append(f"jobs nobody submitted: {sorted(extra)}")

    # Every valid job completed with the reference's adapters, bit for bit.
    unequal = []
    for job_id, job in jobs.items():
        if job["state"] != "completed":
            problems.append(f"{job_id} ended {job['state']}: {job['reason']}")
            continue
        produced = Path(job["adapter_path"]) / "adapters.safetensors"
        if digest(produced) != expected:
            unequal.append(f"{job['name']} ({job_id}, rung {job['rung']})")
    if unequal:
        problems.append(f"adapters differ from the reference: {unequal}")

    # Every fault shows in the history with its cause.
    for fault in list(soak.faults):
        if fault.kind == "memory_squeeze" and finished_first(fault, jobs.get(fault.job)):
            soak.faults.remove(fault)
            soak.notes.append(f"{fault.kind} on {fault.job}: it had just finished; not counted")
            continue
        fault.problem = verify(soak, fault, jobs)
        if fault.problem and rolled_back(soak, fault):
            soak.notes.append(f"{fault.kind} at {fault.at:.1f}: {fault.problem} (rolled back)")
            fault.problem = ""
        if fault.problem:
            problems.append(f"{fault.kind} at {fault.at:.1f} on {fault.job}: {fault.problem}")
    spurious = [
        f"{job_id}: {c['cause']} ({c.get('explanation', '')})"
        for job_id, job in jobs.items()
        for c in job["crashes"]
        if not attributed(soak, job_id, c)
    ]
    # Under load a trainer can miss its 5 s heartbeat window: a hang the supervisor is right
    # to call. Anything else nobody caused is a bug.
    unexplained = [s for s in spurious if ": hang (" not in s]
    if unexplained:
        problems.append(f"crashes no fault explains: {unexplained}")

    # The supervisor never crashed on its own: every exit but the last is one of our SIGKILLs.
    sup_kills = sum(f.kind in SUPERVISOR_KILLS for f in soak.faults)
    soak.ask(ShutdownRequest())
    assert soak.loop.wait(timeout=120) == 0
    exits = soak.exits.read_text().split()
    if exits != ["137"] * sup_kills + ["0"]:
        problems.append(f"supervisor exits {exits}, expected {sup_kills} x 137 then 0")
    if soak.doubled or soak.most_trainers_per_job > 1:
        problems.append(f"two trainers for one job: {soak.doubled[:5]}")
    if soak.internal_errors:
        problems.append(f"internal errors: {soak.internal_errors[:5]}")

    leak = leak_check(soak)
    by_kind = Counter(f.kind for f in soak.faults)
    recovered = Counter(
        f.kind
        for f in soak.faults
        if not f.problem
        and (
            f.job is None
            or f.kind == "bad_data_job"  # failed as it should, then removed
            or jobs.get(f.job, {}).get("state") == "completed"
        )
    )
    lost = len(soak.submitted) - sum(1 for j in listed if j["name"] in soak.submitted)
    lines = [
        f"soak: {fault_phase:.0f} s of faults, {drain:.0f} s to drain, "
        f"{time.monotonic() - began:.0f} s in all",
        f"{'fault':<18}{'injected':>9}{'recovered':>11}",
        *(f"{kind:<18}{by_kind[kind]:>9}{recovered[kind]:>11}" for kind in sorted(by_kind)),
        f"{'total':<18}{sum(by_kind.values()):>9}{sum(recovered.values()):>11}",
        f"jobs: {len(soak.submitted)} submitted, "
        f"{sum(j['state'] == 'completed' for j in jobs.values())} completed, "
        f"{len(jobs) - len(unequal)} bitwise equal, lost {lost}",
        "commands: " + ", ".join(f"{k} {v}" for k, v in sorted(soak.commands.items())),
        f"hostile files: {Counter(f.detail['what'] for f in soak.faults if f.detail.get('what'))}",
        f"most trainers at once: {soak.most_trainers} (per job {soak.most_trainers_per_job})",
        f"supervisor: {len(exits)} incarnations; " + "; ".join(leak),
        f"failures on the way (retried): {soak.failures_seen or 'none'}",
        f"hangs nobody injected (slow machine): {len(spurious) - len(unexplained)}",
        *soak.notes,
    ]
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert not problems, "\n".join(problems + lines)
    assert lost == 0
    assert sum(by_kind.values()) >= min(20, SOAK_SECONDS / 15), by_kind
    assert len(by_kind) >= (5 if SOAK_SECONDS >= 240 else 3), by_kind
