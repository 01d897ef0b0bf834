"""GPU check: first the proofs that the GPU path is the GPU's, then the figures, in order of
value, within a time budget.

    python -m meld_dali.bench.gpu_check OUT_DIR [--budget 240] [--doctor] [--ab]

The proofs, on a MELD-shaped set (280 clips of 1280x720 H.264 and its 256-px H.264 clip
cache, made once per machine):
- `nvcuvid`: NVDEC's library loads in this process;
- `nvdec`: dali-gpu decodes a run of train batches with the NVDEC engines busy (NVML's
  decoder utilization > 0) and 0 batches redone on the CPU path;
- `verify_eval_video`, `verify_train_video`, `verify_eval_cache`: dali-gpu against the CPU
  reference (meld_dali.verify: same plans, the doctor's tolerance, every compared batch
  DALI's own), eval view and train draws (fp16 output, the GPU's mirror, rotation and
  per-sample normalization) on the H.264 video, eval view on the cache.
Then the figures, each only if the budget leaves it time: loader clips/s (dali-gpu and torch
on the 720p video and on the cache), the trainer alone and fed by dali-gpu on the cache at
the `head` and `res3` stages; `--ab` adds the compile/layout/precision variants.
OUT_DIR/gpu_check.json is rewritten after every step, so a run cut short still leaves what it
measured; bench JSON goes to OUT_DIR and bench/results/, named by the device. The exit code
is 0 only when every proof passed. `--doctor` runs `meld-dali doctor` first (minutes).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import traceback
from pathlib import Path

import torch

PROOF_BATCHES = 6  # train batches of 16 dali-gpu decodes for the NVDEC proof


class Budget:
    """The seconds left of `total` from now; a step that needs more is skipped, not cut."""

    def __init__(self, total: float):
        self.end = time.monotonic() + total

    def left(self) -> float:
        return self.end - time.monotonic()


def device_slug() -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def nvdec_proof(manifest, cfg) -> dict:
    """dali-gpu over train batches of the H.264 video: NVML's decoder utilization over the
    window and who made the batches."""
    from meld_dali.bench.common import ResourceMonitor
    from meld_dali.pipelines.loader import DaliLoader

    from meld_dali.data.base import LoaderSpec

    spec = LoaderSpec(manifest, "train", True, 16, seed=0, device=torch.device("cuda"),
                      dtype=torch.float16, channels_last=True, source="video")
    loader = DaliLoader(spec, cfg.data, cfg.loader, "gpu")
    n = 0
    with ResourceMonitor(interval=0.1) as mon:
        for _ in loader:
            n += 1
            if n == PROOF_BATCHES:
                break
        torch.cuda.synchronize()
    util = mon.summary()["nvdec_util"]
    c = loader.counts
    out = {"batches": n, "backend_batches": c.backend_batches,
           "cpu_redone_batches": c.cpu_redone_batches, "nvdec_util": util,
           "pipelines": loader.n_pipes, "last_fault": loader.last_fault}
    out["ok"] = bool(util) and c.cpu_redone_batches == 0 and c.backend_batches == n
    if util is None:
        out["error"] = "no NVML figure (pip install nvidia-ml-py): NVDEC use not shown"
    return out


def verify_step(manifest, cfg, source: str, train: bool, views_per_decode: int = 1) -> dict:
    from meld_dali.verify import compare

    v = compare(manifest, "dev", source, cfg.data, cfg.loader, "dali-gpu", torch.device("cuda"),
                label="gpu-check 720p", train=train,
                dtype=torch.float16 if train else torch.float32,
                views_per_decode=views_per_decode)
    return {**v.to_dict(), "ok": bool(v.ok), **({"line": v.line()} if not v.ok else {})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--budget", type=float, default=240.0,
                    help="seconds for the whole check: proofs first, then figures that fit")
    ap.add_argument("--doctor", action="store_true", help="run `meld-dali doctor` first")
    ap.add_argument("--ab", action="store_true",
                    help="also the compile/layout/precision variants (compile takes minutes)")
    ap.add_argument("--data-dir", type=Path, default=Path("/tmp/meld-dali-gpu-check"))
    args = ap.parse_args(argv)
    budget = Budget(args.budget)
    args.out.mkdir(parents=True, exist_ok=True)

    from meld_dali.bench.common import RESULTS_DIR, environment, write_json

    results: dict = {"env": environment(), "budget_s": args.budget, "proofs": [],
                     "skipped": []}

    def step(name: str, fn, need_s: float = 0.0, proof: bool = False) -> None:
        """Run one step if the budget leaves it `need_s`; record it, rewrite the JSON."""
        if budget.left() < need_s:
            results["skipped"].append(f"{name}: {budget.left():.0f} s left, needs ~{need_s:.0f}")
            results[name] = {"ok": False, "skipped": True}
        else:
            t = time.monotonic()
            try:
                results[name] = fn()
            except Exception as e:  # noqa: BLE001 - record and go on to the next step
                results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                 "traceback": traceback.format_exc()}
            results[name]["seconds"] = time.monotonic() - t
        if proof:
            results["proofs"].append(name)
        results["proofs_ok"] = all(results[p].get("ok") for p in results["proofs"])
        write_json(results, args.out / "gpu_check.json")

    if args.doctor:
        step("doctor", lambda: run_doctor_first(args.out))
    if not torch.cuda.is_available():
        step("cuda", lambda: {"ok": False, "error": "no CUDA device is visible"}, proof=True)
        return 1

    from meld_dali.bench.data import ensure_bench_data

    from meld_dali.config import load_config
    from meld_dali.hardware import nvcuvid_problem
    from meld_dali.manifest import Manifest

    slug = device_slug()
    workers = min(16, torch.multiprocessing.cpu_count())
    cfg = load_config("seed", [f"loader.workers={workers}"])
    data: dict = {}

    def make_data():
        root, record = ensure_bench_data("gpu-check", 256, args.data_dir, frames=False)
        data["manifest"] = Manifest.load(root)
        return {"ok": True, **record}

    step("nvcuvid", lambda: {"ok": not nvcuvid_problem(), "problem": nvcuvid_problem()},
         proof=True)
    step("data", make_data, proof=True)
    if "manifest" not in data:
        return 1
    m = data["manifest"]
    step("nvdec", lambda: nvdec_proof(m, cfg), proof=True)
    step("verify_eval_video", lambda: verify_step(m, cfg, "video", False), proof=True)
    step("verify_train_video", lambda: verify_step(m, cfg, "video", True), proof=True)
    step("verify_eval_cache", lambda: verify_step(m, cfg, "cache", False), proof=True)
    # two draws from one NVDEC decode (loader.views_per_decode=2: the graph's rearrange)
    step("verify_train_cache_x2", lambda: verify_step(m, cfg, "cache", True, 2), proof=True)

    def save(rep: dict, what: str) -> None:
        name = f"gpu_check_{what}_{slug}.json"
        write_json(rep, args.out / name)
        write_json(rep, RESULTS_DIR / name)  # bench/results/ (carried back with OUT too)

    def loader_bench() -> dict:
        from meld_dali.bench.loader import bench_loader

        rep = bench_loader(m, cfg.data, cfg.loader, ["dali-gpu", "torch"], ["video", "cache"],
                           batches=5, repeats=2, warmup=2, batch_size=16)
        save(rep, "bench_loader")
        keys = ("backend", "source", "dali_pipelines", "clips_per_s", "vs_torch", "cpu_util",
                "nvdec_util", "backend_batches", "cpu_redone_batches", "gpu_mem_peak_mb")
        return {"ok": True, "rows": [{k: r.get(k) for k in keys} for r in rep["results"]]}

    train_keys = ("backend", "variant", "stage", "clips_per_s", "data_wait_share", "verdict",
                  "achieved_tflops", "mfu", "nvdec_util", "backend_batches",
                  "cpu_redone_batches", "builds_in_window", "gpu_mem_peak_mb")

    def train_bench() -> dict:
        from meld_dali.bench.train import bench_train

        tcfg = load_config("seed", [f"loader.workers={workers}", "model.pretrained=",
                                    "train.batch_size=16", "train.compile=false"])
        rep = bench_train(tcfg, m, ["synthetic", "dali-gpu"], steps=10, warmup=3,
                          source="cache", stages=["head", "res3"])
        save(rep, "bench_train")
        return {"ok": True, "rows": [{k: r.get(k) for k in train_keys} for r in rep["results"]]}

    def ab_bench() -> dict:  # the model alone, res3: eager/compiled, layouts, fp16/bf16
        from meld_dali.bench.train import bench_train_ab

        acfg = load_config("seed", ["model.pretrained=", "train.batch_size=16"])
        rep = bench_train_ab(acfg, None, ["synthetic"], steps=10, warmup=3, stages=["res3"])
        save(rep, "bench_train_ab")
        return {"ok": True, "rows": [{k: r.get(k) for k in train_keys} for r in rep["results"]]}

    # the figures, most wanted first; each needs about this long on an H100/H200
    step("bench_loader", loader_bench, need_s=45)
    step("bench_train", train_bench, need_s=60)
    if args.ab:
        step("bench_train_ab", ab_bench, need_s=180)
    results["total_s"] = args.budget - budget.left()
    write_json(results, args.out / "gpu_check.json")
    print(json.dumps({k: v for k, v in results.items() if k != "env"}, indent=1, default=str))
    return 0 if results["proofs_ok"] else 1


def run_doctor_first(out: Path) -> dict:
    """`meld-dali doctor` on this machine: its screen, OUT/doctor.json, and a summary."""
    from meld_dali.bench.common import write_json
    from rich.console import Console

    from meld_dali.doctor import render, run_doctor

    rep = run_doctor(out=out, say=lambda s: print(s, file=sys.stderr, flush=True))
    Console(width=80).print(*render(rep), highlight=False)
    write_json(rep, out / "doctor.json")
    return {"ok": rep["ok"], "failures": rep["failures"], "auto": rep["auto"]}


if __name__ == "__main__":
    sys.exit(main())
