"""``python -m loractl.supervisor``: the command launchd and systemd run to keep the supervisor up.

A second supervisor for the same home, started by the service manager, waits for the pidfile
lock (``--wait-for-lock``) instead of exiting non-zero. launchd's KeepAlive
{SuccessfulExit: false} restarts every non-zero exit after ThrottleInterval, so a supervisor
that exited because another one holds the lock would be relaunched every ten seconds, all
night: a restart loop. Waiting instead means it takes over as soon as the other one is gone.

An interactive ``loractl daemon run`` (no ``--wait-for-lock``) fails fast with exit 3, which
tells the user at once that a supervisor is already running. The systemd unit also sets
RestartPreventExitStatus=3, so an exit 3 there is never restarted either.

Exit 0 means only a requested stop (``loractl daemon stop``), which the service manager leaves
alone; every other exit is non-zero and gets the supervisor restarted.
"""

from __future__ import annotations

import argparse
import sys


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loractl.supervisor",
        description="Run the loractl supervisor in the foreground (launchd and systemd run this).",
    )
    parser.add_argument(
        "--home",
        default=None,
        help="loractl's state folder (default: LORACTL_HOME, else per platform)",
    )
    parser.add_argument(
        "--wait-for-lock",
        action="store_true",
        help="if another supervisor holds this home's lock, wait for it instead of exiting 3",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    # Imported after parsing, so --help answers without loading the supervisor.
    from loractl.supervisor.service import main as run_supervisor

    return run_supervisor(args.home, wait_for_lock=args.wait_for_lock)


if __name__ == "__main__":
    sys.exit(main())
