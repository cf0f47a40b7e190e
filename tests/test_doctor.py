"""`loractl doctor`: each check against a healthy and a broken setup, the output and exit code."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from loractl.client import doctor
from loractl.client.doctor import GIB, Check, Context, Status
from loractl.paths import Layout

FIXTURES = Path(__file__).parent / "fixtures" / "doctor"
PROBE = ("<probe>",)

METAL_PROBE_OUTPUT = json.dumps(
    {
        "device": "gpu",
        "backend": "metal",
        "info": {
            "device_name": "Apple M3 Pro",
            "architecture": "applegpu_g15s",
            "memory_size": 36 * GIB,
            "max_buffer_length": 27 * GIB,
            "max_recommended_working_set_size": 28 * GIB,
        },
    }
)


@dataclass
class FakeServiceState:
    """Shaped like loractl.launchd.ServiceState; defaults describe a healthy LaunchAgent."""

    target: str = "launchd"
    label: str = "io.loractl.supervisor"
    unit_path: str = "/Users/me/Library/LaunchAgents/io.loractl.supervisor.plist"
    installed: bool = True
    loaded: bool = True
    running: bool = True
    pid: int | None = 4242
    last_exit: int | None = None
    process_type: str | None = "Interactive"
    detail: str = "gui/501: running"


@dataclass
class FakeRunner:
    """Answers commands from a table keyed by argv (the device probe by PROBE); logs calls."""

    answers: dict[tuple[str, ...], tuple[int, str, str]] = field(default_factory=dict)
    calls: list[tuple[str, ...]] = field(default_factory=list)

    def __call__(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        key = PROBE if argv[0] == sys.executable else tuple(argv)
        self.calls.append(key)
        returncode, stdout, stderr = self.answers[key]
        return subprocess.CompletedProcess(argv, returncode, stdout, stderr)


def mac_runner(batt: str = "pmset_batt_ac_laptop.txt", settings: str = "pmset_g_normal.txt"):
    return FakeRunner(
        {
            PROBE: (0, METAL_PROBE_OUTPUT + "\n", ""),
            ("pmset", "-g", "batt"): (0, (FIXTURES / batt).read_text(), ""),
            ("pmset", "-g"): (0, (FIXTURES / settings).read_text(), ""),
        }
    )


def free_space(default: int = 200 * GIB, **by_folder: int):
    """A statvfs whose free space is ``by_folder[name]`` for paths ending in ``name``."""

    def statvfs(path: str) -> SimpleNamespace:
        free = by_folder.get(Path(path).name, default)
        return SimpleNamespace(f_bavail=free // 4096, f_frsize=4096)

    return statvfs


@pytest.fixture
def layout(tmp_path, monkeypatch) -> Layout:
    monkeypatch.setenv("LORACTL_RUNTIME_DIR", str(tmp_path / "rt"))
    home = Layout.at(tmp_path / "home")
    home.ensure()
    return home


def mac_context(layout: Layout, **overrides) -> Context:
    """A healthy Apple Silicon Mac: Metal, AC power, service installed as Interactive."""
    settings = {
        "platform": "darwin",
        "statvfs": free_space(),
        "runner": mac_runner(),
        "service_state": lambda layout: FakeServiceState(),
        "physical_memory": lambda: 36 * GIB,
    }
    settings.update(overrides)
    return Context(layout, **settings)


def status_of(check: Check) -> Status:
    assert check.detail
    if check.status is Status.OK:
        assert check.fix is None
    else:
        assert check.fix and check.fix.endswith(".")
    return check.status


# -- the whole report ------------------------------------------------------------------------


def test_healthy_mac_passes_every_check(layout):
    """On a healthy setup every check is ok and the exit code is 0."""
    checks = doctor.run_checks(mac_context(layout))
    assert {check.name: check.status for check in checks} == {
        check.name: Status.OK for check in checks
    }
    assert len(checks) == len(doctor.CHECKS)
    assert doctor.exit_code(checks) == 0


def test_json_output_has_one_object_per_check(layout):
    """--json prints {"checks": [{name, status, detail, fix}]} and exits 0 without failures."""
    result = CliRunner().invoke(doctor.doctor, ["--json"], obj=mac_context(layout))
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert list(data) == ["checks"]
    assert len(data["checks"]) == len(doctor.CHECKS)
    for entry in data["checks"]:
        assert list(entry) == ["name", "status", "detail", "fix"]
        assert entry["status"] == "ok" and entry["fix"] is None
    assert {"python", "mlx", "mlx-lm", "device", "service", "socket path"} <= {
        entry["name"] for entry in data["checks"]
    }


def test_text_output_indents_the_fix_and_a_failure_exits_1(layout):
    """Text output has one line per check, the fix indented below it; any fail exits 1."""
    os.chmod(layout.home, 0o777)
    context = mac_context(layout, runner=mac_runner(batt="pmset_batt_battery.txt"))
    result = CliRunner().invoke(doctor.doctor, [], obj=context)
    assert result.exit_code == 1
    lines = result.output.splitlines()
    failing = next(i for i, line in enumerate(lines) if line.startswith("fail  home folder"))
    assert lines[failing + 1].lstrip().startswith("fix: Restrict it with `chmod go-w")
    assert lines[failing + 1].startswith(" " * 8)
    warning = next(i for i, line in enumerate(lines) if line.startswith("warn  power source"))
    assert "fix: Plug in the power adapter" in lines[warning + 1]
    assert lines[-1] == f"{len(doctor.CHECKS) - 2} ok, 1 warn, 1 fail"


def test_warnings_alone_exit_0(layout):
    """Warnings are advice, not failure: the exit code stays 0."""
    context = mac_context(layout, runner=mac_runner(settings="pmset_g_low_power.txt"))
    result = CliRunner().invoke(doctor.doctor, ["--json"], obj=context)
    assert result.exit_code == 0
    statuses = {entry["name"]: entry["status"] for entry in json.loads(result.output)["checks"]}
    assert statuses["low power mode"] == "warn"


def test_command_accepts_a_plain_layout_as_the_cli_group_passes_it(layout, monkeypatch):
    """Given the Layout that the loractl group puts in ctx.obj, the command builds a Context."""
    seen = []
    monkeypatch.setattr(
        doctor, "CHECKS", [lambda ctx: seen.append(ctx) or Check("x", Status.OK, "y")]
    )
    result = CliRunner().invoke(doctor.doctor, ["--json"], obj=layout)
    assert result.exit_code == 0
    assert isinstance(seen[0], Context) and seen[0].layout == layout


# -- python and packages ---------------------------------------------------------------------


def test_old_python_fails(layout):
    """A Python older than 3.11 fails, with an install fix."""
    check = doctor.check_python(mac_context(layout, python_version=(3, 10, 14)))
    assert status_of(check) is Status.FAIL
    assert "3.10.14" in check.detail and "3.11" in check.fix


def test_missing_mlx_lm_fails(layout):
    """An mlx-lm that is not installed fails, and the fix installs loractl's requirement."""

    def version(package: str) -> str:
        raise metadata.PackageNotFoundError(package)

    ctx = mac_context(layout, package_version=version)
    check = doctor.check_mlx_lm(ctx)
    assert status_of(check) is Status.FAIL
    required = doctor._pinned_requirement(ctx, "mlx-lm")
    assert required is not None and required.specifier
    assert f"pip install '{str(required).split(';')[0]}'" in check.fix


