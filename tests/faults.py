"""Faults as they happen on a user's machine, for the tests: bit rot, real processes."""

from __future__ import annotations

import os
from pathlib import Path


def corrupt_in_place(path: Path) -> None:
    """Bit rot: the file's bytes spoilt, its size and time unchanged (what a prepared
    manifest's fingerprint cannot see, so the loaders meet it at training time)."""
    st = path.stat()
    path.write_bytes(b"\x00" * st.st_size)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
