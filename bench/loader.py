"""`meld-dali bench loader`: clips/s of each backend on the same manifest and settings.

Every backend runs the train graph (the expensive one: random crops, flips, rotations,
colour) with the same batch size and the same worker/thread count: warm-up batches first
(enough to drain what the loader prefetched before timing started), then `repeats` timed
runs of `batches` batches; medians and spread are reported, with the ratio to the torch
baseline measured in the same run. Each row names its input (resolution, codec, frames per
clip, bitrate) and says how many epochs its timed window spans.

With several views per decode (`--views-per-decode 1,2`: each decoded clip yields k training
samples), a row's `clips_per_s` counts samples, `decoded_clips_per_s` the clips decoded for
them (samples / k): a k-view row is compared with the same loader's 1-view row
(`vs_one_view`), never with the torch baseline or the seed as if it were the same work.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from pathlib import Path

import psutil
import torch
from meld_dali.bench.common import (
    ResourceMonitor,
    compact_table,
    describe_input,
    environment,
    gpu_mem_cell,
    input_label,
    process_tree,
    redone_label,
    redone_warnings,
    row_counts,
    tree_memory,
    with_unavailable,
)
from meld_dali.bench.peers import Peer, peer_problem, peer_sources

from meld_dali.config import DataConfig, LoaderConfig
from meld_dali.data.base import LoaderSpec
from meld_dali.data.select import backend_problem, build_loader, source_problem
from meld_dali.manifest import Manifest


def _endless(loader):
    """Batches across epoch boundaries, so a run can be longer than one epoch."""
    while True:
        yield from loader


def auto_warmup(backend: str, loader_cfg: LoaderConfig) -> int:
    """Batches to take before timing: everything the loader may have prefetched, plus one.
    The torch DataLoader holds workers x prefetch_factor batches; DALI's queue holds
    `prefetch` batches."""
    if backend == "torch":
        return max(loader_cfg.num_workers, 1) * loader_cfg.prefetch + 1 \
            if loader_cfg.num_workers > 0 else 1
    return loader_cfg.prefetch + 1


def window(warmup: int, timed: int, per_epoch: int) -> int:
    """Epoch boundaries inside the timed window (batches warmup .. warmup+timed-1, epochs of
    `per_epoch` batches): each one restarts the loader's prefetch inside the timing."""
    if per_epoch <= 0:
        return 0
    first = max(1, math.ceil(warmup / per_epoch))  # first boundary at or after the window
    return max(0, (warmup + timed - 1) // per_epoch - first + 1)


def time_loader(loader, batches: int, repeats: int, warmup: int, device) -> dict:
    it = _endless(loader)
    for _ in range(warmup):
        next(it)
    rates, frames_rates = [], []
    T, timed = None, 0
    counts0 = loader.counts.copy()  # who made the timed batches: DALI, or the CPU path
    with ResourceMonitor() as mon:
        for _ in range(repeats):
            clips = frames = 0
            t0 = time.perf_counter()
            for _ in range(batches):
                b = next(it)
                clips += len(b)
                timed += len(b)
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
            "repeats": repeats, "batches": batches, "warmup_batches": warmup,
            "timed_batches": batches * repeats, "timed_clips": timed,
            **row_counts(loader, counts0), **mon.summary()}


def soak(loader, epochs: int) -> dict:
    """Full epochs through a loader, the process tree's memory (PSS, and summed RSS) after
    each: a leak shows as growth after the first epoch (which includes start-up
    allocations)."""
    me = psutil.Process()
    rss, mem = [], []
    counts0 = loader.counts.copy()
    for _ in range(epochs):
        for _ in loader:
            pass
        rss_b, mem_b = tree_memory(process_tree(me))
        rss.append(rss_b / 2**20)
        mem.append(mem_b / 2**20)
    second = min(1, len(rss) - 1)
    return {"mem_mb_per_epoch": mem, "rss_mb_per_epoch": rss,
            "mem_growth_mb": mem[-1] - mem[second] if mem else 0.0,
            "rss_growth_mb": rss[-1] - rss[second] if rss else 0.0,
            **row_counts(loader, counts0)}