def test_mlx_other_than_the_pinned_version_warns(layout):
    """An mlx outside loractl's requirement warns and suggests a version inside it."""
    ctx = mac_context(layout, package_version=lambda package: "0.18.0")
    check = doctor.check_mlx(ctx)
    assert status_of(check) is Status.WARN
    required = doctor._pinned_requirement(ctx, "mlx")
    assert required is not None and required.specifier
    assert "0.18.0" in check.detail and str(required.specifier) in check.detail
    assert f"pip install 'mlx{required.specifier}'" in check.fix


# -- device and memory -----------------------------------------------------------------------


def test_metal_device_reports_its_working_set(layout):
    """The probe's Metal device and recommended working set show up in the device check."""
    check = doctor.check_device(mac_context(layout))
    assert status_of(check) is Status.OK
    assert "gpu via metal (Apple M3 Pro)" in check.detail and "28.0 GiB" in check.detail


def test_failing_probe_fails_the_device_check(layout):
    """A child that cannot import mlx fails the check with its last stderr line."""
    runner = FakeRunner({PROBE: (1, "", "Traceback...\nImportError: libmlx.so: cannot open")})
    check = doctor.check_device(mac_context(layout, runner=runner))
    assert status_of(check) is Status.FAIL
    assert "ImportError: libmlx.so" in check.detail


