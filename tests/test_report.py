"""`loractl report`: the page of a real job with a SIGKILL and a ladder step, its picture in
headless Chromium, and the parts (the SVG writer, torn train.log lines, the sparkline, a failed
job, a running job)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import pytest

from conftest import FIXTURES, make_job, wait_for
from loractl.client.harness import SupervisorProcess
from loractl.client.report import (
    BLOCKS,
    gather,
    iteration_at,
    loss_sparkline,
    read_train_log,
    render_html,
    sparkline,
    write_report,
)
from loractl.client.svg import Element, Scale, attribute_name, number, path_data, svg, ticks

REPORT_FIXTURES = FIXTURES / "report"
# The trainer's fault injector fails this optimizer step twice (the in-process retry too),
# so the trainer exits 75 and the supervisor steps down the ladder.
OOM_STEP = 5
# Colours of the page's style sheet that the picture is checked for.
TRAIN_RGB = (0x1F, 0x77, 0xB4)
VAL_RGB = (0xFF, 0x7F, 0x0E)
CRASH_RGB = (0xD6, 0x27, 0x28)
LADDER_RGB = (0x94, 0x67, 0xBD)


def history_of(job: dict, kind: str) -> list[dict]:
    return [e for e in job["history"] if e["kind"] == kind]


@pytest.fixture(scope="module")
def night(tiny_workspace, tmp_path_factory) -> dict:
    """One real job through a night: the trainer SIGKILLed once it has made progress, then an
    out-of-memory exit and a ladder step; paused, the supervisor restarted without the fault,
    resumed, reported while running and run to completion."""
    from loractl.client.control import request
    from loractl.protocol import PauseRequest, ResumeRequest

    root = tmp_path_factory.mktemp("report")
    home = root / "home"
    supervisor = SupervisorProcess(home, LORACTL_FAULT_OOM=f"{OOM_STEP}:2")
    supervisor.start()
    try:
        config = make_job(tiny_workspace, root / "job", iters=48, checkpoint_every=1)
        job_id = supervisor.submit(config)
        wait_for(lambda: (supervisor.show(job_id)["progress"] or {}).get("step", 0) >= 2, 120)
        os.kill(supervisor.show(job_id)["trainer_pid"], signal.SIGKILL)
        wait_for(lambda: history_of(supervisor.show(job_id), "ladder_step"), 120, interval=0.05)
        # The fault is in every trainer this supervisor starts: pause before the next one
        # reaches the failing step, and go on under a supervisor without it.
        request(supervisor.layout, PauseRequest(job=job_id))
        supervisor.wait_state(job_id, {"paused"}, timeout=60)
        supervisor.stop()
        supervisor = SupervisorProcess(home).start()
        request(supervisor.layout, ResumeRequest(job=job_id))
        running = wait_for(
            lambda: (
                (job := supervisor.show(job_id))["state"] == "running"
                and (job["progress"] or {}).get("step", 0) >= OOM_STEP + 1
                and job
            ),
            120,
            interval=0.05,
        )
        running_report = write_report(running, root / "running.html")
        job = supervisor.wait_state(job_id, {"completed", "failed"}, timeout=120)
        assert job["state"] == "completed", job["reason"] + supervisor.debug()
    finally:
        supervisor.stop()
    done = write_report(job, root / "out" / "report.html")
    return {
        "home": home,
        "job": job,
        "running": running,
        "running_report": running_report,
        "report": done,
    }


def chart(page: str, chart_id: str) -> ET.Element:
    """The SVG element ``chart_id`` of the page, parsed (the writer emits well-formed XML)."""
    found = re.search(rf'<svg [^>]*id="{chart_id}".*?</svg>', page, re.S)
    assert found, f"no {chart_id} in the page"
    return ET.fromstring(found.group(0))


def with_class(tree: ET.Element, *classes: str) -> list[ET.Element]:
    return [e for e in tree.iter() if set(classes) <= set(e.get("class", "").split())]


def assert_self_contained(page: str) -> None:
    lowered = page.lower()
    for reference in ("http:", "https:", "src=", "href=", "@import", "url(", "<script", "<link"):
        assert reference not in lowered, reference
    assert not re.search(r"""=\s*["']?//""", page)


