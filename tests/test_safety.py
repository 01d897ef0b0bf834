"""Fault injection, run as a user would: real files, real processes, real signals, a real
lock, a real file size limit, a real read-only mount. Nothing the user owns is deleted or
replaced, and every stop resumes (issue 23)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from meld_dali.checkpoint import atomic_save, load_checkpoint
from meld_dali.errors import UserError
from meld_dali.fileio import FolderLock
from meld_dali.launch import build_trainer, run_training
from meld_dali.manifest import Manifest
from meld_dali.prepare import prepare
from meld_dali.synth import SynthSpec, synth

BIN = Path(sys.executable).parent
ENV = {**os.environ, "COLUMNS": "200", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
       "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
# the demo recipe, small enough for seconds per epoch on 2 cores (the real SlowFast R50)
TINY = ["data.num_frames=4", "data.crop_size=32", "data.short_side=36", "train.batch_size=2",
        "train.accum_steps=1", "model.hidden=[32, 16]", "tracking.wandb=false",
        "loader.backend=torch", "tracking.progress_every=1"]


def cli(*args, check_rc: int | None = None, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "meld_dali", *map(str, args)], env=ENV,
                       capture_output=True, text=True, timeout=600, **kw)
    if check_rc is not None:
        assert r.returncode == check_rc, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The error of a failed command: exit 1, one `error:` line, no traceback."""
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file below `folder` -> sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def tree_state(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory) -> Path:
    """A raw (unprepared) MELD-layout set of 24 small H.264 clips."""
    root = tmp_path_factory.mktemp("raw")
    synth(root, SynthSpec(clips=24, seed=5))
    return root


# ----------------------------------------------------------------------------- the cache


def test_cache_pointed_at_videos_deletes_nothing(raw_root, tmp_path):
    """`--cache` at the data root, at a split's video folder, or at any folder of someone's
    videos: refused in one line, every file byte-identical."""
    root = tmp_path / "MELD.Raw"
    shutil.copytree(raw_root, root)
    videos = tmp_path / "my-videos"  # the user's own clips, outside the MELD tree
    shutil.copytree(root / "dev", videos)
    before, mine = tree_digest(root), tree_digest(videos)
    train_videos = next((root / "train").glob("*_splits"))
    for target, says in ((root, "outside the source tree"),
                         (train_videos, "outside the source tree"),
                         (tmp_path, "must not hold it"),
                         (videos, "not empty and is not a meld-dali cache")):
        err = one_line_error(cli("prepare", root, "--out", tmp_path / "m", "--cache", target,
                                 "--short-side", 32, "--workers", 1))
        assert says in err and str(target) in err, err
    assert tree_digest(root) == before and tree_digest(videos) == mine


@pytest.mark.slow  # real processes end to end: seconds each
def test_two_prepares_into_one_cache_keep_each_others_files(raw_root, tmp_path):
    """Another manifest's prepare with other settings never removes the first's files; if a
    cache no longer matches its manifest, opening the manifest says how to rebuild it."""
    cache = tmp_path / "cache"
    a, _ = prepare(raw_root, tmp_path / "a", short_side=32, workers=1, cache=cache,
                   cache_codec="h264")
    files_a = tree_digest(cache / "h264-s32-crf23-g16")
    b, _ = prepare(raw_root, tmp_path / "b", short_side=24, workers=1, cache=cache,
                   cache_codec="h264")
    assert tree_digest(cache / "h264-s32-crf23-g16") == files_a  # untouched
    a2 = Manifest.load(tmp_path / "a")  # still opens, every cached file there
    assert all(a2.cache_path(c).exists() for c in a2.clips if c.cache)
    assert b.cache_short_side == 24 and Manifest.load(tmp_path / "b").has_cache
    # the first cache's stamp spoilt (as a hand edit or another tool might): one line
    (cache / "h264-s32-crf23-g16" / "cache_settings.json").write_text('{"short_side": 99}')
    with pytest.raises(UserError, match=r"clip cache does not match.*meld-dali prepare .*"
                                        r"--cache .*cache --cache-codec h264"):
        Manifest.load(tmp_path / "a")


