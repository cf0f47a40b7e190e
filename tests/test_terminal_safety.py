"""Nothing from a path, a name or a log reaches the terminal raw: `show`, `list`, `logs`,
`watch` and notifications escape control characters, and the command `show` offers for
pasting is quoted so that pasting it runs exactly that command (issue 17, H)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from test_offline import loractl

from conftest import wait_for
from loractl.client.watch import WatchState, event_line, render
from loractl.paths import Layout
from loractl.protocol import JobState
from loractl.supervisor.desktop import Notifier, SideProcesses
from loractl.supervisor.store import Store
from loractl.terminal import printable, shell_join

# A path that runs commands when pasted unquoted, retitles the window, clears the screen,
# and carries a C1 CSI, DEL and a right-to-left override.
HOSTILE = "a'$(touch PWNED)`touch PWNED2`;\x1b]0;pwned\x07\x1b[2J\x9b\x7f\u202e z"
RAW = ("\x1b", "\x07", "\x9b", "\x7f", "\u202e")


def assert_no_raw_controls(text: str) -> None:
    found = [char for char in RAW if char in text]
    assert not found, f"raw control characters {found!r} in {text!r}"


def words_of(command: str, cwd: Path) -> list[str]:
    """What a shell makes of a pasted command line: its words, run nowhere."""
    done = subprocess.run(
        ["bash", "-c", f"set -- {command}; printf '%s\\0' \"$@\""],
        capture_output=True,
        cwd=cwd,
        check=True,
    )
    return [word.decode("utf-8", "surrogateescape") for word in done.stdout.split(b"\0")[:-1]]


def test_printable_escapes_every_control_and_keeps_lines_only_when_asked():
    """C0, C1, DEL, bidi overrides and lone surrogates become escapes; tabs and newlines
    stay only in multi-line text."""
    assert printable("\x1b]0;t\x07\x1b[2J") == "\\x1b]0;t\\x07\\x1b[2J"
    assert printable("\x9b\x7f\u202e\udcff") == "\\x9b\\x7f\\u202e\\udcff"
    assert printable("a\tb\nc\rd") == "a\\tb\\nc\\rd"
    assert printable("a\tb\nc\rd", multiline=True) == "a\tb\nc\\rd"
    assert printable("plain /path/ünïcode") == "plain /path/ünïcode"
    assert printable(None) == "None" and printable(3) == "3"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash to paste into")
def test_a_pasted_command_line_is_exactly_its_words_and_runs_nothing(tmp_path):
    """Quotes, $( ), backticks, ; and control characters come back as the same words."""
    argv = ["mlx_lm.generate", "--adapter-path", HOSTILE, "--prompt", "it's", "plain"]
    command = shell_join(argv)
    assert_no_raw_controls(command)
    assert shell_join(["a b", "c"]) == "'a b' c"  # printable words: shlex.quote as ever
    assert words_of(command, tmp_path) == argv
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "PWNED2").exists()


@pytest.fixture
def hostile_home(tmp_path) -> tuple[Path, Path]:
    """A home whose one job writes its adapters (and log) under HOSTILE, and whose inbox
    rejected a file with a hostile name; no supervisor runs."""
    layout = Layout.at(tmp_path / "home")
    (tmp_path / "model").mkdir()
    (tmp_path / "data").mkdir()
    adapters = tmp_path / HOSTILE
    adapters.mkdir()
    (adapters / "adapters.safetensors").write_bytes(b"weights")
    record = {"event": "step", "level": "info", "timestamp": "T", "note": "x\x1b[2Jy\nsecond"}
    (adapters / "train.log").write_text(
        json.dumps(record) + "\n" + "raw \x1b]0;pwned\x07 line\twith tab\n"
    )
    folder = layout.job_dir("j1")
    folder.mkdir(parents=True)
    config = folder / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {"model": str(tmp_path / "model"), "data": str(tmp_path / "data"), "name": "hp"}
            | {"adapter_path": str(adapters)}
        )
    )
    with Store(layout.database) as store:
        store.add_job(job_id="j1", name="hp", config_path=config, job_dir=folder)
        store.transition("j1", JobState.STARTING, "spawned", attempt=1)
        store.transition("j1", JobState.FAILED, f"crashed in {adapters}", outcome="failed: crash")
    rejected = layout.inbox / "rejected"
    rejected.mkdir(parents=True)
    (rejected / "evil\x1b]0;x\x07.yaml.error.txt").write_text("bad \x1b[2J key\nsecond line\n")
    return layout.home, adapters


def test_show_escapes_a_hostile_path_and_prints_the_use_with_of_show_json(hostile_home):
    """`show` writes no control character; its "use with" line is `show --json`'s use_with,
    and that command pastes to the exact adapter path without running anything."""
    home, adapters = hostile_home
    text = loractl(home, "show", "j1")
    assert text.returncode == 0, text.stderr
    assert_no_raw_controls(text.stdout)
    assert f"adapters: {printable(str(adapters))}" in text.stdout
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\x9b\\x7f\\u202e" in text.stdout
    data = json.loads(loractl(home, "show", "j1", "--json").stdout)
    assert_no_raw_controls(data["use_with"])
    # "use with:", or "use with (partial adapters, step N of M):" for an unfinished job.
    (line,) = [ln for ln in text.stdout.splitlines() if ln.startswith("  use with")]
    assert line.endswith(f": {data['use_with']}")
    if shutil.which("bash"):
        words = words_of(data["use_with"], home)
        assert words[words.index("--adapter-path") + 1] == str(adapters)
        assert not (home / "PWNED").exists() and not (home / "PWNED2").exists()


def test_list_history_and_logs_escape_controls_and_keep_log_lines(hostile_home):
    """`list --rejected`, `history` and `logs` escape what they print; a log keeps its
    lines, tabs and a record's multi-line value."""
    home, _ = hostile_home
    for args in (("list", "--rejected"), ("history", "j1"), ("logs", "j1")):
        result = loractl(home, *args)
        assert result.returncode == 0, (args, result.stderr)
        assert_no_raw_controls(result.stdout + result.stderr)
    listed = loractl(home, "list", "--rejected").stdout
    assert "evil\\x1b]0;x\\x07.yaml: bad \\x1b[2J key" in listed
    logs = loractl(home, "logs", "j1").stdout
    assert "note=x\\x1b[2Jy\nsecond" in logs
    assert "raw \\x1b]0;pwned\\x07 line\twith tab" in logs