def test_cpu_device_on_a_mac_warns(layout):
    """MLX falling back to the CPU on a Mac (an x86_64 Python) warns."""
    cpu = json.dumps({"device": "cpu", "backend": "cpu", "info": {"device_name": "Intel"}})
    check = doctor.check_device(mac_context(layout, runner=FakeRunner({PROBE: (0, cpu, "")})))
    assert status_of(check) is Status.WARN
    assert "arm64" in check.fix


def test_probe_runs_once_for_device_and_memory(layout):
    """The device and memory checks share one probe child."""
    context = mac_context(layout)
    doctor.check_device(context)
    doctor.check_memory(context)
    assert context.runner.calls == [PROBE]


def test_memory_budget_is_capped_by_the_metal_working_set(layout):
    """On a 16 GiB Mac the Metal working set (about 2/3 of RAM) is below 70%, so it wins."""
    # What an M1 with 16 GiB reports as max_recommended_working_set_size.
    working_set = 11_453_251_584
    probe = json.dumps(
        {
            "device": "gpu",
            "backend": "metal",
            "info": {"max_recommended_working_set_size": working_set},
        }
    )
    context = mac_context(
        layout, runner=FakeRunner({PROBE: (0, probe, "")}), physical_memory=lambda: 16 * GIB
    )
    check = doctor.check_memory(context)
    assert status_of(check) is Status.OK
    expected = working_set // 1024**2
    assert f"memory_budget_mb: {expected} (Metal's recommended working set)" in check.detail


def test_memory_budget_is_70_percent_of_ram_without_metal(layout):
    """Without a working set (CPU or a failed probe) the budget is 70% of RAM."""
    runner = FakeRunner({PROBE: (1, "", "no mlx")})
    context = mac_context(layout, runner=runner, physical_memory=lambda: 10 * GIB)
    check = doctor.check_memory(context)
    assert f"memory_budget_mb: {7 * 1024} (70% of RAM)" in check.detail


# -- the service -----------------------------------------------------------------------------


def service_check(layout, **state):
    context = mac_context(layout, service_state=lambda layout: FakeServiceState(**state))
    return doctor.check_service(context)


def test_service_not_installed_warns(layout):
    """No LaunchAgent installed warns and says how to install it."""
    check = service_check(layout, installed=False, loaded=False, running=False, pid=None)
    assert status_of(check) is Status.WARN
    assert "LaunchAgent" in check.detail and doctor.INSTALL_COMMAND in check.fix


def test_service_without_a_manager_advises_daemon_run(layout):
    """With no user systemd to install into, doctor advises `daemon run`, not `install`."""
    check = service_check(
        layout,
        target="systemd",
        label="loractl.service",
        installed=False,
        loaded=False,
        running=False,
        pid=None,
        process_type=None,
        detail="no systemd --user manager here (systemctl not found)",
    )
    assert status_of(check) is Status.WARN
    assert "loractl daemon run" in check.fix
    assert not check.fix.startswith(f"Install it with `{doctor.INSTALL_COMMAND}`")


def test_service_with_background_process_type_fails(layout):
    """A LaunchAgent with ProcessType Background fails: macOS would throttle training."""
    check = service_check(layout, process_type="Background")
    assert status_of(check) is Status.FAIL
    assert "ProcessType is Background" in check.detail and "Interactive" in check.fix


def test_service_without_process_type_fails_on_macos(layout):
    """An unset ProcessType is launchd's Standard, not Interactive, so it fails too."""
    check = service_check(layout, process_type=None)
    assert status_of(check) is Status.FAIL
    assert "unset" in check.detail


def test_service_installed_but_not_loaded_warns_with_bootstrap(layout):
    """An installed but unloaded LaunchAgent warns with the launchctl bootstrap command."""
    check = service_check(layout, loaded=False, running=False, pid=None)
    assert status_of(check) is Status.WARN
    assert "launchctl bootstrap gui/" in check.fix


def test_service_loaded_but_not_running_warns_with_last_exit(layout):
    """A loaded agent whose supervisor is not running warns and shows the last exit."""
    check = service_check(layout, running=False, pid=None, last_exit=78)
    assert status_of(check) is Status.WARN
    assert "last exit 78" in check.detail
    assert "launchctl kickstart gui/" in check.fix and "/io.loractl.supervisor" in check.fix