def iteration_reached(train_log: Path, at: float) -> int:
    """The iteration of the last step logged at or before ``at``, read independently of the
    report's own parser."""
    from datetime import datetime

    reached = 0
    for line in train_log.read_text().splitlines():
        entry = json.loads(line)
        stamp = datetime.fromisoformat(entry["timestamp"]).timestamp()
        if entry["event"] in ("step", "training") and stamp <= at:
            reached = entry["iteration"]
    return reached


def test_report_of_a_night_with_a_sigkill_and_a_ladder_step(night):
    """One self-contained file whose loss chart draws both curves and marks the crash and the
    ladder step at the iterations the history and train.log put them."""
    job, written = night["job"], night["report"]
    path = Path(written["path"])
    assert path.is_file() and written["state"] == "completed"
    assert written["train_points"] >= 10 and written["val_points"] >= 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.html"]
    page = path.read_text(encoding="utf-8")
    assert_self_contained(page)

    loss = chart(page, "loss-chart")
    curves = {c.get("id"): c for c in with_class(loss, "curve")}
    assert len(re.findall("L", curves["curve-train"].get("d"))) >= 10
    assert len(re.findall("L", curves["curve-val"].get("d"))) >= 2

    killed = [c for c in job["crashes"] if c["cause"] == "killed_externally"]
    memory = [c for c in job["crashes"] if c["cause"] == "memory"]
    assert len(killed) == 1 and len(memory) == 1, job["crashes"]
    (crash_marker,) = with_class(loss, "marker", "crash")
    (ladder_marker,) = with_class(loss, "marker", "ladder")
    assert with_class(loss, "marker", "memory-stop") and with_class(loss, "marker", "pause")
    assert with_class(loss, "marker", "resume")
    for marker in (crash_marker, ladder_marker):
        assert marker.find("title").text and marker.find("line") is not None

    train_log = Path(job["adapter_path"]) / "train.log"
    (crash_event,) = [e for e in history_of(job, "crash") if e["cause"] == "killed_externally"]
    (step_event,) = history_of(job, "ladder_step")
    crash_at = int(crash_marker.get("data-iteration"))
    step_at = int(ladder_marker.get("data-iteration"))
    assert crash_at == iteration_reached(train_log, crash_event["at"])
    assert step_at == iteration_reached(train_log, step_event["at"])
    # Killed after its second step (4 iterations each on rung 0); the out-of-memory step is
    # the one after the checkpoint the crash record names.
    assert crash_at >= 8
    assert step_at == memory[0]["checkpoint_step"] * 4 == (OOM_STEP - 1) * 4
    assert "max_seq_length=128" in "".join(ladder_marker.itertext())
    assert "killed_externally, rank 0" in "".join(crash_marker.itertext())
    assert int(crash_marker.get("data-x")) < int(ladder_marker.get("data-x"))

    # The other figures and tables.
    assert with_class(chart(page, "tokens-chart"), "curve", "tokens")
    memory_chart = chart(page, "memory-chart")
    assert with_class(memory_chart, "bar", "measured") and with_class(memory_chart, "budget")
    assert with_class(memory_chart, "rung", "skipped") or len(job["ladder"]) == 1
    outcomes = [g.get("class") for g in with_class(chart(page, "attempts-chart"), "attempt")]
    assert outcomes[0] == "attempt crash" and outcomes[-1] == "attempt ok", outcomes
    assert '<tr class="changed"><td>max_seq_length</td><td>256</td><td>128</td></tr>' in page
    assert "mlx_lm.generate" in page and "--adapter-path" in page


def test_a_report_while_the_job_runs(night):
    """Made while the trainer runs: the open attempt is drawn as running, with the events
    so far and the curves up to now."""
    assert night["running"]["state"] == "running"
    page = Path(night["running_report"]["path"]).read_text(encoding="utf-8")
    assert_self_contained(page)
    assert with_class(chart(page, "attempts-chart"), "attempt", "running")
    loss = chart(page, "loss-chart")
    assert with_class(loss, "curve", "train") and with_class(loss, "marker", "ladder")
    assert "The adapters are partial" in page