def _row(loader, backend: str, source: str, described: dict, warmup: int, batches: int,
         repeats: int, device, soak_epochs: int, train_clips: int) -> dict:
    """Time one built loader (ours or a peer's): one result row."""
    per_epoch = len(loader)  # before timing: the position is at an epoch start
    row = {"backend": backend, "source": source, "input": described,
           **time_loader(loader, batches, repeats, warmup, device)}
    # what one pass takes: its samples (k per decoded clip with several views per decode)
    epoch_clips = getattr(loader, "num_plans", train_clips)
    row["batches_per_epoch"], row["epoch_clips"] = per_epoch, epoch_clips
    row["epochs_in_window"] = row["timed_clips"] / max(epoch_clips, 1)
    row["epoch_boundaries_in_window"] = window(warmup, batches * repeats, per_epoch)
    if soak_epochs:
        row["soak"] = soak(loader, soak_epochs)
    return row


def loader_jobs(backends: list[str], sources: list[str], peers, loader_cfg: LoaderConfig,
                cuda: bool, views: list[int] = (1,)
                ) -> list[tuple[str, str, Peer | None, int | None, int]]:
    """What to time, in order: (name, source, peer, pipelines, views per decode). Each
    backend on each source at each views-per-decode count, then the peers on theirs (one
    view). On a GPU with `loader.dali_pipelines` auto, dali-gpu on video or cache runs twice:
    auto (one pipeline per NVDEC engine) and beside it one pipeline (`pipelines` 1, i.e.
    loader.dali_pipelines=1), so the premise of one pipeline per engine is measured, not
    assumed."""
    jobs: list[tuple[str, str, Peer | None, int | None, int]] = []
    for s in sources:
        for b in backends:
            for k in views:
                jobs.append((b, s, None, None, k))
                if (cuda and b == "dali-gpu" and s in ("video", "cache")
                        and loader_cfg.dali_pipelines == 0):
                    jobs.append((b, s, None, 1, k))
    return jobs + [(p.name, s, p, None, 1) for p in peers for s in peer_sources(p, sources)]