def test_systemd_service_needs_no_process_type(layout):
    """A running systemd unit is ok: ProcessType is a launchd notion."""
    check = service_check(
        layout,
        target="systemd",
        label="loractl.service",
        unit_path="/root/.config/systemd/user/loractl.service",
        process_type=None,
        detail="loaded, active",
    )
    assert status_of(check) is Status.OK
    assert "loractl.service running, pid 4242" in check.detail


def test_systemd_unit_not_loaded_warns_with_enable(layout):
    """An installed systemd unit that is not loaded warns with systemctl's enable --now."""
    check = service_check(
        layout,
        target="systemd",
        label="loractl.service",
        process_type=None,
        loaded=False,
        running=False,
        detail="no systemd --user manager here (systemctl not found)",
    )
    assert status_of(check) is Status.WARN
    assert "systemctl not found" in check.detail
    assert "systemctl --user enable --now loractl.service" in check.fix


def test_service_notes_reach_the_report(layout):
    """The manager's notes, such as a service serving another home, appear in the detail."""
    check = service_check(layout, detail="gui/501: running; the installed service serves /x")
    assert status_of(check) is Status.OK
    assert "serves /x" in check.detail


def test_fake_service_state_matches_the_real_one():
    """The fake has exactly the fields of loractl.launchd's ServiceState, so the tests hold."""
    interface = pytest.importorskip("loractl.launchd.interface")
    real = [item.name for item in dataclasses.fields(interface.ServiceState)]
    assert real == [item.name for item in dataclasses.fields(FakeServiceState)]


def test_service_reader_missing_warns_instead_of_crashing(layout, monkeypatch):
    """When loractl.launchd cannot be imported, the check warns with the import error."""
    monkeypatch.setitem(sys.modules, "loractl.launchd", None)
    check = doctor.check_service(mac_context(layout, service_state=None))
    assert status_of(check) is Status.WARN
    assert "loractl.launchd" in check.detail


def test_service_manager_error_warns_instead_of_crashing(layout):
    """When querying launchctl raises, the check warns with the reason."""

    def broken(layout):
        raise FileNotFoundError(2, "No such file or directory", "launchctl")

    check = doctor.check_service(mac_context(layout, service_state=broken))
    assert status_of(check) is Status.WARN
    assert "launchctl" in check.detail and "launchctl" in check.fix


# -- folders, sockets, disk ------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a folder to another user")
def test_home_owned_by_another_user_fails(layout):
    """A home folder owned by another uid fails with a chown fix."""
    os.chown(layout.home, 65534, -1)
    check = doctor.check_home_folder(mac_context(layout))
    assert status_of(check) is Status.FAIL
    assert "uid 65534" in check.detail and "chown" in check.fix


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a folder to another user")
def test_runtime_folder_owned_by_another_user_fails(layout):
    """A runtime folder squatted by another uid (it lives in /tmp) fails."""
    os.chown(layout.runtime.parent, 65534, -1)
    check = doctor.check_runtime_folder(mac_context(layout))
    assert status_of(check) is Status.FAIL
    assert "uid 65534" in check.detail


def test_world_writable_home_fails(layout):
    """A home others can write to fails with a chmod go-w fix."""
    os.chmod(layout.home, 0o777)
    check = doctor.check_home_folder(mac_context(layout))
    assert status_of(check) is Status.FAIL
    assert "0777" in check.detail and "chmod go-w" in check.fix


def test_runtime_folder_open_to_others_fails(layout):
    """A runtime folder with mode 0777 fails: it must be 0700."""
    os.chmod(layout.runtime.parent, 0o777)
    check = doctor.check_runtime_folder(mac_context(layout))
    assert status_of(check) is Status.FAIL
    assert "chmod 700" in check.fix


def test_socket_folder_readable_by_others_fails(layout):
    """Even a read-only 0755 socket folder fails: only 0700 keeps others off the sockets."""
    os.chmod(layout.runtime, 0o755)
    check = doctor.check_socket_folder(mac_context(layout))
    assert status_of(check) is Status.FAIL
    assert "0755" in check.detail