# -- the picture -------------------------------------------------------------------------------


def browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


def png_rows(path: Path) -> tuple[int, int, list[bytes]]:
    """Width, height and the unfiltered RGB rows of an 8-bit RGB or RGBA PNG, read with the
    standard library (rows as bytes, alpha dropped)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    position, chunks, header = 8, [], None
    while position < len(data):
        (size,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + size]
        position += size + 12
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    channels = 3 if colour == 2 else 4
    stride = width * channels
    raw = zlib.decompress(b"".join(chunks))
    low = int.from_bytes(b"\x7f" * stride, "big")
    high = int.from_bytes(b"\x80" * stride, "big")

    def add(a: int, b: int) -> int:
        # Byte-wise addition modulo 256 of two rows held as big integers (no carries across
        # bytes): the PNG filters' arithmetic on a whole row at once.
        return ((a & low) + (b & low)) ^ ((a ^ b) & high)

    rows, previous = [], bytes(stride)
    for index in range(height):
        start = index * (stride + 1)
        kind, line = raw[start], raw[start + 1 : start + 1 + stride]
        if kind == 0:
            row = line
        elif kind == 2:  # up
            row = add(int.from_bytes(line, "big"), int.from_bytes(previous, "big"))
            row = row.to_bytes(stride, "big")
        elif kind == 1:  # sub: a prefix sum per channel, in log2(width) whole-row additions
            value, shift = int.from_bytes(line, "big"), channels
            while shift < stride:
                value = add(value, value >> (8 * shift))
                shift *= 2
            row = value.to_bytes(stride, "big")
        else:  # average, paeth: byte by byte (rare in screenshots)
            out = bytearray(stride)
            for i in range(stride):
                left = out[i - channels] if i >= channels else 0
                up = previous[i]
                if kind == 3:
                    out[i] = (line[i] + (left + up) // 2) & 0xFF
                else:
                    corner = previous[i - channels] if i >= channels else 0
                    guess = left + up - corner
                    pa, pb, pc = abs(guess - left), abs(guess - up), abs(guess - corner)
                    best = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                    out[i] = (line[i] + best) & 0xFF
            row = bytes(out)
        rows.append(row if channels == 3 else bytes(b for i, b in enumerate(row) if i % 4 != 3))
        previous = row
    return width, height, rows


def pixels_of(rows: list[bytes], rgb: tuple[int, int, int]) -> dict[int, int]:
    """How many pixels of exactly ``rgb`` each column holds."""
    needle, columns = bytes(rgb), {}
    for row in rows:
        found = row.find(needle)
        while found != -1:
            if found % 3 == 0:
                columns[found // 3] = columns.get(found // 3, 0) + 1
            found = row.find(needle, found + 1)
    return columns


def test_chromium_draws_the_curves_and_the_markers(night, tmp_path):
    """Headless Chromium at 1280 px renders a picture that is not blank, in which both loss
    curves are drawn and the crash and ladder lines stand where the SVG puts them."""
    found = browser()
    if found is None:
        pytest.skip("no chromium, chromium-browser or google-chrome on PATH (.ci/run installs it)")
    page = Path(night["report"]["path"])
    picture = tmp_path / "report.png"
    subprocess.run(
        [
            found,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={picture}",
            "--window-size=1280,2000",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert picture.is_file(), "chromium wrote no screenshot"
    width, height, rows = png_rows(picture)
    assert (width, height) == (1280, 2000)
    assert len(set(rows)) > 200, "the picture is blank"
    colours = {row[i : i + 3] for row in rows[::10] for i in range(0, len(row), 3)}
    assert len(colours) > 50

    assert sum(pixels_of(rows, TRAIN_RGB).values()) > 300, "no training curve"
    assert sum(pixels_of(rows, VAL_RGB).values()) > 300, "no validation curve"

    def line_columns(rgb) -> list[int]:
        return sorted(x for x, count in pixels_of(rows, rgb).items() if count >= 60)

    crash_columns, ladder_columns = line_columns(CRASH_RGB), line_columns(LADDER_RGB)
    assert crash_columns and ladder_columns, (crash_columns, ladder_columns)
    loss = chart(page.read_text(encoding="utf-8"), "loss-chart")
    crash_x = int(with_class(loss, "marker", "crash")[0].get("data-x"))
    ladder_x = int(with_class(loss, "marker", "ladder")[0].get("data-x"))
    # The chart is drawn at its own size, so the lines are as far apart on screen as in
    # the SVG (each 2 px wide, centred on a whole pixel).
    apart = min(ladder_columns) - min(crash_columns)
    assert abs(apart - (ladder_x - crash_x)) <= 2, (crash_columns, ladder_columns)


# -- the parts ----------------------------------------------------------------------------------


def test_svg_writer_escapes_and_formats():
    """Attributes and text are escaped, Python names become SVG's, numbers are short, and an
    SVG root carries no namespace URL."""
    root = svg(200, 100, id="c")
    node = root.child("text", 'a <b> & "c"', class_="label x", data_at=1.5, stroke_width=2.0)
    node.titled("</title><script>")
    out = root.render()
    assert "<script>" not in out and "&lt;/title&gt;&lt;script&gt;" in out
    assert 'class="label x" data-at="1.5" stroke-width="2"' in out
    assert ">a &lt;b&gt; &amp; &quot;c&quot;<" not in out  # text needs no quote escaping
    assert '<title>&lt;/title&gt;&lt;script&gt;</title>a &lt;b&gt; &amp; "c"</text>' in out
    assert "xmlns" not in out and out.startswith('<svg width="200" height="100"')
    assert Element("line", x1=0.0).render() == '<line x1="0"/>'
    assert (number(-0.001), number(3.14159), number(2.0)) == ("0", "3.14", "2")
    assert attribute_name("class_") == "class" and attribute_name("text_anchor") == "text-anchor"
    assert path_data([(0, 0), (1.5, 2)]) == "M0 0 L1.5 2" and path_data([]) == ""
    scale = Scale(0, 10, 100, 200)
    assert (scale(0), scale(5), scale(10)) == (100, 150, 200)
    assert Scale(3, 3, 0, 10)(3) == 5


def test_ticks_cover_the_range_with_round_steps():
    """Ticks start at or below the lowest value and end at or above the highest, on 1-2-5
    steps, for ordinary, flat, tiny and reversed ranges."""
    for low, high in [(0, 48), (6.18, 6.24), (5, 5), (0.0001, 0.0009), (10, 2), (0, 16874)]:
        values = ticks(low, high, 5)
        assert values[0] <= min(low, high) and values[-1] >= max(low, high), (low, high, values)
        assert 2 <= len(values) <= 12, values
        steps = {round(b - a, 9) for a, b in zip(values, values[1:], strict=False)}
        assert len(steps) == 1, values
    assert ticks(0, 48, 10) == [0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50]
    assert ticks(math.nan, 1) == [0.0, 1.0]


def test_torn_and_garbage_train_log_lines_are_skipped(tmp_path):
    """A torn last line, garbage, non-objects, bad timestamps and invalid UTF-8 are skipped
    and counted; the steps, evaluations and resumes around them are kept."""
    stamp = "2026-12-03T13:08:{:02d}.000000Z"
    good = [
        {"event": "attempt starting", "pid": 1, "rung": 0, "timestamp": stamp.format(0)},
        {"event": "training", "iteration": 0, "plan": {"total_examples": 48, "batch_size": 2},
         "timestamp": stamp.format(1)},
        {"event": "eval", "iteration": 0, "val_loss": 6.2, "timestamp": stamp.format(2)},
        {"event": "step", "step": 1, "iteration": 4, "loss": 6.1, "tokens_per_sec": 900.0,
         "timestamp": stamp.format(3)},
        {"event": "step", "step": 2, "iteration": 8, "loss": float("nan"),
         "timestamp": stamp.format(5)},
    ]  # fmt: skip
    lines = [json.dumps(e) for e in good]
    lines[3:3] = ["not json at all", "[1, 2, 3]", '{"event": "step", "timestamp": "yesterday"}']
    log_path = tmp_path / "train.log"
    log_path.write_bytes(
        "\n".join(lines).encode() + b"\n\xff\xfe garbage\n" + b'{"event": "step", "ite'
    )
    log = read_train_log(log_path)
    assert log.found and log.skipped_lines == 5
    assert [(p.iteration, p.loss) for p in log.steps] == [(4, 6.1), (8, None)]
    assert [(e.iteration, e.val_loss) for e in log.evals] == [(0, 6.2)]
    assert log.planned_iterations == 24
    first_step = log.steps[0].at
    assert iteration_at(log, first_step - 10) == 0
    assert iteration_at(log, first_step) == 4 and iteration_at(log, first_step + 60) == 8
    missing = read_train_log(tmp_path / "absent.log")
    assert not missing.found and iteration_at(missing, 0) is None


def test_sparkline_draws_values_in_blocks():
    """The sparkline is at most ``width`` blocks from lowest to highest, skips non-finite
    values and draws a flat series and an empty one sensibly."""
    assert sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == BLOCKS
    assert sparkline([3, 1]) == "█▁"
    line = sparkline([math.sin(i / 10) for i in range(1000)], width=40)
    assert len(line) == 40 and set(line) <= set(BLOCKS) and "▁" in line and "█" in line
    assert sparkline([2.0, float("nan"), 2.0, float("inf")]) == "▁▁"
    assert sparkline([]) == "" and sparkline([1.0], width=0) == ""


def test_loss_sparkline_of_a_real_job(night):
    """`show`'s sparkline: the real job's training losses, from its train.log."""
    line = loss_sparkline(night["job"]["adapter_path"], width=12)
    assert len(line) == 12 and set(line) <= set(BLOCKS) and len(set(line)) > 2
    assert loss_sparkline(None) == ""


def test_the_report_command_writes_the_page_offline(night, tmp_path):
    """`loractl report JOB -o FILE --json` with the supervisor down writes the page and
    prints where; an unknown job exits 4."""
    from click.testing import CliRunner

    from loractl.client.cli import main

    if main.get_command(None, "report") is None:
        pytest.skip("`loractl report` is not wired into client/cli.py yet")
    home, out = str(night["home"]), tmp_path / "page.html"
    result = CliRunner().invoke(
        main, ["--home", home, "report", night["job"]["id"], "-o", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    written = json.loads(result.output)
    assert written["path"] == str(out) and written["offline"] is True
    assert_self_contained(out.read_text(encoding="utf-8"))
    missing = CliRunner().invoke(main, ["--home", home, "report", "no-such-job", "--json"])
    assert missing.exit_code == 4, missing.output


def failed_job(tmp_path: Path, with_log: bool = True) -> dict:
    """A real failed job's `show --json` (out of memory on every rung), moved under
    ``tmp_path``, with a reason holding markup that must come out escaped."""
    text = (REPORT_FIXTURES / "failed-job.json").read_text().replace("{ROOT}", str(tmp_path))
    job = json.loads(text)
    job["reason"] = "<script>alert(1)</script> & " + job["reason"]
    adapters = Path(job["adapter_path"])
    adapters.mkdir(parents=True)
    if with_log:
        log = (REPORT_FIXTURES / "failed-train.log").read_text().replace("{ROOT}", str(tmp_path))
        (adapters / "train.log").write_text(log + '{"event": "step", "iter')  # torn
    return job


def test_a_failed_job_reports_its_crashes_and_every_rung(tmp_path):
    """A job that ran out of memory on every rung: its reason escaped, a memory stop and a
    ladder step per rung, skipped and measured rungs, and the failed attempts."""
    job = failed_job(tmp_path)
    report = gather(job)
    page = render_html(report)
    assert_self_contained(page)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp;" in page
    assert report.log.skipped_lines == 1
    loss = chart(page, "loss-chart")
    assert len(with_class(loss, "marker", "memory-stop")) == 3
    assert len(with_class(loss, "marker", "ladder")) == 2
    memory = chart(page, "memory-chart")
    assert [r.get("data-rung") for r in with_class(memory, "rung", "skipped")] == ["1"]
    assert len(with_class(memory, "bar", "measured")) == 3
    assert len(with_class(memory, "bar", "predicted")) == 1
    outcomes = [g.get("class") for g in with_class(chart(page, "attempts-chart"), "attempt")]
    assert outcomes == ["attempt memory"] * 3
    assert "The submitted config could not be read." in page
    assert 'class="state-failed"' in page


def test_a_job_without_train_log_says_so(tmp_path):
    """Without train.log the page says so, draws no loss chart without checkpoints, and
    still lists the events, memory and attempts."""
    job = failed_job(tmp_path, with_log=False)
    written = write_report(job, tmp_path / "r" / "page.html")
    page = Path(written["path"]).read_text(encoding="utf-8")
    assert written["train_log"] is None and written["train_points"] == 0
    assert 'id="no-train-log"' in page and 'id="loss-chart"' not in page
    assert "No losses logged yet." in page and 'id="memory-chart"' in page
    assert page.count('class="kind memory-stop"') == 3


def test_restarts_and_adoptions_are_placed_by_time(tmp_path):
    """A supervisor stop, a restart and an adoption in the history become restart markers at
    the iteration train.log had reached by then; the attempt cut short shows how."""
    stamp = "2026-12-03T13:00:{:02d}Z"
    steps = [
        {"event": "step", "step": s, "iteration": 4 * s, "loss": 6.0 - s / 10,
         "timestamp": stamp.format(10 * s)}
        for s in range(1, 5)
    ]  # fmt: skip
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    (adapters / "train.log").write_text("".join(json.dumps(e) + "\n" for e in steps))
    base = read_train_log(adapters / "train.log").steps[0].at - 10
    history = [
        {"at": base + 1, "kind": "transition", "to_state": "starting", "rung": 0,
         "detail": {"attempt": 1}, "cause": "attempt 1 on rung 0"},
        {"at": base + 15, "kind": "transition", "to_state": "queued", "from_state": "running",
         "cause": "supervisor shutting down; will resume", "detail": {}},
        {"at": base + 25, "kind": "transition", "to_state": "starting", "rung": 0,
         "detail": {"attempt": 2}, "cause": "attempt 2 on rung 0"},
        {"at": base + 35, "kind": "adopted", "detail": {"pid": 42, "attempt": 2}, "cause": ""},
    ]  # fmt: skip
    job = {"id": "x", "name": "n", "state": "running", "adapter_path": str(adapters),
           "history": history, "crashes": [], "ladder": [], "peak_memory_mb": {}}  # fmt: skip
    report = gather(job)
    placed = [(m.kind, m.label, m.iteration) for m in report.markers]
    assert placed == [
        ("restart", "supervisor stopped", 4),
        ("restart", "supervisor restarted", 12),
    ]
    assert [(a.number, a.outcome, a.end is None) for a in report.attempts] == [
        (1, "stopped", False),
        (2, "running", True),
    ]
    page = render_html(report)
    assert len(with_class(chart(page, "loss-chart"), "marker", "restart")) == 2


def test_without_train_log_the_checkpoint_draws_the_losses(tmp_path):
    """With train.log gone, the newest checkpoint's loss and validation histories are drawn
    (by optimizer step), and no event is placed on that axis."""
    job = failed_job(tmp_path, with_log=False)
    folder = Path(job["adapter_path"]) / "checkpoints" / "step-00000003"
    folder.mkdir(parents=True)
    state = {"step": 3, "loss_history": [[1, 6.2], [2, 6.1], [3, 6.0]], "val_history": [[0, 6.3]]}
    (folder / "state.json").write_text(json.dumps(state))
    page = render_html(gather(job))
    loss = chart(page, "loss-chart")
    assert len(re.findall("L", with_class(loss, "curve", "train")[0].get("d"))) == 2
    assert not with_class(loss, "marker") and "optimizer step" in "".join(loss.itertext())
    assert 'id="no-train-log"' in page
