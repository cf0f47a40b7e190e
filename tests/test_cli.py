"""Tests for the loractl command line (commands that need no daemon)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from loractl.client.cli import main
from loractl.client.train_cmd import overrides_from_flags, parse_assignments, schema_flags
from loractl.config import load_config
from loractl.protocol import ExitCode


@pytest.fixture
def job(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "data").mkdir()
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"model": "model", "data": "data"}))
    return path


def flag_value(info, tmp_path):
    """A non-default command-line string for a schema field, and the value it must become."""
    kind = info.kind.rstrip("?")
    if info.name == "resume_adapter_file":
        target = tmp_path / "start.safetensors"
        target.write_bytes(b"x")
        return str(target), str(target)
    if kind.startswith("path"):
        target = tmp_path / f"dir-{info.name}"
        target.mkdir(exist_ok=True)
        return str(target), str(target)
    if info.name == "report_to":
        return "wandb", "wandb"
    if kind.startswith("choice:"):
        choice = next(c for c in kind.split(":", 1)[1].split("|") if c != info.default)
        return choice, choice
    if kind == "bool":
        return (not info.default), (not info.default)
    if kind == "int":
        return "70", 70
    if kind == "float":
        return "2.5", 2.5
    if kind == "size":
        return "2MB", 2_000_000  # decimal units, as mlx-lm parses them
    return "abc", "abc"


def test_every_scalar_schema_field_is_a_train_flag_that_reaches_the_config(
    job, tmp_path, monkeypatch
):
    """Each scalar schema field has a `train` flag, and its value arrives in the config."""
    # report_to=wandb is only valid where wandb is installed; an empty package stands in.
    (tmp_path / "site" / "wandb").mkdir(parents=True)
    (tmp_path / "site" / "wandb" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    flags = schema_flags()
    assert {"batch_size", "max_seq_length", "grad_accumulation_steps", "memory_budget_mb"} <= {
        info.name for info in flags
    }
    option_names = {p.name for p in main.get_command(None, "train").params}
    for info in flags:
        assert info.name in option_names
        raw, expected = flag_value(info, tmp_path)
        cfg = load_config(job, overrides_from_flags({info.name: raw}))
        assert cfg.to_dict()[info.name] == expected, info.name


def test_set_assignments_nest_and_parse_yaml_values():
    """--set a.b=4 becomes {'a': {'b': 4}} with YAML typing."""
    assert parse_assignments(("lora_parameters.rank=4", "grad_checkpoint=true")) == {
        "lora_parameters": {"rank": 4},
        "grad_checkpoint": True,
    }


def test_config_validate_reports_errors_with_exit_78(tmp_path):
    """`config validate` names the bad key in one line and exits 78."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\ndata: d\nbatch_sise: 2\n")
    result = CliRunner().invoke(main, ["config", "validate", str(bad)])
    assert result.exit_code == ExitCode.CONFIG_ERROR
    assert "batch_size" in result.output
    assert "Traceback" not in result.output


