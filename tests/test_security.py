"""Other local users reach nothing of loractl's: not its files, not its sockets, and a
runtime folder they created first is refused by the supervisor and by the client."""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from pathlib import Path

import pytest
import yaml
import zmq

from loractl.client.control import request
from loractl.client.harness import SupervisorProcess
from loractl.paths import Layout, UnsafeFolder
from loractl.protocol import ClientExit, ExitCode, StatusRequest, SubmitRequest

OTHER_USER = "loractl-fuzz-other"
NOBODY = 65534

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="creating users and giving folders away (chown) needs root"
)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def base(monkeypatch):
    """A short folder in /tmp that anyone may traverse (so only loractl's own modes stand
    between other users and its files), holding the runtime root."""
    folder = Path(tempfile.mkdtemp(prefix="lc-sec-", dir="/tmp"))
    os.chmod(folder, 0o755)
    monkeypatch.setenv("LORACTL_RUNTIME_DIR", str(folder / "rt"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def job_config(base: Path) -> Path:
    for name in ("model", "data"):
        (base / name).mkdir(exist_ok=True)
    path = base / "job.yaml"
    path.write_text(yaml.safe_dump({"model": str(base / "model"), "data": str(base / "data")}))
    return path


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loractl.client.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


# -- a runtime folder someone else made first --------------------------------------------------


@needs_root
def test_supervisor_refuses_a_runtime_folder_another_user_made(base):
    """With the runtime root owned by another uid, `daemon run` exits 78 naming the folder,
    its owner and mode, and binds nothing."""
    root = base / "rt"
    root.mkdir()
    os.chmod(root, 0o777)
    os.chown(root, NOBODY, NOBODY)
    result = cli("--home", str(base / "home"), "daemon", "run")
    assert result.returncode == ExitCode.CONFIG_ERROR, result.stderr
    assert f"refusing to use {root}" in result.stderr
    assert f"owned by uid {NOBODY}, mode 0777, not owned by you (uid 0)" in result.stderr
    assert list(root.iterdir()) == [], "nothing was created in (or bound inside) it"
    assert os.lstat(root).st_uid == NOBODY and mode(root) == 0o777


@needs_root
def test_client_refuses_to_talk_through_a_runtime_folder_another_user_owns(base):
    """A stranger's runtime folder with a control socket bound in it, and a daemon seemingly
    alive: `loractl submit` refuses to connect (exit 5, one line); the impostor hears nothing."""
    layout = Layout.at(base / "home")
    layout.home.mkdir(mode=0o700)
    layout.runtime.mkdir(parents=True)
    # The impostor answers every request with success: before the check, `submit` printed
    # its reply and exited 0 while nothing was queued.
    impostor = zmq.Context.instance().socket(zmq.ROUTER)
    impostor.setsockopt(zmq.LINGER, 0)
    impostor.bind(layout.control)
    for folder in (layout.runtime.parent, layout.runtime):
        os.chmod(folder, 0o777)
        os.chown(folder, NOBODY, NOBODY)
    # A lock on the pidfile, as a live supervisor holds it, so only the folder check is left.
    lock = os.open(layout.pidfile, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        with pytest.raises(UnsafeFolder, match=f"owned by uid {NOBODY}"):
            request(layout, StatusRequest(), timeout=1)
        result = cli("--home", str(layout.home), "submit", str(job_config(base)))
        assert not impostor.poll(200), "the client talked to the impostor"
    finally:
        os.close(lock)
        impostor.close()
    assert result.returncode == ClientExit.REFUSED, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert f"refusing to use {layout.runtime.parent}" in line and "LORACTL_RUNTIME_DIR" in line
    assert result.stdout == ""


# -- a second local user against a running supervisor -----------------------------------------


@pytest.fixture
def other_user():
    """A real second local user, removed again afterwards."""
    if shutil.which("useradd") is None or shutil.which("userdel") is None:
        pytest.skip("useradd/userdel are not available to create a second user")
    if _exists(OTHER_USER):
        subprocess.run(["userdel", OTHER_USER], check=False, capture_output=True)
    shell = shutil.which("nologin") or "/bin/false"
    made = subprocess.run(
        ["useradd", "-M", "-s", shell, OTHER_USER], capture_output=True, text=True
    )
    if made.returncode != 0:
        pytest.skip(f"useradd failed: {made.stderr.strip()}")
    try:
        yield pwd.getpwnam(OTHER_USER)
    finally:
        subprocess.run(["userdel", OTHER_USER], check=False, capture_output=True)


def _exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def _as(user: pwd.struct_passwd, args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        args,
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=[],
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", **env},
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
    )


def _interpreter_for(user: pwd.struct_passwd) -> str:
    """A Python of our version that the other user may run (ours may sit under /root)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [os.path.realpath(sys.executable), f"/usr/bin/python{version}"]
    candidates += [found] if (found := shutil.which(f"python{version}")) else []
    for candidate in candidates:
        try:
            ran = _as(user, [candidate, "-c", "import sys; print(sys.version_info[:2])"], {})
        except OSError:
            continue
        if ran.returncode == 0 and ran.stdout.strip() == str(sys.version_info[:2]):
            return candidate
    pytest.skip(f"no python{version} the second user may run (ours is {sys.executable})")


# Run as the other user: every way in, each recorded as "denied", "answered" or the error.
PROBE = textwrap.dedent(
    """
    import json, os, site, socket, sys
    args = json.loads(sys.argv[1])
    site.addsitedir(args["site"])
    import zmq
    seen = {}

    def attempt(name, action):
        try:
            action()
            seen[name] = "allowed"
        except PermissionError:
            seen[name] = "denied"
        except Exception as exc:
            seen[name] = f"{type(exc).__name__}: {exc}"

    def read(path):
        with open(path, "rb") as handle:
            handle.read(1)

    for key in ("db", "config", "log"):
        attempt("read " + key, lambda key=key: read(args[key]))
    for key in ("home", "jobs", "logs", "runtime_root"):
        attempt("list " + key, lambda key=key: os.listdir(args[key]))

    def unix_connect():
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(args["control_path"])

    attempt("connect control", unix_connect)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(args["control"])
    sock.send(args["request"].encode())
    seen["zmq status"] = "answered" if sock.poll(1500) else "no answer"
    sock.close()
    # loractl's own client, pointed at the daemon's home and runtime folder.
    from loractl.client.control import request
    from loractl.paths import Layout
    from loractl.protocol import StatusRequest
    try:
        request(Layout.at(args["home"]), StatusRequest(), timeout=1)
        seen["client"] = "answered"
    except Exception as exc:
        seen["client"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(seen))
    """
)
CLIENT = (
    "import site, sys; site.addsitedir(sys.argv.pop(1)); sys.argv[0] = 'loractl';"
    " from loractl.client.cli import main; main()"
)


@needs_root
def test_a_second_local_user_reaches_no_file_and_no_socket(base, other_user):
    """Against a running supervisor with a queued job: the other user can read neither the
    database, a job config nor the logs (not even with the folders opened up, as the files
    are 0600), cannot connect to the control socket, and `loractl status` refuses."""
    python = _interpreter_for(other_user)
    sup = SupervisorProcess(base / "home", LORACTL_HOLD_QUEUE="1").start()
    try:
        layout = sup.layout
        job_id = request(layout, SubmitRequest(config_path=str(job_config(base)))).data["id"]
        config = layout.job_dir(job_id) / "config.yaml"
        log = layout.logs / "supervisor.log"
        for path in (layout.database, config, log):
            assert path.is_file() and mode(path) == 0o600, (path, oct(mode(path)))
        for folder in (*layout.folders, layout.runtime.parent, layout.runtime):
            assert mode(folder) == 0o700, folder
        assert mode(layout.runtime / "control") & 0o077 == 0
        args = {
            "site": sysconfig.get_paths()["purelib"],
            "db": str(layout.database),
            "config": str(config),
            "log": str(log),
            "home": str(layout.home),
            "jobs": str(layout.jobs),
            "logs": str(layout.logs),
            "runtime_root": str(layout.runtime.parent),
            "control_path": str(layout.runtime / "control"),
            "control": layout.control,
            "request": StatusRequest().encode().decode(),
        }
        env = {"LORACTL_RUNTIME_DIR": os.environ["LORACTL_RUNTIME_DIR"]}
        probe = _as(other_user, [python, "-c", PROBE, json.dumps(args)], env)
        assert probe.returncode == 0, probe.stderr
        seen = json.loads(probe.stdout)
        assert seen.pop("zmq status") == "no answer"
        client = seen.pop("client")
        assert client.startswith(f"UnsafeFolder: refusing to use {layout.runtime.parent}")
        assert f"not owned by you (uid {other_user.pw_uid})" in client
        assert seen == dict.fromkeys(seen, "denied"), seen

        # The command line stops earlier still: it may not even read the home folder.
        status = _as(
            other_user,
            [python, "-c", CLIENT, args["site"], "--home", str(layout.home), "status"],
            env,
        )
        assert status.returncode == ClientExit.USAGE and status.stdout == ""
        assert "is not readable" in status.stderr

        # Folders opened up (as a user might): the files themselves are still 0600.
        for folder in (layout.home, layout.jobs, layout.job_dir(job_id), layout.logs):
            os.chmod(folder, 0o755)
        probe = _as(other_user, [python, "-c", PROBE, json.dumps(args)], env)
        seen = json.loads(probe.stdout)
        assert [seen[f"read {key}"] for key in ("db", "config", "log")] == ["denied"] * 3
        assert seen["list home"] == "allowed", "the probe did get past the folder this time"
        assert sup.proc.poll() is None
        assert request(layout, StatusRequest()).data["jobs"] == {"queued": 1}
    finally:
        sup.stop()