def test_watch_escapes_names_paths_and_reasons_in_both_views():
    """The live view and the plain event lines write no control character, and rich
    markup in a path is shown, not interpreted."""
    state = WatchState("j1")
    job = {
        "id": "j1",
        "name": "hp",
        "state": "completed",
        "reason": "done in \x1b]0;pwned\x07",
        "adapter_path": "/tmp/[bold]x\x1b[2J",
        "progress": {"examples_seen": 4, "total_examples": 4, "step": 2},
        "crashes": [{"step": 1, "rung": 0, "cause": "crash\x9b", "explanation": "why\x1b[2J"}],
        "ladder": [{"rung": 0, "change": "base\u202e"}],
    }
    state.apply_show(job)
    out = io.StringIO()
    Console(file=out, force_terminal=False, width=200).print(render(state.snapshot(0.0)))
    assert_no_raw_controls(out.getvalue())
    assert "/tmp/[bold]x\\x1b[2J" in out.getvalue()
    lines = [
        event_line("job", {"job_id": "j1", "state": "failed", "reason": "r\x1b]0;x\x07"}),
        event_line("crash", {"job_id": "j1", "step": 1, "explanation": "e\x9b"}),
        event_line("rejected", {"name": "n\x1b[2J", "reason": "r\u202e"}),
    ]
    for line in lines:
        assert line is not None
        assert_no_raw_controls(line)
    assert lines[0] == "j1 failed: r\\x1b]0;x\\x07"


def test_a_notification_carries_escaped_text_to_the_notify_command(tmp_path):
    """The notifier's command gets the title and message with controls escaped."""
    record = tmp_path / "argv.json"
    script = tmp_path / "notify.py"
    script.write_text(
        "import json, sys\n"
        f"open({str(record)!r} + '.tmp', 'w').write(json.dumps(sys.argv[1:]))\n"
        f"import os; os.replace({str(record)!r} + '.tmp', {str(record)!r})\n"
    )
    processes = SideProcesses()
    notifier = Notifier(processes, enabled=True, command=f"{sys.executable} {script}")
    notifier.send("loractl: hp\x1b]0;x\x07 completed", f"adapters in {HOSTILE}\nline two")
    wait_for(record.exists, timeout=30)
    title, message = json.loads(record.read_text())
    assert title == "loractl: hp\\x1b]0;x\\x07 completed"
    assert_no_raw_controls(title + message)
    assert message.endswith("\\x9b\\x7f\\u202e z\nline two")
    for proc in processes.live:
        proc.wait(timeout=30)
