"""`loractl fit`: the pre-flight alone, rung by rung, on the tiny preset."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import make_job
from loractl.client.fit_cmd import parse_size_mb


def fit(config, *extra: str) -> subprocess.CompletedProcess:
    """Run `loractl fit CONFIG ...` as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "loractl.client.cli", "fit", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=240,
    )


def assert_adapters_untouched(config) -> None:
    """The job's adapter folder is never made, let alone written to."""
    adapters = config.parent / "adapters"
    assert not adapters.exists() or not any(adapters.iterdir())


def test_generous_budget_fits_on_rung_0(tiny_workspace, tmp_path):
    """With room to spare, rung 0 is measured and fits: exit 0."""
    config = make_job(tiny_workspace, tmp_path / "job")
    done = fit(config, "--budget", "64GB")
    assert done.returncode == 0, done.stderr
    assert "0     as submitted" in done.stdout
    assert "fits under the 65536 MB budget on rung 0" in done.stdout
    assert_adapters_untouched(config)


def test_budget_below_every_rung_fits_nowhere(tiny_workspace, tmp_path):
    """Under 1 MB no rung fits: the table says so and the exit is 1."""
    config = make_job(tiny_workspace, tmp_path / "job")
    done = fit(config, "--budget", "1MB")
    assert done.returncode == 1, done.stderr
    assert "nothing fits under the 1 MB budget" in done.stdout
    assert_adapters_untouched(config)


def test_json_output_parses(tiny_workspace, tmp_path):
    """--json gives the budget, every rung with measured or predicted peaks, and the verdict."""
    config = make_job(tiny_workspace, tmp_path / "job")
    done = fit(config, "--budget", "900", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["budget_mb"] == 900.0
    assert result["fits"] == 0
    rungs = result["rungs"]
    assert [row["rung"] for row in rungs] == list(range(len(rungs)))
    assert rungs[0]["fits"] is True and rungs[0]["measured_mb"] > 0
    assert all(row["predicted_mb"] for row in rungs)
    assert all(row["measured_mb"] is None for row in rungs[1:])
    assert_adapters_untouched(config)


def test_json_when_nothing_fits(tiny_workspace, tmp_path):
    """A budget below every rung measures more than rung 0 and reports no fit."""
    config = make_job(tiny_workspace, tmp_path / "job")
    done = fit(config, "--budget", "1MB", "--json")
    assert done.returncode == 1, done.stderr
    result = json.loads(done.stdout)
    assert result["fits"] is None
    assert sum(row["measured_mb"] is not None for row in result["rungs"]) >= 2
    assert not any(row["fits"] for row in result["rungs"])


def test_default_budget_is_the_jobs_own(tiny_workspace, tmp_path):
    """Without --budget the job's memory_budget_mb is the budget."""
    config = make_job(tiny_workspace, tmp_path / "job", memory_budget_mb=4096)
    done = fit(config, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["budget_mb"] == 4096.0


def test_trainer_preflight_only_writes_nothing(tiny_workspace, tmp_path):
    """The trainer's --preflight-only prints one JSON line and leaves adapter_path alone."""
    config = make_job(tiny_workspace, tmp_path / "job")
    argv = [sys.executable, "-m", "loractl.daemon.trainer", str(config), "--preflight-only"]
    done = subprocess.run(
        [*argv, "--fresh", "--overrides", '{"max_seq_length": 128}', "--budget-mb", "1"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 83, done.stderr
    line = json.loads(done.stdout.strip().splitlines()[-1])["preflight"]
    assert line["fits"] is False and line["max_seq_length"] == 128 and line["fixed_mb"] > 0
    assert_adapters_untouched(config)


@pytest.mark.parametrize(
    ("text", "mb"), [("12GB", 12288.0), ("900MB", 900.0), ("900", 900.0), ("1.5g", 1536.0)]
)
def test_sizes(text, mb):
    """--budget takes GB, MB and bare MB."""
    assert parse_size_mb(text) == mb


@pytest.mark.parametrize("text", ["", "twelve", "0", "12XB"])
def test_bad_sizes(text):
    """A budget that is not a positive size is refused."""
    with pytest.raises(ValueError):
        parse_size_mb(text)
