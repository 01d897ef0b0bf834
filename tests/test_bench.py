"""The bench suite on tiny synthetic data: schema, table, plot, each CPU backend."""

import json
import subprocess
import sys

import av
import numpy as np
import pytest
import torch
from meld_dali.bench.common import (
    ResourceMonitor,
    describe_input,
    gpu_mem_cell,
    nvml_bus_id,
    process_gpu_bytes,
    result_path,
)
from meld_dali.bench.data import DATA_ROOTS, MELD_SHAPED, bench_spec
from meld_dali.bench.loader import (
    auto_warmup,
    bench_loader,
    loader_jobs,
    plot,
    render_table,
    window,
)
from meld_dali.bench.train import DATA_BOUND_SHARE, Feed, bench_train, check_builds
from meld_dali.bench.train import render_table as train_table
from rich.console import Console

from meld_dali.config import LoaderConfig, load_config
from meld_dali.data.base import SyntheticLoader
from meld_dali.manifest import Manifest

BACKENDS = ["dali-gpu", "dali-cpu", "torch"]


@pytest.mark.slow
def test_bench_loader_schema_table_and_plot(synth_vp9, tmp_path):
    cfg = load_config("demo", ["data.num_frames=8", "loader.workers=2"])
    report = bench_loader(Manifest.load(synth_vp9), cfg.data, cfg.loader, BACKENDS,
                          ["video", "frames"], batches=2, repeats=2, warmup=1, batch_size=4,
                          soak_epochs=2)
    assert {"torch", "python", "cores", "cpu", "gpu", "dali"} <= set(report["env"])
    ran = {(r["backend"], r["source"]) for r in report["results"]}
    assert {("torch", "video"), ("torch", "frames"), ("dali-cpu", "video"),
            ("dali-cpu", "frames")} <= ran
    for r in report["results"]:
        for key in ("backend", "clips_per_s", "frames_per_s", "peak_rss_mb", "peak_mem_mb",
                    "cpu_util", "warmup_batches", "timed_batches", "timed_clips",
                    "epochs_in_window", "input"):
            assert key in r
        assert r["warmup_batches"] >= 1 and r["timed_batches"] == 4
        assert r["input"]["source"] == r["source"] and r["input"]["mean_frames"] > 0
        assert r["clips_per_s"] > 0 and r["peak_rss_mb"] > 50
        assert r["clips_per_s_min"] <= r["clips_per_s"] <= r["clips_per_s_max"]
        assert len(r["soak"]["rss_mb_per_epoch"]) == 2 and min(r["soak"]["rss_mb_per_epoch"]) > 50
        # every compared batch was made by the row's own backend (DALI for a DALI row): no
        # figure here is the CPU path's redoing batches DALI failed on
        assert (r["backend_batches"], r["cpu_redone_batches"]) == (r["timed_batches"], 0)
        assert r["soak"]["cpu_redone_batches"] == 0 and r["soak"]["backend_batches"] > 0
        assert r["vs_torch"] == pytest.approx(
            r["clips_per_s"] / next(x["clips_per_s"] for x in report["results"]
                                    if x["backend"] == "torch" and x["source"] == r["source"]))
    if report["env"]["gpu"] == "none":
        assert any(u["backend"] == "dali-gpu" and "CUDA" in u["reason"]
                   for u in report["unavailable"])
    json.dumps(report)  # serializable as is
    console = Console(record=True, width=200)
    console.print(render_table(report))
    text = console.export_text()
    assert "dali-cpu" in text and "vs torch" in text and "1.00x" in text
    assert "CPU redid" not in text and not any("CPU path" in w for w in report["warnings"])
    assert "PSS+" in text and "peak memory of the process tree" in text
    assert "video: 64x48 vp9" in text and "frames: jpeg frames" in text
    plot(report, tmp_path / "loader.png")
    assert (tmp_path / "loader.png").read_bytes()[:4] == b"\x89PNG"
    name = result_path("loader", "uint8-fp32", report["env"]).name
    assert name.startswith("loader-uint8-fp32-torch") and "cpu" in name


