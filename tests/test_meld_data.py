"""MELD metadata, manifest (`prepare`), synth."""

import json
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest
from PIL import Image

from meld_dali.config import EMOTIONS
from meld_dali.manifest import Manifest
from meld_dali.meld import find_sources, parse_time, read_csv
from meld_dali.prepare import prepare
from meld_dali.synth import SynthSpec, synth

from .conftest import MELD_CSV_DIR

MELD_COUNTS = {  # MELD's published label counts
    "train": {"neutral": 4710, "joy": 1743, "surprise": 1205, "anger": 1109, "sadness": 683,
              "disgust": 271, "fear": 268},
    "dev": {"neutral": 470, "joy": 163, "surprise": 150, "anger": 153, "sadness": 111,
            "disgust": 22, "fear": 40},
    "test": {"neutral": 1256, "joy": 402, "surprise": 281, "anger": 345, "sadness": 208,
             "disgust": 68, "fear": 50},
}


@pytest.mark.skipif(not (MELD_CSV_DIR / "train_sent_emo.csv").exists(),
                    reason="MELD CSVs not available (set MELD_CSV_DIR)")
def test_real_meld_csvs_give_the_paper_counts(tmp_path):
    # doubled MELD.Raw/MELD.Raw layout, as users often have it
    base = tmp_path / "MELD.Raw" / "MELD.Raw"
    (base / "train").mkdir(parents=True)
    shutil.copy(MELD_CSV_DIR / "train_sent_emo.csv", base / "train")
    for s in ("dev", "test"):
        shutil.copy(MELD_CSV_DIR / f"{s}_sent_emo.csv", base)
    sources = find_sources(tmp_path)
    assert set(sources) == {"train", "dev", "test"}
    for split, expected in MELD_COUNTS.items():
        parsed = read_csv(sources[split].csv, split)
        assert parsed.bad_rows == []
        got = {e: sum(r.emotion == e for r in parsed.rows) for e in EMOTIONS}
        assert got == expected, split
        assert len(parsed.rows) == sum(expected.values())
        assert all(r.start_s is not None and r.end_s is not None for r in parsed.rows)
    train = read_csv(sources["train"].csv, "train").rows
    assert 60 not in {r.dialogue for r in train}  # MELD's train has no dialogue 60
    # prepare reports the labelled rows per class even when no video is there
    _, report = prepare(tmp_path, workers=1)
    for split, expected in MELD_COUNTS.items():
        c = report["splits"][split]
        assert c["labelled_per_class"] == expected and c["rows"] == sum(expected.values())
        assert c["missing"] == c["rows"] and sum(c["ok_per_class"].values()) == 0


def test_parse_time_quirks():
    assert parse_time("0:12:43,012") == pytest.approx(763.012)
    assert parse_time("00:00:01,5") == pytest.approx(1.5)
    assert parse_time("garbage") is None


def test_prepare_with_faults_gives_exact_statuses(synth_root):
    info = json.loads((synth_root / "synth.json").read_text())
    m = Manifest.load(synth_root)
    status = {(c.split, c.clip_id): c.status for c in m.clips}
    f = info["faults"]
    assert status[(f["missing"]["split"], f["missing"]["clip"])] == "missing"
    assert status[(f["corrupt"]["split"], f["corrupt"]["clip"])] == "unreadable"
    assert status[(f["empty"]["split"], f["empty"]["clip"])] == "empty"
    assert (f["unlabelled"]["split"], f["unlabelled"]["clip"]) not in status
    assert (f["bad_label"]["split"], f["bad_label"]["clip"]) not in status
    assert sum(s != "ok" for s in status.values()) == 3
    for split, per_class in info["splits"].items():
        assert m.class_counts(split) == [per_class[e] for e in EMOTIONS]
    report = json.loads((synth_root / "prepare_report.json").read_text())
    assert any("confused" in b["reason"] for b in report["bad_rows"])
    assert any(f["unlabelled"]["clip"] in p for p in report["unlabelled_files"])
    # frame counts come from the file: they match what a decoder yields
    for c in m.clips[:10]:
        if c.status == "ok":
            with av.open(str(m.video_path(c))) as v:
                assert c.num_frames == sum(1 for _ in v.decode(video=0))
    assert any(c.num_frames < 32 for c in m.clips if c.status == "ok")


class Interrupt(Exception):
    pass


class StopAfter:
    """A progress sink that raises out of prepare's probe loop after n probed clips: stops it
    at an exact record (the torn-line test needs one); a real Ctrl-C is tested below."""

    def __init__(self, n):
        self.n = n

    def add_task(self, *a, **k):
        return 0

    def advance(self, task):
        self.n -= 1
        if self.n == 0:
            raise Interrupt


