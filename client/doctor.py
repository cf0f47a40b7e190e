"""``loractl doctor``: is this machine set up to train overnight, and if not, what to do.

Each check is a small function from a ``Context`` to a ``Check``. The context carries every
seam a test needs (file-system stats, the subprocess runner, the service reader, the
platform), so the checks can be run against a broken setup without touching the real one.

The client never imports mlx (``loractl status`` must stay fast, and a broken MLX install must
not take the diagnosis down with it): the device is read by a child Python that prints JSON.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from importlib import metadata
from pathlib import Path
from typing import Any

import click

from loractl.paths import Layout, runtime_root
from loractl.terminal import shell_join, shell_quote

GIB = 1024**3
MB = 1024 * 1024

MIN_PYTHON = (3, 11)
# A 7B LoRA checkpoint (adapter plus optimizer state) is a few hundred MB and the last K are
# kept per job: under 5 GiB a queue of jobs can run out overnight, under 1 GiB the next one may.
DISK_WARN_BYTES = 5 * GIB
DISK_FAIL_BYTES = 1 * GIB
# The supervisor's default share of RAM for a job without memory_budget_mb.
DEFAULT_BUDGET_FRACTION = 0.7
# sizeof(sockaddr_un.sun_path), which includes the terminating NUL.
SUN_PATH_BYTES = {"darwin": 104, "linux": 108}
PROBE_TIMEOUT_S = 60.0
PMSET_TIMEOUT_S = 5.0
INSTALL_COMMAND = "loractl daemon install"


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str | None = None


def ok(name: str, detail: str) -> Check:
    return Check(name, Status.OK, detail)


def warn(name: str, detail: str, fix: str) -> Check:
    return Check(name, Status.WARN, detail, fix)


def failed(name: str, detail: str, fix: str) -> Check:
    return Check(name, Status.FAIL, detail, fix)


Runner = Callable[[list[str], float], subprocess.CompletedProcess]


def run_command(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``argv`` and capture its text output; a missing tool or a timeout is a result too."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        return subprocess.CompletedProcess(argv, 127, "", str(exc))
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, 124, "", f"timed out after {timeout:.0f} s")


def physical_memory_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


# Runs in a child interpreter. Older mlx has only the Metal variant of device_info, and no
# mx.cuda before the CUDA backend existed.
DEVICE_PROBE = """
import json
import mlx.core as mx

device = mx.default_device()
cuda = getattr(mx, "cuda", None)
if mx.metal.is_available():
    backend = "metal"
elif cuda is not None and cuda.is_available():
    backend = "cuda"
else:
    backend = "cpu"
if hasattr(mx, "device_info"):
    info = mx.device_info(device)
elif backend == "metal":
    info = mx.metal.device_info()
else:
    info = {}
print(json.dumps({"device": device.type.name, "backend": backend, "info": dict(info)}, default=str))
"""


@dataclass(frozen=True)
class DeviceProbe:
    """What the child process saw: the default device, its backend and mx.device_info()."""

    device: str = ""
    backend: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def working_set_bytes(self) -> int | None:
        value = self.info.get("max_recommended_working_set_size")
        return int(value) if value else None


def probe_device(runner: Runner) -> DeviceProbe:
    result = runner([sys.executable, "-c", DEVICE_PROBE], PROBE_TIMEOUT_S)
    if result.returncode != 0:
        lines = (result.stderr or "").strip().splitlines()
        reason = lines[-1] if lines else f"exit code {result.returncode}"
        return DeviceProbe(error=reason)
    lines = (result.stdout or "").strip().splitlines()
    try:
        data = json.loads(lines[-1])
        return DeviceProbe(device=data["device"], backend=data["backend"], info=data["info"])
    except (IndexError, ValueError, KeyError, TypeError):
        return DeviceProbe(error=f"unexpected probe output: {result.stdout!r:.200}")


@dataclass
class Context:
    """Everything the checks read from the outside world, replaceable one piece at a time."""

    layout: Layout
    platform: str = sys.platform
    statvfs: Callable[[str], Any] = os.statvfs
    runner: Runner = run_command
    # None: loractl.launchd.service_state, imported when the check runs.
    service_state: Callable[[Layout], Any] | None = None
    package_version: Callable[[str], str] = metadata.version
    python_version: tuple[int, ...] = tuple(sys.version_info[:3])
    physical_memory: Callable[[], int] = physical_memory_bytes
    _device: DeviceProbe | None = field(default=None, init=False, repr=False)

    def device(self) -> DeviceProbe:
        # The probe starts a Python that imports mlx, which is slow; two checks share it.
        if self._device is None:
            self._device = probe_device(self.runner)
        return self._device


# -- the interpreter and packages ----------------------------------------------------------


def check_python(ctx: Context) -> Check:
    shown = ".".join(str(part) for part in ctx.python_version)
    if tuple(ctx.python_version[:2]) < MIN_PYTHON:
        return failed(
            "python",
            f"Python {shown} at {sys.executable}; loractl needs 3.11 or newer",
            "Install Python 3.11+ (e.g. `brew install python@3.12`) and reinstall loractl in it.",
        )
    return ok("python", f"Python {shown} at {sys.executable}")


def _pinned_requirement(ctx: Context, package: str):
    """loractl's own requirement on ``package`` for ctx.platform, or None if it has none."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        declared = metadata.requires("loractl") or []
    except metadata.PackageNotFoundError:
        return None
    for text in declared:
        requirement = Requirement(text)
        if canonicalize_name(requirement.name) != canonicalize_name(package):
            continue
        environment = {"sys_platform": ctx.platform, "extra": ""}
        if requirement.marker is None or requirement.marker.evaluate(environment):
            return requirement
    return None