@pytest.mark.slow
def test_bench_train_synthetic_and_torch(synth_root, tmp_path):
    cfg = load_config("demo", ["data.num_frames=4", "train.batch_size=2", "loader.workers=0",
                               "model.hidden=[32, 16]"])
    report = bench_train(cfg, Manifest.load(synth_root), ["synthetic", "torch", "nope"],
                         steps=2, warmup=1)
    rows = {r["backend"]: r for r in report["results"]}
    assert set(rows) == {"synthetic", "torch"}
    for r in rows.values():
        assert r["clips"] == 4 and r["clips_per_s"] > 0
        # the figures are the window's own accounting (no bound on how fast a shared
        # machine ran it): wall = data wait + step time, the share and verdict from them
        wall = r["data_wait_s"] + r["step_time_s"]
        assert r["data_wait_s"] >= 0 and r["step_time_s"] > 0
        assert r["data_wait_share"] == pytest.approx(r["data_wait_s"] / wall)
        assert r["clips_per_s"] == pytest.approx(r["clips"] / wall)
        assert r["verdict"] == ("data-bound" if r["data_wait_share"] > DATA_BOUND_SHARE
                                else "compute-bound")
        assert (r["backend_batches"], r["cpu_redone_batches"]) == (2, 0)
        assert r["builds_in_window"] is None  # no DALI pipelines to build
    assert report["unavailable"][0]["backend"] == "nope"
    console = Console(record=True, width=200)
    console.print(train_table(report))
    text = console.export_text()
    assert "synthetic" in text and "CPU redid" not in text
    rows["torch"].update(cpu_redone_batches=1, backend_batches=1)  # as if DALI had failed
    console.print(train_table(report))
    text = console.export_text()
    assert "torch [CPU redid 1]" in text
    assert "torch/res3: 1 of 2 measured batches were redone by the CPU path" in text


@pytest.mark.slow
def test_bench_cli_writes_json(synth_vp9, tmp_path):
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, "-m", "meld_dali", "bench", "loader", "--data",
                        str(synth_vp9), "--backends", "torch", "--sources", "frames",
                        "--batches", "1", "--repeats", "1", "--batch-size", "2", "--set",
                        "data.num_frames=4", "--set", "data.crop_size=32", "--set",
                        "data.short_side=36", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert report["results"][0]["backend"] == "torch" and report["env"]["cores"] >= 1


def test_default_bench_data_is_meld_shaped(tmp_path):
    spec = bench_spec("meld-shaped")
    assert (spec.width, spec.height, spec.codec) == (1280, 720, "h264")
    assert spec.clips == MELD_SHAPED["clips"] == 120
    assert DATA_ROOTS["meld-shaped"].name == "bench-data-720p"
    quick = bench_spec("quick")
    assert quick.clips < spec.clips and quick.width < spec.width
    # a few frames rendered and encoded the way synth() does it, probed with PyAV
    from meld_dali.synth import render_clip, write_video

    path = tmp_path / "c.mp4"
    frames = render_clip(0, 6, spec.width, spec.height, np.random.default_rng(0),
                         texture=True)  # as synth() renders HD clips
    write_video(path, frames, spec.codec, spec.fps)
    with av.open(str(path)) as f:
        s = f.streams.video[0]
        assert (s.codec_context.width, s.codec_context.height) == (1280, 720)
        assert s.codec_context.name == "h264" and s.codec_context.profile == "High"
    # MELD is ~1.5-3 Mbit/s; synth's rate control aims at 2.2 (measured 1.7 over these 6
    # frames). Without it (CRF alone) the textured clip reads ~9 Mbit/s: outside this band
    rate = path.stat().st_size * 8 / (6 / spec.fps)
    assert 1.1e6 < rate < 4.4e6


def test_warmup_and_window_arithmetic():
    from meld_dali.config import LoaderConfig

    assert auto_warmup("torch", LoaderConfig(workers=4, prefetch=3)) == 13
    assert auto_warmup("torch", LoaderConfig(workers=0, prefetch=3)) == 1
    assert auto_warmup("dali-cpu", LoaderConfig(workers=4, prefetch=3)) == 4
    assert window(5, 4, 10) == 0  # batches 5..8 inside epoch 0
    assert window(5, 4, 4) == 1  # boundary at batch 8
    assert window(4, 4, 4) == 1  # the window starts on a fresh epoch
    assert window(3, 30, 9) == 3  # batches 3..32: boundaries at 9, 18 and 27


def test_describe_input(synth_vp9):
    m = Manifest.load(synth_vp9)
    v = describe_input(m, "train", "video")
    assert (v["resolution"], v["codec"]) == ("64x48", "vp9") and v["mbit_per_s"] > 0
    assert v["clips"] == len(m.ok("train")) and 3 <= v["mean_frames"] <= 240
    f = describe_input(m, "train", "frames")
    assert f["codec"] == "jpeg" and f["mbit_per_s"] > 0


