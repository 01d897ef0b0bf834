"""A run on a DALI backend says who made its batches, and stops when the backend cannot decode.

No GPU here: the backend that fails is DALI's CPU decoder, given H.264 clips under a manifest
that says VP9 (what a file replaced after `prepare` looks like), a real DALI failure on every
batch. The train and dev splits are re-encoded, or one train clip only."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from meld_dali.config import load_config
from meld_dali.data.decode import read_video_frames
from meld_dali.launch import run_training
from meld_dali.manifest import Manifest
from meld_dali.prepare import fingerprint, manifest_inputs, scan, stale_reason
from meld_dali.synth import write_video
from meld_dali.tables import data_path_line

ENV = {**os.environ, "COLUMNS": "200", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
TINY = ["data.num_frames=4", "data.crop_size=32", "data.short_side=36", "train.batch_size=2",
        "train.accum_steps=1", "model.hidden=[32, 16]", "tracking.wandb=false",
        "loader.workers=1", "loader.backend=dali-cpu", "train.epochs=2", "data.source=video"]


def to_h264(root: Path, rows) -> None:
    """Re-encode these clips' files as H.264 in place while the manifest still says VP9, and
    mark the manifest current (as if the files had always been so): the codec check before
    a run passes, and DALI meets H.264 it cannot decode."""
    m = Manifest.load(root)
    for row in rows:
        path = m.video_path(m.clips[row])
        write_video(path, read_video_frames(path, np.arange(m.clips[row].num_frames)), "h264")
    base, frames, spec = manifest_inputs(m)
    sources, found, _, _ = scan(base)
    data = json.loads(m.path.read_text())
    data["meta"]["fingerprint"] = fingerprint(base, m.base, sources, [p for _, p in found],
                                              frames, m.meta.get("short_side", 256), spec)
    m.path.write_text(json.dumps(data))
    assert stale_reason(Manifest.load(root)) == ""


def copy_of(root: Path, tmp_path: Path) -> Path:
    out = tmp_path / "data"
    shutil.copytree(root, out)
    return out


def train_cli(root: Path, run: Path, *extra: str) -> subprocess.CompletedProcess:
    sets = [a for s in (*TINY, *extra) for a in ("--set", s)]
    return subprocess.run([sys.executable, "-m", "meld_dali", "train", "--config", "demo",
                           "--data", str(root), "--out", str(run), *sets], env=ENV,
                          capture_output=True, text=True, timeout=600)


def error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def all_h264(synth_vp9, tmp_path_factory) -> Path:
    root = copy_of(synth_vp9, tmp_path_factory.mktemp("all_h264"))
    m = Manifest.load(root)
    to_h264(root, m.ok("train") + m.ok("dev"))
    return root


@pytest.mark.slow
def test_training_on_a_decoder_that_always_fails_stops_in_one_line(all_h264, tmp_path):
    """verify off: training starts, DALI fails every batch, FAULT_LIMIT - 1 batches are
    redone (each one warned) and the third stops the run with one line. No epoch ends."""
    r = train_cli(all_h264, tmp_path / "run", "loader.verify=off")
    line = error_line(r)
    assert line.startswith("error: dali-cpu failed: DALI's decoder failed on 3 batches in a "
                           "row whose clips the CPU path reads"), line
    assert "Failed to create video decoder" in line
    assert r.stderr.count("the CPU path did, its result is used") == 2
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_verify_refuses_a_backend_whose_batches_the_cpu_path_made(all_h264, tmp_path):
    r = train_cli(all_h264, tmp_path / "run")  # loader.verify=auto: the default
    line = error_line(r)
    assert "were made by the CPU path, not dali-cpu" in line and "(video, eval)" in line
    assert "the CPU path did, its result is used" in r.stderr  # what verify saw, warned


@pytest.mark.slow
def test_metrics_and_summary_count_the_batches_the_cpu_path_redid(synth_vp9, tmp_path):
    """One H.264 clip among the VP9 train clips: each epoch, its batch is redone by the
    CPU path, and metrics.jsonl, the epoch line and the run summary say how many."""
    root = copy_of(synth_vp9, tmp_path)
    m = Manifest.load(root)
    to_h264(root, m.ok("train")[:1])
    cfg = load_config("demo", [*TINY, f"data.root={root}"])
    result = run_training(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["loader_backend"] == "dali-cpu"
        assert row["cpu_redone_batches"] == 1 and row["eval_cpu_redone_batches"] == 0
        assert row["backend_batches"] == len(m.ok("train")) // 2 - 1
        assert row["eval_backend_batches"] == -(-len(m.ok("dev")) // 2)
    line = data_path_line(result["history"]).plain
    made = sum(r["backend_batches"] + r["eval_backend_batches"] for r in rows)
    assert line == f"data path: dali-cpu made {made} batches (train and dev), the CPU path redid 2"
