"""`meld-dali bench train`: the trainer's consumption rate, alone and fed by each loader.

The same Trainer as `meld-dali train` runs `steps` optimizer steps (accumulation 1) after a
warm-up; its own timers split wall time into data wait (blocked on the loader) and step
time (forward, backward, optimizer; the loss .item() is the GPU sync point). "synthetic" is
the model alone on in-memory batches: the ceiling any loader can reach.
"""

from __future__ import annotations

import copy

import torch
from meld_dali.bench.common import (
    ResourceMonitor,
    compact_table,
    describe_input,
    environment,
    input_label,
)

from meld_dali.config import Config
from meld_dali.data.base import SyntheticLoader
from meld_dali.data.select import backend_problem, resolve_source, source_problem
from meld_dali.evaluation import Dist
from meld_dali.launch import build_loaders, build_model_on, flag, net_factory, video_dtype
from meld_dali.manifest import Manifest
from meld_dali.trainer import Trainer

DATA_BOUND_SHARE = 0.10  # above this share of step time waiting for data: data-bound


def measure(cfg: Config, loader, device: torch.device, steps: int, warmup: int) -> dict:
    """The training assembly of `meld-dali train` (model, compile/DDP wrapper, Trainer),
    res3-res5 trainable (the costliest recipe stage): `warmup` optimizer steps, then
    `steps` timed ones."""
    torch.manual_seed(0)
    model = build_model_on(cfg, device)
    model.set_trainable({"res3", "res4", "res5"})
    trainer = Trainer(cfg, model, loader, loader, [1] * 7, device,
                      make_net=net_factory(cfg, device, Dist()))
    trainer.train_one_epoch(max_steps=warmup)  # warm-up (and compilation)
    trainer.take_stats()
    with ResourceMonitor() as mon:
        trainer.train_one_epoch(max_steps=steps)
    s = trainer.take_stats()
    wall = s.data_wait + s.step_time
    share = s.data_wait / max(wall, 1e-9)
    return {"clips_per_s": s.clips / max(wall, 1e-9), "clips": s.clips,
            "data_wait_share": share, "step_time_s": s.step_time, "data_wait_s": s.data_wait,
            "verdict": "data-bound" if share > DATA_BOUND_SHARE else "compute-bound",
            **mon.summary()}


def bench_train(cfg: Config, manifest: Manifest | None, backends: list[str], *, steps: int,
                warmup: int, source: str = "auto", progress=None,
                dataset: dict | None = None) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = copy.deepcopy(cfg)  # this bench's own settings: one optimizer step per batch
    cfg.train.accum_steps = 1
    cfg.tracking.wandb = False
    cfg.data.source = source
    B, T, S = cfg.train.batch_size, cfg.data.num_frames, cfg.data.crop_size
    dtype = video_dtype(cfg, device)
    cl = flag(cfg.loader.channels_last, device)
    resolved = resolve_source(manifest, "auto") if manifest and source == "auto" else source
    results, unavailable = [], []
    described = None
    task = progress.add_task("bench train", total=len(backends)) if progress else None
    for backend in backends:
        if backend == "synthetic":
            n = B * (steps + warmup + 1)
            loader = SyntheticLoader.random(n, T, S, B, device=device, dtype=dtype,
                                            channels_last=cl)
            why = ""
        elif manifest is None:
            why = "no dataset"
        else:
            why = (source_problem(manifest, resolved)
                   or backend_problem(backend, manifest, cfg.data.train_split, resolved))
            if not why:
                _, loader, _ = build_loaders(cfg, manifest, device, Dist(), backend=backend)
                if len(loader) < steps + warmup:
                    why = (f"dataset too small: {len(loader)} batches < {steps + warmup} "
                           "steps + warm-up")
        if why:
            unavailable.append({"backend": backend, "reason": why})
        else:
            row = {"backend": backend}
            if backend != "synthetic":
                described = described or describe_input(manifest, cfg.data.train_split,
                                                        resolved)
                row["input"] = described
            results.append({**row, **measure(cfg, loader, device, steps, warmup)})
        if progress:
            progress.advance(task)
    amp = cfg.train.amp if device.type == "cuda" else "off"
    if dataset is None and manifest is not None:
        dataset = {"kind": "user", "root": str(manifest.base)}
    return {"env": environment(), "dataset": dataset, "input": described,
            "settings": {"batch_size": B, "num_frames": T, "crop_size": S, "amp": amp,
                         "channels_last": cl, "compile": flag(cfg.train.compile, device),
                         "steps": steps, "warmup": warmup, "workers": cfg.loader.workers,
                         "source": resolved, "data_bound_share": DATA_BOUND_SHARE},
            "results": results, "unavailable": unavailable}


def render_table(report: dict):
    s = report["settings"]
    kind = (report.get("dataset") or {}).get("kind")
    d = report.get("input")
    t = compact_table(f"trainer throughput{f', {kind} data' if kind else ''} (batch "
                      f"{s['batch_size']}, T={s['num_frames']}, {s['crop_size']} px, amp "
                      f"{s['amp']}, channels_last {s['channels_last']}, compile "
                      f"{s['compile']}, GPU: {report['env']['gpu']}; PSS: peak memory of the "
                      "process tree, GPU: peak device memory, both MB)",
                      f"{s['source']}: {input_label(d)}" if d else None)
    for col in ("loader", "clips/s", "data wait", "verdict", "PSS", "GPU"):
        t.add_column(col, justify="left" if col in ("loader", "verdict") else "right")
    for r in report["results"]:
        t.add_row(r["backend"], f"{r['clips_per_s']:.2f}", f"{r['data_wait_share']:.0%}",
                  r["verdict"], f"{r['peak_mem_mb']:.0f}",
                  f"{r['gpu_mem_peak_mb']:.0f}" if "gpu_mem_peak_mb" in r else "-")
    for u in report["unavailable"]:
        t.add_row(u["backend"], "-", "-", f"n/a: {u['reason']}", "-", "-")
    return t
