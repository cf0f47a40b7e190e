"""Tests for loractl.launchd: the plist and unit it renders, and how it drives launchctl/systemctl.

launchctl's answers come from tests/fixtures/macos/launchctl_errors.txt through a hand-written
fake runner, so the macOS paths are checked on Linux too.
"""

from __future__ import annotations

import configparser
import os
import plistlib
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FIXTURES, OK, FakeRunner
from loractl.atomic import atomic_write_bytes as write_atomically
from loractl.launchd import (
    DEFAULT_LABEL,
    LAUNCHD,
    SYSTEMD,
    InvalidLabel,
    LaunchdService,
    NoUserSystemd,
    ServiceError,
    SystemdService,
    build_definition,
    default_target,
    definition_path,
    parse_launchctl_print,
    service_state,
)
from loractl.launchd.systemd import _read_unit
from loractl.paths import Layout

GOLDEN = FIXTURES / "launchd"
UID = 501

PLIST_TYPES = {
    "Label": str,
    "ProgramArguments": list,
    "RunAtLoad": bool,
    "KeepAlive": dict,
    "ThrottleInterval": int,
    "ProcessType": str,
    "ExitTimeOut": int,
    "StandardOutPath": str,
    "StandardErrorPath": str,
    "EnvironmentVariables": dict,
}


