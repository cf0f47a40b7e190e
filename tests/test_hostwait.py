"""hostwait: the ranks start only once every other Mac answers ssh; a host that does not
ends the attempt with exit 84, naming it, within the time it was given."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loractl.protocol import ExitCode
from loractl.supervisor.hostwait import LAUNCHING, UNREACHABLE_PREFIX, probe_command

REAL_SSH = shutil.which("ssh")
pytestmark = pytest.mark.skipif(REAL_SSH is None, reason="needs the ssh client (openssh-client)")


def closed_port() -> int:
    """A port nothing listens on: bound, then released."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ssh_to_closed_port(folder: Path) -> dict[str, str]:
    """PATH with an ``ssh`` first that is the real client aimed at a closed port (and no user
    config): every host refuses the connection, at once, as a Mac with sshd off does."""
    folder.mkdir(parents=True, exist_ok=True)
    wrapper = folder / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec {REAL_SSH} -F /dev/null -p {closed_port()} "$@"\n')
    wrapper.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def hostwait(*args: str, env: dict[str, str], timeout: float = 60):
    return subprocess.run(
        [sys.executable, "-m", "loractl.supervisor.hostwait", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_a_host_refusing_ssh_ends_the_attempt_with_84_naming_it_in_time(tmp_path):
    """A host whose sshd refuses is retried until the give-up time, then exit 84 with its
    name and ssh's own words; the command behind it never runs."""
    marker = tmp_path / "ran"
    started = time.monotonic()
    done = hostwait(
        "--give-up-after",
        "3",
        "--host",
        "127.0.0.1",
        "--",
        "touch",
        str(marker),
        env=ssh_to_closed_port(tmp_path / "bin"),
    )
    took = time.monotonic() - started
    assert done.returncode == ExitCode.HOST_UNREACHABLE, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(UNREACHABLE_PREFIX + "127.0.0.1 did not answer ssh within 3 s")
    assert "refused" in last.lower(), last
    assert "(try 2)" in done.stderr, "tried again before giving up"
    assert 3 <= took < 15, took
    assert not marker.exists() and LAUNCHING not in done.stderr


def test_without_remote_hosts_it_launches_at_once_as_the_same_process(tmp_path):
    """With every host answering (here: none to ask), it prints LAUNCHING and execs the
    command in its own process: the pid the supervisor holds is mlx.launch's."""
    done = hostwait(
        "--give-up-after",
        "5",
        "--",
        sys.executable,
        "-c",
        "import os, sys; print(os.getpid()); sys.exit(7)",
        env=dict(os.environ),
    )
    assert done.returncode == 7
    assert done.stderr.strip() == LAUNCHING


def test_no_command_is_a_usage_error(tmp_path):
    """Nothing to launch is refused with exit 2 and a line saying so."""
    done = hostwait("--give-up-after", "1", "--host", "x", env=dict(os.environ))
    assert done.returncode == ExitCode.USAGE and "--" in done.stderr


def test_the_probe_never_asks_for_a_password_or_waits_on_a_dead_route():
    """The probe is plain ssh from PATH (as mlx.launch runs it), in batch mode, with a
    connect timeout, running `true`."""
    command = probe_command("mac2", 7.4)
    assert command[0] == "ssh" and command[-2:] == ["mac2", "true"]
    assert "BatchMode=yes" in command and "ConnectTimeout=7" in command