def bench_loader(manifest: Manifest, data: DataConfig, loader_cfg: LoaderConfig,
                 backends: list[str], sources: list[str], *, batches: int = 10,
                 repeats: int = 3, warmup: int | None = None, batch_size: int = 8,
                 split: str = "train", device: torch.device | None = None, progress=None,
                 soak_epochs: int = 0, dataset: dict | None = None,
                 peers: list[Peer] = (), views: list[int] = (1,)) -> dict:
    """`warmup`: the least number of warm-up batches (None: automatic, see auto_warmup;
    the larger of the two is used). `dataset`: what the data set is (kind, spec), recorded.
    `peers`: other tools doing the same work (bench.peers), timed the same way after ours;
    their rows have `"peer": true`, every row a `vs_seed` ratio. `views`: views per decode to
    time each of our backends at (peers: 1)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results, unavailable, warnings, inputs = [], [], [], {}
    train_clips = len(manifest.ok(split))
    timing = dict(batches=batches, repeats=repeats, device=device, soak_epochs=soak_epochs,
                  train_clips=train_clips)
    jobs = loader_jobs(backends, sources, peers, loader_cfg, torch.cuda.is_available(), views)
    task = progress.add_task("bench loader", total=len(jobs)) if progress else None
    for name, source, peer, pipes, k in jobs:
        why = ((peer_problem(peer) or ("" if peer.name == "seed" else
                                       source_problem(manifest, source))) if peer
               else (source_problem(manifest, source)
                     or backend_problem(name, manifest, split, source)))
        if not why and batch_size % k:
            why = f"{k} views per decode do not divide the batch ({batch_size})"
        auto = next((r for r in results if r["backend"] == name and r["source"] == source
                     and r.get("dali_pipelines_setting") == "auto"
                     and r["views_per_decode"] == k), None)
        if not why and pipes and auto and auto["dali_pipelines"] == pipes:
            why = f"auto runs {pipes} pipeline here already (the row above)"
        if why:
            unavailable.append({"backend": name, "source": source, "reason": why,
                                "peer": bool(peer), "views_per_decode": k,
                                **({"dali_pipelines": pipes} if pipes else {})})
        else:
            spec = LoaderSpec(manifest, split, True, batch_size, seed=0, device=device,
                              source=source, views_per_decode=k)
            cfg = loader_cfg.model_copy(update={"dali_pipelines": pipes}) if pipes \
                else loader_cfg
            loader = (peer.build(spec, data, cfg) if peer
                      else build_loader(spec, data, cfg, name))
            wu = max(auto_warmup("torch" if peer else name, loader_cfg), warmup or 0)
            if peer and peer.name == "seed":  # its own folders, maybe not the manifest's
                described = describe_input(manifest, split, source, loader.paths)
                inputs.setdefault(source, described)
            else:
                described = inputs.setdefault(source, describe_input(manifest, split, source))
            row = _row(loader, name, source, described, wu, **timing)
            row["peer"] = bool(peer)
            row["views_per_decode"] = k  # samples per decoded clip
            row["decoded_clips_per_s"] = row["clips_per_s"] / k
            if hasattr(loader, "n_pipes"):  # a DALI loader: its pipelines, and who said so
                row["dali_pipelines"] = loader.n_pipes
                row["dali_pipelines_setting"] = cfg.dali_pipelines or "auto"
            if peer:
                row["gaps"] = list(peer.gaps)
            # its workers end here, not while the next loader's are measured (or forked:
            # a forked child that collects an inherited DataLoader iterator raises "can only
            # test a child process"): a loader can sit in a reference cycle (the torch
            # loader's sampler refers back to it) that only the collector frees
            del loader
            gc.collect()
            results.append(row)
        if progress:
            progress.advance(task)
    crossing = [f"{r['backend']}/{r['source']} {r['epoch_boundaries_in_window']}"
                for r in results if r["epoch_boundaries_in_window"]]
    if crossing:
        warnings.append(
            f"timed windows cross epoch boundaries ({', '.join(crossing)}; "
            f"{results[0]['epochs_in_window']:.1f} epochs of {results[0]['epoch_clips']} "
            f"{split} clips): "
            "each boundary restarts the loader's prefetch inside the timing"
            + ("; by design for the MELD-shaped set (see README)"
               if (dataset or {}).get("kind") == "meld-shaped" else ""))
    warnings += redone_warnings(results)
    warnings += redone_warnings([r["soak"] | {"backend": r["backend"], "source": r["source"]}
                                 for r in results if "soak" in r], " (soak)")
    seed = next((r for r in results if r["peer"] and r["backend"] == "seed"), None)
    for row in results:  # ratios against the torch baseline of the same source, the seed
        k = row["views_per_decode"]
        base = next((r for r in results if r["backend"] == "torch" and r["views_per_decode"]
                     == k and r["source"] == row["source"]), None)
        row["vs_torch"] = row["clips_per_s"] / base["clips_per_s"] if base else None
        row["vs_seed"] = row["clips_per_s"] / seed["clips_per_s"] if seed and k == 1 else None
        one = next((r for r in results if r["views_per_decode"] == 1 and
                    (r["backend"], r["source"], r.get("dali_pipelines"), r["peer"]) ==
                    (row["backend"], row["source"], row.get("dali_pipelines"), False)), None)
        row["vs_one_view"] = (row["clips_per_s"] / one["clips_per_s"]
                              if one and k > 1 else None)
    return {"env": environment(),
            "dataset": dataset or {"kind": "user", "root": str(manifest.base)},
            "settings": {"batch_size": batch_size, "workers": loader_cfg.num_workers,
                         "prefetch": loader_cfg.prefetch,
                         "num_frames": data.num_frames, "crop_size": data.crop_size,
                         "short_side": data.short_side, "split": split, "clips": train_clips,
                         "warmup_min": warmup, "batches": batches, "repeats": repeats,
                         "timed_batches": batches * repeats,
                         "timed_clips": batches * repeats * batch_size,
                         "manifest": str(manifest.path),
                         "peers": [p.name for p in peers], "views_per_decode": list(views)},
            "inputs": inputs, "results": results, "unavailable": unavailable,
            "warnings": warnings}


def render_table(report: dict):
    s, env = report["settings"], report["env"]
    kind = report.get("dataset", {}).get("kind", "user")
    soaked = any("soak" in r for r in report["results"])
    t = compact_table(f"loader throughput, {kind} data ({env['cores']} cores, GPU: "
                      f"{env['gpu']}; train graph, batch {s['batch_size']}, {s['workers']} "
                      f"workers/threads, T={s['num_frames']}, {s['crop_size']} px; PSS: peak "
                      "memory of the process tree, GPU: peak device memory NVML "
                      "lists for the process (in (): torch's allocations alone), both MB"
                      f"{'; PSS+: growth over the soak' if soaked else ''})",
                      with_unavailable(caption(report), report))
    peers = bool(s.get("peers"))
    views = len(s.get("views_per_decode", [1])) > 1
    for col in ("backend", "source", "samples/s" if views else "clips/s", "min-max",
                *(("decoded/s", "vs 1 view") if views else ()), "frames/s", "vs torch",
                *(("vs seed",) if peers else ()), "CPU", "PSS", "GPU",
                *(("PSS+",) if soaked else ())):
        t.add_column(col, justify="left" if col in ("backend", "source") else "right")
    for group in (False, True):  # ours, then the peers below a line
        rows = [r for r in report["results"] if r.get("peer", False) == group]
        gone = [u for u in report["unavailable"] if u.get("peer", False) == group]
        if group and (rows or gone) and t.rows:
            t.add_section()
        for r in rows:
            t.add_row(redone_label(row_name(r, report["results"]), r), r["source"],
                      f"{r['clips_per_s']:.1f}",
                      f"{r['clips_per_s_min']:.1f}-{r['clips_per_s_max']:.1f}",
                      *((f"{r['decoded_clips_per_s']:.1f}", _ratio(r["vs_one_view"]))
                        if views else ()),
                      f"{r['frames_per_s']:.0f}", _ratio(r["vs_torch"]),
                      *((_ratio(r["vs_seed"]),) if peers else ()),
                      f"{r['cpu_util']:.0%}", f"{r['peak_mem_mb']:.0f}",
                      gpu_mem_cell(r),
                      *((f"{r['soak']['mem_growth_mb']:+.0f}",) if soaked else ()))
        for u in gone:  # the reasons are in the caption
            t.add_row(u["backend"], u["source"], "n/a", *["-"] * (len(t.columns) - 3))
    return t


def row_name(row: dict, rows: list[dict]) -> str:
    """The backend, with its views per decode where above 1 (`torch x2`) and its pipeline
    count where rows of the same backend and source differ in it (dali-gpu auto beside one
    pipeline)."""
    k = row.get("views_per_decode", 1)
    name = row["backend"] + (f" x{k}" if k > 1 else "")
    n = row.get("dali_pipelines")
    same = {r.get("dali_pipelines") for r in rows
            if r["backend"] == row["backend"] and r["source"] == row["source"]}
    if n is None or len(same) < 2:
        return name
    return f"{name} {n} pipe{'s' if n > 1 else ''}"


def _ratio(x: float | None) -> str:
    return f"{x:.2f}x" if x else "-"


def caption(report: dict) -> str:
    """The inputs each source row was measured on, and the timed window."""
    lines = [f"{src}: {input_label(d)}" for src, d in report.get("inputs", {}).items()]
    rows = report["results"]
    seed = next((r for r in rows if r.get("peer") and r["backend"] == "seed"), None)
    if seed and seed["input"] != report.get("inputs", {}).get("frames"):
        lines.append(f"seed's frames: {input_label(seed['input'])}")
    if report["settings"].get("peers"):
        lines.append("below the line: peers, other tools doing the same work (vs seed: "
                     "clips/s over the seed peer's); what each lacks:")
        gaps = {r["backend"]: r["gaps"] for r in rows if r.get("peer")}
        lines += [f"  {name}: {'; '.join(g)}" for name, g in gaps.items()]
    if rows:
        r = rows[0]
        wu = sorted({x["warmup_batches"] for x in rows})
        lines.append(f"timed: {r['timed_batches']} batches ({r['timed_clips']} clips, "
                     f"{r['epochs_in_window']:.1f} epochs) after "
                     f"{'/'.join(map(str, wu))} warm-up batches")
    return "\n".join(lines)


def plot(report: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    labels = [f"{row_name(r, rows)}\n{r['source']}" for r in rows]
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
