"""`meld-dali bench loader`: clips/s of each backend on the same manifest and settings.

Every backend runs the train graph (the expensive one: random crops, flips, rotations,
colour) with the same batch size and the same worker/thread count: warm-up batches first,
then `repeats` timed runs of `batches` batches; medians and spread are reported, with the
ratio to the torch baseline measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from meld_dali.bench.common import ResourceMonitor, environment

from meld_dali.config import DataConfig, LoaderConfig
from meld_dali.data.base import LoaderSpec
from meld_dali.data.select import backend_problem, build_loader, source_problem
from meld_dali.manifest import Manifest


def _endless(loader):
    """Batches across epoch boundaries, so a run can be longer than one epoch."""
    while True:
        yield from loader


def time_loader(loader, batches: int, repeats: int, warmup: int, device) -> dict:
    it = _endless(loader)
    for _ in range(warmup):
        next(it)
    rates, frames_rates = [], []
    T = None
    with ResourceMonitor() as mon:
        for _ in range(repeats):
            clips = frames = 0
            t0 = time.perf_counter()
            for _ in range(batches):
                b = next(it)
                clips += len(b)
                frames += int(b.mask.sum())  # real (decoded) frames, not padding
                T = b.mask.shape[1]
            if device.type == "cuda":
                torch.cuda.synchronize()  # GPU sync point: the batch must really be ready
            dt = time.perf_counter() - t0
            rates.append(clips / dt)
            frames_rates.append(frames / dt)
    return {"clips_per_s": statistics.median(rates),
            "clips_per_s_min": min(rates), "clips_per_s_max": max(rates),
            "frames_per_s": statistics.median(frames_rates),
            "sampled_frames_per_s": statistics.median(rates) * (T or 0),
            "repeats": repeats, "batches": batches, **mon.summary()}


def soak(loader, epochs: int) -> dict:
    """Full epochs through a loader, the process tree's RSS after each: a leak shows as
    growth after the first epoch (which includes start-up allocations)."""
    mon = ResourceMonitor()
    rss = []
    for _ in range(epochs):
        for _ in loader:
            pass
        mon._sample()
        rss.append(mon.peak_rss / 2**20)
        mon.peak_rss = 0
    return {"rss_mb_per_epoch": rss,
            "rss_growth_mb": rss[-1] - rss[min(1, len(rss) - 1)] if rss else 0.0}


def bench_loader(manifest: Manifest, data: DataConfig, loader_cfg: LoaderConfig,
                 backends: list[str], sources: list[str], *, batches: int = 10,
                 repeats: int = 3, warmup: int = 2, batch_size: int = 8, split: str = "train",
                 device: torch.device | None = None, progress=None,
                 soak_epochs: int = 0) -> dict:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results, unavailable = [], []
    task = progress.add_task("bench loader", total=len(backends) * len(sources)) \
        if progress else None
    for source in sources:
        for backend in backends:
            why = (source_problem(manifest, source)
                   or backend_problem(backend, manifest, split, source))
            if why:
                unavailable.append({"backend": backend, "source": source, "reason": why})
            else:
                spec = LoaderSpec(manifest, split, True, batch_size, seed=0, device=device,
                                  source=source)
                loader = build_loader(spec, data, loader_cfg, backend)
                row = {"backend": backend, "source": source,
                       **time_loader(loader, batches, repeats, warmup, device)}
                if soak_epochs:
                    row["soak"] = soak(loader, soak_epochs)
                del loader
                results.append(row)
            if progress:
                progress.advance(task)
    for row in results:  # ratios against the torch baseline of the same source
        base = next((r for r in results if r["backend"] == "torch"
                     and r["source"] == row["source"]), None)
        row["vs_torch"] = row["clips_per_s"] / base["clips_per_s"] if base else None
    return {"env": environment(),
            "settings": {"batch_size": batch_size, "workers": loader_cfg.workers,
                         "num_frames": data.num_frames, "crop_size": data.crop_size,
                         "short_side": data.short_side, "split": split, "clips":
                         len(manifest.ok(split)), "warmup": warmup, "manifest":
                         str(manifest.path)},
            "results": results, "unavailable": unavailable}


def render_table(report: dict):
    from rich.table import Table

    t = Table(title=f"loader throughput ({report['env']['cores']} cores, "
                    f"GPU: {report['env']['gpu']}; train graph, batch "
                    f"{report['settings']['batch_size']}, {report['settings']['workers']} "
                    f"workers/threads, T={report['settings']['num_frames']}, "
                    f"{report['settings']['crop_size']} px)")
    soaked = any("soak" in r for r in report["results"])
    for col in ("backend", "source", "clips/s", "min-max", "frames/s", "vs torch", "CPU util",
                "peak RSS MB", "GPU mem MB") + (("RSS growth MB",) if soaked else ()):
        t.add_column(col, justify="left" if col in ("backend", "source") else "right")
    for r in report["results"]:
        t.add_row(r["backend"], r["source"], f"{r['clips_per_s']:.1f}",
                  f"{r['clips_per_s_min']:.1f}-{r['clips_per_s_max']:.1f}",
                  f"{r['frames_per_s']:.0f}",
                  f"{r['vs_torch']:.2f}x" if r["vs_torch"] else "-",
                  f"{r['cpu_util']:.0%}", f"{r['peak_rss_mb']:.0f}",
                  f"{r['gpu_mem_peak_mb']:.0f}" if "gpu_mem_peak_mb" in r else "-",
                  *((f"{r['soak']['rss_growth_mb']:+.0f}",) if soaked else ()))
    for u in report["unavailable"]:
        t.add_row(u["backend"], u["source"], f"n/a: {u['reason']}",
                  *["-"] * (len(t.columns) - 3))
    return t


def plot(report: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    labels = [f"{r['backend']}\n{r['source']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(rows)), 3.5))
    vals = [r["clips_per_s"] for r in rows]
    err = [[v - r["clips_per_s_min"] for v, r in zip(vals, rows, strict=True)],
           [r["clips_per_s_max"] - v for v, r in zip(vals, rows, strict=True)]]
    ax.bar(labels, vals, yerr=err, color=["#76b900" if "dali" in r["backend"] else "#888"
                                          for r in rows])
    ax.set_ylabel("clips / s (median, min-max)")
    env = report["env"]
    where = env["gpu"] if env["gpu"] != "none" else f"{env['cores']} CPU cores"
    ax.set_title(f"meld-dali loaders on {where}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
