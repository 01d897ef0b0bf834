"""Faults as they happen on a user's machine, each the real thing: a full disk (a small
tmpfs in a private mount namespace), a SIGKILLed trainer and its DataLoader workers, a lock
whose holder was SIGKILLed, a `--frames` folder of someone's files, a rotated phone clip."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from meld_dali.errors import UserError
from meld_dali.fileio import FolderLock
from meld_dali.prepare import prepare
from meld_dali.synth import SynthSpec, synth
from tests.test_safety import ENV, one_line_error, train_args, tree_digest

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


# ----------------------------------------------------------------------------- folders


def test_frames_folder_of_someone_elses_files_is_refused_and_untouched(tmp_path):
    """`prepare --frames DIR` replaces frame folders it finds (shutil.rmtree): a DIR holding
    other files, even one named like a clip's frame folder, is refused before any work and
    every file in it stays byte-identical; nothing is added to it."""
    root = tmp_path / "raw"
    synth(root, SynthSpec(clips=8, seed=9))
    mine = tmp_path / "photos"
    clip = next((root / "train").glob("*/*.mp4")).stem
    (mine / "train" / clip).mkdir(parents=True)  # where that clip's frames would go
    (mine / "train" / clip / "holiday.jpg").write_bytes(b"\xff\xd8 my holiday")
    (mine / "notes.txt").write_text("mine\n")
    before = tree_digest(mine)
    with pytest.raises(UserError, match=r"--frames .*photos: the folder is not empty and is "
                                        r"not a meld-dali frames folder"):
        prepare(root, frames=mine, short_side=32, workers=1)
    assert tree_digest(mine) == before
    assert sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*")) == [
        "notes.txt", "train", f"train/{clip}", f"train/{clip}/holiday.jpg"]


# ----------------------------------------------------------------------------- SIGKILL


HOLDER = textwrap.dedent("""
    import sys, time
    from meld_dali.fileio import FolderLock
    lock = FolderLock(sys.argv[1], "run folder").acquire()  # held while this process lives
    print("held", flush=True)
    time.sleep(600)
""")


@pytest.mark.slow  # a real process, killed
def test_a_lock_whose_holder_was_sigkilled_is_taken_again(tmp_path):
    """The run folder's lock, held by a live process: refused, naming its pid; that process
    SIGKILLed (no cleanup runs, the lock file stays): the next process takes the lock."""
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE,
                              text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"  # bounded by the child's sleep
        with pytest.raises(UserError, match=f"another meld-dali process \\(pid {holder.pid}\\)"):
            FolderLock(run, "run folder").acquire()
        holder.kill()
        assert holder.wait(timeout=60) == -signal.SIGKILL
    finally:
        holder.kill()
        holder.wait()
    assert (run / FolderLock.NAME).exists()  # left behind: only the kernel's lock went
    lock = FolderLock(run, "run folder").acquire()
    assert (run / FolderLock.NAME).read_text() == f"{os.getpid()}\n"
    lock.release()


PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def set_subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        pytest.skip("cannot become a child subreaper here")


def run_processes(run: Path) -> list[int]:
    """Live (not zombie) processes whose command line names the run folder."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            if p.info["status"] != psutil.STATUS_ZOMBIE and \
                    str(run) in " ".join(p.info["cmdline"] or []):
                found.append(p.pid)
    return found