def test_a_torn_partial_line_costs_only_itself(tmp_path):
    """A crash mid-write leaves a torn last line in the partial manifest: the resume drops
    it and appends after the last whole record, so a second interruption still keeps every
    record written since."""
    synth(tmp_path, SynthSpec(clips=30, seed=3))
    with pytest.raises(Interrupt):
        prepare(tmp_path, workers=1, progress=StopAfter(12))
    partial = tmp_path / "manifest.partial.jsonl"
    with open(partial, "a") as f:
        f.write('{"key": "train/dia0_u')  # torn: no end, no newline
    with pytest.raises(Interrupt):
        prepare(tmp_path, workers=1, progress=StopAfter(5))
    lines = partial.read_text().splitlines()
    assert len(lines) == 1 + 12 + 5 and all(json.loads(x) for x in lines)
    _, report = prepare(tmp_path, workers=1)
    assert report["resumed_probes"] == 17


@pytest.mark.slow  # a real `meld-dali prepare` process and its pool, a real SIGINT
def test_ctrl_c_mid_prepare_keeps_finished_work_and_the_same_command_resumes(tmp_path):
    """Ctrl-C (SIGINT to the whole foreground process group: prepare and its pool workers)
    while the pool extracts frame folders: one line, exit 130, no manifest.json, no half-made
    file or folder, no worker left; the partial manifest holds every probed clip, and the same
    command finishes the job without probing or extracting again what was done."""
    import os
    import signal
    import time

    import psutil

    root, frames = tmp_path / "raw", tmp_path / "raw" / "frames"
    synth(root, SynthSpec(clips=40, seed=3))
    cmd = [sys.executable, "-m", "meld_dali", "prepare", str(root), "--frames", str(frames),
           "--short-side", "48", "--workers", "2"]
    env = {**os.environ, "COLUMNS": "200"}
    log_path = tmp_path / "prepare.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # its own group, as a terminal's job

    def made() -> list:
        return [d for d in frames.glob("*/*") if d.is_dir() and ".tmp" not in d.name]

    try:
        deadline = time.monotonic() + 300
        while not made() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        # freeze the job where it is (as Ctrl-Z would) so the signal surely lands mid-pool
        os.killpg(proc.pid, signal.SIGSTOP)
        workers = psutil.Process(proc.pid).children(recursive=True)
        done_before = len(made())
        assert workers and 0 < done_before < 40, (done_before, log_path.read_text())
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
        os.killpg(proc.pid, signal.SIGCONT)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = log_path.read_text()
    assert rc == 130, out[-3000:]
    assert "interrupted (SIGINT): finished work is kept; run the same command to continue" \
        in out.replace("\n", " ") and "Traceback" not in out, out[-3000:]
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"workers left behind: {[p.pid for p in alive]}"
    assert not (root / "manifest.json").exists()
    assert not [p for p in root.rglob("*") if ".tmp" in p.name], "a half-written file"
    lines = (root / "manifest.partial.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines[1:]]
    assert len(records) == 40 and "fingerprint" in json.loads(lines[0])  # every probe kept
    kept = {d: (d / "000000.jpg").stat().st_mtime_ns for d in made()}
    n = {r["key"]: r["num_frames"] for r in records}
    for d in kept:  # each frame folder there is whole
        assert len(list(d.glob("*.jpg"))) == n[f"{d.parent.name}/{d.name}"], d
    assert len(kept) < 40, "nothing was left to do: the signal came too late"
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((root / "prepare_report.json").read_text())
    assert report["resumed_probes"] == 40
    assert all((d / "000000.jpg").stat().st_mtime_ns == t for d, t in kept.items())
    m = Manifest.load(root)
    assert all(c.frames for c in m.clips) and len(m.clips) == 40


def test_prepare_resumes_and_reuses_and_a_changed_input_invalidates(tmp_path):
    synth(tmp_path, SynthSpec(clips=30, seed=3))
    with pytest.raises(Interrupt):
        prepare(tmp_path, workers=1, progress=StopAfter(12))
    assert not (tmp_path / "manifest.json").exists()
    assert (tmp_path / "manifest.partial.jsonl").exists()
    m, report = prepare(tmp_path, workers=1)
    assert report["resumed_probes"] == 12 and not report["reused"]
    fresh_dir = tmp_path / "fresh"
    m2, _ = prepare(tmp_path, out=fresh_dir, workers=1)
    strip = lambda clips: [{k: v for k, v in c.to_dict().items() if k != "path"} for c in clips]
    assert strip(m.clips) == strip(m2.clips)
    _, again = prepare(tmp_path, workers=1)
    assert again["reused"]
    # a changed input invalidates it: a label edited in the CSV (one byte), then a clip gone
    csv_path = tmp_path / "dev_sent_emo.csv"
    text = csv_path.read_text()
    first_dev = next(c for c in m.clips if c.split == "dev")
    edited = text.replace(f",{first_dev.emotion},", f",{EMOTIONS[(first_dev.label + 1) % 7]},", 1)
    assert edited != text
    csv_path.write_text(edited)
    m_edit, edit = prepare(tmp_path, workers=1)
    assert not edit["reused"] and edit["resumed_probes"] == 0
    assert next(c for c in m_edit.clips if c.split == "dev").emotion != first_dev.emotion
    _, again = prepare(tmp_path, workers=1)
    assert again["reused"]
    victim = next(c for c in m.clips if c.split == "dev")
    m.video_path(victim).unlink()
    m3, changed = prepare(tmp_path, workers=1)
    assert not changed["reused"]
    assert next(c for c in m3.clips if c.clip_id == victim.clip_id
                and c.split == "dev").status == "missing"


def test_extracted_frames_are_what_the_decoder_sees(synth_root):
    m = Manifest.load(synth_root)
    c = next(c for c in m.clips if c.status == "ok" and c.num_frames > 10)
    folder = m.frames_path(c)
    jpgs = sorted(folder.glob("*.jpg"))
    assert len(jpgs) == c.num_frames
    with av.open(str(m.video_path(c))) as v:
        frames = [f.to_image() for f in v.decode(video=0)]
    for i in (0, len(jpgs) // 2, len(jpgs) - 1):
        jpg = Image.open(jpgs[i])
        assert min(jpg.size) == 36
        ref = np.asarray(frames[i].resize(jpg.size, resample=3), dtype=np.float32)
        assert np.abs(np.asarray(jpg, dtype=np.float32) - ref).mean() < 4.0  # JPEG loss only
        other = np.asarray(frames[(i + 5) % len(frames)].resize(jpg.size, resample=3),
                           dtype=np.float32)
        assert np.abs(np.asarray(jpg, dtype=np.float32) - ref).mean() < \
            np.abs(np.asarray(jpg, dtype=np.float32) - other).mean() or i == 0


def test_frames_made_at_another_short_side_are_extracted_again(tmp_path):
    """prepare --frames at short side 24, then 32 into the same folder: no stale 24-px
    folder is reused (DALI would skip its resize on them), and a kept one is kept."""
    synth(tmp_path, SynthSpec(clips=8, seed=4))
    frames = tmp_path / "frames"

    def sides(m):
        return {min(Image.open(m.frames_path(c) / "000000.jpg").size)
                for c in m.clips if c.frames}

    m, _ = prepare(tmp_path, frames=frames, short_side=24, workers=1)
    assert sides(m) == {24}
    m, _ = prepare(tmp_path, frames=frames, short_side=32, workers=1)
    assert sides(m) == {32} and all(c.frames for c in m.clips if c.status == "ok")
    kept = next(c for c in m.clips if c.frames)
    before = (m.frames_path(kept) / "000000.jpg").stat().st_mtime_ns
    (tmp_path / "manifest.json").unlink()  # prepare again, same short side: folders reused
    m, _ = prepare(tmp_path, frames=frames, short_side=32, workers=1)
    assert (m.frames_path(kept) / "000000.jpg").stat().st_mtime_ns == before


def test_synth_is_deterministic_and_meld_shaped(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    synth(a, SynthSpec(clips=25, seed=5, codec="mjpeg"))
    synth(b, SynthSpec(clips=25, seed=5, codec="mjpeg"))
    files = sorted(p.relative_to(a) for p in a.rglob("*.mp4"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.mp4"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "train" / "train_sent_emo.csv").exists()
    assert (a / "dev" / "dev_splits_complete").is_dir()
    assert (a / "test" / "output_repeated_splits_test").is_dir()
    header = (a / "dev_sent_emo.csv").read_text().splitlines()[0]
    assert header.split(",")[0] == "Sr No." and len(header.split(",")) == 11


def test_prepare_cli_names_each_bad_file(tmp_path):
    synth(tmp_path, SynthSpec(clips=25, seed=6, faults=True))
    info = json.loads((tmp_path / "synth.json").read_text())
    r = subprocess.run([sys.executable, "-m", "meld_dali", "prepare", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    text = r.stdout.replace("\n", "")
    for kind in ("missing", "corrupt", "empty"):
        assert info["faults"][kind]["clip"] in text
