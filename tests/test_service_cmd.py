"""Tests for `loractl daemon install|uninstall|start|restart` and service_status.

The commands run through click on a small `daemon` group built with ``register``, exactly as the
CLI adds them; a hand-written fake runner stands in for launchctl, systemctl and loginctl.
"""

from __future__ import annotations

import json
import plistlib
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from conftest import FakeRunner
from loractl.client.service_cmd import RUNNER_KEY, register, service_status
from loractl.launchd import LAUNCHD, SYSTEMD, build_definition, default_target, definition_path
from loractl.paths import Layout
from loractl.protocol import ClientExit

USER_MANAGER = (0, "Version=252\n", "")
NO_BUS = (1, "", "Failed to connect to bus: No medium found\n")


@pytest.fixture(autouse=True)
def user_home(user_home_folder) -> Path:
    return user_home_folder


@pytest.fixture
def layout(tmp_path) -> Layout:
    return Layout.at(tmp_path / "home")


def daemon_group(layout: Layout, runner: FakeRunner | None = None) -> click.Group:
    """A `daemon` group like the CLI's: the layout in ctx.obj, the fake runner in ctx.meta."""

    @click.group()
    @click.pass_context
    def daemon(ctx) -> None:
        ctx.obj = layout
        if runner is not None:
            ctx.meta[RUNNER_KEY] = runner

    register(daemon)
    return daemon


def invoke(layout: Layout, args: list[str], runner: FakeRunner | None = None):
    return CliRunner().invoke(daemon_group(layout, runner), args)


def files_under(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file())


def test_register_adds_the_service_commands():
    """register adds install, uninstall, start and restart, each with --json."""
    group = click.Group("daemon")
    register(group)
    assert {"install", "uninstall", "start", "restart"} <= set(group.commands)
    for command in group.commands.values():
        assert "as_json" in {param.name for param in command.params}


def test_dry_run_launchd_prints_the_exact_plist_and_touches_nothing(layout, user_home):
    """--dry-run --target launchd prints, on any OS, the plist an install would write."""
    result = invoke(layout, ["install", "--dry-run", "--target", "launchd"])
    assert result.exit_code == 0, result.output
    assert result.stdout.encode() == build_definition(layout, target=LAUNCHD).render()
    assert plistlib.loads(result.stdout.encode())["ProcessType"] == "Interactive"
    assert str(definition_path(LAUNCHD)) in result.stderr
    assert files_under(user_home) == []
    assert not layout.home.exists()


def test_dry_run_systemd_prints_the_exact_unit(layout, user_home):
    """--dry-run --target systemd prints the unit and writes nothing."""
    result = invoke(layout, ["install", "--dry-run", "--target", "systemd"])
    assert result.exit_code == 0, result.output
    assert result.stdout.encode() == build_definition(layout, target=SYSTEMD).render()
    assert files_under(user_home) == []


def test_dry_run_json_carries_path_and_content(layout):
    """--dry-run --json reports the target, the path and the content."""
    result = invoke(layout, ["install", "--dry-run", "--target", "launchd", "--json"])
    data = json.loads(result.stdout)
    assert data["dry_run"] is True and data["target"] == LAUNCHD
    assert data["unit_path"] == str(definition_path(LAUNCHD))
    assert plistlib.loads(data["content"].encode())["Label"] == "io.loractl.supervisor"


def test_dry_run_default_target_is_this_os(layout):
    """Without --target the dry run renders this OS's service file."""
    data = json.loads(invoke(layout, ["install", "--dry-run", "--json"]).stdout)
    assert data["target"] == default_target()


def test_install_without_user_systemd_prints_one_line(layout):
    """No user bus: install exits non-zero with one `loractl: ...` line naming `daemon run`."""
    runner = FakeRunner(show=[NO_BUS])
    result = invoke(layout, ["install", "--target", "systemd"], runner)
    assert result.exit_code == ClientExit.REFUSED
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("loractl: no systemd --user manager")
    assert "loractl daemon run" in lines[0]
    assert not definition_path(SYSTEMD).exists()


def test_install_error_with_json_is_a_json_object(layout):
    """With --json a failure is one JSON object with the exit code and the reason."""
    runner = FakeRunner(show=[NO_BUS])
    result = invoke(layout, ["install", "--target", "systemd", "--json"], runner)
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["error"] == ClientExit.REFUSED
    assert "Failed to connect to bus" in data["reason"]


def test_invalid_label_is_a_usage_error(layout):
    """A label that is not reverse-DNS exits with the usage code in one line."""
    result = invoke(layout, ["install", "--dry-run", "--label", "loractl"])
    assert result.exit_code == ClientExit.USAGE
    assert result.stderr.startswith("loractl: label 'loractl' is not reverse-DNS")


def test_install_systemd_through_the_cli(layout):
    """install --target systemd writes the unit, enables it and shows the linger hint."""
    runner = FakeRunner(show=[USER_MANAGER], show_user=[(0, "Linger=no\n", "")])
    result = invoke(layout, ["install", "--target", "systemd"], runner)
    assert result.exit_code == 0, result.output
    assert definition_path(SYSTEMD).exists()
    assert "enable --now loractl.service" in result.stdout
    assert "loginctl enable-linger" in result.stdout


def test_install_launchd_through_the_cli_off_macos_is_refused_in_one_line(layout):
    """install --target launchd off macOS fails in one line and points at --dry-run."""
    if default_target() == LAUNCHD:
        pytest.skip("this is macOS, where launchd installs are real")
    runner = FakeRunner()
    result = invoke(layout, ["install", "--target", "launchd"], runner)
    assert result.exit_code == ClientExit.REFUSED
    assert len(result.stderr.splitlines()) == 1 and "--dry-run" in result.stderr
    assert runner.calls == [] and not definition_path(LAUNCHD).exists()


def test_uninstall_start_restart_through_the_cli_with_json(layout):
    """uninstall, start and restart report what they ran, as JSON."""
    invoke(layout, ["install", "--target", "systemd"], FakeRunner())
    runner = FakeRunner()
    for command in ("start", "restart", "uninstall"):
        result = invoke(layout, [command, "--target", "systemd", "--json"], runner)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["action"] == command
    ran = [" ".join(argv) for argv in runner.calls]
    assert "systemctl --user start loractl.service" in ran
    assert "systemctl --user restart loractl.service" in ran
    assert "systemctl --user disable --now loractl.service" in ran
    assert not definition_path(SYSTEMD).exists()


def test_start_before_install_says_to_install(layout):
    """start with no unit installed fails in one line telling the user to install."""
    result = invoke(layout, ["start", "--target", "systemd"], FakeRunner())
    assert result.exit_code == ClientExit.REFUSED
    assert "loractl daemon install" in result.stderr


def test_service_status_is_json_able(layout):
    """service_status returns the manager's view as a plain, JSON-serializable dict."""
    shown = "LoadState=loaded\nActiveState=active\nMainPID=99\nExecMainStatus=0\n"
    status = service_status(layout, target=SYSTEMD, runner=FakeRunner(show=[(0, shown, "")]))
    assert json.loads(json.dumps(status)) == status
    assert status["running"] is True and status["pid"] == 99 and status["target"] == SYSTEMD
    assert set(status) == {
        "target",
        "label",
        "unit_path",
        "installed",
        "loaded",
        "running",
        "pid",
        "last_exit",
        "process_type",
        "detail",
    }