def _check_package(ctx: Context, package: str) -> Check:
    try:
        version = ctx.package_version(package)
    except metadata.PackageNotFoundError:
        requirement = _pinned_requirement(ctx, package)
        spec = str(requirement).split(";")[0] if requirement else package
        return failed(
            package,
            f"{package} is not installed in {sys.prefix}",
            "Install it into loractl's environment: "
            f"`{shell_join([sys.executable, '-m', 'pip', 'install', spec])}`.",
        )
    requirement = _pinned_requirement(ctx, package)
    if requirement is not None and not requirement.specifier.contains(version, prereleases=True):
        return warn(
            package,
            f"{package} {version}, but loractl is built against {requirement.specifier}",
            "Install a supported version: `"
            + shell_join(
                [sys.executable, "-m", "pip", "install", f"{package}{requirement.specifier}"]
            )
            + "`.",
        )
    return ok(package, f"{package} {version}")


def check_mlx(ctx: Context) -> Check:
    return _check_package(ctx, "mlx")


def check_mlx_lm(ctx: Context) -> Check:
    return _check_package(ctx, "mlx-lm")


# -- the device and memory -----------------------------------------------------------------


def check_device(ctx: Context) -> Check:
    probe = ctx.device()
    if probe.error:
        return failed(
            "device",
            f"MLX could not start in a child process: {probe.error}",
            f"Reinstall MLX: `{sys.executable} -m pip install --force-reinstall mlx`.",
        )
    name = probe.info.get("device_name") or probe.info.get("architecture") or "unknown"
    detail = f"{probe.device} via {probe.backend} ({name})"
    if probe.working_set_bytes:
        detail += f", recommended working set {probe.working_set_bytes / GIB:.1f} GiB"
    if probe.backend == "cpu":
        fix = (
            "Run loractl under an arm64 (Apple Silicon) Python so MLX can use Metal."
            if ctx.platform == "darwin"
            else "Install MLX's CUDA build (`pip install 'mlx[cuda]'`) on a machine with an "
            "NVIDIA GPU; the CPU build is fine for tests but slow for real jobs."
        )
        return warn("device", detail + "; training on the CPU is many times slower", fix)
    return ok("device", detail)


def check_memory(ctx: Context) -> Check:
    total = ctx.physical_memory()
    by_share = int(total * DEFAULT_BUDGET_FRACTION)
    working_set = ctx.device().working_set_bytes
    if working_set is not None and working_set < by_share:
        # Past Metal's recommended working set, GPU buffers start paging and steps crawl.
        budget, reason = working_set, "Metal's recommended working set"
    else:
        budget, reason = by_share, f"{DEFAULT_BUDGET_FRACTION:.0%} of RAM"
    return ok(
        "memory",
        f"{total / GIB:.1f} GiB physical; suggested memory_budget_mb: {budget // MB} ({reason})",
    )


# -- the background service ----------------------------------------------------------------


def _load_service_state() -> Callable[[Layout], Any]:
    from loractl.launchd import service_state

    return service_state