def test_config_validate_json_shows_the_effective_ladder(job):
    """`config validate --json` prints the config and the ladder it would use."""
    result = CliRunner().invoke(main, ["config", "validate", "--json", str(job)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["ok"] is True
    assert data["config"]["batch_size"] == 4
    assert isinstance(data["ladder"], list)


def test_version_json():
    """`version --json` prints the package and protocol versions."""
    result = CliRunner().invoke(main, ["version", "--json"])
    data = json.loads(result.output)
    assert data["version"] and data["protocol"] == 1


def test_the_client_imports_no_mlx():
    """Importing the CLI and building its commands pulls in neither mlx nor mlx_lm."""
    code = (
        "import sys, loractl.client.cli as c, loractl.client.train_cmd as t; t.schema_flags(); "
        "print([m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_a_permission_error_is_one_line_not_a_traceback(tmp_path):
    """A file or folder the user may not touch ends the command with one line naming it and
    exit 5, from any command of the group."""
    import click

    from loractl.client.cli import LazyGroup

    @click.group(cls=LazyGroup)
    def group():
        pass

    @group.command()
    def touch():
        raise PermissionError(13, "Permission denied", str(tmp_path / "locked"))

    result = CliRunner().invoke(group, ["touch"])
    assert result.exit_code == 5
    assert "Traceback" not in result.output
    assert result.output.strip() == (
        f"loractl: permission denied: {tmp_path / 'locked'} (Permission denied); "
        "check its owner and mode"
    )


def test_config_validate_shows_the_warnings_and_still_passes(tmp_path):
    """A key mlx_lm.lora ignores is a warning: on stderr, in --json, exit 0."""
    (tmp_path / "model").mkdir()
    (tmp_path / "data").mkdir()
    path = tmp_path / "job.yaml"
    path.write_text("model: model\ndata: data\nwandb_run_name: mine\n")
    result = CliRunner().invoke(main, ["config", "validate", str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [w for w in data["warnings"] if "wandb_run_name" in w]
    result = CliRunner().invoke(main, ["config", "validate", str(path)])
    assert result.exit_code == 0
    assert "warning" in result.stderr and "wandb_run_name" in result.stderr


def test_daemon_keys_makes_the_keys_once_and_names_what_other_macs_need(tmp_path):
    """`daemon keys` creates this install's CURVE keys (0600) once, lists the two files each
    other Mac needs, and refuses keys others can read with exit 78 and the fix."""
    home = tmp_path / "home"
    runner = CliRunner()
    first = runner.invoke(main, ["--home", str(home), "daemon", "keys", "--json"])
    assert first.exit_code == 0, first.output
    data = json.loads(first.output)
    assert [p.rsplit("/", 1)[1] for p in data["copy_to_each_mac"]] == [
        "client.key_secret",
        "server.key",
    ]
    for path in data["copy_to_each_mac"]:
        assert (Path(path).stat().st_mode & 0o777) == 0o600
    again = runner.invoke(main, ["--home", str(home), "daemon", "keys", "--json"])
    assert json.loads(again.output)["server_public_key"] == data["server_public_key"]
    Path(data["copy_to_each_mac"][0]).chmod(0o640)
    refused = runner.invoke(main, ["--home", str(home), "daemon", "keys"])
    assert refused.exit_code == 78 and "chmod 600" in refused.output


@pytest.mark.parametrize("command", ["pause", "resume", "wait"])
def test_job_or_all_is_required_and_not_both(command, tmp_path):
    """pause, resume and wait take a JOB or --all: neither, or both, is one line and exit 2
    before any supervisor is asked."""
    runner = CliRunner()
    home = ["--home", str(tmp_path / "nowhere")]
    neither = runner.invoke(main, [*home, command])
    assert neither.exit_code == 2
    assert neither.stderr.strip() == "loractl: name a JOB, or pass --all for every job"
    both = runner.invoke(main, [*home, command, "j1", "--all", "--json"])
    assert both.exit_code == 2
    assert json.loads(both.stdout)["reason"] == (
        "name a JOB or pass --all, not both (got 'j1' and --all)"
    )


def test_the_client_imports_none_of_the_trainers_side():
    """No client module, imported and with its commands built, imports loractl.daemon."""
    code = (
        "import importlib, pkgutil, sys, loractl.client as c\n"
        "for m in pkgutil.iter_modules(c.__path__):\n"
        "    importlib.import_module('loractl.client.' + m.name)\n"
        "import loractl.client.cli as cli\n"
        "for name in cli.main.list_commands(None):\n"
        "    cli.main.get_command(None, name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('loractl.daemon')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_demo_prepare_builds_the_workspace_in_a_child(tmp_path):
    """`demo --prepare --json` prints the model, data and job.yaml it built, all present."""
    result = subprocess.run(
        [sys.executable, "-m", "loractl.client.cli", "demo", str(tmp_path / "ws"), "--prepare"]
        + ["--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    paths = json.loads(result.stdout)
    assert sorted(paths) == ["config", "data", "model"]
    assert all(Path(p).exists() for p in paths.values())
    assert load_config(paths["config"]).name


@pytest.mark.parametrize(
    "args",
    [
        ("priority", "j1", "99999999999999999999"),
        ("priority", "j1", "--", "-2147483649"),
        ("submit", "--priority", "2147483648", "job.yaml"),
        ("logs", "j1", "-n", "-5"),
        ("logs", "j1", "-n", "99999999999999999999"),
    ],
)
def test_an_absurd_number_is_refused_in_one_line_with_exit_2(tmp_path, args):
    """A priority outside 32 bits or a negative or huge -n: one line on stderr, exit 2, no
    traceback (and nothing sent to a supervisor)."""
    env = {k: v for k, v in os.environ.items() if k != "LORACTL_HOME"}
    result = subprocess.run(
        [sys.executable, "-m", "loractl.client.cli", "--home", str(tmp_path / "home"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("loractl: ") and "must be between" in result.stderr
