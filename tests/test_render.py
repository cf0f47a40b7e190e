"""`loractl show` and `loractl ladder` in text: each rung's measured and predicted peak, and
why a step down skipped it."""

from __future__ import annotations

from loractl.client.render import job_details, ladder_table

SKIP = "predicted 412 MB, saves 0%"
LADDER = [
    {
        "rung": 0,
        "change": "initial settings",
        "peak_memory_mb": 521.4,
        "predicted_peak_mb": 521.4,
        "skipped": None,
    },
    {
        "rung": 1,
        "change": "grad_accumulation_steps=2",
        "peak_memory_mb": None,
        "predicted_peak_mb": 520.9,
        "skipped": SKIP,
    },
    {
        "rung": 2,
        "change": "max_seq_length=128",
        "peak_memory_mb": 402.0,
        "predicted_peak_mb": 398.6,
        "skipped": None,
    },
    {
        "rung": 3,
        "change": "lora_parameters.rank=4",
        "peak_memory_mb": None,
        "predicted_peak_mb": None,
        "skipped": None,
    },
]


def job(ladder=LADDER, rung=2) -> dict:
    return {
        "id": "j1",
        "name": "squeezed",
        "state": "completed",
        "outcome": "success",
        "progress": {"examples_seen": 24, "total_examples": 24, "step": 12},
        "attempts": 2,
        "rung": rung,
        "ladder": ladder,
        "crashes": [],
        "adapter_path": "/tmp/adapters",
    }


def ladder_lines(text: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index("  ladder:") + 1
    return [line for line in lines[start:] if line.startswith("   ")]


def test_show_prints_measured_and_predicted_peaks_and_the_skip_reason():
    lines = ladder_lines(job_details(job()))
    assert len(lines) == 4
    assert lines[0].endswith("peak 521 MB, predicted 521 MB")
    assert lines[1].endswith(f"not run, predicted 521 MB (skipped: {SKIP})")
    assert lines[2].startswith("   -> 2: max_seq_length=128")
    assert lines[2].endswith("peak 402 MB, predicted 399 MB")
    # No reading predicts rung 3 and nothing skipped it.
    assert lines[3].endswith("not run")
    assert "skipped" not in lines[3] and "predicted" not in lines[3]


def test_show_before_any_measurement_has_no_predictions():
    """A ladder from before the memory model (no prediction keys) renders as it did."""
    bare = [{"rung": 0, "change": "initial settings", "peak_memory_mb": None}]
    lines = ladder_lines(job_details(job(bare, rung=0)))
    assert lines == ["   -> 0: " + "initial settings".ljust(40) + " not run"]


def test_ladder_command_prints_the_skip_too():
    lines = ladder_table(LADDER, current=2).splitlines()
    assert lines[1].endswith(f"not run yet, predicted 521 MB (skipped: {SKIP})")
    assert lines[2].startswith("-> rung 2:")


def test_show_says_when_every_checkpoint_was_damaged_and_the_run_started_over():
    """A `started_over` history event is printed in `show`, so a resume that began again from
    step 0 is never taken for one that continued."""
    reason = "all 3 checkpoints failed their checksums; starting over from step 0"
    shown = job_details({**job(), "history": [{"kind": "started_over", "cause": reason}]})
    assert f"  note: {reason}" in shown.splitlines()
    assert "note:" not in job_details(job())


def test_show_prints_the_loss_sparkline_it_is_given():
    """The client's loss sparkline appears as one `loss:` line under the rung; none without."""
    assert "  loss: ▇▅▃▁" in job_details(job(), loss_line="▇▅▃▁").splitlines()
    assert "loss:" not in job_details(job())