@contextlib.contextmanager
def hold_lock(folder: Path, what: str):
    """Another live process holding `folder`'s lock; yields its pid."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time\nfrom meld_dali.fileio import FolderLock\n"
        f"lock = FolderLock({str(folder)!r}, {what!r}).acquire()\nprint('held', flush=True)\n"
        "time.sleep(120)")], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow  # real processes end to end: seconds each
def test_a_second_prepare_on_a_locked_cache_or_manifest_is_refused(raw_root, tmp_path):
    cache = tmp_path / "cache"
    prepare(raw_root, tmp_path / "a", short_side=32, workers=1, cache=cache)
    with hold_lock(cache, "clip cache") as pid:
        err = one_line_error(cli("prepare", raw_root, "--out", tmp_path / "b", "--cache", cache,
                                 "--short-side", 24, "--workers", 1))
        assert f"pid {pid}" in err and "clip cache" in err, err
    assert not (cache / "h264-s24-crf23-g16").exists()
    with hold_lock(tmp_path / "a", "manifest folder") as pid:
        err = one_line_error(cli("prepare", raw_root, "--out", tmp_path / "a", "--workers", 1))
        assert f"pid {pid}" in err and "manifest folder" in err, err


@pytest.mark.slow
def test_killed_prepare_leaves_no_process_behind(tmp_path):
    """SIGKILL to `prepare --cache`: its pool workers die with it (no orphans), and the
    same command afterwards finishes the job."""
    root = tmp_path / "raw"
    synth(root, SynthSpec(clips=40, seed=6, width=320, height=240))
    log = open(tmp_path / "prepare.log", "w")  # noqa: SIM115 - the child writes it
    proc = subprocess.Popen([sys.executable, "-m", "meld_dali", "prepare", str(root), "--out",
                             str(tmp_path / "m"), "--cache", str(tmp_path / "cache"),
                             "--workers", "2"], env=ENV, stdout=log, stderr=log)
    parent = psutil.Process(proc.pid)
    deadline, workers = time.time() + 120, []
    while time.time() < deadline and len(workers) < 2:
        workers = parent.children(recursive=True)
        time.sleep(0.05)
    assert len(workers) >= 2, (tmp_path / "prepare.log").read_text()
    time.sleep(1.0)  # the pool at work
    proc.kill()
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"orphaned workers: {[p.pid for p in alive]}"
    r = cli("prepare", root, "--out", tmp_path / "m", "--cache", tmp_path / "cache",
            "--workers", 2, check_rc=0)
    m = Manifest.load(tmp_path / "m")
    assert all(c.cache for c in m.clips if c.loadable), r.stdout
    assert not list((tmp_path / "cache").rglob("*.tmp*"))


# ----------------------------------------------------------------------------- writes


def test_checkpoint_write_past_the_file_size_limit_leaves_the_old_one(tmp_path):
    """EFBIG in a real child process (RLIMIT_FSIZE): one line naming the path and the free
    space, no temp file, the previous checkpoint whole."""
    path = tmp_path / "last.pt"
    atomic_save({"step": 1, "w": torch.arange(10)}, path)
    before = path.read_bytes()
    code = ("import resource, torch\nfrom meld_dali.checkpoint import atomic_save\n"
            "from meld_dali.errors import UserError\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
            "try:\n"
            f"    atomic_save({{'step': 2, 'w': torch.zeros(1 << 20)}}, {str(path)!r}, True)\n"
            "except UserError as e:\n    print(e)\n    raise SystemExit(1)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert r.returncode == 1, r.stderr
    assert "file size limit reached" in r.stdout and str(path) in r.stdout
    assert "MiB free there" in r.stdout and "previous file is intact" in r.stdout
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["last.pt"]


@pytest.mark.slow
def test_train_that_cannot_write_its_checkpoint_stops_in_one_line(synth_root, tmp_path):
    """The whole CLI under a 20 MB file size limit (a nearly full disk): the checkpoint write
    fails, the run stops with one line, and no temp file is left to keep the disk full."""
    run = tmp_path / "run"
    limit = 20 << 20
    r = cli("train", "--config", "demo", "--data", synth_root, "--out", run,
            *[a for s in TINY for a in ("--set", s)], "--set", "train.epochs=1",
            "--set", "train.max_steps_per_epoch=1", "--set", "loader.workers=0",
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    err = one_line_error(r)
    assert "cannot write" in err and "last.pt" in err and "file size limit" in err, err
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]


# ----------------------------------------------------------------------------- run folders


def stopped_in_epoch_0(cfg, run: Path) -> Path:
    """A run stopped by a signal in epoch 0 (no metrics row yet): its last.pt."""
    from tests.test_trainer import StopAtStep

    trainer, _ = build_trainer(cfg, run)
    trainer.reporter.tracker = StopAtStep(trainer, 1)
    assert trainer.train()["interrupted"] and trainer.epoch == 0
    trainer.run_lock.release()  # that process has ended
    assert not (run / "metrics.jsonl").exists()
    return run / "checkpoints" / "last.pt"


@pytest.mark.slow
def test_run_folder_is_never_started_over(synth_root, tiny_cfg, tmp_path):
    tiny_cfg.data.root = str(synth_root)
    tiny_cfg.train.checkpoint_every_steps = 1
    tiny_cfg.train.max_steps_per_epoch = 3
    run = tmp_path / "run"
    last = stopped_in_epoch_0(tiny_cfg, run)
    before = last.read_bytes()
    # 2. a fresh run into it: refused, last.pt untouched
    with pytest.raises(UserError, match="already holds a run: pass --resume auto"):
        run_training(tiny_cfg, run)
    assert last.read_bytes() == before
    # 3. --resume auto with both checkpoints unreadable: one line, nothing written
    ck = run / "checkpoints"
    shutil.copy(last, ck / "last.prev.pt")
    for p in (ck / "last.pt", ck / "last.prev.pt"):
        p.write_bytes(p.read_bytes()[:1000])
    state = tree_state(run)
    with pytest.raises(UserError, match="holds a run but no checkpoint of it can be read") as e:
        run_training(tiny_cfg, run, resume="auto")
    assert "\n" not in str(e.value) and "last.prev.pt" in str(e.value)
    assert tree_state(run) == state
    # 5. one process at a time: a run folder another live process holds is refused
    with hold_lock(tmp_path / "other", "run folder") as pid, \
            pytest.raises(UserError) as e:
        run_training(tiny_cfg, tmp_path / "other")
    assert f"in use: another meld-dali process (pid {pid})" in str(e.value)
    assert os.listdir(tmp_path / "other") == [FolderLock.NAME]


@pytest.mark.slow
def test_torn_metrics_line_is_dropped_on_resume(synth_root, tiny_cfg, tmp_path, caplog):
    caplog.set_level(logging.INFO)  # the reporter's lines
    tiny_cfg.data.root = str(synth_root)
    tiny_cfg.train.max_steps_per_epoch = 1
    tiny_cfg.train.epochs = 1
    run = tmp_path / "run"
    run_training(tiny_cfg, run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 1, "train_lo')  # a kill mid-append
    tiny_cfg.train.epochs = 2
    result = run_training(tiny_cfg, run, resume="auto")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and result["epochs"] == 2
    assert "dropped 1 unreadable line" in caplog.text


@pytest.mark.slow
def test_resume_past_a_lowered_step_cap_ends_the_epoch(synth_root, tiny_cfg, tmp_path):
    """Stopped after 2 of 3 optimizer steps, resumed with max_steps_per_epoch=1: the epoch
    is over at once (before: a negative group size negated that epoch's gradients)."""
    from tests.test_trainer import StopAtStep

    tiny_cfg.data.root = str(synth_root)
    tiny_cfg.train.accum_steps = 2
    tiny_cfg.train.max_steps_per_epoch = 3
    tiny_cfg.train.epochs = 1
    first, _ = build_trainer(tiny_cfg, tmp_path / "r")
    first.reporter.tracker = StopAtStep(first, 2)
    first.train()
    first.run_lock.release()
    saved = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
    assert saved["ranks"][0]["loader"]["delivered"] == 4 and saved["train"]["epoch"] == 0
    tiny_cfg.train.max_steps_per_epoch = 1
    resumed, _ = build_trainer(tiny_cfg, tmp_path / "r", resume="auto")
    resumed.train()
    assert resumed.epoch == 1 and resumed.step == 2  # no step taken past the new cap
    for k, v in saved["model"].items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


# ----------------------------------------------------------------------------- signals


def train_args(root: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--config", "demo", "--data", str(root), "--out", str(run),
            *[a for s in (*TINY, *extra) for a in ("--set", s)]]


@pytest.mark.slow
def test_group_sigterm_saves_and_the_printed_hint_resumes_bit_exact(synth_root, tmp_path):
    """SIGTERM to the whole process group (Slurm, `timeout`, systemd) mid-epoch, with
    DataLoader workers: the step finishes, last.pt is saved, one line, exit 0. The resume
    command it prints, run verbatim (no --config, no --set), finishes the run with the same
    weights as a run never stopped."""
    extra = ("train.epochs=2", "train.max_steps_per_epoch=8", "loader.workers=2",
             "train.accum_steps=2")
    cli(*train_args(synth_root, tmp_path / "straight", *extra), check_rc=0)

    run, log_path = tmp_path / "run", tmp_path / "run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "meld_dali",
                                 *train_args(synth_root, run, *extra)], env=ENV, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while "epoch 0 5/" not in log_path.read_text() and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.05)
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert workers, "expected DataLoader worker processes"
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group: trainer and workers
    assert proc.wait(timeout=300) == 0  # README: "prints the resume command and exits 0"
    out = log_path.read_text()
    assert "Traceback" not in out and "killed by signal" not in out, out[-3000:]
    assert "SIGTERM: finishing the current step, then saving" in out, out[-3000:]
    saved = load_checkpoint(run / "checkpoints" / "last.pt")
    t = saved["train"]
    assert t["epoch"] == 0 and 0 < t["step"] < 4, "expected a mid-epoch stop"
    hint = out.split("resume with `", 1)[1].split("`", 1)[0]
    assert hint == f"meld-dali train --out {run} --resume auto"
    r = subprocess.run(hint, shell=True, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(v, b[k]) for k, v in a.items())