@pytest.mark.slow
def test_bench_quick_cli_labelled_and_warmed(tmp_path, monkeypatch):
    from meld_dali import cli

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "q.json"
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "loader", "--quick", "--backends", "torch", "--sources", "frames",
                  "--batches", "1", "--repeats", "1", "--batch-size", "2", "--workers", "2",
                  "--set", "data.num_frames=4", "--set", "data.crop_size=32", "--set",
                  "data.short_side=36", "--set", "loader.prefetch=2", "--json", str(out)])
    assert e.value.code == 0
    report = json.loads(out.read_text())
    assert report["dataset"]["kind"] == "quick"
    assert report["dataset"]["spec"]["width"] == bench_spec("quick").width
    assert report["dataset"]["size_mb"] > 0
    assert (tmp_path / "runs" / "bench-data-quick" / "bench-spec.json").exists()
    row = report["results"][0]
    assert row["warmup_batches"] >= 2 * 2  # workers x prefetch, what the DataLoader holds
    assert row["timed_batches"] == 1 and row["timed_clips"] == 2
    assert row["epochs_in_window"] == pytest.approx(2 / row["epoch_clips"])
    assert 0 < row["epoch_clips"] <= report["settings"]["clips"]


def test_pss_below_summed_rss_with_workers(synth_vp9):
    cfg = load_config("demo", ["data.num_frames=4", "data.crop_size=32", "data.short_side=36",
                               "loader.workers=4"])
    report = bench_loader(Manifest.load(synth_vp9), cfg.data, cfg.loader, ["torch"],
                          ["frames"], batches=2, repeats=1, batch_size=2)
    r = report["results"][0]
    assert r["warmup_batches"] == 4 * cfg.loader.prefetch + 1
    assert 50 < r["peak_mem_mb"] < r["peak_rss_mb"]


def test_nvml_bus_id_and_process_memory():
    """NVML's device is found by PCI bus id (CUDA_VISIBLE_DEVICES renumbers CUDA's devices,
    not NVML's), written as nvmlPciInfo_t.busId; the process memory is our tree's entries."""
    from types import SimpleNamespace as P

    assert nvml_bus_id(0, 0x17, 0) == "00000000:17:00.0"
    assert nvml_bus_id(1, 0xAB, 0x1F) == "00000001:AB:1F.0"
    assert nvml_bus_id(0x10000, 0, 3) == "00010000:00:03.0"
    procs = [P(pid=10, usedGpuMemory=5 << 20), P(pid=11, usedGpuMemory=None),
             P(pid=12, usedGpuMemory=7 << 20), P(pid=99, usedGpuMemory=1 << 30)]
    assert process_gpu_bytes(procs, {10, 12}) == 12 << 20  # another process's: not ours
    assert process_gpu_bytes(procs, {11}) is None  # NVML cannot tell: no figure, not 0
    assert process_gpu_bytes(procs, {5}) is None and process_gpu_bytes([], {10}) is None
    assert gpu_mem_cell({"gpu_mem_peak_mb": 1500.4, "torch_gpu_mem_peak_mb": 900}) == "1500"
    assert gpu_mem_cell({"gpu_mem_peak_mb": None, "torch_gpu_mem_peak_mb": 900}) == "(900)"
    assert gpu_mem_cell({}) == "-"
    with ResourceMonitor(interval=10) as mon:
        pass
    out = mon.summary()
    assert mon.peak_process_gpu is None or out["gpu_mem_peak_mb"] > 0
    if not torch.cuda.is_available():
        assert "gpu_mem_peak_mb" not in out and "torch_gpu_mem_peak_mb" not in out


def test_one_pipeline_row_beside_auto_on_a_gpu():
    auto, two = LoaderConfig(), LoaderConfig(dali_pipelines=2)
    jobs = loader_jobs(["dali-gpu", "torch"], ["video", "frames", "cache"], [], auto, True)
    assert [(n, s, p) for n, s, _, p, _ in jobs] == [
        ("dali-gpu", "video", None), ("dali-gpu", "video", 1), ("torch", "video", None),
        ("dali-gpu", "frames", None), ("torch", "frames", None),
        ("dali-gpu", "cache", None), ("dali-gpu", "cache", 1), ("torch", "cache", None)]
    cpu = loader_jobs(["dali-gpu", "dali-cpu"], ["video"], [], auto, False)
    assert [p for *_, p, _ in cpu] == [None, None]  # no GPU: the CPU behaviour as before
    assert all(p is None for *_, p, _ in loader_jobs(["dali-gpu"], ["video"], [], two, True))
    assert [k for *_, k in jobs] == [1] * len(jobs)


