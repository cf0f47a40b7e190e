"""A distributed job's layout and the mlx.launch command that starts it.

A job config's ``distributed`` section mirrors mlx.launch's own options (``backend``,
``hosts``, ``hostfile``, ``processes`` for ``-n``, ``env``, ``starting_port``), so what a user
knows from mlx.launch carries over. loractl writes no launcher and no collective of its own:
the supervisor runs the command built here, and the trainer talks to its peers through
``mx.distributed``.

This module never imports mlx: the supervisor and the config loader import it.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BACKENDS",
    "DEFAULT_HOST",
    "LAUNCHER",
    "free_port_range",
    "RANK_LOG_PATTERN",
    "address_towards",
    "hostfile_hosts",
    "RankHost",
    "rank_hosts",
    "remote_hosts",
    "remote_ssh_names",
    "launch_command",
    "world_size",
]

# mlx/_distributed_utils/launch.py (mlx 0.32.4) accepts exactly these; without --backend it
# takes the hostfile's, else nccl with CUDA and ring without.
BACKENDS = ("ring", "mpi", "nccl", "jaccl", "jaccl-ring")
# mlx.launch's console script, inline: its module has no __main__ guard, so ``python -m``
# would only import it, and this way no venv bin folder needs finding.
LAUNCHER = (
    "import sys; from mlx._distributed_utils.launch import main; "
    "sys.argv[0] = 'mlx.launch'; sys.exit(main())"
)
# mlx.launch's default --hosts: every rank on this machine.
DEFAULT_HOST = "127.0.0.1"
# Ranks other than 0 log here, beside rank 0's train.log, so a peer's failure can be read.
RANK_LOG_PATTERN = "train.rank{rank}.log"


def hostfile_hosts(path: str | Path) -> list[dict[str, Any]]:
    """The host entries of an mlx.launch hostfile (a list, or a mapping with 'hosts').

    Raises ValueError with the reason when the file cannot be read or has no host list.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read hostfile {path}: {exc}") from None
    hosts = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(hosts, list) or not hosts:
        raise ValueError(f"hostfile {path}: expected a non-empty list of hosts")
    for index, host in enumerate(hosts):
        if not isinstance(host, dict) or not isinstance(host.get("ssh"), str):
            raise ValueError(f"hostfile {path}: host {index} needs an 'ssh' name")
    return hosts


def world_size(section: Mapping[str, Any] | None) -> int:
    """How many ranks mlx.launch starts for a ``distributed`` section (None: one process).

    As in mlx.launch: a hostfile's hosts are one rank each (it ignores ``-n`` then); otherwise
    each host of ``hosts`` (default: this machine) is repeated ``processes`` times.
    """
    if not section:
        return 1
    if section.get("hostfile"):
        return len(hostfile_hosts(section["hostfile"]))
    hosts = section.get("hosts") or [DEFAULT_HOST]
    return len(hosts) * int(section.get("processes") or 1)


@dataclass(frozen=True)
class RankHost:
    """Where one rank runs: the host as the config names it (its ssh name), the address it
    is reached at (a hostfile entry's first IP, else the name), and whether mlx.launch starts
    it on this machine, without ssh: only for the host ``127.0.0.1``."""

    name: str
    address: str
    local: bool


def rank_hosts(section: Mapping[str, Any] | None) -> list[RankHost]:
    """Each rank's host, in rank order. Host names say nothing (two Macs may both be called
    "MacBook-Pro"), so they are never used to tell ranks apart: mlx.launch's layout is."""
    if not section:
        return [RankHost(DEFAULT_HOST, DEFAULT_HOST, True)]
    if section.get("hostfile"):
        entries = [
            (entry["ssh"], (entry.get("ips") or [None])[0] or entry["ssh"])
            for entry in hostfile_hosts(section["hostfile"])
        ]
    else:
        repeats = int(section.get("processes") or 1)
        hosts = section.get("hosts") or [DEFAULT_HOST]
        entries = [(host, host) for host in hosts for _ in range(repeats)]
    return [RankHost(name, address, name == DEFAULT_HOST) for name, address in entries]


def remote_hosts(section: Mapping[str, Any] | None) -> list[str]:
    """The addresses of the section's hosts that are not this machine, in rank order: the
    ranks whose telemetry has to cross the network (mlx.launch reaches them over ssh)."""
    if not section:
        return []
    return [host.address for host in rank_hosts(section) if not host.local]


def remote_ssh_names(section: Mapping[str, Any] | None) -> list[str]:
    """The ssh names of the section's other machines, each once, in rank order: what
    mlx.launch runs ``ssh`` with."""
    names = [host.name for host in rank_hosts(section) if not host.local] if section else []
    return list(dict.fromkeys(names))


def address_towards(host: str) -> str:
    """This machine's address on the route to ``host``: where that host's ranks can reach
    the supervisor. A UDP socket's connect sends nothing; it only picks the route."""
    import socket

    try:
        target = socket.getaddrinfo(host, 9, socket.AF_INET, socket.SOCK_DGRAM)[0][4]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(target)
            return str(probe.getsockname()[0])
    except OSError as exc:
        raise OSError(f"no route to the distributed host {host}: {exc}") from None


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# Ring ports are picked below the ephemeral ranges (Linux 32768-60999, macOS 49152-65535), so
# no outgoing connection can take one between the pick and the ranks' bind.
RING_PORTS = (20000, 32700)


def free_port_range(count: int, host: str = DEFAULT_HOST, tries: int = 50) -> int:
    """A port p with p .. p + count - 1 free on ``host``: the ring backend listens on one
    port per rank from ``--starting-port`` on, so two jobs (or a stale one) must not clash.
    mlx.launch's own default (32323) would be the same for every job."""
    import random
    import socket

    low, high = RING_PORTS
    for _ in range(tries):
        port = random.randrange(low, high - count)
        probes = []
        try:
            for offset in range(count):
                probe = socket.socket()
                probes.append(probe)
                probe.bind((host, port + offset))
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
        return port
    raise OSError(f"no {count} consecutive free ports on {host} in {low}-{high}")


def launch_command(
    section: Mapping[str, Any],
    trainer_argv: Sequence[str],
    *,
    starting_port: int | None = None,
    python: str | None = None,
) -> list[str]:
    """The argv that starts every rank of a job: mlx.launch run by ``python`` (default: this
    interpreter) with the section's options, then ``--`` and the trainer's own argv.

    ``trainer_argv`` is what a single-process attempt would run (``[python, "-m",
    "loractl.daemon.trainer", CONFIG, ...]``); mlx.launch runs it through a shell with
    ``exec``, so each local rank's pid is the trainer's. ``starting_port`` overrides the
    section's (the ring backend listens on it and the ports after it, one per rank), so
    parallel jobs on one machine need not clash. The launcher's exit status says nothing
    (it exits 0 when a rank dies); the ranks' heartbeats and announced exits do.
    """
    argv = [python or sys.executable, "-c", LAUNCHER]
    if section.get("backend"):
        argv += ["--backend", section["backend"]]
    if section.get("hostfile"):
        argv += ["--hostfile", str(section["hostfile"])]
    else:
        argv += ["--hosts", ",".join(section.get("hosts") or [DEFAULT_HOST])]
        argv += ["-n", str(int(section.get("processes") or 1))]
    port = starting_port if starting_port is not None else section.get("starting_port")
    if port is not None:
        argv += ["--starting-port", str(int(port))]
    for key, value in (section.get("env") or {}).items():
        argv += ["--env", f"{key}={value}"]
    return [*argv, "--", *trainer_argv]
