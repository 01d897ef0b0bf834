"""GPU check: the DALI mixed/GPU variant on real H.264 clips, the loader and trainer benches.

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--quick", action="store_true", help="skip torch.compile runs")
    ap.add_argument("--data-dir", type=Path, default=Path("/tmp/meld-dali-gpu-check"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device: nothing to check", file=sys.stderr)
        return 1
    from meld_dali.bench.common import environment, write_json
    from meld_dali.bench.loader import bench_loader
    from meld_dali.bench.train import bench_train

    from meld_dali.config import load_config
    from meld_dali.manifest import prepare
    from meld_dali.synth import SynthSpec, synth

    results: dict = {"env": environment()}
    t0 = time.time()
    root = args.data_dir
    synth(root, SynthSpec(clips=96, codec="h264", width=320, height=240, seed=0))
    manifest, _ = prepare(root, frames=root / "frames", short_side=256, workers=8)
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
    step("dali_gpu_frames", lambda: check_pipeline(manifest, "frames", results))

    def loader_bench():
        cfg = load_config("seed", ["loader.workers=8"])
        rep = bench_loader(manifest, cfg.data, cfg.loader, ["dali-gpu", "dali-cpu", "torch"],
                           ["video", "frames"], batches=6, repeats=3, warmup=2, batch_size=16)
        write_json(rep, args.out / "bench_loader.json")
        results["bench_loader"] = {"ok": True, "rows": [
            {k: r[k] for k in ("backend", "source", "clips_per_s", "vs_torch", "cpu_util")}
            for r in rep["results"]]}

    step("bench_loader", loader_bench)

    variants = [("amp_fp16_cl", ["train.amp=fp16", "loader.channels_last=true",
                                 "train.compile=false"]),
                ("fp32_nocl", ["train.amp=off", "loader.channels_last=false",
                               "train.compile=false"])]
    if not args.quick:
        variants.append(("amp_fp16_cl_compile", ["train.amp=fp16", "loader.channels_last=true",
                                                 "train.compile=true"]))
    for tag, over in variants:
        def train_bench(tag=tag, over=over):
            cfg = load_config("seed", ["loader.workers=8", "model.pretrained=",
                                       "train.batch_size=8", *over])
            rep = bench_train(cfg, manifest, ["synthetic", "dali-gpu", "torch"], steps=5,
                              warmup=2)
            write_json(rep, args.out / f"bench_train_{tag}.json")
            results[f"bench_train_{tag}"] = {"ok": True, "rows": [
                {k: r[k] for k in ("backend", "clips_per_s", "data_wait_share", "verdict",
                                   "gpu_mem_peak_mb")} for r in rep["results"]]}

        step(f"bench_train_{tag}", train_bench)
    results["total_s"] = time.time() - t0
    write_json(results, args.out / "gpu_check.json")
    print(json.dumps({k: v for k, v in results.items() if k != "env"}, indent=1, default=str))
    return 0 if all(v.get("ok", True) for v in results.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