def test_views_per_decode_rows_count_samples_and_decodes_apart(synth_vp9):
    """A k-view row says samples/s and decoded clips/s (samples / k), is compared with its
    own 1-view row (vs 1 view) and never with the seed or a 1-view torch row."""
    cfg = load_config("demo", ["data.num_frames=8", "loader.workers=1"])
    report = bench_loader(Manifest.load(synth_vp9), cfg.data, cfg.loader,
                          ["torch", "dali-cpu"], ["video"], batches=2, repeats=1, warmup=1,
                          batch_size=4, views=[1, 2, 3])
    rows = {(r["backend"], r["views_per_decode"]): r for r in report["results"]}
    assert set(rows) == {("torch", 1), ("torch", 2), ("dali-cpu", 1), ("dali-cpu", 2)}
    assert [u["views_per_decode"] for u in report["unavailable"]
            if "divide" in u["reason"]] == [3, 3]
    for (b, k), r in rows.items():
        assert r["decoded_clips_per_s"] == pytest.approx(r["clips_per_s"] / k)
        assert r["vs_torch"] == pytest.approx(r["clips_per_s"] / rows["torch", k]["clips_per_s"])
        assert r["vs_one_view"] == (pytest.approx(r["clips_per_s"] / rows[b, 1]["clips_per_s"])
                                    if k > 1 else None)
        assert r["cpu_redone_batches"] == 0
    console = Console(record=True, width=220)
    console.print(render_table(report))
    text = console.export_text()
    assert "samples/s" in text and "decoded/s" in text and "dali-cpu x2" in text


def test_feed_continues_passes_and_builds_check():
    loader = SyntheticLoader.random(6, 2, 8, 2)  # 3 batches a pass
    feed = Feed(loader)
    taken = [next(feed) for _ in range(7)]
    assert feed.passes == 3 and len(taken) == 7
    assert loader.counts.backend_batches == 7 and loader.position.delivered == 1
    feed.close()

    class Dali:
        backend, builds = "dali-cpu", 2

    assert check_builds(Dali, 2, 0, "res3") == 0
    assert check_builds(Dali, 1, 1, "res3") == 1  # the rebuild after a CPU-redone batch
    with pytest.raises(RuntimeError, match="built its DALI pipelines 1 time.*stage res3"):
        check_builds(Dali, 1, 0, "res3")
    assert check_builds(loader, None, 0, "res3") is None  # no pipelines


@pytest.mark.slow
def test_bench_train_dali_window_continues_the_warmup_pass(synth_vp9):
    """dali-cpu on VP9 clips: every timed step comes from the pass the warm-up began, and a
    pass that ends inside the window resets the pipelines: none is built inside the window
    (bench train raises otherwise), and DALI made every timed batch. The head stage: the
    cheapest steps on a CPU (no backward through the backbone)."""
    cfg = load_config("demo", ["data.num_frames=4", "data.crop_size=32", "data.short_side=36",
                               "train.batch_size=8", "loader.workers=1", "loader.prefetch=1",
                               "model.hidden=[32, 16]"])
    manifest = Manifest.load(synth_vp9)
    per_epoch = -(-len(manifest.ok("train")) // 8)
    report = bench_train(cfg, manifest, ["dali-cpu"], steps=per_epoch, warmup=1,
                         source="video", stages=["head"])
    assert not report["unavailable"]
    (r,) = report["results"]
    assert r["epoch_batches"] == per_epoch and r["epoch_boundaries_in_window"] == 1
    assert r["builds_in_window"] == 0
    assert (r["backend_batches"], r["cpu_redone_batches"]) == (per_epoch, 0)


def test_cpu_redone_rows_are_marked(synth_vp9, monkeypatch):
    """A row whose timed batches the CPU path redid (as after DALI failed on them) says so
    in its table row and in a warning: its figure is not DALI's."""
    import meld_dali.bench.loader as bench_loader_mod

    real = bench_loader_mod.build_loader

    def redoing(*a, **kw):  # a loader whose every batch counts as redone by the CPU path
        loader = real(*a, **kw)
        batches = loader._batches

        def counted():
            for b in batches():
                loader.counts.backend_batches -= 1
                loader.counts.cpu_redone_batches += 1
                yield b
        loader._batches = counted
        return loader

    monkeypatch.setattr(bench_loader_mod, "build_loader", redoing)
    cfg = load_config("demo", ["data.num_frames=4", "data.crop_size=32", "data.short_side=36",
                               "loader.workers=0"])
    report = bench_loader(Manifest.load(synth_vp9), cfg.data, cfg.loader, ["torch"],
                          ["frames"], batches=2, repeats=1, batch_size=2)
    r = report["results"][0]
    assert (r["backend_batches"], r["cpu_redone_batches"]) == (0, 2)
    assert "torch/frames: 2 of 2 measured batches were redone by the CPU path" in \
        " ".join(report["warnings"])
    console = Console(record=True, width=200)
    console.print(render_table(report))
    assert "torch [CPU redid 2]" in console.export_text()