def launchctl_errors() -> dict[int, str]:
    """The fixture's `exit code<TAB>stderr` lines, by exit code."""
    errors = {}
    for line in (FIXTURES / "macos" / "launchctl_errors.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            code, message = line.split("\t", 1)
            errors[int(code)] = message
    return errors


ERRORS = launchctl_errors()


def failing(code: int) -> tuple[int, str, str]:
    return code, "", ERRORS[code] + "\n"


@pytest.fixture(autouse=True)
def user_home(user_home_folder) -> Path:
    return user_home_folder


@pytest.fixture
def fake_python(tmp_path) -> Path:
    """A stand-in interpreter at a known place, so golden files do not depend on the machine."""
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    return python


@pytest.fixture
def env_home(tmp_path, monkeypatch) -> Layout:
    """A home chosen by LORACTL_HOME, as tests and users with a custom home have it."""
    home = tmp_path / "home"
    monkeypatch.setenv("LORACTL_HOME", str(home))
    return Layout.at(home)


def normalized(text: str, tmp_path: Path) -> str:
    return text.replace(str(tmp_path.resolve()), "<TMP>").replace(str(tmp_path), "<TMP>")


def launchd_service(runner: FakeRunner, slept: list[float] | None = None) -> LaunchdService:
    slept = [] if slept is None else slept
    return LaunchdService(runner=runner, uid=UID, sleep=slept.append, platform="darwin")


# -- the plist ---------------------------------------------------------------------------------


def test_plist_matches_golden_file(env_home, fake_python, tmp_path):
    """The plist for a LORACTL_HOME home is byte-for-byte the golden file (paths normalized)."""
    definition = build_definition(env_home, target=LAUNCHD, python=fake_python)
    rendered = normalized(definition.render().decode(), tmp_path)
    assert rendered == (GOLDEN / "io.loractl.supervisor.plist").read_text()


def test_plist_with_explicit_home_matches_golden_file(env_home, fake_python, tmp_path):
    """A home other than the default is passed as --home, pinned by its own golden file."""
    other = Layout.at(tmp_path / "other home")
    definition = build_definition(
        other, target=LAUNCHD, label="io.example.night", python=fake_python
    )
    rendered = normalized(definition.render().decode(), tmp_path)
    assert rendered == (GOLDEN / "explicit-home.plist").read_text()


def test_plist_has_exactly_the_documented_keys_and_types(env_home):
    """The plist parses with plistlib and holds exactly the documented keys, each typed right."""
    plist = plistlib.loads(build_definition(env_home, target=LAUNCHD).render())
    assert set(plist) == set(PLIST_TYPES)
    for key, kind in PLIST_TYPES.items():
        assert type(plist[key]) is kind, key
    assert plist["Label"] == DEFAULT_LABEL
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ThrottleInterval"] >= 10
    assert plist["ExitTimeOut"] >= 60
    assert plist["StandardOutPath"] == str(env_home.logs / "supervisor.stdout.log")
    assert plist["StandardErrorPath"] == str(env_home.logs / "supervisor.stderr.log")
    assert plist["EnvironmentVariables"]["LORACTL_HOME"] == str(env_home.home)
    assert all(isinstance(arg, str) for arg in plist["ProgramArguments"])


def test_process_type_is_interactive(env_home):
    """ProcessType is Interactive, so macOS does not throttle the trainer's Metal work."""
    plist = plistlib.loads(build_definition(env_home, target=LAUNCHD).render())
    assert plist["ProcessType"] == "Interactive"


def test_program_arguments_run_this_interpreter(env_home):
    """ProgramArguments[0] is this installation's interpreter, exists, and its bin is on PATH."""
    plist = plistlib.loads(build_definition(env_home, target=LAUNCHD).render())
    python = plist["ProgramArguments"][0]
    assert python == os.path.abspath(sys.executable)
    assert Path(python).exists()
    assert plist["ProgramArguments"][1:] == ["-m", "loractl.supervisor", "--wait-for-lock"]
    assert plist["EnvironmentVariables"]["PATH"].split(":")[0] == str(Path(python).parent)


def test_default_home_passes_no_home_and_no_environment_override(user_home):
    """With the platform's default home, neither --home nor LORACTL_HOME is written."""
    layout = Layout.at(None)
    plist = plistlib.loads(build_definition(layout, target=LAUNCHD).render())
    assert "--home" not in plist["ProgramArguments"]
    assert set(plist["EnvironmentVariables"]) == {"PATH"}
    assert plist["StandardOutPath"] == str(layout.logs / "supervisor.stdout.log")
    assert (
        definition_path(LAUNCHD) == user_home / "Library/LaunchAgents/io.loractl.supervisor.plist"
    )


def test_missing_interpreter_is_refused(env_home, tmp_path):
    """A service pointing at an interpreter that does not exist is never rendered."""
    with pytest.raises(ServiceError, match="does not exist"):
        build_definition(env_home, target=LAUNCHD, python=tmp_path / "gone" / "python")


@pytest.mark.parametrize("label", ["loractl", "io loractl.x", "io.loractl.", ""])
def test_label_must_be_reverse_dns(env_home, label):
    """Labels that are not reverse-DNS are refused before anything is written."""
    with pytest.raises(InvalidLabel):
        build_definition(env_home, target=LAUNCHD, label=label)


def test_default_target_follows_the_os():
    """macOS gets launchd, every other OS systemd."""
    assert default_target("darwin") == LAUNCHD
    assert default_target("linux") == SYSTEMD


def test_write_atomically_replaces_the_file_and_leaves_no_temporary(tmp_path):
    """The write replaces the old file whole, with mode 0644, and no temp file remains."""
    target = tmp_path / "new" / "folder" / "x.plist"
    write_atomically(target, b"old")
    write_atomically(target, b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["x.plist"]


# -- the systemd unit ----------------------------------------------------------------------------


def test_unit_matches_golden_file(env_home, fake_python, tmp_path):
    """The unit for a LORACTL_HOME home is byte-for-byte the golden file (paths normalized)."""
    definition = build_definition(env_home, target=SYSTEMD, python=fake_python)
    assert (
        normalized(definition.render().decode(), tmp_path)
        == (GOLDEN / "loractl.service").read_text()
    )


def test_unit_has_the_documented_keys(env_home, user_home):
    """The unit parses as INI and sets restart policy, stop timeout, environment and install."""
    definition = build_definition(env_home, target=SYSTEMD)
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string(definition.render().decode())
    unit, service = parser["Unit"], parser["Service"]
    assert unit["Description"]
    assert int(unit["StartLimitIntervalSec"]) > 0 and int(unit["StartLimitBurst"]) > 0
    assert service["Type"] == "simple"
    assert service["ExecStart"].split() == [
        os.path.abspath(sys.executable),
        "-m",
        "loractl.supervisor",
        "--wait-for-lock",
    ]
    assert service["Restart"] == "on-failure"
    assert int(service["RestartSec"]) > 0
    assert service["RestartPreventExitStatus"] == "3"
    assert int(service["TimeoutStopSec"]) >= 60
    assert f"LORACTL_HOME={env_home.home}" in service["Environment"]
    assert "PATH=" in service["Environment"]
    assert service["StandardOutput"] == service["StandardError"] == "journal"
    assert parser["Install"]["WantedBy"] == "default.target"
    assert definition.path == user_home / ".config/systemd/user/loractl.service"


def test_unit_quotes_spaces_percent_and_dollar(tmp_path, monkeypatch):
    """Paths with spaces, % and $ survive systemd's quoting and specifier rules."""
    home = tmp_path / "my home" / "100% $USER"
    monkeypatch.setenv("LORACTL_HOME", str(tmp_path / "env home"))
    definition = build_definition(Layout.at(home), target=SYSTEMD)
    text = definition.render().decode()
    assert "100%% $$USER" in text
    unit = tmp_path / "loractl.service"
    unit.write_text(text)
    argv, environment = _read_unit(unit)
    assert argv == definition.program_arguments
    assert environment == definition.environment


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_unit_passes_systemd_analyze_verify(tmp_path, monkeypatch):
    """systemd itself accepts the unit: `systemd-analyze --user verify` reports nothing on it."""
    monkeypatch.setenv("LORACTL_HOME", str(tmp_path / "a home"))
    definition = build_definition(Layout.at(tmp_path / "100% other"), target=SYSTEMD)
    unit = tmp_path / "loractl.service"
    unit.write_bytes(definition.render())
    # --user needs a runtime folder, which a CI session without a login may lack.
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    done = subprocess.run(
        ["systemd-analyze", "--user", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
    )
    if "Failed to initialize manager" in done.stderr:
        pytest.skip(f"systemd-analyze cannot run a user manager here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert str(unit) not in done.stderr


# -- launchctl ---------------------------------------------------------------------------------


def test_install_writes_the_plist_then_bootstraps_the_gui_domain(env_home):
    """Install writes the plist (and the logs folder), then bootstraps it into gui/$UID."""
    runner = FakeRunner()
    result = launchd_service(runner).install(build_definition(env_home, target=LAUNCHD))
    plist = definition_path(LAUNCHD)
    assert runner.calls == [["launchctl", "bootstrap", f"gui/{UID}", str(plist)]]
    assert plistlib.loads(plist.read_bytes())["ProcessType"] == "Interactive"
    assert env_home.logs.is_dir()
    assert result.domain == f"gui/{UID}"


def test_bootstrap_125_retries_in_the_user_domain(env_home):
    """125 (no gui domain, e.g. over SSH) makes install use the user/$UID domain instead."""
    runner = FakeRunner(bootstrap=[failing(125)])
    result = launchd_service(runner).install(build_definition(env_home, target=LAUNCHD))
    assert runner.verbs() == [
        f"launchctl bootstrap gui/{UID} {definition_path(LAUNCHD)}",
        f"launchctl bootstrap user/{UID} {definition_path(LAUNCHD)}",
    ]
    assert result.domain == f"user/{UID}"
    assert any("user/501" in hint for hint in result.hints)


def test_bootstrap_5_boots_out_then_bootstraps_again(env_home):
    """5 (already loaded) boots the old service out and bootstraps the new plist."""
    runner = FakeRunner(bootstrap=[failing(5)])
    launchd_service(runner).install(build_definition(env_home, target=LAUNCHD))
    assert runner.verbs() == [
        f"launchctl bootstrap gui/{UID} {definition_path(LAUNCHD)}",
        f"launchctl bootout gui/{UID}/{DEFAULT_LABEL}",
        f"launchctl bootstrap gui/{UID} {definition_path(LAUNCHD)}",
    ]


def test_bootstrap_5_again_while_the_old_supervisor_stops_is_waited_out(env_home):
    """A 5 right after bootout (old supervisor still checkpointing) is retried, not fatal."""
    runner = FakeRunner(bootstrap=[failing(5), failing(5), failing(5)])
    slept: list[float] = []
    launchd_service(runner, slept).install(build_definition(env_home, target=LAUNCHD))
    assert [argv[1] for argv in runner.calls] == ["bootstrap", "bootout", *["bootstrap"] * 3]
    assert len(slept) == 2


def test_bootstrap_5_with_nothing_loaded_is_an_error_with_advice(env_home):
    """5 when bootout finds nothing loaded is a real failure: launchctl's text plus advice."""
    runner = FakeRunner(bootstrap=[failing(5), failing(5)], bootout=[failing(3)])
    with pytest.raises(ServiceError) as caught:
        launchd_service(runner).install(build_definition(env_home, target=LAUNCHD))
    message = str(caught.value)
    assert "Bootstrap failed: 5: Input/output error" in message
    assert "plutil -lint" in message and "loractl daemon run" in message
    assert "\n" not in message


def test_in_progress_36_is_retried_with_backoff_then_succeeds(env_home):
    """36 (operation in progress) is retried after growing pauses until launchctl succeeds."""
    runner = FakeRunner(bootstrap=[failing(36), failing(36)])
    slept: list[float] = []
    launchd_service(runner, slept).install(build_definition(env_home, target=LAUNCHD))
    assert [argv[1] for argv in runner.calls] == ["bootstrap"] * 3
    assert slept == sorted(slept) and len(slept) == 2 and all(0 < s <= 4 for s in slept)


def test_in_progress_36_that_never_ends_fails_with_launchctl_text(env_home):
    """A 36 that outlasts every retry ends as an error quoting launchctl."""
    runner = FakeRunner(bootstrap=[failing(36)] * 10)
    with pytest.raises(ServiceError, match="Operation now in progress"):
        launchd_service(runner).install(build_definition(env_home, target=LAUNCHD))
    assert len(runner.calls) == launchd_service(FakeRunner()).attempts


@pytest.mark.parametrize("code", [3, 113])
def test_other_fixture_errors_on_bootstrap_fail_with_launchctl_text_and_advice(env_home, code):
    """Codes with no meaning for bootstrap fail at once, quoting launchctl and saying what to do."""
    runner = FakeRunner(bootstrap=[failing(code)])
    with pytest.raises(ServiceError) as caught:
        launchd_service(runner).install(build_definition(env_home, target=LAUNCHD))
    assert ERRORS[code] in str(caught.value)
    assert f"({code})" in str(caught.value) and "launchctl print" in str(caught.value)
    assert len(runner.calls) == 1


@pytest.mark.parametrize("code", [3, 113])
def test_uninstall_tolerates_a_service_that_is_not_loaded(env_home, code):
    """Uninstall accepts 3 and 113 (not loaded) from bootout and still removes the plist."""
    service = launchd_service(FakeRunner())
    service.install(build_definition(env_home, target=LAUNCHD))
    runner = FakeRunner(bootout=[failing(code), failing(code)])
    result = launchd_service(runner).uninstall()
    assert runner.verbs() == [
        f"launchctl bootout gui/{UID}/{DEFAULT_LABEL}",
        f"launchctl bootout user/{UID}/{DEFAULT_LABEL}",
    ]
    assert not definition_path(LAUNCHD).exists()
    assert f"{DEFAULT_LABEL} was not loaded" in result.steps


def test_uninstall_boots_out_a_loaded_service_and_retries_36(env_home):
    """Uninstall retries a busy bootout and removes the plist once launchd lets go."""
    launchd_service(FakeRunner()).install(build_definition(env_home, target=LAUNCHD))
    runner = FakeRunner(bootout=[failing(36)])
    slept: list[float] = []
    launchd_service(runner, slept).uninstall()
    assert [argv[1] for argv in runner.calls] == ["bootout", "bootout"]
    assert len(slept) == 1
    assert not definition_path(LAUNCHD).exists()


def test_uninstall_over_ssh_uses_the_user_domain(env_home):
    """Uninstall over SSH (125 for gui) boots the service out of user/$UID."""
    runner = FakeRunner(bootout=[failing(125)])
    result = launchd_service(runner).uninstall()
    assert result.domain == f"user/{UID}"
    assert runner.verbs()[-1] == f"launchctl bootout user/{UID}/{DEFAULT_LABEL}"


def test_start_and_restart_kickstart_the_service(env_home):
    """start runs `kickstart`, restart `kickstart -k`, on gui/$UID/<label>."""
    runner = FakeRunner()
    launchd_service(runner).start()
    launchd_service(runner).start(restart=True)
    assert runner.verbs() == [
        f"launchctl kickstart gui/{UID}/{DEFAULT_LABEL}",
        f"launchctl kickstart -k gui/{UID}/{DEFAULT_LABEL}",
    ]


def test_start_when_not_installed_says_to_install(env_home):
    """start with no plist and nothing loaded (113) tells the user to install first."""
    runner = FakeRunner(kickstart=[failing(113), failing(113)])
    with pytest.raises(ServiceError, match="loractl daemon install"):
        launchd_service(runner).start()


def test_start_of_an_installed_but_unloaded_service_bootstraps_it(env_home):
    """start loads an installed plist that was booted out, instead of failing."""
    launchd_service(FakeRunner()).install(build_definition(env_home, target=LAUNCHD))
    runner = FakeRunner(kickstart=[failing(113), failing(113)])
    result = launchd_service(runner).start()
    assert runner.verbs()[-1] == f"launchctl bootstrap gui/{UID} {definition_path(LAUNCHD)}"
    assert result.action == "start"


def test_launchd_operations_refuse_other_systems(env_home):
    """On Linux a launchd install fails in one line and writes nothing."""
    runner = FakeRunner()
    service = LaunchdService(runner=runner, uid=UID, platform="linux")
    with pytest.raises(ServiceError, match="only on macOS"):
        service.install(build_definition(env_home, target=LAUNCHD))
    assert runner.calls == []
    assert not definition_path(LAUNCHD).exists()


# -- launchctl print -> ServiceState -----------------------------------------------------------


def test_parse_launchctl_print_reads_top_level_fields():
    """The parser reads top-level fields and ignores nested blocks."""
    fields = parse_launchctl_print((GOLDEN / "launchctl_print_running.txt").read_text())
    assert fields["state"] == "running"
    assert fields["pid"] == "4242"
    assert fields["last exit code"] == "1"
    assert "PATH" not in fields and "activate" not in fields


def test_state_of_a_running_agent(env_home):
    """A running agent: loaded, running, its pid and last exit, ProcessType from the plist."""
    launchd_service(FakeRunner()).install(build_definition(env_home, target=LAUNCHD))
    printed = (GOLDEN / "launchctl_print_running.txt").read_text()
    state = launchd_service(FakeRunner(print=[(0, printed, "")])).state(env_home)
    assert (state.installed, state.loaded, state.running) == (True, True, True)
    assert (state.pid, state.last_exit) == (4242, 1)
    assert state.process_type == "Interactive"
    assert state.target == LAUNCHD and state.label == DEFAULT_LABEL
    assert state.unit_path == str(definition_path(LAUNCHD))


def test_state_of_an_agent_that_exited(env_home):
    """An exited agent: loaded, not running, no pid, last exit code 78 from '78: EX_CONFIG'."""
    printed = (GOLDEN / "launchctl_print_exited.txt").read_text()
    state = launchd_service(FakeRunner(print=[(0, printed, "")])).state(env_home)
    assert (state.loaded, state.running, state.pid, state.last_exit) == (True, False, None, 78)
    assert state.installed is False and state.process_type is None


def test_state_113_means_not_loaded(env_home):
    """113 from print in both domains means not loaded."""
    runner = FakeRunner(print=[failing(113), failing(113)])
    state = launchd_service(runner).state(env_home)
    assert (state.installed, state.loaded, state.running) == (False, False, False)
    assert state.detail == "not installed"


def test_state_over_ssh_reads_the_user_domain(env_home):
    """125 for gui/$UID makes status ask user/$UID."""
    printed = (GOLDEN / "launchctl_print_running.txt").read_text()
    runner = FakeRunner(print=[failing(125), (0, printed, "")])
    state = launchd_service(runner).state(env_home)
    assert state.running and f"user/{UID}" in state.detail


def test_state_reads_process_type_from_the_installed_plist(env_home):
    """ProcessType comes from the plist on disk, so an old Background plist shows up."""
    path = definition_path(LAUNCHD)
    path.parent.mkdir(parents=True)
    path.write_bytes(plistlib.dumps({"Label": DEFAULT_LABEL, "ProcessType": "Background"}))
    state = launchd_service(FakeRunner(print=[failing(113), failing(113)])).state(env_home)
    assert state.process_type == "Background"
    assert state.detail == "not loaded"


def test_state_notes_a_service_installed_for_another_home(env_home, tmp_path):
    """A plist serving another home is called out in the detail."""
    other = Layout.at(tmp_path / "elsewhere")
    launchd_service(FakeRunner()).install(build_definition(other, target=LAUNCHD))
    state = launchd_service(FakeRunner(print=[failing(113), failing(113)])).state(env_home)
    assert f"serves {other.home}, not {env_home.home}" in state.detail


def test_service_state_defaults_to_this_os_and_never_raises_without_a_manager(env_home):
    """service_state picks this OS's target and reports a missing manager in its detail."""
    missing = (127, "", "launchctl: command not found")
    runner = FakeRunner(print=[missing], show=[(1, "", "Failed to connect to bus: No medium")])
    state = service_state(env_home, runner=runner)
    assert state.target == default_target()
    assert not state.loaded and state.detail


# -- systemd -----------------------------------------------------------------------------------

USER_MANAGER = (0, "Version=252\n", "")
NO_BUS = (1, "", "Failed to connect to bus: No medium found\n")


def test_systemd_install_reloads_enables_and_suggests_linger(env_home):
    """Install writes the unit, reloads, enables --now, and suggests enable-linger when off."""
    runner = FakeRunner(
        show=[USER_MANAGER], is_active=[(3, "", "")], show_user=[(0, "Linger=no\n", "")]
    )
    result = SystemdService(runner=runner, user="ada").install(
        build_definition(env_home, target=SYSTEMD)
    )
    assert runner.verbs() == [
        "systemctl show --property=Version",
        "systemctl is-active --quiet loractl.service",
        "systemctl daemon-reload",
        "systemctl enable --now loractl.service",
        "loginctl show-user ada -p Linger",
    ]
    assert (
        definition_path(SYSTEMD).read_bytes() == build_definition(env_home, target=SYSTEMD).render()
    )
    assert any("loginctl enable-linger ada" in hint for hint in result.hints)


def test_systemd_install_with_linger_on_needs_no_linger_hint(env_home):
    """With Linger=yes the result does not suggest enable-linger."""
    runner = FakeRunner(show=[USER_MANAGER], show_user=[(0, "Linger=yes\n", "")])
    result = SystemdService(runner=runner, user="ada").install(
        build_definition(env_home, target=SYSTEMD)
    )
    assert not any("enable-linger" in hint for hint in result.hints)


def test_systemd_reinstall_restarts_a_running_supervisor(env_home):
    """Reinstalling over an active unit restarts it, so the new definition takes effect."""
    runner = FakeRunner(show=[USER_MANAGER], is_active=[OK])
    SystemdService(runner=runner, user="ada").install(build_definition(env_home, target=SYSTEMD))
    assert "systemctl restart loractl.service" in runner.verbs()


@pytest.mark.parametrize(
    "probe",
    [NO_BUS, (127, "", "systemctl: command not found")],
    ids=["no-user-bus", "no-systemctl"],
)
def test_no_user_systemd_fails_in_one_line_and_writes_nothing(env_home, probe):
    """Without a user manager, install fails in one line pointing at `loractl daemon run`."""
    runner = FakeRunner(show=[probe])
    with pytest.raises(NoUserSystemd) as caught:
        SystemdService(runner=runner, user="ada").install(
            build_definition(env_home, target=SYSTEMD)
        )
    message = str(caught.value)
    assert "\n" not in message and "loractl daemon run" in message
    assert len(runner.calls) == 1
    assert not definition_path(SYSTEMD).exists()


def test_systemd_failure_quotes_systemctl(env_home):
    """A failing systemctl step raises with systemctl's own text and where to look."""
    runner = FakeRunner(
        show=[USER_MANAGER], enable=[(1, "", "Failed to enable unit: Access denied\n")]
    )
    with pytest.raises(ServiceError, match="Access denied.*journalctl --user -u loractl.service"):
        SystemdService(runner=runner, user="ada").install(
            build_definition(env_home, target=SYSTEMD)
        )


def test_systemd_uninstall_tolerates_a_missing_unit_and_removes_the_file(env_home):
    """Uninstall accepts 'does not exist' from disable, removes the unit and reloads."""
    SystemdService(runner=FakeRunner(show=[USER_MANAGER]), user="ada").install(
        build_definition(env_home, target=SYSTEMD)
    )
    missing = (1, "", "Failed to disable unit: Unit file loractl.service does not exist.\n")
    runner = FakeRunner(show=[USER_MANAGER], disable=[missing])
    result = SystemdService(runner=runner, user="ada").uninstall()
    assert not definition_path(SYSTEMD).exists()
    assert "loractl.service was not loaded" in result.steps
    assert runner.verbs()[-1] == "systemctl daemon-reload"


def test_systemd_start_and_restart(env_home):
    """start and restart map to systemctl --user start/restart of the unit."""
    SystemdService(runner=FakeRunner(show=[USER_MANAGER]), user="ada").install(
        build_definition(env_home, target=SYSTEMD)
    )
    runner = FakeRunner()
    SystemdService(runner=runner, user="ada").start()
    SystemdService(runner=runner, user="ada").start(restart=True)
    assert [verb for verb in runner.verbs() if "Version" not in verb] == [
        "systemctl start loractl.service",
        "systemctl restart loractl.service",
    ]


def test_systemd_state_parses_systemctl_show(env_home):
    """status reads LoadState, ActiveState, MainPID and ExecMainStatus from systemctl show."""
    shown = "MainPID=777\nExecMainStatus=0\nLoadState=loaded\nActiveState=active\n"
    runner = FakeRunner(show=[(0, shown, "")])
    state = SystemdService(runner=runner, user="ada").state(env_home)
    assert runner.verbs() == [
        "systemctl show loractl.service -p LoadState,ActiveState,MainPID,ExecMainStatus"
    ]
    assert (state.loaded, state.running, state.pid, state.last_exit) == (True, True, 777, 0)
    assert state.process_type is None and state.label == "loractl.service"


def test_systemd_state_of_a_failed_unit(env_home):
    """A failed unit is loaded, not running, with no pid and its exit status."""
    shown = "LoadState=loaded\nActiveState=failed\nMainPID=0\nExecMainStatus=1\n"
    state = SystemdService(runner=FakeRunner(show=[(0, shown, "")]), user="ada").state(env_home)
    assert (state.loaded, state.running, state.pid, state.last_exit) == (True, False, None, 1)
    assert "failed" in state.detail


# -- python -m loractl.supervisor ----------------------------------------------------------------


def test_supervisor_module_help_works():
    """`python -m loractl.supervisor --help` answers and documents --wait-for-lock and --home."""
    done = subprocess.run(
        [sys.executable, "-m", "loractl.supervisor", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "--wait-for-lock" in done.stdout and "--home" in done.stdout


def test_supervisor_module_passes_its_options_and_exit_code_through(monkeypatch, tmp_path):
    """The entry point hands --home and --wait-for-lock to service.main and returns its code."""
    from loractl.supervisor import __main__ as entry
    from loractl.supervisor import service

    received = []

    def fake_main(home, wait_for_lock=False):
        received.append((home, wait_for_lock))
        return 3

    monkeypatch.setattr(service, "main", fake_main)
    assert entry.main(["--home", str(tmp_path), "--wait-for-lock"]) == 3
    assert entry.main([]) == 3
    assert received == [(str(tmp_path), True), (None, False)]
