"""A second Mac on this Linux machine, for tests of remote ranks (root only).

``SecondHost`` is a network namespace with its own address, host name and process table,
sharing the filesystem, reached over ssh the way mlx.launch reaches a real second Mac; it can
be partitioned, slowed, made to refuse ssh, and have its rank killed. ``NamespacedSupervisor``
runs the supervisor in a process table of its own, so the second host's ranks are not in it.
The recipe and what it found are in DESIGN.md, "A second Mac on one Linux machine".
"""

from __future__ import annotations

import fcntl
import functools
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import psutil
import pytest

from loractl.client.harness import SupervisorProcess, kill_tree, trainers_of, wait_for

REAL_SSH = "/usr/bin/ssh"
SSHD = "/usr/sbin/sshd"
TOOLS = ("ip", "tc", "unshare", "nsenter", "ssh-keygen", "hostname")
# One lock file per index: whoever holds it owns the namespace and veth of that index, so
# xdist workers never share one, and a namespace whose lock is free is a crashed run's.
LOCKS = Path("/tmp/loractl-secondhost")
FIRST_INDEX, INDICES = 20, 200
_instances = itertools.count()

# PID 1 of the second host's process table: names the host, then stays alive and reaps the
# orphans (a session's processes once sshd is killed), so sshd can stop and start again
# without taking the host's processes with it.
HOST_INIT = 'hostname "$1" || exit 1; while :; do sleep 1; done'


def unavailable() -> str | None:
    """Why no second host can be made here, or None when one can."""
    if not sys.platform.startswith("linux"):
        return "a second host needs Linux network and PID namespaces"
    if os.geteuid() != 0:
        return "a second host needs root (network namespaces, veth, sshd)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    missing += [path for path in (SSHD, REAL_SSH) if not os.access(path, os.X_OK)]
    if missing:
        return f"a second host needs {', '.join(missing)} (apt: iproute2 openssh-server)"
    return namespaces_unavailable()


@functools.cache
def namespaces_unavailable() -> str | None:
    """Why this root cannot make the namespaces a second host is made of (a container
    without CAP_SYS_ADMIN, say), or None when it can: probed once, with a throwaway set."""
    probe = run("unshare", "--net", "--pid", "--fork", "--mount-proc", "--uts", "true", check=False)
    if probe.returncode != 0:
        return f"cannot make network and PID namespaces here: {probe.stderr.strip()}"
    return None


def lossy_link_unavailable() -> str | None:
    """Why neither netem nor a TUN relay can make a bad link here, or None."""
    if SecondHost.netem_unavailable() is None:
        return None
    if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        return f"no tc netem ({SecondHost.netem_unavailable()}) and no /dev/net/tun"
    return None


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done


def pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def is_trainer(cmdline: list[str]) -> bool:
    """A trainer's own command line, not a shell whose script merely names it (mlx.launch's
    remote script does)."""
    return any(
        word == "-m" and cmdline[i + 1 : i + 2] == ["loractl.daemon.trainer"]
        for i, word in enumerate(cmdline)
    )


