"""The bench's peers (other tools doing our loader's work) on small real clips: the batches
they deliver, their rows beside ours, and the reason rows of peers that cannot run."""

import dataclasses
import json

import pytest
import torch
from meld_dali.bench.loader import bench_loader, render_table
from meld_dali.bench.peers import PEERS, parse_peers, peer_problem, seed_folders
from meld_dali.bench.train import bench_train
from meld_dali.bench.train import render_table as train_table
from rich.console import Console

from meld_dali.config import load_config
from meld_dali.data.base import LoaderSpec
from meld_dali.manifest import Manifest
from meld_dali.prepare import prepare
from meld_dali.synth import SynthSpec, synth

T = 32  # the seed's T: the short synthetic clips (3-31 frames) are padded
SETTINGS = [f"data.num_frames={T}", "data.crop_size=32", "data.short_side=36",
            "loader.workers=2"]
# a pixel in [0, 1] normalized with ImageNet's mean and std lies in this range
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
LOW, HIGH = float((-MEAN / STD).min()), float(((1 - MEAN) / STD).max())


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """24 H.264 clips with an MJPEG clip cache and no frame folders (the seed makes its
    own)."""
    root = tmp_path_factory.mktemp("peers")
    synth(root, SynthSpec(clips=24, seed=3))
    prepare(root, short_side=36, workers=2, cache=root.with_name(root.name + "-cache"),
            cache_codec="mjpeg")
    return Manifest.load(root)


@pytest.fixture()
def cfg():
    return load_config("demo", SETTINGS)


def runnable(name: str):
    why = peer_problem(PEERS[name])
    if why:
        pytest.skip(why)
    return PEERS[name]


def check_batches(loader, manifest: Manifest) -> tuple[int, int]:
    """Every batch has the contract's shape, dtype, device, range, mask and padding.
    Returns (clips, batches)."""
    clips, short, batches = 0, 0, 0
    for b in loader:
        batches += 1
        assert b.video.shape == (len(b), 3, T, 32, 32) and b.video.dtype == torch.float32
        assert b.video.device.type == "cpu" and b.mask.dtype == torch.bool
        assert float(b.video.min()) >= LOW - 1e-4 and float(b.video.max()) <= HIGH + 1e-4
        for i in range(len(b)):
            k = min(manifest.clips[int(b.index[i])].num_frames, T)
            assert b.mask[i].tolist() == [True] * k + [False] * (T - k)
            assert int(b.label[i]) == manifest.clips[int(b.index[i])].label
            if k < T:
                short += 1
                assert b.video[i][:, k:].abs().max() == 0  # padded frames are exactly 0
            assert b.video[i][:, :k].abs().amax(dim=(0, 2, 3)).min() > 0  # real ones aren't
        clips += len(b)
    assert short > 0, "the data has short clips: the padding was exercised"
    return clips, batches


@pytest.mark.parametrize("name, source", [("seed", "frames"), ("pytorchvideo", "video"),
                                          ("pytorchvideo", "cache"), ("torchcodec", "video"),
                                          ("torchcodec", "cache")])
def test_peer_batches_follow_the_contract(cached, cfg, tmp_path, monkeypatch, name, source):
    monkeypatch.chdir(tmp_path)  # the seed extracts its frame folders under runs/
    peer = runnable(name)
    spec = LoaderSpec(cached, "train", True, 4, seed=0, source=source)
    loader = peer.build(spec, cfg.data, cfg.loader)
    n = len(cached.ok("train"))
    assert check_batches(loader, cached) == (n, len(loader)) and loader.num_clips == n
    assert loader.position.epoch == 1  # a whole pass is an epoch


def test_seed_makes_its_frame_folders_once(cached, tmp_path):
    rows = cached.ok("train")
    folders = seed_folders(cached, "train", 36, root=tmp_path)
    assert sorted(folders) == rows and all(f.is_relative_to(tmp_path) for f in folders.values())
    for r in rows[:3]:
        assert len(list(folders[r].glob("*.jpg"))) == cached.clips[r].num_frames
    stamp = {r: f.stat().st_mtime_ns for r, f in folders.items()}
    again = seed_folders(cached, "train", 36, root=tmp_path)
    assert {r: f.stat().st_mtime_ns for r, f in again.items()} == stamp  # reused


