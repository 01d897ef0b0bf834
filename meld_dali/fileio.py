"""Atomic file writes: write `name.tmp`, fsync, rename over the target, fsync the folder.

A reader (or a run resumed after a kill) sees the old file or the new one, never half of
one; a kill mid-write leaves only a `*.tmp` behind. Checkpoints, the manifest and the
metrics log all go through here.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_write(path: str | Path, mode: str = "w",
                 keep_previous: bool = False) -> Iterator[IO]:
    """Open `path` for writing atomically. keep_previous: the file it replaces is kept as
    `stem.prev.suffix` (a complete one to fall back to if the new one is spoilt later)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    if keep_previous and path.exists():
        os.replace(path, path.with_name(path.stem + ".prev" + path.suffix))
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` itself durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Make `dst` the same bytes as `src` without writing them again: a hard link (timm
    does the same for best/last), or an atomic copy where the filesystem has no links.
    Safe because files written here are only ever replaced by a rename, never rewritten in
    place: replacing one later leaves the other as it was."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # no hard links here (some network or FAT filesystems): copy
        with open(src, "rb") as s, atomic_write(dst, "wb") as d:
            shutil.copyfileobj(s, d, 1 << 24)
        return
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)
