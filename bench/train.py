"""`meld-dali bench train`: the trainer's consumption rate, alone and fed by each loader.

The same Trainer as `meld-dali train` runs `steps` optimizer steps (accumulation 1) after a
warm-up; its own timers split wall time into data wait (blocked on the loader) and step
time (forward, backward, optimizer; the loss .item() is the GPU sync point). "synthetic" is
the model alone on in-memory batches: the ceiling any loader can reach.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from meld_dali.bench.common import ResourceMonitor, environment

from meld_dali.config import Config
from meld_dali.data import BACKENDS, LoaderSpec, SyntheticLoader, backend_problem, build_loader
from meld_dali.launch import flag, video_dtype
from meld_dali.manifest import Manifest
from meld_dali.model import build_model
from meld_dali.trainer import Trainer

DATA_BOUND_SHARE = 0.10  # above this share of step time waiting for data: data-bound


def measure(cfg: Config, loader, device: torch.device, steps: int, warmup: int,
            run_dir: Path) -> dict:
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    if flag(cfg.loader.channels_last, device):
        model = model.to(memory_format=torch.channels_last_3d)
    model.set_trainable(set(("res3", "res4", "res5")))  # the costliest recipe stage
    make = torch.compile if flag(cfg.train.compile, device) else None
    trainer = Trainer(cfg, run_dir, model, loader, loader, [1] * 7, device, make_net=make)
    trainer.cfg.train.max_steps_per_epoch = warmup
    trainer.train_one_epoch()  # warm-up (and compilation)
    trainer.stats.__init__()
    trainer.cfg.train.max_steps_per_epoch = steps
    with ResourceMonitor() as mon:
        trainer.train_one_epoch()
    s = trainer.stats
    wall = s.data_wait + s.step_time
    share = s.data_wait / max(wall, 1e-9)
    return {"clips_per_s": s.clips / max(wall, 1e-9), "clips": s.clips,
            "data_wait_share": share, "step_time_s": s.step_time, "data_wait_s": s.data_wait,
            "verdict": "data-bound" if share > DATA_BOUND_SHARE else "compute-bound",
            **mon.summary()}


def bench_train(cfg: Config, manifest: Manifest | None, backends: list[str], *, steps: int,
                warmup: int, run_dir: Path, source: str = "auto", progress=None) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = copy.deepcopy(cfg)
    cfg.train.accum_steps = 1
    cfg.tracking.wandb = False
    B, T, S = cfg.train.batch_size, cfg.data.num_frames, cfg.data.crop_size
    dtype = video_dtype(cfg, device)
    cl = flag(cfg.loader.channels_last, device)
    frames = source == "frames" or (source == "auto" and manifest is not None
                                    and manifest.has_frames)
    results, unavailable = [], []
    task = progress.add_task("bench train", total=len(backends)) if progress else None
    for backend in backends:
        if backend == "synthetic":
            n = B * (steps + warmup + 1)
            loader = SyntheticLoader.random(n, T, S, B, device=device, dtype=dtype,
                                            channels_last=cl)
            why = ""
        else:
            why = ("no dataset" if manifest is None else backend_problem(
                backend, manifest, cfg.data.train_split, frames)
                if backend in BACKENDS else f"unknown backend {backend!r}")
            if not why:
                spec = LoaderSpec(manifest, cfg.data.train_split, True, B, cfg.train.seed,
                                  device=device, dtype=dtype, channels_last=cl,
                                  use_frames=frames)
                loader = build_loader(spec, cfg.data, cfg.loader, backend)
                if len(loader) < steps + warmup:
                    why = (f"dataset too small: {len(loader)} batches < {steps + warmup} "
                           "steps + warm-up")
        if why:
            unavailable.append({"backend": backend, "reason": why})
        else:
            results.append({"backend": backend,
                            **measure(cfg, loader, device, steps, warmup, run_dir)})
        if progress:
            progress.advance(task)
    amp = cfg.train.amp if device.type == "cuda" else "off"
    return {"env": environment(),
            "settings": {"batch_size": B, "num_frames": T, "crop_size": S, "amp": amp,
                         "channels_last": cl, "compile": flag(cfg.train.compile, device),
                         "steps": steps, "warmup": warmup, "workers": cfg.loader.workers,
                         "source": "frames" if frames else "video",
                         "data_bound_share": DATA_BOUND_SHARE},
            "results": results, "unavailable": unavailable}


def render_table(report: dict):
    from rich.table import Table

    s = report["settings"]
    t = Table(title=f"trainer throughput (batch {s['batch_size']}, T={s['num_frames']}, "
                    f"{s['crop_size']} px, amp {s['amp']}, channels_last {s['channels_last']}, "
                    f"compile {s['compile']}, GPU: {report['env']['gpu']})")
    for col in ("loader", "clips/s", "data wait", "verdict", "peak RSS MB", "GPU mem MB"):
        t.add_column(col, justify="left" if col in ("loader", "verdict") else "right")
    for r in report["results"]:
        t.add_row(r["backend"], f"{r['clips_per_s']:.2f}", f"{r['data_wait_share']:.0%}",
                  r["verdict"], f"{r['peak_rss_mb']:.0f}",
                  f"{r['gpu_mem_peak_mb']:.0f}" if "gpu_mem_peak_mb" in r else "-")
    for u in report["unavailable"]:
        t.add_row(u["backend"], "-", "-", f"n/a: {u['reason']}", "-", "-")
    return t
