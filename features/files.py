"""Files published so that they survive a crash of the process, of the OS or of the power.

A rename is atomic but not durable by itself: until the directory holding the new name is
flushed, a power loss may bring back the old directory, and until a file's data is flushed its
new name may point at an empty or partial file. So a file is published in three steps: fsync
the staged file, rename it into place, fsync the directory it now lives in (and the parent of
a directory created for it). With `durable=False` the flushes are skipped (only for measuring
what they cost: a crash may then lose or truncate recently published files).

A published file is never overwritten by another one: a target that exists already with the
same bytes is an idempotent re-publication (the staged copy is dropped), one with other bytes
is refused with PublishConflictError, because it means two batches were given one name.
"""

from __future__ import annotations

import filecmp
import os
from pathlib import Path
from typing import Iterable


class PublishConflictError(Exception):
    """A file would replace a published file with different content."""


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's data and metadata to stable storage."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flush_files(paths: Iterable[Path]) -> None:
    """fsync files, then each directory holding them: for staged files that must be on disk before
    a commit that refers to them (after it, recovery publishes them instead of re-reading)."""
    directories = set()
    for path in paths:
        fsync_path(path)
        directories.add(path.parent)
    for directory in directories:
        fsync_path(directory)


def make_directory(directory: Path, durable: bool = True) -> None:
    """Create `directory` (and missing parents) with each new entry flushed into its parent."""
    if directory.is_dir():
        return
    make_directory(directory.parent, durable)
    directory.mkdir(exist_ok=True)
    if durable:
        fsync_path(directory.parent)


def move_into_place(staged: Path, target: Path, durable: bool = True, replace: bool = False) -> bool:
    """fsync `staged`, rename it to `target`, fsync the target's directory.

    Without `replace` an existing target is never overwritten: the same bytes there make this a
    no-op that removes `staged` (returns False), other bytes raise PublishConflictError (staged is
    kept for inspection). `replace=True` is for rewriting a published file on purpose (the same
    rows under a grown schema). Returns True when `staged` was moved.
    """
    make_directory(target.parent, durable)
    if durable:
        fsync_path(staged)
    if replace:
        os.replace(staged, target)
        if durable:
            fsync_path(target.parent)
        return True
    try:
        os.link(staged, target)  # unlike a rename, a link never replaces an existing name
    except FileExistsError:
        if not filecmp.cmp(staged, target, shallow=False):
            raise PublishConflictError(
                f"Refusing to overwrite the published file {target} with {staged}, whose content differs: "
                "two batches were given the same name. Nothing was replaced; the staged file is kept.") from None
        staged.unlink()
        return False
    if durable:
        fsync_path(target.parent)  # the new name is durable before the staged one goes
    staged.unlink()
    return True
