"""The bench suite on tiny synthetic data: schema, table, plot, each CPU backend."""

import json
import subprocess
import sys

import pytest
from meld_dali.bench.common import result_path
from meld_dali.bench.loader import bench_loader, plot, render_table
from meld_dali.bench.train import bench_train
from meld_dali.bench.train import render_table as train_table
from rich.console import Console

from meld_dali.config import load_config
from meld_dali.manifest import Manifest

BACKENDS = ["dali-gpu", "dali-cpu", "torch"]


def test_bench_loader_schema_table_and_plot(synth_vp9, tmp_path):
    pytest.importorskip("nvidia.dali")
    cfg = load_config("demo", ["data.num_frames=8", "loader.workers=2"])
    report = bench_loader(Manifest.load(synth_vp9), cfg.data, cfg.loader, BACKENDS,
                          ["video", "frames"], batches=2, repeats=2, warmup=1, batch_size=4,
                          soak_epochs=2)
    assert {"torch", "python", "cores", "cpu", "gpu", "dali"} <= set(report["env"])
    ran = {(r["backend"], r["source"]) for r in report["results"]}
    assert {("torch", "video"), ("torch", "frames"), ("dali-cpu", "video"),
            ("dali-cpu", "frames")} <= ran
    for r in report["results"]:
        for key in ("backend", "clips_per_s", "frames_per_s", "peak_rss_mb", "cpu_util"):
            assert key in r
        assert r["clips_per_s"] > 0 and r["peak_rss_mb"] > 50
        assert r["clips_per_s_min"] <= r["clips_per_s"] <= r["clips_per_s_max"]
        assert len(r["soak"]["rss_mb_per_epoch"]) == 2 and min(r["soak"]["rss_mb_per_epoch"]) > 50
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
    assert "RSS growth MB" in text
    plot(report, tmp_path / "loader.png")
    assert (tmp_path / "loader.png").read_bytes()[:4] == b"\x89PNG"
    name = result_path("loader", "uint8-fp32", report["env"]).name
    assert name.startswith("loader-uint8-fp32-torch") and "cpu" in name


def test_bench_train_synthetic_and_torch(synth_root, tmp_path):
    cfg = load_config("demo", ["data.num_frames=4", "train.batch_size=2", "loader.workers=0",
                               "model.hidden=[32, 16]"])
    report = bench_train(cfg, Manifest.load(synth_root), ["synthetic", "torch", "nope"],
                         steps=2, warmup=1)
    rows = {r["backend"]: r for r in report["results"]}
    assert set(rows) == {"synthetic", "torch"}
    for r in rows.values():
        assert r["clips"] == 4 and r["clips_per_s"] > 0
        assert 0 <= r["data_wait_share"] <= 1
        assert r["verdict"] in ("data-bound", "compute-bound")
    assert rows["synthetic"]["data_wait_share"] < rows["torch"]["data_wait_share"]
    assert report["unavailable"][0]["backend"] == "nope"
    console = Console(record=True, width=200)
    console.print(train_table(report))
    assert "synthetic" in console.export_text()


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