# ----------------------------------------------------------------------------- read-only data


def read_only(cmd: list[str], root: Path) -> subprocess.CompletedProcess:
    """`cmd` with `root` bind-mounted read-only over itself, in a private mount namespace."""
    script = f'mount --bind -o ro "{root}" "{root}" && exec "$@"'
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *cmd], env=ENV,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # real processes end to end: seconds each
def test_read_only_root_is_told_before_any_work(raw_root, tmp_path):
    root = tmp_path / "ro"
    shutil.copytree(raw_root, root)
    probe = read_only(["sh", "-c", f'touch "{root}/x"'], root)
    if "Read-only" not in probe.stderr:
        pytest.skip(f"no read-only bind mount here: {probe.stderr.strip()[:200]}")
    before = tree_digest(root)
    py = [sys.executable, "-m", "meld_dali"]
    err = one_line_error(read_only([*py, "prepare", str(root)], root))
    assert f"{root} is read-only: pass --out DIR" in err, err
    err = one_line_error(read_only([*py, "train", "--config", "demo", "--data", str(root),
                                    "--out", str(tmp_path / "run")], root))
    assert f"{root} is read-only: prepare it elsewhere" in err, err
    r = read_only([*py, "prepare", str(root), "--out", str(tmp_path / "m")], root)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "m" / "manifest.json").exists() and tree_digest(root) == before


