"""Atomic directory writes: a reader sees the previous complete directory or the new one, never part."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_dembed import _atomic


def write(path: Path, text: str) -> None:
    with _atomic.atomic_directory(path) as staging:
        (staging / "data.txt").write_text(text)


def test_a_write_replaces_the_directory_and_leaves_one_version(tmp_path: Path) -> None:
    path = tmp_path / "out"
    write(path, "one")
    write(path, "two")
    assert (path / "data.txt").read_text() == "two"
    assert path.is_symlink() and len(list(_atomic.versions_dir(path).iterdir())) == 1


def test_an_error_keeps_the_previous_directory_and_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "out"
    write(path, "one")
    with pytest.raises(RuntimeError, match="disk full"):
        with _atomic.atomic_directory(path) as staging:
            (staging / "data.txt").write_text("half")
            raise RuntimeError("disk full")
    assert (path / "data.txt").read_text() == "one"
    assert len(list(_atomic.versions_dir(path).iterdir())) == 1
    with pytest.raises(RuntimeError):
        with _atomic.atomic_directory(tmp_path / "new"):
            raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.versions", "out"]


def test_what_a_killed_write_left_is_removed_by_the_next(tmp_path: Path) -> None:
    path = tmp_path / "out"
    write(path, "one")
    (_atomic.new_version(path) / "data.txt").write_text("killed before publishing")
    assert (path / "data.txt").read_text() == "one"
    write(path, "two")
    assert len(list(_atomic.versions_dir(path).iterdir())) == 1


def test_discard_never_removes_the_published_version(tmp_path: Path) -> None:
    path = tmp_path / "out"
    version = _atomic.new_version(path)
    _atomic.publish(path, version)
    _atomic.discard(path, version)
    assert path.resolve() == version.resolve() and version.is_dir()


KILL_WHILE_REPLACING_A_PLAIN_DIRECTORY = """
import os, pathlib
from lightning_dembed import _atomic
def killed(*args):
    os.kill(os.getpid(), 9)
os.symlink = killed  # after the plain directory was moved aside, before the link is in place
with _atomic.atomic_directory(pathlib.Path({path!r})) as staging:
    (staging / "data.txt").write_text("two")
"""


def test_a_plain_directory_replaced_by_a_killed_write_comes_back(tmp_path: Path) -> None:
    # What versions of lightning-dembed before atomic writes left: a plain directory.
    path = tmp_path / "out"
    path.mkdir()
    (path / "data.txt").write_text("one")
    script = KILL_WHILE_REPLACING_A_PLAIN_DIRECTORY.format(path=str(path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not path.exists()  # the one instant a reader finds nothing; the next write restores it
    version = _atomic.new_version(path)
    assert (path / "data.txt").read_text() == "one" and not path.is_symlink()
    _atomic.discard(path, version)
    write(path, "two")
    assert (path / "data.txt").read_text() == "two" and path.is_symlink()
    _atomic.remove(path)
    assert list(tmp_path.iterdir()) == []
