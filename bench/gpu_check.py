"""GPU check: `meld-dali doctor` first (its screen, OUT_DIR/doctor.json), then the DALI
mixed/GPU variant on real H.264 clips, the loader and trainer benches on a MELD-shaped set
(280 clips of 1280x720 H.264, raw and as the 256-px clip cache), every recipe stage, and
the --ab variants; sized for ~8 minutes on an H100 (not yet run on one).

    python -m meld_dali.bench.gpu_check OUT_DIR [--quick]

Needs CUDA, DALI and PyAV (see shared/gpu/README.md for carrying DALI to a bare GPU machine).
Writes OUT_DIR/gpu_check.json (pass/fail per check with the figures), bench JSON files and
a log. CI skips it (tests/test_gpu.py runs it only where CUDA and DALI are present).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch


def check_pipeline(manifest, source: str, results: dict) -> None:
    """Batch contract and eval values of dali-gpu against the CPU fallback, same clips."""
    from meld_dali.pipelines.loader import DaliLoader

    from meld_dali.config import load_config
    from meld_dali.data.base import LoaderSpec
    from meld_dali.data.torch_loader import TorchLoader

    name = f"dali_gpu_{'frames' if source == 'frames' else 'h264_video'}"
    cfg = load_config("seed", ["loader.workers=4"])
    dev = torch.device("cuda")
    out: dict = {}
    for train in (False, True):
        spec = LoaderSpec(manifest, "dev" if not train else "train", train, 8, seed=0,
                          device=dev, dtype=torch.float32, source=source)
        gpu, cpu = DaliLoader(spec, cfg.data, cfg.loader, "gpu"), TorchLoader(
            spec, cfg.data, cfg.loader)
        diffs, padded_nonzero, n = [], 0, 0
        for a, b in zip(gpu, cpu, strict=True):
            assert a.video.is_cuda and a.video.shape[1:] == (3, 32, 224, 224), a.video.shape
            assert torch.equal(a.index.cpu(), b.index.cpu())
            assert torch.equal(a.mask.cpu(), b.mask.cpu())
            pad = ~a.mask
            padded_nonzero += int(torch.count_nonzero(
                a.video.permute(0, 2, 1, 3, 4)[pad])) if pad.any() else 0
            diffs.append((a.video.cpu() - b.video.cpu()).abs().mean().item())
            n += len(a)
        out["train" if train else "eval"] = {
            "clips": n, "mean_abs_diff_vs_cpu": max(diffs), "padded_nonzero": padded_nonzero}
        assert padded_nonzero == 0
    # Tolerance in normalized units (one grey level = 0.017): nvJPEG and libjpeg-turbo differ in
    # IDCT and chroma upsampling, NVDEC and libavcodec in YUV->RGB, and the resize kernels
    # differ; measured on an H100: 0.017 (frames) and 0.033 (H.264 video).
    out["ok"] = out["eval"]["mean_abs_diff_vs_cpu"] < 0.05
    results[name] = out


def run_doctor_first(out: Path) -> dict:
    """`meld-dali doctor` on this machine: its screen, OUT/doctor.json, and a summary for
    gpu_check.json (ok, failures, auto's picks), so one command shows both."""
    from meld_dali.bench.common import write_json
    from rich.console import Console

    from meld_dali.doctor import render, run_doctor

    rep = run_doctor(out=out, say=lambda s: print(s, file=sys.stderr, flush=True))
    Console(width=80).print(*render(rep), highlight=False)
    write_json(rep, out / "doctor.json")
    return {"ok": rep["ok"], "failures": rep["failures"], "auto": rep["auto"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--quick", action="store_true", help="skip the torch.compile variant")
    ap.add_argument("--data-dir", type=Path, default=Path("/tmp/meld-dali-gpu-check"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    doctor = run_doctor_first(args.out)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device: nothing to check", file=sys.stderr)
        return 1
    import os

    from meld_dali.bench.common import RESULTS_DIR, ensure_bench_data, environment, write_json
    from meld_dali.bench.loader import bench_loader
    from meld_dali.bench.train import bench_train, bench_train_ab

    from meld_dali.config import load_config
    from meld_dali.manifest import Manifest

    results: dict = {"env": environment(), "doctor": doctor}
    t0 = time.time()
    workers = os.cpu_count() or 8
    # MELD-shaped: 1280x720 H.264, 280 clips = 168 train = 10 batches of 16 (steps below);
    # made once per machine: a rerun on a warm machine reuses it
    root, _ = ensure_bench_data("gpu-check", 256, args.data_dir, frames=False)
    manifest = Manifest.load(root)
    results["synth_prepare_s"] = time.time() - t0

    def step(name, fn):
        t = time.time()
        try:
            fn()
            results.setdefault(name, {})["seconds"] = time.time() - t
        except Exception as e:  # noqa: BLE001 - record and go on to the next check
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                             "traceback": traceback.format_exc()}
        write_json(results, args.out / "gpu_check.json")

    step("dali_gpu_h264_video", lambda: check_pipeline(manifest, "video", results))

    def save(rep, name):
        write_json(rep, args.out / name)
        write_json(rep, RESULTS_DIR / name)  # bench/results/ (carried back with OUT too)

    def loader_bench():
        cfg = load_config("seed", [f"loader.workers={workers}"])
        rep = bench_loader(manifest, cfg.data, cfg.loader, ["dali-gpu", "torch"],
                           ["video", "cache"], batches=5, repeats=2, warmup=2, batch_size=16)
        save(rep, "gpu_check_bench_loader.json")
        results["bench_loader"] = {"ok": True, "rows": [
            {k: r.get(k) for k in ("backend", "source", "clips_per_s", "vs_torch", "cpu_util",
                                   "nvdec_util", "nvjpg_util")} for r in rep["results"]]}

    step("bench_loader", loader_bench)

    keys = ("backend", "variant", "stage", "clips_per_s", "data_wait_share", "verdict",
            "achieved_tflops", "mfu", "compile_s", "recompiles", "nvdec_util",
            "gpu_mem_peak_mb")
    for source in ("video", "cache"):
        def train_bench(source=source):
            cfg = load_config("seed", [f"loader.workers={workers}", "model.pretrained=",
                                       "train.batch_size=16", "train.compile=false"])
            rep = bench_train(cfg, manifest, ["synthetic", "dali-gpu"] if source == "video"
                              else ["dali-gpu"], steps=10, warmup=3, source=source,
                              stages=["head", "res5", "res4", "res3"])
            save(rep, f"gpu_check_bench_train_{source}.json")
            results[f"bench_train_{source}"] = {"ok": True, "rows": [
                {k: r.get(k) for k in keys} for r in rep["results"]]}

        step(f"bench_train_{source}", train_bench)

    def ab_bench():  # the model alone, res3 stage: eager/compiled, layouts, fp16/bf16
        cfg = load_config("seed", ["model.pretrained=", "train.batch_size=16"])
        rep = bench_train_ab(cfg, None, ["synthetic"], steps=10, warmup=3,
                             stages=["res3"], quick=args.quick)
        save(rep, "gpu_check_bench_train_ab.json")
        results["bench_train_ab"] = {"ok": True, "rows": [
            {k: r.get(k) for k in keys} for r in rep["results"]]}

    step("bench_train_ab", ab_bench)
    results["total_s"] = time.time() - t0
    write_json(results, args.out / "gpu_check.json")
    print(json.dumps({k: v for k, v in results.items() if k != "env"}, indent=1, default=str))
    return 0 if all(v.get("ok", True) for v in results.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