@pytest.mark.slow  # a real training process: ~20 s
def test_a_sigkilled_train_leaves_no_dataloader_worker(synth_root, tmp_path):
    """SIGKILL to `meld-dali train` (backend torch, 2 DataLoader workers) mid-epoch: the
    workers are killed with it (PR_SET_PDEATHSIG), not left to notice by themselves; no
    process of the run is left, and the run folder's lock can be taken again. This process
    is the workers' subreaper meanwhile, so it sees how each one ended."""
    run, log_path = tmp_path / "run", tmp_path / "train.log"
    set_subreaper(True)
    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "meld_dali",
                 *train_args(synth_root, run, "train.epochs=20", "loader.workers=2")],
                env=ENV, stdout=log, stderr=subprocess.STDOUT)
        deadline, workers = time.monotonic() + 300, []
        while proc.poll() is None and time.monotonic() < deadline:
            workers = psutil.Process(proc.pid).children()
            if len(workers) >= 2 and "epoch 0 2/" in log_path.read_text():
                break
            time.sleep(0.05)
        assert len(workers) >= 2 and proc.poll() is None, log_path.read_text()[-3000:]
        proc.kill()  # the trainer alone, as the OOM killer or `kill -9 PID` would
        assert proc.wait(timeout=60) == -signal.SIGKILL
        ended = {}
        deadline = time.monotonic() + 60  # a bound on the wait: they go at once or never
        while len(ended) < len(workers) and time.monotonic() < deadline:
            for w in workers:
                if w.pid not in ended:
                    with contextlib.suppress(ChildProcessError):
                        pid, status = os.waitpid(w.pid, os.WNOHANG)
                        if pid:
                            ended[pid] = status
            time.sleep(0.05)
        left = [w.pid for w in workers if w.pid not in ended]
        assert not left, f"workers left running 60 s after their parent was killed: {left}"
        how = {pid: (os.WTERMSIG(s) if os.WIFSIGNALED(s) else f"exit {os.WEXITSTATUS(s)}")
               for pid, s in ended.items()}
        assert set(how.values()) == {signal.SIGKILL}, \
            f"workers outlived their parent and left by themselves: {how}"
        assert run_processes(run) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ChildProcessError):  # reap anything else reparented here
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        set_subreaper(False)
    FolderLock(run, "run folder").acquire().release()  # the dead trainer's lock is gone


# ----------------------------------------------------------------------------- a phone clip


@pytest.mark.slow  # builds the real SlowFast R50: a few seconds
def test_predict_shows_a_rotated_clip_upright(tmp_path, monkeypatch):
    """A clip stored landscape with display rotation 90 (what phones write): the frames
    predict decodes are turned as the file says (portrait, the band that is on the left of
    the stored frames at the bottom: 90 degrees counterclockwise), and its prediction is
    that of the same clip written upright."""
    import numpy as np
    import torch

    from meld_dali import inference
    from meld_dali.config import load_config
    from meld_dali.model import SlowFastMELD
    from meld_dali.runtime import Runtime
    from meld_dali.synth import write_video
    from tests.test_safety import TINY

    frames = np.zeros((6, 48, 64, 3), np.uint8)
    frames[:, :, :16] = 255  # a white band on the left of the stored frames
    rotated, upright = tmp_path / "rotated.mp4", tmp_path / "upright.mp4"
    write_video(rotated, frames, rotation=90)
    write_video(upright, np.ascontiguousarray(np.rot90(frames, 1, axes=(1, 2))))
    cfg = load_config("demo", [*TINY, "model.pretrained="])
    torch.manual_seed(0)
    runtime = Runtime.resolve(cfg, torch.device("cpu"))  # as load_for_inference sets it up
    loaded = inference.Loaded(runtime.place(SlowFastMELD(cfg.model)).eval(), cfg, {}, runtime)
    seen, to_clip = [], inference.to_clip  # what predict hands the transforms
    monkeypatch.setattr(inference, "to_clip", lambda raw, *a: seen.append(raw) or to_clip(raw, *a))
    got, want = (inference.predict_file(loaded, p) for p in (rotated, upright))
    assert "error" not in got, got
    assert seen[0].shape[1:] == (64, 48, 3), seen[0].shape  # portrait, as displayed
    assert seen[0][:, -16:].mean() > 200 and seen[0][:, :-16].mean() < 30
    assert np.abs(seen[0].astype(int) - seen[1]).max() < 8  # the upright file's frames
    assert list(got["probabilities"].values()) == pytest.approx(
        list(want["probabilities"].values()), abs=1e-6)