def check_service(ctx: Context) -> Check:
    name = "service"
    try:
        reader = ctx.service_state or _load_service_state()
    except ImportError as exc:
        return warn(
            name,
            f"cannot read the service state: {exc}",
            "Reinstall loractl (`pip install -e .` in its checkout) so loractl.launchd is "
            "complete.",
        )
    try:
        state = reader(ctx.layout)
    except Exception as exc:
        # service_state reports a missing service manager in its detail, but whatever else
        # goes wrong there, the doctor's job is to say so, not to crash mid-report.
        return warn(
            name,
            f"cannot read the service state: {type(exc).__name__}: {exc}",
            "Check that `launchctl` (macOS) or `systemctl --user` (Linux) works in this session.",
        )
    launchd = state.target == "launchd"
    # The manager's own notes (launchd domain, last signal, a service serving another home).
    notes = f" ({state.detail})" if state.detail else ""
    if not state.installed and "manager here" in state.detail:
        # No launchd or user systemd to install into: `daemon install` would only fail.
        return warn(
            name,
            f"no service manager to run the supervisor{notes}",
            "Run the supervisor in a terminal with `loractl daemon run` (under tmux or nohup "
            "to outlive it); `loractl daemon install` needs launchd or a systemd --user "
            "manager.",
        )
    if not state.installed:
        kind = "LaunchAgent" if launchd else "systemd user unit"
        return warn(
            name,
            f"no {kind} installed at {state.unit_path}",
            f"Install it with `{INSTALL_COMMAND}` so jobs run in the background and the "
            "supervisor is restarted if it dies.",
        )
    if launchd and state.process_type != "Interactive":
        shown = state.process_type or "unset (launchd's default, Standard)"
        return failed(
            name,
            f"{state.label}: ProcessType is {shown}, so macOS throttles the trainer's CPU, GPU "
            "and I/O",
            f"Reinstall the service with `{INSTALL_COMMAND}` so its plist sets ProcessType "
            "to Interactive.",
        )
    uid = os.getuid()
    if not state.loaded:
        fix = (
            "Load it with "
            f"`{shell_join(['launchctl', 'bootstrap', f'gui/{uid}', str(state.unit_path)])}`."
            if launchd
            else f"Enable it with `systemctl --user enable --now {state.label}`."
        )
        return warn(name, f"{state.label} is installed but not loaded{notes}", fix)
    if not state.running:
        exit_note = f", last exit {state.last_exit}" if state.last_exit is not None else ""
        fix = (
            f"Start it with `launchctl kickstart gui/{uid}/{state.label}`, and read "
            f"{ctx.layout.logs} if it keeps exiting."
            if launchd
            else f"Start it with `systemctl --user restart {state.label}`, and read "
            f"`journalctl --user -u {state.label}` if it keeps exiting."
        )
        return warn(name, f"{state.label} is loaded but not running{exit_note}{notes}", fix)
    process_type = f", ProcessType {state.process_type}" if launchd else ""
    return ok(name, f"{state.label} running, pid {state.pid}{process_type}{notes}")


# -- folders, sockets, disk ----------------------------------------------------------------


