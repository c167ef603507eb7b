"""Directories written all or nothing: checkpoints, preprocessed Criteo data, task stores.

A directory ``P`` written here is a symbolic link to a complete version, ``.P.versions/<id>``,
beside it. A write:

1. `new_version`: removes the versions ``P`` does not point to (what a killed write left) and
   creates an empty one;
2. fills it (the caller, from one process or several);
3. `publish`: fsyncs its files and directories, points ``P`` at it with one atomic rename of a
   fresh link over ``P`` (the parent directory fsync'd), then removes the previous version.

Until that rename ``P`` is the previous complete directory (or absent); after it, the new one. So
no failure, a kill included, loses a good ``P``, and a reader never sees half of one. A write
removes every version ``P`` does not point to: one writer per ``P`` at a time. `atomic_directory`
does all three steps for a writer in one process; `remove` deletes ``P`` with its versions.

A plain directory at ``P`` (written before versions existed) is moved into ``.P.versions`` just
before the link replaces it; a write killed between those two renames leaves ``P`` missing until
the next write of ``P`` puts it back.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

__all__ = ["atomic_directory", "discard", "new_version", "publish", "remove", "versions_dir"]

# What a plain directory at ``P`` (written before versions existed) is moved to while ``P`` becomes
# a link; a write killed in between is undone from here.
_FORMER = "former"


def versions_dir(path: Union[str, Path]) -> Path:
    """Where the versions of ``path`` live: ``.<name>.versions`` beside it."""
    path = Path(path)
    # Hidden and without the name's suffix, so a search for "*.ckpt" never finds a version.
    return path.with_name(f".{path.name}.versions")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    """Flush every file and directory under ``directory`` to disk, the directories last."""
    for root, _, files in os.walk(directory, topdown=False):
        for name in files:
            _fsync(Path(root, name))
        _fsync(Path(root))


def _restore_former(path: Path) -> None:
    """Put back a plain directory a killed `publish` had moved aside but not yet replaced."""
    former = versions_dir(path) / _FORMER
    if former.is_dir() and not (path.exists() or path.is_symlink()):
        former.rename(path)


def _remove_stale(path: Path) -> None:
    """Remove the versions ``path`` does not point to."""
    versions = versions_dir(path)
    if not versions.is_dir():
        return
    current = path.resolve() if path.is_symlink() else None
    for entry in versions.iterdir():
        if entry.resolve() != current:
            shutil.rmtree(entry)


def new_version(path: Union[str, Path]) -> Path:
    """Clear what killed writes of ``path`` left and create an empty version directory to fill."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _restore_former(path)
    _remove_stale(path)
    version = versions_dir(path) / uuid.uuid4().hex[:16]
    version.mkdir(parents=True)
    return version


def _swap_link(path: Path, version: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        # A plain directory cannot be replaced by a link in one step: moved aside first (and put
        # back by the next write if this one is killed before the link is in place).
        path.rename(versions_dir(path) / _FORMER)
    link = path.with_name(f".{path.name}.link")
    link.unlink(missing_ok=True)
    os.symlink(os.path.relpath(version, path.parent), link)
    os.replace(link, path)
    _fsync(path.parent)


def publish(path: Union[str, Path], version: Path) -> None:
    """Make the filled ``version`` what ``path`` is, in one atomic step, durably."""
    path = Path(path)
    _fsync_tree(version)
    _fsync(version.parent)
    _swap_link(path, version)
    _remove_stale(path)


def discard(path: Union[str, Path], version: Path) -> None:
    """Delete an unpublished version of ``path`` (and the versions folder, once empty).

    A version ``path`` already points to (a `publish` that failed after its link) is kept.
    """
    path = Path(path)
    if path.is_symlink() and path.resolve() == version.resolve():
        return
    shutil.rmtree(version, ignore_errors=True)
    versions = versions_dir(path)
    if versions.is_dir() and not any(versions.iterdir()):
        versions.rmdir()


@contextmanager
def atomic_directory(path: Union[str, Path]) -> Iterator[Path]:
    """A version directory to fill; published at ``path`` when the block ends, discarded on error.

    Example::

        with atomic_directory("stores/ml") as staging:
            (staging / "stats.json").write_text("{}")
        # stores/ml -> .ml.versions/<id>, complete, or (on error) what stores/ml was before
    """
    version = new_version(path)
    try:
        yield version
    except BaseException:
        discard(path, version)
        raise
    publish(path, version)


def remove(path: Union[str, Path]) -> None:
    """Remove ``path`` (a link, or a plain directory) and all its versions."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    shutil.rmtree(versions_dir(path), ignore_errors=True)