def test_folders_not_created_yet_are_ok(tmp_path, monkeypatch):
    """Before the first start nothing exists, which is not a problem."""
    monkeypatch.setenv("LORACTL_RUNTIME_DIR", str(tmp_path / "rt"))
    context = mac_context(Layout.at(tmp_path / "home"))
    for check in (doctor.check_home_folder, doctor.check_runtime_folder, doctor.check_inbox):
        assert status_of(check(context)) is Status.OK


def test_long_runtime_dir_fails_the_socket_path(layout, monkeypatch):
    """A very long LORACTL_RUNTIME_DIR makes ipc:// paths too long, with the fix to shorten it."""
    monkeypatch.setenv("LORACTL_RUNTIME_DIR", "/tmp/" + "r" * 120)
    check = doctor.check_socket_path(mac_context(layout))
    assert status_of(check) is Status.FAIL
    assert "Set LORACTL_RUNTIME_DIR to a shorter path" in check.fix


@pytest.mark.parametrize(
    ("platform", "path_bytes", "expected"),
    [
        ("darwin", 103, Status.OK),
        ("darwin", 104, Status.FAIL),
        ("linux", 104, Status.OK),
        ("linux", 107, Status.OK),
        ("linux", 108, Status.FAIL),
    ],
)
def test_socket_path_limit_per_platform(layout, monkeypatch, platform, path_bytes, expected):
    """Socket paths must be under 104 bytes on macOS and under 108 on Linux."""
    # The longest endpoint is <root>/<10-char digest>/telemetry: the root plus 21 bytes.
    root = "/tmp/" + "r" * (path_bytes - 21 - len("/tmp/"))
    monkeypatch.setenv("LORACTL_RUNTIME_DIR", root)
    assert len(layout.telemetry.removeprefix("ipc://")) == path_bytes
    check = doctor.check_socket_path(mac_context(layout, platform=platform))
    assert status_of(check) is expected


def test_nearly_full_disk_fails(layout):
    """Under 1 GiB free in the home fails."""
    check = doctor.check_disk_home(mac_context(layout, statvfs=free_space(home=512 * 1024**2)))
    assert status_of(check) is Status.FAIL
    assert "0.5 GiB free" in check.detail


def test_low_disk_warns(layout):
    """Between 1 and 5 GiB free warns."""
    check = doctor.check_disk_home(mac_context(layout, statvfs=free_space(home=3 * GIB)))
    assert status_of(check) is Status.WARN


def test_adapter_folder_is_measured_on_its_own(layout):
    """A full volume under home/jobs fails the adapters check while the home is fine."""
    context = mac_context(layout, statvfs=free_space(jobs=100 * 1024**2))
    assert status_of(doctor.check_disk_home(context)) is Status.OK
    adapters = doctor.check_disk_adapters(context)
    assert status_of(adapters) is Status.FAIL
    assert str(layout.jobs) in adapters.detail


def test_disk_of_a_missing_folder_is_read_from_its_parent(tmp_path):
    """A home that does not exist yet is measured on the volume that will hold it."""
    seen = []

    def statvfs(path):
        seen.append(path)
        return SimpleNamespace(f_bavail=10**9, f_frsize=4096)

    context = mac_context(Layout.at(tmp_path / "not" / "yet"), statvfs=statvfs)
    assert status_of(doctor.check_disk_adapters(context)) is Status.OK
    assert seen == [str(tmp_path)]


# -- pidfile and inbox -----------------------------------------------------------------------


def test_stale_pidfile_warns(layout):
    """A pidfile naming a pid whose lock nobody holds is reported as stale."""
    layout.pidfile.write_text("48213\n")
    check = doctor.check_pidfile(mac_context(layout))
    assert status_of(check) is Status.WARN
    assert "stale" in check.detail and "48213" in check.detail


def test_locked_pidfile_means_a_running_supervisor(layout):
    """A pidfile whose lock is held is a live supervisor: ok, and the lock is left alone."""
    fd = os.open(layout.pidfile, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"777\n")
        check = doctor.check_pidfile(mac_context(layout))
        assert status_of(check) is Status.OK
        assert "pid 777" in check.detail
    finally:
        os.close(fd)


