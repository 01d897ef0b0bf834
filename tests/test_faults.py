"""Faults as they happen on a user's machine, each the real thing: a full disk (a small
tmpfs in a private mount namespace), a SIGKILLed trainer and its DataLoader workers, a lock
whose holder was SIGKILLed, a `--frames` folder of someone's files, a rotated phone clip."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from meld_dali.synth import SynthSpec, synth
from tests.test_safety import ENV, one_line_error

# ----------------------------------------------------------------------------- a full disk


def on_small_tmpfs(tmp_path: Path, cmd: list[str], size: str = "1m",
                   leave_kib: int | None = None) -> subprocess.CompletedProcess:
    """`cmd` with a fresh tmpfs of `size` mounted at tmp_path/"disk" (a private mount
    namespace: nothing outside sees it, and it is gone when `cmd` ends); `leave_kib`: filled
    first (a file `filler`) until only that much is free. `{disk}` in cmd is the mount."""
    disk = tmp_path / "disk"
    disk.mkdir(parents=True, exist_ok=True)
    fill = ""
    if leave_kib is not None:
        fill = (f'head -c {size.rstrip("m")}M /dev/zero > "{disk}/filler" 2>/dev/null; '
                f'truncate -s -{leave_kib}K "{disk}/filler" && ')
    script = f'mount -t tmpfs -o size={size} tmpfs "{disk}" && {fill}exec "$@"'
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh",
                           *[c.replace("{disk}", str(disk)) for c in cmd]],
                          env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture()
def tmpfs_works(tmp_path):
    probe = on_small_tmpfs(tmp_path / "probe", ["sh", "-c", "head -c 2M /dev/zero > {disk}/x"])
    if "No space left" not in probe.stderr:
        pytest.skip(f"no tmpfs in a private mount namespace here: {probe.stderr[:200]}")


# Each write unit on a disk with a few KiB left, in one process: what it raised, and what the
# file it wrote holds afterwards.
UNITS = textwrap.dedent("""
    import json, os, sys, torch
    from pathlib import Path
    from meld_dali.checkpoint import atomic_save
    from meld_dali.fileio import Journal, append_line
    disk = Path(sys.argv[1])
    filler = disk / "filler"
    out = {}

    def fill(leave):  # the disk full but `leave` bytes
        filler.write_bytes(b"")
        try:
            with open(filler, "ab") as f:
                while True:
                    f.write(b"x" * 4096)
                    f.flush()
        except OSError:
            pass
        size = filler.stat().st_size
        os.truncate(filler, max(0, size - leave))

    def caught(fn):
        try:
            fn()
        except BaseException as e:  # what a caller (the CLI) would get
            return {"type": type(e).__name__, "msg": str(e)}
        return None

    # a checkpoint replaced by one that does not fit
    ck = disk / "run" / "checkpoints" / "last.pt"
    atomic_save({"step": 1, "w": torch.arange(10)}, ck)
    fill(16 << 10)
    out["checkpoint"] = caught(lambda: atomic_save(
        {"step": 2, "w": torch.zeros(1 << 18)}, ck, keep_previous=True))
    out["checkpoint_files"] = sorted(os.listdir(ck.parent))
    out["checkpoint_step"] = torch.load(ck)["step"]
    filler.unlink()

    # metrics.jsonl: two rows, then a row that does not fit
    log = disk / "run" / "metrics.jsonl"
    append_line(log, json.dumps({"epoch": 0}))
    append_line(log, json.dumps({"epoch": 1}))
    fill(8 << 10)
    out["metrics"] = caught(lambda: append_line(log, json.dumps({"epoch": 2, "pad": "y" * 65536})))
    out["metrics_text"] = log.read_text()
    filler.unlink()

    # prepare's journal: three records synced, then records that do not fit
    partial = disk / "m" / "manifest.partial.jsonl"
    partial.parent.mkdir()
    def journal():
        with Journal(partial, every_s=0) as j:
            for i in range(3):
                j.append(json.dumps({"key": f"train/r{i}"}))
            fill(8 << 10)
            for i in range(3, 40):
                j.append(json.dumps({"key": f"train/r{i}", "pad": "z" * 8192}))
    out["journal"] = caught(journal)
    out["journal_text"] = partial.read_text()
    print(json.dumps(out))
""")


@pytest.mark.slow  # a process in a mount namespace: a few seconds
def test_a_full_disk_is_one_line_naming_the_file_and_the_earlier_file_stays_whole(
        tmp_path, tmpfs_works):
    """ENOSPC (a real full tmpfs) for each writer: the checkpoint (atomic_write), the metrics
    log (append_line), prepare's partial manifest (Journal). Each fails with DiskFullError
    naming its file; the file it was writing holds exactly what it held before (no torn
    tail a later append would glue a good line to), and no temp file is left."""
    r = on_small_tmpfs(tmp_path, [sys.executable, "-c", UNITS, "{disk}"], size="2m")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    disk = tmp_path / "disk"
    for unit, name in (("checkpoint", "last.pt"), ("metrics", "metrics.jsonl"),
                       ("journal", "manifest.partial.jsonl")):
        err = out[unit]
        assert err is not None, f"{unit}: the write that did not fit raised nothing"
        assert err["type"] == "DiskFullError", (unit, err)
        assert "no space left on the device" in err["msg"] and name in err["msg"], err
        assert str(disk) in err["msg"] and "previous file is intact" in err["msg"], err
    assert out["checkpoint_files"] == ["last.pt"] and out["checkpoint_step"] == 1
    assert out["metrics_text"] == '{"epoch": 0}\n{"epoch": 1}\n'
    lines = out["journal_text"].splitlines(keepends=True)
    assert all(ln.endswith("\n") and json.loads(ln) for ln in lines), lines[-1][:200]
    assert [json.loads(ln)["key"] for ln in lines[:3]] == [f"train/r{i}" for i in range(3)]


@pytest.mark.slow  # real processes end to end
def test_prepare_onto_a_full_disk_is_one_line(tmp_path, tmpfs_works):
    """The whole CLI: `prepare --out` a disk with 8 KiB left (the partial manifest is what
    fills it): exit 1, one line naming the partial manifest, no traceback (the journal's
    last flush, at close, used to escape as a bare OSError)."""
    root = tmp_path / "raw"
    synth(root, SynthSpec(clips=12, seed=8))
    r = on_small_tmpfs(tmp_path, [sys.executable, "-m", "meld_dali", "prepare", str(root),
                                  "--out", "{disk}/m", "--workers", "1"],
                       size="1m", leave_kib=8)
    err = one_line_error(r)
    assert "no space left on the device" in err and "manifest.partial.jsonl" in err, err