class SecondHost:
    """A second host at ``address`` named ``name``, with ssh from this machine as root."""

    def __init__(self, folder: Path, name: str = "mac2"):
        reason = unavailable()
        if reason:
            raise RuntimeError(reason)
        self.folder = folder
        self.name = name
        self._closed = False
        self._lock: IO[str] | None = None
        self._init: subprocess.Popen | None = None  # unshare, parent of the host's PID 1
        self._sshd: subprocess.Popen | None = None
        self._pid_ns: str | None = None
        self.index = self._claim_index()
        self.netns = f"lcns{self.index}"
        self.host_link = f"lcA{self.index}"  # this machine's end of the veth
        self.guest_link = f"lcB{self.index}"  # the second host's end
        self.local_address = f"10.231.{self.index}.1"
        self.address = f"10.231.{self.index}.2"
        self._relay: subprocess.Popen | None = None  # the slow, lossy link, when there is one
        self.relay_links = (f"ltA{self.index}", f"ltB{self.index}")
        try:
            self._remove_leftovers()
            self._make_network()
            self._make_keys()
            self._start_host()
            self.allow_ssh()
        except BaseException:
            self.close()
            raise

    # -- setup -------------------------------------------------------------------------

    def _claim_index(self) -> int:
        LOCKS.mkdir(mode=0o700, exist_ok=True)
        start = (os.getpid() * 7 + next(_instances)) % INDICES
        for offset in range(INDICES):
            index = FIRST_INDEX + (start + offset) % INDICES
            handle = open(LOCKS / f"lcns{index}.lock", "w")  # held until close()
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            self._lock = handle
            return index
        raise RuntimeError(f"all {INDICES} second-host indices are in use")

    def _remove_leftovers(self) -> None:
        """What a crashed run with this index left: its processes, namespace and veth."""
        names = run("ip", "netns", "list").stdout.split()
        if self.netns in names:
            for pid in run("ip", "netns", "pids", self.netns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._delete_network()

    def _delete_network(self) -> None:
        # Deleting the namespace frees its veth only once the kernel releases the namespace,
        # which is asynchronous: delete the pair by name so the next run can reuse it at once.
        if run("ip", "link", "show", self.host_link, check=False).returncode == 0:
            run("ip", "link", "del", self.host_link, check=False)
        if self.netns in run("ip", "netns", "list").stdout.split():
            run("ip", "netns", "del", self.netns, check=False)

    def _make_network(self) -> None:
        taken = run("ip", "-4", "-o", "addr", "show").stdout
        if f" 10.231.{self.index}." in taken:
            raise RuntimeError(f"10.231.{self.index}.0/24 is already on an interface here")
        run("ip", "netns", "add", self.netns)
        run("ip", "link", "add", self.host_link, "type", "veth", "peer", "name", self.guest_link)
        run("ip", "link", "set", self.guest_link, "netns", self.netns)
        run("ip", "addr", "add", f"{self.local_address}/24", "dev", self.host_link)
        run("ip", "link", "set", self.host_link, "up")
        self._in_netns("ip", "addr", "add", f"{self.address}/24", "dev", self.guest_link)
        self._in_netns("ip", "link", "set", self.guest_link, "up")
        self._in_netns("ip", "link", "set", "lo", "up")

    def _in_netns(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return run("ip", "netns", "exec", self.netns, *argv, check=check)

    def _make_keys(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.host_key = self.folder / "host_ed25519"
        self.client_key = self.folder / "client_ed25519"
        for key in (self.host_key, self.client_key):
            if not key.exists():
                run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        self.authorized_keys = self.folder / "authorized_keys"
        self.authorized_keys.write_text(Path(f"{self.client_key}.pub").read_text())
        self.sshd_config = self.folder / "sshd_config"
        self.sshd_config.write_text(
            f"ListenAddress {self.address}\n"
            f"HostKey {self.host_key}\n"
            f"AuthorizedKeysFile {self.authorized_keys}\n"
            "PermitRootLogin yes\n"
            "StrictModes no\n"
            "UsePAM no\n"
            "PidFile none\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PrintMotd no\n"
        )
        self.bin = self.folder / "bin"
        self.bin.mkdir(exist_ok=True)
        wrapper = self.bin / "ssh"
        # mlx.launch runs plain `ssh -tt -o LogLevel=QUIET HOST 'script'`: this one adds the
        # key and trusts the fresh host key. ConnectTimeout keeps a partitioned host from
        # holding a connect (and mlx.launch's kill script) for the kernel's two minutes.
        wrapper.write_text(
            "#!/bin/sh\n"
            f"exec {REAL_SSH} -i {self.client_key} -o StrictHostKeyChecking=no"
            " -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o ConnectTimeout=10"
            ' "$@"\n'
        )
        wrapper.chmod(0o755)
        self.log = self.folder / "sshd.log"

    def _start_host(self) -> None:
        """The host's own PID, UTS and mount namespaces inside its network namespace."""
        with self.log.open("ab") as handle:
            self._init = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, "unshare", "--pid", "--fork"]
                + ["--mount-proc", "--uts", "sh", "-c", HOST_INIT, "init", self.name],
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=handle,
            )
        init = self._init

        def host_init() -> psutil.Process | None:
            if init.poll() is not None:
                raise RuntimeError(f"the second host's init exited: {self.log.read_text()}")
            children = psutil.Process(init.pid).children()
            if not children or pid_namespace(children[0].pid) == pid_namespace(init.pid):
                return None
            return children[0]

        self.init_pid = wait_for(host_init, timeout=10).pid
        self._pid_ns = pid_namespace(self.init_pid)
        # The host is named once its init has run `hostname`; a session must never see
        # this machine's name where another was asked for.
        wait_for(lambda: self.run_inside("hostname").stdout.strip() == self.name, timeout=10)

    def run_inside(self, *argv: str, check: bool = False) -> subprocess.CompletedProcess:
        """Run ``argv`` on the second host (its namespaces), not over ssh."""
        enter = ["nsenter", "--target", str(self.init_pid), "--net", "--pid", "--uts", "--mount"]
        return run(*enter, "--", *argv, check=check)

    # -- what tests use ----------------------------------------------------------------

    def path_env(self) -> str:
        """PATH with the ssh wrapper first, for the supervisor that launches the ranks."""
        return f"{self.bin}{os.pathsep}{os.environ.get('PATH', os.defpath)}"

    def ssh(self, *command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run ``command`` on the second host over ssh, as mlx.launch would."""
        return subprocess.run(
            [str(self.bin / "ssh"), self.address, *command],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def reachable(self) -> bool:
        try:
            return self.ssh("true", timeout=15).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def hostfile(self, path: Path) -> Path:
        """An mlx.launch hostfile: rank 0 on this machine, rank 1 on the second host."""
        hosts = [
            {"ssh": "127.0.0.1", "ips": [self.local_address]},
            {"ssh": self.address, "ips": [self.address]},
        ]
        path.write_text(json.dumps(hosts))
        return path

    def processes(self) -> list[psutil.Process]:
        """Live processes of the second host's process table (by their pids on this one)."""
        found = []
        for proc in psutil.process_iter(["status"]):
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if pid_namespace(proc.pid) == self._pid_ns:
                found.append(proc)
        return found

    def trainers(self) -> list[psutil.Process]:
        """Live rank trainers on the second host; a trainer's forked helper that has not
        exec'd yet carries its command line, and is part of it, so it is left out."""
        found = []
        for proc in self.processes():
            try:
                if is_trainer(proc.cmdline()):
                    found.append(proc)
            except psutil.Error:
                continue
        pids = {proc.pid for proc in found}
        return [proc for proc in found if _ppid(proc) not in pids]

    def kill_remote_trainer(self) -> int:
        """SIGKILL the second host's rank trainer; its pid on this machine."""
        trainers = wait_for(self.trainers, timeout=60)
        assert len(trainers) == 1, f"expected one remote trainer: {trainers}"
        trainers[0].kill()
        return trainers[0].pid

    def partition(self) -> None:
        """Cut the link: nothing passes either way until heal()."""
        run("ip", "link", "set", self.host_link, "down")

    def heal(self) -> None:
        run("ip", "link", "set", self.host_link, "up")

    @staticmethod
    def netem_unavailable() -> str | None:
        """Why tc netem cannot be used on this kernel, or None when it can (probed on lo
        of a throwaway network namespace, so no real interface is touched)."""
        probe = run(
            "unshare",
            "--net",
            "tc",
            "qdisc",
            "add",
            "dev",
            "lo",
            "root",
            "netem",
            "delay",
            "1ms",
            check=False,
        )
        return None if probe.returncode == 0 else f"tc netem: {probe.stderr.strip()}"

    def netem(self, delay_ms: float = 200, loss_pct: float = 5) -> None:
        """A bad link: each direction gets ``delay_ms`` (so a round trip gains twice that)
        and loses ``loss_pct`` percent of packets. Raises RuntimeError without netem."""
        shape = ["root", "netem", "delay", f"{delay_ms}ms", "loss", f"{loss_pct}%"]
        run("tc", "qdisc", "replace", "dev", self.host_link, *shape)
        self._in_netns("tc", "qdisc", "replace", "dev", self.guest_link, *shape)

    def clear_netem(self) -> None:
        run("tc", "qdisc", "del", "dev", self.host_link, "root", check=False)
        self._in_netns("tc", "qdisc", "del", "dev", self.guest_link, "root", check=False)

    def lossy_link(self, delay_ms: float = 200, loss_pct: float = 5) -> tuple[str, str]:
        """A second link to the host, slow and lossy, without netem: a TUN device on each
        side, and a relay process between them that holds every packet ``delay_ms`` and drops
        ``loss_pct`` percent, each way (the kernel's TCP sees real delay and real loss).
        Returns the two ends' addresses, ``(this machine's, the host's)``, on 10.232.<i>.0/24;
        ssh stays on the veth."""
        here, there = f"10.232.{self.index}.1", f"10.232.{self.index}.2"
        ours, theirs = self.relay_links
        for link in self.relay_links:
            run("ip", "tuntap", "add", "dev", link, "mode", "tun")
        self._relay = subprocess.Popen(
            [sys.executable, __file__, "relay", ours, theirs, str(delay_ms), str(loss_pct)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._relay.stdout is not None and self._relay.stdin is not None
        # The relay holds both devices open; moved into the namespace, the far one stays its.
        if self._relay.stdout.readline().strip() != "attached":
            raise RuntimeError("the relay could not attach its TUN devices")
        run("ip", "link", "set", theirs, "netns", self.netns)
        run("ip", "addr", "add", f"{here}/24", "dev", ours)
        run("ip", "link", "set", ours, "up")
        self._in_netns("ip", "addr", "add", f"{there}/24", "dev", theirs)
        self._in_netns("ip", "link", "set", theirs, "up")
        self._relay.stdin.write("go\n")
        self._relay.stdin.flush()
        return here, there

    def _close_lossy_link(self) -> None:
        if self._relay is not None:
            self._relay.kill()
            self._relay.wait(timeout=30)
            for end in (self._relay.stdin, self._relay.stdout):
                if end is not None:
                    end.close()
            self._relay = None
        for link in self.relay_links:
            if run("ip", "link", "show", link, check=False).returncode == 0:
                run("ip", "link", "del", link, check=False)

    def refuse_ssh(self) -> None:
        """Stop sshd: new connections are refused; sessions and ranks already there run on."""
        if self._sshd is not None:
            # Only the listener (nsenter's child): its sessions are processes of their own.
            for listener in psutil.Process(self._sshd.pid).children():
                listener.kill()
            self._sshd.wait(timeout=30)
            self._sshd = None
        wait_for(lambda: not self.reachable(), timeout=30)

    def allow_ssh(self) -> None:
        """Start sshd on the second host and wait until ssh works."""
        if self._sshd is None:
            # sshd insists on its privilege separation folder; the host shares this one's /run.
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
            with self.log.open("ab") as handle:
                self._sshd = subprocess.Popen(
                    ["nsenter", "--target", str(self.init_pid), "--net", "--pid", "--uts"]
                    + ["--mount", "--", SSHD, "-D", "-e", "-f", str(self.sshd_config)],
                    stdin=subprocess.DEVNULL,
                    stdout=handle,
                    stderr=handle,
                )
        sshd = self._sshd

        def answers() -> bool:
            if sshd.poll() is not None:
                raise RuntimeError(f"sshd exited {sshd.returncode}: {self.log.read_text()}")
            return self.reachable()

        wait_for(answers, timeout=30, interval=0.1)

    def close(self) -> None:
        """Tear everything down; safe to call twice and after a failed setup."""
        if self._closed:
            return
        self._closed = True
        for popen in (self._sshd, self._init):
            if popen is not None and popen.poll() is None:
                popen.kill()
        if self._pid_ns is not None:
            # Killing PID 1 of a PID namespace kills every process in it.
            try:
                os.kill(self.init_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for popen in (self._sshd, self._init):
            if popen is not None:
                popen.wait(timeout=30)
        self._close_lossy_link()
        if self._lock is not None:
            try:
                self._remove_leftovers()
            finally:
                self._lock.close()
                self._lock = None

    def __enter__(self) -> SecondHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ppid(proc: psutil.Process) -> int | None:
    try:
        return proc.ppid()
    except psutil.Error:
        return None


class NamespacedSupervisor(SupervisorProcess):
    """A supervisor in a process table of its own, restarted by a keep-alive loop as launchd
    would restart it. The loop, not the supervisor, is that table's PID 1: killing PID 1
    kills every process of the namespace. Pids that ``show`` reports are namespace-local."""

    def __init__(self, home: Path, second_host: SecondHost | None = None, **env: str):
        if second_host is not None:
            env.setdefault("PATH", second_host.path_env())
        super().__init__(home, **env)
        self.stop_file = home.parent / f"{home.name}-keepalive.stop"

    def start(self) -> NamespacedSupervisor:
        self.home.mkdir(parents=True, exist_ok=True)
        self.stop_file.unlink(missing_ok=True)
        daemon = [sys.executable, "-m", "loractl.client.cli", "--home", str(self.home)]
        # The loop's $0 is the stop file: stop() creates it so the loop does not restart
        # the supervisor it is stopping. The pause keeps one that dies at once from spinning.
        keep_alive = 'while [ ! -e "$0" ]; do "$@"; sleep 0.5; done'
        with self.log.open("ab") as handle:
            self.proc = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", keep_alive]
                + [str(self.stop_file), *daemon, "daemon", "run"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=handle,
            )
        wait_for(self._answers, timeout=30, interval=0.05)
        return self

    def keep_alive_pid(self) -> int:
        """The host pid of the namespace's PID 1, the keep-alive loop."""
        return wait_for(lambda: psutil.Process(self.proc.pid).children(), timeout=10)[0].pid

    def supervisor_pid(self, timeout: float = 30) -> int:
        """The host pid of the running ``daemon run`` process."""
        loop = psutil.Process(self.keep_alive_pid())

        def daemon() -> int | None:
            for child in loop.children():
                try:
                    cmdline = child.cmdline()
                except psutil.Error:
                    continue
                if cmdline[-2:] == ["daemon", "run"] and child.status() != psutil.STATUS_ZOMBIE:
                    return child.pid
            return None

        return wait_for(daemon, timeout=timeout, interval=0.05)

    def kill(self) -> None:
        """SIGKILL the supervisor only; the loop restarts it; returns once the new one
        answers."""
        victim = self.supervisor_pid()
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: self.supervisor_pid() != victim, timeout=30, interval=0.05)
        wait_for(self._answers, timeout=30, interval=0.05)

    def stop(self) -> None:
        """Stop the supervisor, then everything in its namespace (its launchers and ranks)."""
        if self.proc is None:
            return
        self.stop_file.touch()
        if self.proc.poll() is None:
            try:
                daemon = psutil.Process(self.supervisor_pid(timeout=5))
                daemon.terminate()
                daemon.wait(timeout=40)
            except (AssertionError, psutil.Error):
                pass  # already gone, or deaf: the namespace's end below takes it
            try:
                os.kill(self.keep_alive_pid(), signal.SIGKILL)
            except (AssertionError, ProcessLookupError, psutil.Error):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for proc in trainers_of(self.home):
            kill_tree(proc)


@pytest.fixture
def second_host(tmp_path) -> Iterator[SecondHost]:
    """A second host named mac2, torn down after the test whatever its outcome."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    host = SecondHost(tmp_path / "second-host")
    try:
        yield host
    finally:
        host.close()


@pytest.fixture
def second_host_factory(tmp_path) -> Iterator:
    """Makes second hosts with a chosen name (``make(name=socket.gethostname())``); all are
    torn down after the test."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    made: list[SecondHost] = []

    def make(name: str = "mac2") -> SecondHost:
        host = SecondHost(tmp_path / f"second-host-{len(made)}", name=name)
        made.append(host)
        return host

    try:
        yield make
    finally:
        for host in made:
            host.close()


def relay(ours: str, theirs: str, delay_ms: str, loss_pct: str) -> None:
    """The lossy link's relay (run as ``python secondhost.py relay ...``): attach both TUN
    devices, say "attached", wait for "go" (the far device moved into the namespace and both
    addressed), then pass each packet across after ``delay_ms``, dropping ``loss_pct``%."""
    import heapq
    import random
    import select
    import struct
    import time

    tunsetiff, iff_tun, iff_no_pi = 0x400454CA, 0x0001, 0x1000

    def attach(name: str) -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, tunsetiff, struct.pack("16sH", name.encode(), iff_tun | iff_no_pi))
        return fd

    first, second = attach(ours), attach(theirs)
    print("attached", flush=True)
    sys.stdin.readline()
    delay, loss = float(delay_ms) / 1000, float(loss_pct) / 100
    across = {first: second, second: first}
    held: list[tuple[float, int, int, bytes]] = []
    count = itertools.count()
    while True:
        wait = max(0.0, held[0][0] - time.monotonic()) if held else 1.0
        ready, _, _ = select.select([first, second], [], [], wait)
        for fd in ready:
            packet = os.read(fd, 65536)
            if random.random() >= loss:
                heapq.heappush(held, (time.monotonic() + delay, next(count), across[fd], packet))
        now = time.monotonic()
        while held and held[0][0] <= now:
            _, _, destination, packet = heapq.heappop(held)
            os.write(destination, packet)


if __name__ == "__main__" and sys.argv[1:2] == ["relay"]:
    relay(*sys.argv[2:6])
