"""Acceptance for issue 15's learning ladder, with the real supervisor and the real trainer.

"Squeezed ladder-preset job": with a budget between the measured peaks of rung 0 and of the
seq-128 rung, the pre-flight stops rung 0 before its first step, the job's memory model skips
the accumulation rung (it saves nothing), and the job completes on the seq-128 rung, whose
predicted peak was within 15% of what its own pre-flight then measured.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import make_job, run_trainer
from loractl.client.harness import SupervisorProcess, measure_footprint
from loractl.daemon.tinymodel import prepare
from loractl.protocol import ExitCode

# The ladder preset's default ladder: accumulation 4->2, seq 256->128, rank 8->4.
ACCUMULATION_RUNG, SEQ_RUNG = 1, 2
PREDICTED = re.compile(r"rung (\d+) is predicted to peak at (\d+(?:\.\d+)?) MB")
DOES_NOT_FIT = re.compile(r"does not fit: peak (\d+(?:\.\d+)?) MB")


@pytest.fixture
def supervisor(tmp_path):
    sup = SupervisorProcess(tmp_path / "home")
    yield sup
    sup.stop()


@pytest.fixture(scope="module")
def ladder_workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ladder")
    prepare(root, preset="ladder", seed=0)
    return root


def preflight_peak(config: Path, folder: Path) -> float:
    """Rung 0's pre-flight peak in MB: the real trainer held to a 1 MB budget stops with it."""
    overrides = json.dumps({"adapter_path": str(folder / "adapters")})
    done = run_trainer(config, "--fresh", "--budget-mb", "1", "--overrides", overrides)
    assert done.returncode == ExitCode.DOES_NOT_FIT, done.stderr[-2000:]
    found = DOES_NOT_FIT.search(done.stderr)
    assert found, done.stderr[-2000:]
    return float(found.group(1))


def events(job: dict, kind: str) -> list[dict]:
    return [e for e in job["history"] if e["kind"] == kind]


def test_squeezed_ladder_job_skips_the_accumulation_rung_and_trains_on_seq_128(
    ladder_workspace, tmp_path, supervisor
):
    probe = make_job(ladder_workspace, tmp_path / "probe", iters=24, val_batches=1)
    assert "ladder" not in yaml.safe_load(probe.read_text())  # the recipe's default ladder
    # Measured, not hard-coded: the running footprint of rung 0 and of the seq-128 rung, and
    # rung 0's pre-flight peak, which is what holds it to the budget before its first step.
    rung0 = measure_footprint(probe, {"max_seq_length": 256})
    seq128 = measure_footprint(probe, {"max_seq_length": 128})
    rung0_preflight = preflight_peak(probe, tmp_path / "flight")
    assert rung0 > seq128 * 1.1, (rung0, seq128)
    # Over the seq-128 rung's running peak (it must train to the end under the guard) and
    # under rung 0's pre-flight peak (which must stop it at step 0): halfway between.
    assert rung0_preflight > seq128 * 1.04, (rung0_preflight, seq128)
    budget = int((min(rung0, rung0_preflight) + seq128) / 2)
    config = make_job(
        ladder_workspace,
        tmp_path / "src",
        iters=24,
        memory_budget_mb=budget,
        val_batches=1,
        checkpoint_every=1,
    )
    supervisor.start()
    job_id = supervisor.submit(config)
    job = supervisor.wait_state(job_id, {"completed", "failed"}, timeout=400)
    assert job["state"] == "completed", job["reason"] + supervisor.debug()

    # It completes on the seq-128 rung.
    assert job["rung"] == SEQ_RUNG, job["history"]
    assert job["effective_config"]["max_seq_length"] == 128
    assert job["effective_config"]["grad_accumulation_steps"] == 2

    # The accumulation rung was skipped, with its prediction and reason, in the history and
    # in `show --json`'s ladder.
    skips = events(job, "rung_skipped")
    assert [s["detail"]["rung"] for s in skips] == [ACCUMULATION_RUNG], skips
    skip = skips[0]["detail"]
    assert "saves" in skip["reason"] and skip["predicted_mb"] > 0, skip
    ladder = job["ladder"]
    assert ladder[ACCUMULATION_RUNG]["skipped"] == skip["reason"]
    assert ladder[0]["skipped"] is None and ladder[SEQ_RUNG]["skipped"] is None
    steps = events(job, "ladder_step")
    assert [(s["detail"]["from_rung"], s["detail"]["to_rung"]) for s in steps] == [(0, 2)]

    # The only memory stop is rung 0's pre-flight, at the attempt's start: step 0, before
    # any checkpoint.
    memory = [c for c in job["crashes"] if c["cause"] == "memory"]
    assert len(memory) == 1, job["crashes"]
    crash = memory[0]
    assert crash["rule"] == "preflight_over_budget", crash
    assert crash["rung"] == 0 and crash["step"] == 0, crash
    assert crash["checkpoint_step"] in (None, 0, -1), crash
    assert len(job["crashes"]) == 1, job["crashes"]

    # Each attempt's pre-flight was recorded on its rung; rung 0's over the budget, the
    # trained rung's under it.
    flights = {e["detail"]["rung"]: e["detail"] for e in events(job, "preflight")}
    assert set(flights) == {0, SEQ_RUNG}, flights
    assert flights[0]["peak_mb"] > budget >= flights[SEQ_RUNG]["peak_mb"], (flights, budget)

    # The trained rung's prediction, as recorded when the step down chose it, is within 15%
    # of the peak its own pre-flight measured.
    why = " ".join(str(e.get("cause", "")) + " " + str(e.get("detail", "")) for e in job["history"])
    found = {int(r): float(mb) for r, mb in PREDICTED.findall(why)}
    assert SEQ_RUNG in found, why
    predicted = found[SEQ_RUNG]
    measured = flights[SEQ_RUNG]["peak_mb"]
    error = abs(predicted - measured) / measured
    peaks = {r: f["peak_mb"] for r, f in flights.items()}
    running = job["peak_memory_mb"].get(str(SEQ_RUNG))
    print(
        f"footprints: rung 0 {rung0:.1f} MB, seq-128 {seq128:.1f} MB; rung 0 pre-flight probe"
        f" {rung0_preflight:.1f} MB; budget {budget} MB; job's pre-flight peaks {peaks};"
        f" rung 1 predicted {skip['predicted_mb']} MB ({skip['reason']});"
        f" rung 2 predicted {predicted} MB, pre-flight {measured} MB, error {error:.1%};"
        f" rung 2 running peak {running} MB"
    )
    assert error <= 0.15, (predicted, measured, error)
