"""Atomic file writes: write `name.tmp`, fsync, rename over the target, fsync the folder.

A reader (or a run resumed after a kill) sees the old file or the new one, never half of
one; a kill mid-write leaves only a `*.tmp` behind. Checkpoints, the manifest and the
metrics log all go through here.
"""

from __future__ import annotations

import os
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
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