def _folder_check(name: str, path: Path, private: bool) -> Check:
    """Owned by us; for a private folder mode 0700, otherwise at least not writable by others."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return ok(name, f"{path} not created yet (the supervisor creates it on start)")
    uid = os.getuid()
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid != uid:
        return failed(
            name,
            f"{path} is owned by uid {info.st_uid}, not by you (uid {uid})",
            f"Take it back with `sudo chown -R {uid} {shell_quote(str(path))}`, or remove it if "
            "you did not create it.",
        )
    if private and mode & 0o077:
        return failed(
            name,
            f"{path} has mode {mode:04o}; other users could reach loractl's sockets",
            f"Restrict it with `chmod 700 {shell_quote(str(path))}`.",
        )
    if not private and mode & 0o022:
        return failed(
            name,
            f"{path} has mode {mode:04o}; other users can drop jobs or replace checkpoints",
            f"Restrict it with `chmod go-w {shell_quote(str(path))}`.",
        )
    return ok(name, f"{path} owned by you, mode {mode:04o}")


def check_home_folder(ctx: Context) -> Check:
    return _folder_check("home folder", ctx.layout.home, private=False)


def check_runtime_folder(ctx: Context) -> Check:
    return _folder_check("runtime folder", runtime_root(), private=True)


def check_socket_folder(ctx: Context) -> Check:
    return _folder_check("socket folder", ctx.layout.runtime, private=True)


def check_socket_path(ctx: Context) -> Check:
    limit = SUN_PATH_BYTES.get(ctx.platform, SUN_PATH_BYTES["darwin"])
    endpoints = (ctx.layout.control, ctx.layout.events, ctx.layout.telemetry)
    longest = max((endpoint.removeprefix("ipc://") for endpoint in endpoints), key=len)
    size = len(longest.encode())
    if size >= limit:
        return failed(
            "socket path",
            f"{longest} is {size} bytes; Unix socket paths must stay under {limit} bytes here",
            f"Set LORACTL_RUNTIME_DIR to a shorter path, such as /tmp/loractl-{os.getuid()}.",
        )
    return ok("socket path", f"longest endpoint is {size} bytes (limit {limit - 1})")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _disk_check(ctx: Context, name: str, path: Path) -> Check:
    measured = _nearest_existing(path)
    info = ctx.statvfs(str(measured))
    free = info.f_bavail * info.f_frsize
    detail = f"{free / GIB:.1f} GiB free at {measured}"
    fix = (
        f"Free space on the volume holding {measured} (checkpoints and adapters are written "
        "there), or move LORACTL_HOME to a bigger volume."
    )
    if free < DISK_FAIL_BYTES:
        return failed(name, detail + f"; under {DISK_FAIL_BYTES // GIB} GiB", fix)
    if free < DISK_WARN_BYTES:
        return warn(name, detail + f"; under {DISK_WARN_BYTES // GIB} GiB", fix)
    return ok(name, detail)


def check_disk_home(ctx: Context) -> Check:
    return _disk_check(ctx, "disk (home)", ctx.layout.home)


def check_disk_adapters(ctx: Context) -> Check:
    return _disk_check(ctx, "disk (adapters)", ctx.layout.jobs)


# -- supervisor leftovers and the inbox ----------------------------------------------------


def check_pidfile(ctx: Context) -> Check:
    pidfile = ctx.layout.pidfile
    try:
        fd = os.open(pidfile, os.O_RDONLY)
    except FileNotFoundError:
        return ok("pidfile", "no pidfile: the supervisor has not run in this home")
    except OSError as exc:
        return failed(
            "pidfile",
            f"cannot open {pidfile}: {exc.strerror}",
            f"Remove {pidfile}; the supervisor recreates it on start.",
        )
    try:
        # Shared, not exclusive: it conflicts with the supervisor's exclusive lock just the
        # same, but not with `loractl status` probing the same lock at the same instant.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        held = True
    else:
        held = False
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    pid = pidfile.read_text(errors="replace").strip()
    if held:
        return ok("pidfile", f"a supervisor holds the lock (pid {pid or '?'})")
    if not pid:
        return ok("pidfile", "no supervisor running")
    return warn(
        "pidfile",
        f"stale: {pidfile} names pid {pid}, but no supervisor holds its lock",
        "Start the supervisor (`loractl daemon run`, or let the service restart it); it "
        "replaces the stale pidfile.",
    )


def check_store(ctx: Context) -> Check:
    """The job database: SQLite's quick check, read-only (safe beside a running supervisor),
    and how old its backup is."""
    import sqlite3
    import time

    from loractl.supervisor import storecare

    name = "job database"
    database = ctx.layout.database
    if not database.exists():
        return ok(name, f"{database} not created yet (the supervisor creates it on start)")
    try:
        problem = storecare.check(database, readonly=True)
    except sqlite3.Error as exc:
        return warn(
            name,
            f"cannot read {database}: {exc}",
            f"Check the owner and mode of {database} and its folder.",
        )
    if problem is not None:
        return failed(
            name,
            f"{database} is damaged: {problem}",
            "Restart the supervisor (`loractl daemon restart`): it moves the file aside and "
            "rebuilds it from the job folders; or stop it and run `loractl daemon repair`.",
        )
    backup = storecare.backup_path(ctx.layout)
    try:
        age_h = (time.time() - backup.stat().st_mtime) / 3600
    except OSError:
        return ok(name, f"{database} passes SQLite's quick check; no backup yet")
    return ok(name, f"{database} passes SQLite's quick check; backup {age_h:.0f} h old")


def check_inbox(ctx: Context) -> Check:
    inbox = ctx.layout.inbox
    fix = (
        f"Remove {inbox} and recreate it as a folder you own: `mkdir -p {shell_quote(str(inbox))}`."
    )
    if inbox.is_symlink() and not inbox.exists():
        return failed("inbox", f"{inbox} is a symlink to missing {os.readlink(inbox)}", fix)
    if not inbox.exists():
        return ok("inbox", f"{inbox} not created yet (the supervisor creates it on start)")
    try:
        with os.scandir(inbox) as entries:
            waiting = sum(1 for entry in entries if entry.is_file())
    except OSError as exc:
        return failed("inbox", f"cannot list {inbox}: {exc.strerror}", fix)
    if not os.access(inbox, os.W_OK | os.X_OK):
        return failed("inbox", f"{inbox} is not writable, so accepted jobs cannot leave it", fix)
    return ok("inbox", f"{inbox} readable, {waiting} file(s) waiting")


# -- macOS power state ---------------------------------------------------------------------


def _pmset(ctx: Context, *args: str) -> str | None:
    result = ctx.runner(["pmset", *args], PMSET_TIMEOUT_S)
    return result.stdout if result.returncode == 0 else None


def check_power_source(ctx: Context) -> Check:
    name = "power source"
    if ctx.platform != "darwin":
        return ok(name, f"not applicable on {ctx.platform}")
    text = _pmset(ctx, "-g", "batt")
    source = re.search(r"Now drawing from '([^']+)'", text or "")
    if source is None:
        return warn(
            name,
            "could not read the power source from `pmset -g batt`",
            "Run `pmset -g batt` by hand to see why it fails.",
        )
    if source.group(1) == "AC Power":
        return ok(name, "on AC power")
    battery = re.search(r"(\d+)%;\s*([^;]+);\s*(\S+ remaining|\(no estimate\))?", text)
    detail = f"on {source.group(1)}"
    if battery:
        detail += f", {battery.group(1)}% {battery.group(2).strip()}"
    return warn(
        name,
        detail,
        "Plug in the power adapter: on battery macOS throttles the GPU and an overnight run "
        "can drain it flat.",
    )


def check_low_power_mode(ctx: Context) -> Check:
    name = "low power mode"
    if ctx.platform != "darwin":
        return ok(name, f"not applicable on {ctx.platform}")
    text = _pmset(ctx, "-g")
    if text is None:
        return warn(
            name,
            "could not read power settings from `pmset -g`",
            "Run `pmset -g` by hand to see why it fails.",
        )
    # Most Macs report `lowpowermode 0|1`; those with a High Power Mode report
    # `powermode 0|1|2` instead, where 1 is Low Power.
    setting = re.search(r"^\s*(lowpowermode|powermode)\s+(\d+)", text, re.MULTILINE)
    if setting is None or setting.group(2) != "1":
        return ok(name, "off")
    return warn(
        name,
        "on: macOS lowers CPU and GPU clocks, so training runs markedly slower",
        "Turn it off in System Settings > Battery, or with `sudo pmset -a lowpowermode 0`.",
    )


CHECKS: list[Callable[[Context], Check]] = [
    check_python,
    check_mlx,
    check_mlx_lm,
    check_device,
    check_memory,
    check_service,
    check_home_folder,
    check_runtime_folder,
    check_socket_folder,
    check_socket_path,
    check_disk_home,
    check_disk_adapters,
    check_pidfile,
    check_store,
    check_inbox,
    check_power_source,
    check_low_power_mode,
]


def run_checks(ctx: Context, checks: list[Callable[[Context], Check]] | None = None) -> list[Check]:
    return [check(ctx) for check in (CHECKS if checks is None else checks)]


def exit_code(checks: list[Check]) -> int:
    return 1 if any(check.status is Status.FAIL for check in checks) else 0


_STYLE = {Status.OK: "green", Status.WARN: "yellow", Status.FAIL: "red"}


def render_text(checks: list[Check]) -> str:
    width = max(len(check.name) for check in checks)
    lines = []
    for check in checks:
        label = click.style(f"{check.status.value:<4}", fg=_STYLE[check.status], bold=True)
        lines.append(f"{label}  {check.name:<{width}}  {check.detail}")
        if check.fix:
            lines.append(f"{'':<6}{'':<{width}}  fix: {check.fix}")
    counts = {status: sum(check.status is status for check in checks) for status in Status}
    lines.append(f"{counts[Status.OK]} ok, {counts[Status.WARN]} warn, {counts[Status.FAIL]} fail")
    return "\n".join(lines)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@click.pass_obj
def doctor(obj: Layout | Context, as_json: bool) -> None:
    """Check Python, MLX, the service, folders, disk and power; print a fix for each problem.

    Exit status: 0 when no check fails (warnings allowed), 1 when any check fails.
    """
    ctx = obj if isinstance(obj, Context) else Context(obj)
    checks = run_checks(ctx)
    if as_json:
        click.echo(json.dumps({"checks": [asdict(check) for check in checks]}, indent=2))
    else:
        click.echo(render_text(checks))
    raise SystemExit(exit_code(checks))
