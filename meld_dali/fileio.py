"""Safe file writes and folder locks: what keeps a user's files whole whatever happens.

- `atomic_write`: write a uniquely named temp file in the target's folder, fsync, rename over
  the target, fsync the folder. A reader (or a run resumed after a kill) sees the old file or
  the new one, never half of one; two writers never share a temp file; a write that fails
  (full disk, file too large, any error) removes its temp file and leaves the old file as it
  was. A SIGKILL mid-write runs no cleanup: its temp file (`name.<pid>-<random>.tmp`, which no
  reader opens) is removed by the next atomic_write to the same target once process <pid> is
  gone. Checkpoints, the manifest, the report, config.yaml and the metrics rewrite go here.
- `append_line`: one fsynced line appended to a log (metrics.jsonl); `Journal`: many lines,
  fsynced every second (prepare's partial manifest).
- `FolderLock`: one process at a time writes a run folder, a cache or a manifest folder
  (`fcntl.flock`, released by the kernel when the process dies, even by SIGKILL).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from meld_dali.errors import UserError

# a kill mid-write leaves `name.<pid>-<random>.tmp` (or `name.<pid>-<random>.tmp.ext` for
# media files): <pid> is the writer's, so a later writer can tell a dead one's leftover
TMP_SUFFIX = ".tmp"
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class DiskFullError(UserError):
    """A write ran out of space (or past a file size limit): the message names the path and
    the free space; the temporary file is gone and the previous file is intact."""


def disk_full(path: str | Path, e: OSError) -> DiskFullError:
    folder = Path(path).parent
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:,.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    what = "no space left on the device" if e.errno == errno.ENOSPC else \
        "file size limit reached" if e.errno == errno.EFBIG else "disk quota exceeded"
    return DiskFullError(f"cannot write {path}: {what} ({free}); the previous file is "
                         "intact: free some space and run the same command again")


def temp_path(path: str | Path, suffix: str = "") -> Path:
    """A new, unique, empty temp file beside `path` (`name.<pid>-<random>.tmp<suffix>`)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.{os.getpid()}-",
                               suffix=TMP_SUFFIX + suffix)
    os.close(fd)
    return Path(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def remove_leftovers(path: str | Path, suffix: str = "") -> list[Path]:
    """Remove the temp files of writes to `path` that a kill cut short: the siblings named
    as `temp_path` names them whose writer (the pid in the name) is no longer running. A live
    writer's temp file is never touched; nothing else in the folder is either. Returns them."""
    path = Path(path)
    mine = re.compile(re.escape(path.name) + r"\.(\d+)-[A-Za-z0-9_]+"
                      + re.escape(TMP_SUFFIX + suffix) + "$")
    gone = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return gone
    for name in names:
        m = mine.match(name)
        if m and not _alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                (path.parent / name).unlink()
                gone.append(path.parent / name)
    return gone


@contextmanager
def atomic_write(path: str | Path, mode: str = "w",
                 keep_previous: bool = False) -> Iterator[IO]:
    """Open `path` for writing atomically. keep_previous: the file it replaces is kept as
    `stem.prev.suffix` (a complete one to fall back to if the new one is spoilt later).
    ENOSPC/EFBIG/EDQUOT become a one-line DiskFullError; on any failure the temp file goes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)  # what a SIGKILLed write to this file left
    tmp = temp_path(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, path.with_name(path.stem + ".prev" + path.suffix))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in DISK_FULL:
            raise disk_full(path, e) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def append_line(path: str | Path, line: str) -> None:
    """Append one line and fsync it: a kill afterwards cannot take it back (a kill during it
    leaves at most a torn last line, which readers drop). A write that fails (a full disk)
    cuts the file back to its lines before it: a torn tail left there would have the next
    append glued onto it, and that good line lost with it."""
    data = (line.rstrip("\n") + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.fstat(fd).st_size
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            if e.errno in DISK_FULL:
                raise disk_full(path, e) from None
            raise
    finally:
        os.close(fd)


class Journal:
    """Lines appended to a log that a resume reads back (prepare's partial manifest). One
    fsync per line would cost ~13,700 of them for MELD (minutes on a network disk): this
    writes and fsyncs at most every `every_s` seconds and at close, so a kill loses at most
    that much work, which the resume redoes (a torn last line is dropped by the reader). A
    write that fails (a full disk) cuts the file back to the lines written before it, and
    the journal writes nothing more."""

    def __init__(self, path: str | Path, every_s: float = 1.0):
        self.path, self.every_s = Path(path), every_s
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        self.size = os.fstat(self.fd).st_size  # whole lines end here
        self.pending: list[str] = []
        self.synced = time.monotonic()
        self.failed = False

    def append(self, line: str) -> None:
        self.pending.append(line.rstrip("\n") + "\n")
        if time.monotonic() - self.synced >= self.every_s:
            self.sync()

    def sync(self) -> None:
        if self.failed:
            return
        data = "".join(self.pending).encode()
        self.pending.clear()
        try:
            _write_all(self.fd, data)
            os.fsync(self.fd)
        except OSError as e:
            self.failed = True
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)
            if e.errno in DISK_FULL:
                raise disk_full(self.path, e) from None
            raise
        self.size += len(data)
        self.synced = time.monotonic()

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            self.sync()
        finally:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def fsync_dir(folder: Path) -> None:
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
    remove_leftovers(dst)
    tmp = temp_path(dst)
    tmp.unlink()  # os.link wants a free name: a unique one nobody else will take
    try:
        os.link(src, tmp)
    except OSError:  # no hard links here (some network or FAT filesystems): copy
        with open(src, "rb") as s, atomic_write(dst, "wb") as d:
            shutil.copyfileobj(s, d, 1 << 24)
        return
    os.replace(tmp, dst)
    fsync_dir(dst.parent)


def check_writable(folder: str | Path, what: str, hint: str) -> None:
    """Fail before any work when `folder` (or the nearest existing parent it would be made
    in) cannot be written: read-only mounts, missing permission. `hint` says what to do."""
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        fd, probe = tempfile.mkstemp(dir=p, prefix=".meld-dali-write-test.")
    except OSError as e:
        why = "is read-only" if e.errno == errno.EROFS else \
            f"cannot be written ({e.strerror})"
        raise UserError(f"{what} {p} {why}: {hint}") from None
    os.close(fd)
    os.unlink(probe)


def claim_folder(folder: Path, flag: str, what: str, marker_name: str, marker: dict,
                 made_earlier: Callable[[Path], bool] = lambda _: False) -> None:
    """Make `folder` the project's own before anything is written or replaced there: a new
    or empty folder gets `marker_name`; one already marked, or one `made_earlier` recognises
    as an earlier version's, is reused; anything else (someone's files) is refused in one
    line. Whatever the project later deletes there, it deletes only in a folder it owns."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder}: exists and is not a folder")
    marked = (folder / marker_name).exists()
    if folder.exists() and not marked and any(folder.iterdir()) and not made_earlier(folder):
        raise UserError(f"{flag} {folder}: the folder is not empty and is not a meld-dali "
                        f"{what} (no {marker_name}); choose a new or empty folder: meld-dali "
                        "never writes among other files")
    if not marked:
        with atomic_write(folder / marker_name) as f:
            json.dump(marker, f)


class FolderLock:
    """An exclusive lock on a folder for as long as one process writes it (a run, a cache,
    a manifest folder): `folder/.meld-dali.lock`, taken with `fcntl.flock`. A second
    process gets a one-line UserError naming the holder's pid. The lock file stays (removing
    it would race with a process opening it); the kernel drops the lock when the holder
    closes it or dies, however it dies."""

    NAME = ".meld-dali.lock"

    def __init__(self, folder: str | Path, what: str):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / self.NAME
        self._f: IO | None = None

    def acquire(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 - held open: the open file is the lock
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise UserError(f"{self.folder} is in use: another meld-dali process (pid "
                            f"{holder}) is writing this {self.what}; wait for it to finish "
                            "or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._f = f
        return self

    def release(self) -> None:
        if self._f is not None:
            self._f.close()  # closing drops the flock
            self._f = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
