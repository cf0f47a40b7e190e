"""Tests for loractl.paths: private folders, and refusing folders that are not ours alone."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from loractl.paths import Layout, UnsafeFolder, runtime_root, verify_folder

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="giving a folder to another uid (chown) needs root"
)
OTHER_UID = 65534  # nobody


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def base(monkeypatch):
    """A short folder in /tmp (socket paths must stay short), traversable by anyone, with the
    runtime root inside it, and a umask as loose as a user's usual one."""
    folder = Path(tempfile.mkdtemp(prefix="lc-paths-", dir="/tmp"))
    os.chmod(folder, 0o755)
    monkeypatch.setenv("LORACTL_RUNTIME_DIR", str(folder / "rt"))
    old_umask = os.umask(0o022)
    yield folder
    os.umask(old_umask)
    shutil.rmtree(folder, ignore_errors=True)


def test_ensure_creates_every_folder_private_whatever_the_umask(base):
    """home, jobs, inbox, logs, the runtime root and the socket folder are all made 0700."""
    layout = Layout.at(base / "home")
    layout.ensure()
    for folder in (*layout.folders, runtime_root(), layout.runtime):
        assert folder.is_dir() and mode(folder) == 0o700, folder
    layout.check_private()


def test_ensure_tightens_folders_of_ours_that_older_versions_left_open(base):
    """A world-readable home and runtime folder that belong to us are closed to 0700."""
    layout = Layout.at(base / "home")
    for folder in (*layout.folders, runtime_root(), layout.runtime):
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o755)
    layout.ensure()
    assert {mode(f) for f in (*layout.folders, runtime_root(), layout.runtime)} == {0o700}


def test_open_socket_folder_is_refused_by_the_check_with_the_fix(base):
    """check_runtime (what the client runs) refuses a 0755 socket folder, naming mode and fix."""
    layout = Layout.at(base / "home")
    layout.ensure()
    os.chmod(layout.runtime, 0o755)
    with pytest.raises(UnsafeFolder) as info:
        layout.check_runtime()
    message = str(info.value)
    assert str(layout.runtime) in message and "mode 0755" in message
    assert f"chmod 700 '{layout.runtime}'" in message
    assert "\n" not in message


def test_group_writable_home_is_refused(base):
    """A home others may write (drop jobs, replace checkpoints) fails check_private."""
    layout = Layout.at(base / "home")
    layout.ensure()
    os.chmod(layout.inbox, 0o775)
    with pytest.raises(UnsafeFolder, match="mode 0775; other users could drop jobs"):
        layout.check_private()


def test_symlinked_runtime_root_is_refused_even_to_our_own_folder(base):
    """In /tmp anyone can plant a link, so the runtime root must be a real folder."""
    real = base / "real"
    real.mkdir(mode=0o700)
    (base / "rt").symlink_to(real)
    layout = Layout.at(base / "home")
    with pytest.raises(UnsafeFolder, match="it is a symlink"):
        layout.ensure()
    assert list(real.iterdir()) == [], "nothing is created through the link"


def test_runtime_root_in_a_world_writable_non_sticky_parent_is_refused(base):
    """Others could rename our folder away in such a parent; /tmp's sticky bit prevents it."""
    os.chmod(base, 0o777)
    layout = Layout.at(base / "home")
    with pytest.raises(UnsafeFolder, match="mode 0777, so other users could replace it"):
        layout.ensure()
    os.chmod(base, 0o1777)
    layout.ensure()


def test_file_in_the_way_is_refused_not_crashed_on(base):
    """A plain file where the runtime root should be gives UnsafeFolder, not FileExistsError."""
    (base / "rt").write_text("")
    with pytest.raises(UnsafeFolder, match="it is not a folder"):
        Layout.at(base / "home").ensure()


@needs_root
def test_runtime_root_of_another_uid_is_refused_with_owner_mode_and_fix(base):
    """A runtime root another user created first is refused, never chmodded or used."""
    root = base / "rt"
    root.mkdir()
    os.chmod(root, 0o777)
    os.chown(root, OTHER_UID, OTHER_UID)
    layout = Layout.at(base / "home")
    with pytest.raises(UnsafeFolder) as info:
        layout.ensure()
    message = str(info.value)
    assert f"refusing to use {root}" in message
    assert f"owned by uid {OTHER_UID}, mode 0777, not owned by you (uid 0)" in message
    assert "LORACTL_RUNTIME_DIR" in message and "sudo rm -r" in message
    assert mode(root) == 0o777 and os.lstat(root).st_uid == OTHER_UID
    assert not (root / layout.runtime.name / "control").exists()


@needs_root
def test_home_of_another_uid_is_refused(base):
    """A home folder that belongs to someone else is refused (and left as it is)."""
    layout = Layout.at(base / "home")
    layout.ensure()
    os.chown(layout.home, OTHER_UID, OTHER_UID)
    with pytest.raises(UnsafeFolder, match=f"owned by uid {OTHER_UID}, mode 0700, not owned"):
        layout.ensure()
    assert os.lstat(layout.home).st_uid == OTHER_UID


def test_verify_folder_names_a_dangling_link(tmp_path):
    """A dangling link where a folder should be is named, not a FileNotFoundError."""
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UnsafeFolder, match="cannot be used"):
        verify_folder(tmp_path / "gone", private=False)