@pytest.mark.slow  # real processes end to end: seconds each
def test_bench_loader_puts_peers_beside_ours(cached, cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    peers = parse_peers("all")
    report = bench_loader(cached, cfg.data, cfg.loader, ["torch"], ["cache"], batches=1,
                          repeats=1, warmup=1, batch_size=4, peers=peers)
    rows = {(r["backend"], r["source"]): r for r in report["results"]}
    assert rows[("torch", "cache")]["peer"] is False
    seed = rows[("seed", "frames")]
    assert seed["peer"] is True and seed["vs_seed"] == pytest.approx(1.0)
    assert seed["input"]["codec"] == "jpeg" and seed["input"]["resolution"] == "short side 36"
    ran = {r["backend"] for r in report["results"] if r["peer"]}
    gone = {u["backend"] for u in report["unavailable"]}
    assert ran | gone == {"seed", "pytorchvideo", "torchcodec", "torchcodec-cuda"}
    assert not ran & gone and all(u["peer"] for u in report["unavailable"])
    for r in report["results"]:
        assert r["vs_seed"] == pytest.approx(r["clips_per_s"] / seed["clips_per_s"])
        assert r["input"]["clips"] == len(cached.ok("train"))
        if r["peer"]:
            assert r["gaps"] and r["source"] in PEERS[r["backend"]].sources
    json.dumps(report)
    console = Console(record=True, width=200)
    console.print(render_table(report))
    text = console.export_text()
    assert "vs seed" in text and "1.00x" in text and "below the line: peers" in text
    assert "pytorchvideo: no frame-index decode" in text


def test_a_peer_that_cannot_import_is_a_reason_row(cached, cfg):
    missing = dataclasses.replace(PEERS["torchcodec"], modules=("torchcodec_not_here_xyz",))
    why = peer_problem(missing)
    assert "torchcodec_not_here_xyz" in why and 'pip install -e ".[peers]"' in why
    report = bench_loader(cached, cfg.data, cfg.loader, [], ["video", "cache"], batches=1,
                          repeats=1, batch_size=4, peers=[missing])
    assert report["results"] == []
    assert [(u["backend"], u["source"], u["reason"]) for u in report["unavailable"]] == [
        ("torchcodec", "video", why), ("torchcodec", "cache", why)]


def test_torchcodec_without_ffmpeg_names_the_fix():
    why = peer_problem(PEERS["torchcodec"])
    try:
        import torchcodec
    except ImportError:
        assert 'pip install -e ".[peers]"' in why
        return
    if torchcodec.ffmpeg_major_version is None:
        assert why == "torchcodec: FFmpeg libraries not found: apt-get install ffmpeg"
    else:
        assert why == ""


def test_parse_peers():
    assert parse_peers("none") == []
    assert [p.name for p in parse_peers("all")] == list(PEERS)
    assert [p.name for p in parse_peers("torchcodec")] == ["torchcodec", "torchcodec-cuda"]
    with pytest.raises(ValueError, match="unknown peer.*'dali'.*seed, pytorchvideo"):
        parse_peers("seed,dali")


def test_cli_peers_none_runs_no_peer_and_bad_names_are_usage_errors(cached, tmp_path,
                                                                    capsys):
    from meld_dali import cli

    common = ["bench", "loader", "--data", str(cached.base), "--backends", "torch",
              "--sources", "cache", "--batches", "1", "--repeats", "1", "--batch-size", "4",
              "--warmup", "1", *[a for s in SETTINGS for a in ("--set", s)]]
    out = tmp_path / "none.json"
    with pytest.raises(SystemExit) as e:
        cli.main([*common, "--peers", "none", "--json", str(out)])
    assert e.value.code == 0
    report = json.loads(out.read_text())
    assert [r["backend"] for r in report["results"]] == ["torch"]
    assert not report["settings"]["peers"] and report["unavailable"] == []
    assert "vs seed" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main([*common, "--peers", "seed,nvdec"])
    assert e.value.code == 2
    assert "unknown peer(s) ['nvdec']" in capsys.readouterr().err


@pytest.mark.slow  # trains the real SlowFast R50
def test_bench_train_feeds_the_trainer_from_a_peer(cached, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("demo", ["data.num_frames=4", "data.crop_size=32", "data.short_side=36",
                               "train.batch_size=2", "loader.workers=0",
                               "model.hidden=[32, 16]"])
    report = bench_train(cfg, cached, [], steps=2, warmup=1,
                         peers=[PEERS["seed"], PEERS["torchcodec-cuda"]])
    rows = {r["backend"]: r for r in report["results"]}
    assert rows["seed"]["peer"] is True and rows["seed"]["source"] == "frames"
    assert rows["seed"]["clips"] == 4 and rows["seed"]["clips_per_s"] > 0
    assert 0 < rows["seed"]["data_wait_share"] < 1
    if not torch.cuda.is_available():
        assert report["unavailable"][0]["backend"] == "torchcodec-cuda"
        assert "CUDA" in report["unavailable"][0]["reason"]
    console = Console(record=True, width=200)
    console.print(train_table(report))
    assert "peer seed (frames): jpeg frames, short side 36" in console.export_text()


def test_cpu_of_workers_that_ended_is_counted():
    """pytorchvideo's DataLoader starts new workers every epoch: the CPU time of the ones
    that ended inside the window counts."""
    import os
    import subprocess
    import sys
    import time

    from meld_dali.bench.common import ResourceMonitor

    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass"
    t0 = time.perf_counter()
    with ResourceMonitor(interval=10) as mon:
        subprocess.run([sys.executable, "-c", busy], check=True)
    cpu_s = mon.cpu_util * (time.perf_counter() - t0) * os.cpu_count()
    assert cpu_s >= 0.45