# ----------------------------------------------------------------------------- smaller


def test_bad_csv_rows_and_odd_inputs_are_reported_not_fatal(raw_root, tmp_path):
    """A repeated CSV row is a bad row (it would train twice per epoch); a field past csv's
    128 KiB default is read; a rotated clip is reported; a folder as --config is one line."""
    import csv

    root = tmp_path / "r"
    shutil.copytree(raw_root, root)
    dev_csv = next(root.rglob("dev_sent_emo.csv"))
    rows = list(csv.reader(dev_csv.open(newline="")))
    rows.append(rows[1])  # the first clip again
    rows[2][1] = "x" * 200_000  # an utterance over the field limit
    with dev_csv.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    from meld_dali.synth import write_video

    victim = next((root / "dev").glob("*/*.mp4"))
    frames = np.zeros((6, 48, 64, 3), np.uint8)
    frames[:, :, :16] = 255  # a white band on the left
    write_video(victim, frames, rotation=90)
    m, rep = prepare(root, workers=1)
    dup = [b for b in rep["bad_rows"] if "duplicate row" in b["reason"]]
    assert len(dup) == 1 and dup[0]["line"] == len(rows) and "first at line 2" in \
        dup[0]["reason"], rep["bad_rows"]
    ids = [(c.split, c.clip_id) for c in m.clips]
    assert len(ids) == len(set(ids))
    assert [r["clip"] for r in rep["rotated"]] == [victim.stem]
    assert rep["rotated"][0]["rotation"] == 90
    # what predict makes of it: tests/test_faults.py (predict shows a rotated clip upright)
    err = one_line_error(cli("train", "--config", tmp_path))
    assert "a folder, not a YAML file" in err


def test_train_refuses_a_manifest_its_data_outgrew(raw_root, tiny_cfg, tmp_path):
    """A CSV edited after `prepare`: `train --data ROOT` checks the fingerprint and says how
    to update the manifest, instead of training on stale rows."""
    root = tmp_path / "r"
    shutil.copytree(raw_root, root)
    prepare(root, workers=1)
    dev_csv = next(root.rglob("dev_sent_emo.csv"))
    dev_csv.write_text(dev_csv.read_text() + dev_csv.read_text().splitlines()[1] + "\n")
    tiny_cfg.data.root = str(root)
    with pytest.raises(UserError, match=r"manifest.json is out of date: the label CSVs or the "
                                        r"clip files changed.*`meld-dali prepare .* --out "):
        run_training(tiny_cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
