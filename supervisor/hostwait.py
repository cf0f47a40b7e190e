"""Wait for a distributed job's other Macs to answer ssh, then become mlx.launch.

The supervisor starts an attempt with remote ranks as ``python -m loractl.supervisor.hostwait
--give-up-after S --host mac2 ... -- <mlx.launch argv>``. This process probes each host with
the same ``ssh`` mlx.launch will use, retrying with backoff, and once every host answers it
prints :data:`LAUNCHING` and execs mlx.launch: the same pid, session and stderr, so the
attempt it belongs to sees one process from spawn to reaping, and the supervisor's loop never
waits on a network. A host that still does not answer after ``--give-up-after`` seconds ends
the attempt with exit 84 (``ExitCode.HOST_UNREACHABLE``), naming the host and ssh's own
words; the supervisor retries without spending the job's retry budget, and pauses the job
once the host has been away for ``host_unreachable_minutes``.

Without this, mlx.launch itself would be the probe: a rank whose ssh fails takes the others
down after they have loaded the model, and a host that is down makes every try cost a start.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from loractl.protocol import ExitCode

# Printed once every host answers, just before mlx.launch takes over: where the attempt's
# start-up allowance begins.
LAUNCHING = "loractl: every host answers ssh; launching the ranks"
# Its verdict on a host that did not answer: "loractl: host unreachable: HOST did not
# answer ssh ...". The classifier quotes this line; the policy names HOST from it.
UNREACHABLE = "host unreachable: "
UNREACHABLE_PREFIX = f"loractl: {UNREACHABLE}"
NO_ANSWER = " did not answer ssh"
# Probe retries: 1 s doubling up to this, so a host back after a reboot is found quickly
# without hammering one that is away for the night.
PROBE_BACKOFF_CAP_S = 8.0


def probe_command(host: str, timeout_s: float) -> list[str]:
    """``ssh`` as mlx.launch runs it (from PATH, with the user's ssh config), made to fail
    instead of asking for a password or waiting on a dead route."""
    seconds = max(1, round(timeout_s))
    return ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={seconds}", host, "true"]


def probe(host: str, timeout_s: float) -> str | None:
    """None when ``host`` runs a command over ssh; else ssh's last words on why not."""
    try:
        done = subprocess.run(
            probe_command(host, timeout_s),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout_s + 5,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"no answer in {timeout_s:.0f} s"
    except OSError as exc:
        return f"cannot run ssh: {exc}"
    if done.returncode == 0:
        return None
    lines = [line.strip() for line in done.stderr.decode(errors="replace").splitlines()]
    words = next((line for line in reversed(lines) if line), "")
    return f"ssh exit {done.returncode}" + (f": {words[:300]}" if words else "")


def wait_for_hosts(hosts: list[str], give_up_after_s: float) -> tuple[str, str] | None:
    """Probe until every host answers; ``(host, why)`` for the first that still does not
    once ``give_up_after_s`` has passed, else None."""
    deadline = time.monotonic() + give_up_after_s
    waiting = list(hosts)
    delay, tries = 1.0, 0
    while True:
        tries += 1
        for host in list(waiting):
            remaining = max(1.0, deadline - time.monotonic())
            why = probe(host, min(10.0, remaining))
            if why is None:
                waiting.remove(host)
                continue
            print(f"loractl: {host} does not answer ssh (try {tries}): {why}", file=sys.stderr)
            if time.monotonic() >= deadline:
                return host, why
        if not waiting:
            return None
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, PROBE_BACKOFF_CAP_S)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" not in args:
        print("usage: hostwait --give-up-after S --host H ... -- COMMAND", file=sys.stderr)
        return int(ExitCode.USAGE)
    split = args.index("--")
    parser = argparse.ArgumentParser(prog="loractl-hostwait")
    parser.add_argument("--give-up-after", type=float, required=True)
    parser.add_argument("--host", action="append", default=[])
    options = parser.parse_args(args[:split])
    command = args[split + 1 :]
    if not command:
        print("hostwait: no command after --", file=sys.stderr)
        return int(ExitCode.USAGE)
    missing = wait_for_hosts(options.host, options.give_up_after)
    if missing is not None:
        host, why = missing
        print(
            f"{UNREACHABLE_PREFIX}{host}{NO_ANSWER} within "
            f"{options.give_up_after:.0f} s ({why}); check that it is awake, on the network, "
            "and that this Mac's key is in its authorized_keys",
            file=sys.stderr,
        )
        return int(ExitCode.HOST_UNREACHABLE)
    print(LAUNCHING, file=sys.stderr, flush=True)
    os.execvp(command[0], command)
    return 0  # pragma: no cover - exec does not return


if __name__ == "__main__":
    sys.exit(main())