def test_pidfile_check_releases_its_probe_lock(layout):
    """After the check, a supervisor can still take the exclusive lock."""
    layout.pidfile.write_text("48213\n")
    doctor.check_pidfile(mac_context(layout))
    fd = os.open(layout.pidfile, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_inbox_that_is_a_file_fails(layout):
    """An inbox replaced by a plain file cannot be listed, even by root, and fails."""
    layout.inbox.rmdir()
    layout.inbox.write_text("not a folder")
    check = doctor.check_inbox(mac_context(layout))
    assert status_of(check) is Status.FAIL
    assert "cannot list" in check.detail


def test_inbox_that_is_a_dangling_symlink_fails(layout, tmp_path):
    """An inbox symlinked to a folder that is gone fails and names the missing target."""
    layout.inbox.rmdir()
    layout.inbox.symlink_to(tmp_path / "unmounted-volume" / "inbox")
    check = doctor.check_inbox(mac_context(layout))
    assert status_of(check) is Status.FAIL
    assert "unmounted-volume" in check.detail


def test_inbox_counts_waiting_files(layout):
    """A readable inbox is ok and says how many files wait in it."""
    (layout.inbox / "job.yaml").write_text("model: x\n")
    check = doctor.check_inbox(mac_context(layout))
    assert status_of(check) is Status.OK
    assert "1 file(s) waiting" in check.detail


# -- macOS power -----------------------------------------------------------------------------


def test_running_on_battery_warns(layout):
    """`pmset -g batt` drawing from Battery Power warns with the charge level."""
    context = mac_context(layout, runner=mac_runner(batt="pmset_batt_battery.txt"))
    check = doctor.check_power_source(context)
    assert status_of(check) is Status.WARN
    assert check.detail == "on Battery Power, 87% discharging"


@pytest.mark.parametrize("fixture", ["pmset_batt_ac_laptop.txt", "pmset_batt_ac_desktop.txt"])
def test_ac_power_is_ok(layout, fixture):
    """AC power is ok on a laptop and on a Mac without a battery."""
    check = doctor.check_power_source(mac_context(layout, runner=mac_runner(batt=fixture)))
    assert status_of(check) is Status.OK


@pytest.mark.parametrize("fixture", ["pmset_g_low_power.txt", "pmset_g_powermode_low.txt"])
def test_low_power_mode_warns(layout, fixture):
    """Low Power Mode warns, whether pmset calls it lowpowermode or powermode."""
    check = doctor.check_low_power_mode(mac_context(layout, runner=mac_runner(settings=fixture)))
    assert status_of(check) is Status.WARN
    assert "lowpowermode 0" in check.fix


def test_unreadable_pmset_warns(layout):
    """A pmset that fails is reported, not mistaken for a healthy state."""
    runner = FakeRunner({("pmset", "-g", "batt"): (127, "", "pmset: not found")})
    check = doctor.check_power_source(mac_context(layout, runner=runner))
    assert status_of(check) is Status.WARN


def test_power_checks_skip_cleanly_off_macos(layout):
    """Off macOS the power checks are ok, say so, and never run pmset."""
    runner = FakeRunner()
    context = mac_context(layout, platform="linux", runner=runner)
    for check in (doctor.check_power_source(context), doctor.check_low_power_mode(context)):
        assert status_of(check) is Status.OK
        assert check.detail == "not applicable on linux"
    assert runner.calls == []


# -- real processes --------------------------------------------------------------------------


def test_real_probe_reports_the_device():
    """The real child-process probe imports mlx and reports the default device."""
    probe = doctor.probe_device(doctor.run_command)
    assert not probe.error, probe.error
    assert probe.device in ("cpu", "gpu")
    assert probe.backend in ("cpu", "metal", "cuda")
    assert probe.info.get("device_name") or probe.info.get("architecture")


def test_client_never_imports_mlx(tmp_path):
    """Importing the doctor and running every check leaves mlx out of the client process."""
    script = (
        "import sys\n"
        "import loractl.client.doctor as doctor\n"
        "from loractl.paths import Layout\n"
        "assert 'mlx' not in sys.modules\n"
        f"checks = doctor.run_checks(doctor.Context(Layout.at({str(tmp_path)!r})))\n"
        "assert [c for c in checks if c.name == 'device'][0].detail\n"
        "assert not [m for m in sys.modules if m == 'mlx' or m.startswith(('mlx.', 'mlx_lm'))]\n"
    )
    env = {**os.environ, "LORACTL_RUNTIME_DIR": str(tmp_path / "rt")}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
