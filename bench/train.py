"""`meld-dali bench train`: the trainer's consumption rate, alone and fed by each loader,
per recipe stage, with FLOPs, achieved TFLOP/s and MFU.

The same Trainer as `meld-dali train` runs `steps` optimizer steps (accumulation 1) after a
warm-up, its `train_step` fed by one generator over the loader's passes (`Feed`): the timed
steps continue the pass the warm-up began, so no loader start-up and no DALI pipeline build
falls inside the timed window (checked: a DALI loader's `builds` may not change there, except
for the rebuild that follows a batch the CPU path redid). Its own timers split wall time into
data wait (blocked on the loader) and step time (forward, backward, optimizer; the GPU is
synced at the window's end as at a pass's end, so the window's wall time is exact). Every
row says who made its timed batches (`backend_batches`, `cpu_redone_batches`: batches the
CPU path redid after DALI failed on them; a row with any is marked). "synthetic" is the model
alone on in-memory batches: the ceiling any loader can reach.
FLOPs, TFLOP/s and MFU: bench/flops.py.
"""

from __future__ import annotations

import copy
import gc
import time
from itertools import islice

import torch
from meld_dali.bench.common import (
    ResourceMonitor,
    compact_table,
    describe_input,
    environment,
    gpu_mem_cell,
    input_label,
    redone_label,
    redone_warnings,
    row_counts,
    with_unavailable,
)
from meld_dali.bench.flops import forward_flops, peak_tflops, train_step_flops, uncompiled
from meld_dali.bench.peers import Peer, peer_problem, peer_source

from meld_dali.config import Config
from meld_dali.data.base import LoaderSpec, SyntheticLoader
from meld_dali.data.select import backend_problem, resolve_source, source_problem
from meld_dali.distributed import Dist
from meld_dali.launch import build_loaders
from meld_dali.manifest import Manifest
from meld_dali.model import build_model
from meld_dali.runtime import Runtime
from meld_dali.trainer import Trainer

DATA_BOUND_SHARE = 0.10  # above this share of step time waiting for data: data-bound

# The recipe's stages (train.unfreeze in the seed config): what trains at each.
STAGE_TRAINABLE: dict[str, set[str]] = {
    "head": set(), "res5": {"res5"}, "res4": {"res4", "res5"}, "res3": {"res3", "res4", "res5"}}

# `--ab`: one row per variant, each changing one setting of the eager fp16 channels-last base.
AB_VARIANTS: tuple[tuple[str, list[str]], ...] = (
    ("eager", ["train.compile=false", "loader.channels_last=true", "train.amp=fp16"]),
    ("compiled", ["train.compile=true", "loader.channels_last=true", "train.amp=fp16"]),
    ("contiguous", ["train.compile=false", "loader.channels_last=false", "train.amp=fp16"]),
    ("bf16", ["train.compile=false", "loader.channels_last=true", "train.amp=bf16"]),
)


def parse_stages(text: str) -> list[str]:
    """'all' or a comma list of head, res5, res4, res3 (in the given order)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(STAGE_TRAINABLE)
    bad = [n for n in names if n not in STAGE_TRAINABLE]
    if bad or not names:
        raise ValueError(f"unknown stage(s) {bad or text!r}: use all or any of "
                         f"{', '.join(STAGE_TRAINABLE)}")
    return names


def dynamo_graphs() -> int:
    """Graphs dynamo has compiled in this process (torch._dynamo's counters)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover
        return 0
    return int(counters["stats"]["unique_graphs"])


class Feed:
    """One generator over a loader's passes, one after another, for every stage of a
    loader's rows: warm-up and timed steps come from the same pass, and a stage continues
    where the last one left. A DALI loader builds its pipelines at its first pass and resets
    them at each pass's end; only a pass left unfinished (a loop over the loader broken off,
    as `train_one_epoch(max_steps=...)` does) makes its next pass build them again. `passes`:
    the passes begun so far (a new one begins when the batch after a pass's last is taken)."""

    def __init__(self, loader):
        self.loader, self.passes = loader, 0
        self._gen = self._batches()

    def _batches(self):
        while True:
            self.passes += 1
            empty = True
            for batch in self.loader:
                empty = False
                yield batch
            if empty:
                raise RuntimeError(f"{getattr(self.loader, 'backend', 'loader')}: a pass "
                                   "delivered no batch")

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()


def run_steps(trainer: Trainer, feed: Feed, n: int) -> None:
    """`n` optimizer steps of one micro-batch each from `feed`, as the trainer's
    train_one_epoch runs them (accumulation 1), then its end-of-pass GPU sync (step time)."""
    trainer.net.train()
    for done in range(n):
        trainer.train_step(islice(feed, 1), 1, done)
    trainer.stats.step_time += trainer._drain()


def check_builds(loader, builds0: int | None, redone: int, stage: str) -> int | None:
    """The DALI pipeline builds inside a timed window (None for a loader without them).
    Raises when there were any beyond the one rebuild that follows each batch the CPU path
    redid: the window would time pipeline construction, not training steps."""
    if builds0 is None:
        return None
    built = loader.builds - builds0
    if built > redone:
        raise RuntimeError(
            f"bench train: {loader.backend} built its DALI pipelines {built} time(s) inside "
            f"the timed window of stage {stage} ({redone} after a CPU-redone batch): the "
            "window must continue the warm-up's pass, never start a loader pass anew")
    return built


def measure(cfg: Config, loader, runtime: Runtime, steps: int, warmup: int,
            stage: str = "res3", flops: dict | None = None, feed: Feed | None = None) -> dict:
    """The training assembly of `meld-dali train` (model, compile/DDP wrapper, Trainer) at
    one recipe stage: `warmup` optimizer steps (compilation included), then `steps` timed
    ones, all from `feed` (one is made, and closed, when not given). `flops` keeps the FLOP
    counts between calls: they depend on the shapes and the stage only, never on the
    backend or the pixels."""
    flops = {} if flops is None else flops
    own = feed is None
    feed = feed or Feed(loader)
    device = runtime.device
    gc.collect()  # the last stage's model and optimizer are gone before this one's are made
    if device.type == "cuda":
        torch.cuda.empty_cache()  # ... and so is their memory (NVML sees the cached blocks)
    torch.manual_seed(0)
    base = build_model(cfg.model)
    need = "forward" not in flops or stage not in flops
    probe = copy.deepcopy(base) if need else None  # uncompiled, on the host until counted
    model = runtime.place(base)
    model.set_trainable(STAGE_TRAINABLE[stage])
    trainer = Trainer(cfg, model, loader, loader, [1] * 7, runtime)
    B, T, S = cfg.train.batch_size, cfg.data.num_frames, cfg.data.crop_size
    graphs0 = dynamo_graphs()
    t0 = time.perf_counter()
    try:
        run_steps(trainer, feed, warmup)  # warm-up (and compilation)
        warm_wall = time.perf_counter() - t0
        w = trainer.take_stats()
        graphs_warm = dynamo_graphs()
        epoch_batches = len(loader)
        builds0 = getattr(loader, "builds", None)
        counts0, passes0 = loader.counts.copy(), feed.passes
        with ResourceMonitor() as mon:
            run_steps(trainer, feed, steps)  # the same pass: no loader start-up timed
        s = trainer.take_stats()
        counts = row_counts(loader, counts0)
        built = check_builds(loader, builds0, counts["cpu_redone_batches"], stage)
        boundaries = feed.passes - passes0
    finally:
        if own:
            feed.close()
    graphs_end = dynamo_graphs()
    wall = s.data_wait + s.step_time
    share = s.data_wait / max(wall, 1e-9)
    clips_per_s = s.clips / max(wall, 1e-9)
    if probe is not None:  # after the timing, on the uncompiled copy at this stage
        criterion = trainer.criterion  # the trainer's loss (plain: never compiled)
        del trainer, model
        probe = uncompiled(runtime.place(probe))
        probe.set_trainable(STAGE_TRAINABLE[stage])
        if "forward" not in flops:
            flops["forward"] = forward_flops(probe, T, S, device)
        if stage not in flops:  # a clip's training FLOPs at this stage
            shaped = next(iter(SyntheticLoader.random(
                B, T, S, B, device=device, dtype=runtime.video_dtype,
                channels_last=runtime.channels_last)))
            flops[stage] = train_step_flops(probe, runtime, criterion, shaped) / B
        del probe
    train_flops = flops[stage]
    achieved = clips_per_s * train_flops / 1e12
    peak = peak_tflops(device)
    compiled = runtime.compile
    # compilation time: the warm-up's wall time minus what its steps cost at the timed rate
    steady = w.clips / max(clips_per_s, 1e-9)
    return {"stage": stage, "trainable": sorted(STAGE_TRAINABLE[stage]),
            "clips_per_s": clips_per_s, "clips": s.clips,
            "data_wait_share": share, "step_time_s": s.step_time, "data_wait_s": s.data_wait,
            "verdict": "data-bound" if share > DATA_BOUND_SHARE else "compute-bound",
            "warmup_steps": warmup, "timed_steps": steps, "epoch_batches": epoch_batches,
            # the timed steps continue the warm-up's pass; a pass that ends inside the
            # window starts the next one there (a DALI loader resets, never rebuilds)
            "epochs_in_window": s.clips / max(epoch_batches * B, 1),
            "epoch_boundaries_in_window": boundaries,
            **counts, "builds_in_window": built,
            "fwd_gflops_per_clip": flops["forward"] / 1e9,
            "train_gflops_per_clip": train_flops / 1e9,
            "achieved_tflops": achieved, "peak_tflops": peak,
            "mfu": achieved / peak if peak else None,
            "compiled": compiled,
            "compile_s": max(warm_wall - steady, 0.0) if compiled else None,
            "graphs_compiled": graphs_warm - graphs0 if compiled else None,
            "recompiles": graphs_end - graphs_warm if compiled else None,
            **mon.summary()}


def bench_train(cfg: Config, manifest: Manifest | None, backends: list[str], *, steps: int,
                warmup: int, source: str = "auto", progress=None,
                dataset: dict | None = None, stages: list[str] | None = None,
                variant: str | None = None, peers: list[Peer] = ()) -> dict:
    """One row per (backend, stage); `stages` defaults to res3 (the costliest). `peers`:
    other tools' loaders (bench.peers) feed the same trainer too, rows `"peer": true`."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = copy.deepcopy(cfg)  # this bench's own settings: one optimizer step per batch
    cfg.train.accum_steps = 1
    cfg.tracking.wandb = False
    cfg.data.source = source
    stages = stages or ["res3"]
    runtime = Runtime.resolve(cfg, device)
    runtime.apply()
    B, T, S = cfg.train.batch_size, cfg.data.num_frames, cfg.data.crop_size
    dtype, cl = runtime.video_dtype, runtime.channels_last
    resolved = resolve_source(manifest, "auto") if manifest and source == "auto" else source
    results, unavailable = [], []
    described = None
    flops: dict = {}
    jobs = [(b, None) for b in backends] + [(p.name, p) for p in peers]
    task = (progress.add_task("bench train", total=len(jobs) * len(stages))
            if progress else None)
    for backend, peer in jobs:  # one loader per backend, reused by every stage
        why, row = "", {"backend": backend, "peer": bool(peer)}
        if backend == "synthetic":
            n = B * (steps + warmup + 1)
            loader = SyntheticLoader.random(n, T, S, B, device=device, dtype=dtype,
                                            channels_last=cl)
        elif manifest is None:
            why = "no dataset"
        elif peer:
            row["source"] = peer_source(peer, manifest, resolved)
            why = peer_problem(peer)
            if not why:
                spec = LoaderSpec(manifest, cfg.data.train_split, True, B, cfg.train.seed,
                                  device, dtype, cl, source=row["source"])
                loader = peer.build(spec, cfg.data, cfg.loader)
                row["input"] = describe_input(manifest, cfg.data.train_split, row["source"],
                                              loader.paths)
        else:
            why = (source_problem(manifest, resolved)
                   or backend_problem(backend, manifest, cfg.data.train_split, resolved))
            if not why:
                _, loader, _ = build_loaders(cfg, manifest, runtime, Dist(), backend=backend)
        if not why and len(loader) == 0:
            why = "no training batch: the split has no clip this loader can read"
        if why:
            unavailable.append({**row, "reason": why})
            if progress:
                progress.advance(task, len(stages))
            continue
        if variant:
            row["variant"] = variant
        if backend != "synthetic" and not peer:
            described = described or describe_input(manifest, cfg.data.train_split, resolved)
            row["input"] = described
        feed = Feed(loader)  # one generator for every stage: no pass is left unfinished
        try:
            for stage in stages:
                results.append({**row, **measure(cfg, loader, runtime, steps, warmup, stage,
                                                 flops, feed)})
                if progress:
                    progress.advance(task)
        finally:
            feed.close()
        del loader, feed
        gc.collect()  # its workers end before the next loader's start (see bench.loader)
    amp = cfg.train.amp if runtime.amp else "off"  # the runtime decides whether AMP runs
    if dataset is None and manifest is not None:
        dataset = {"kind": "user", "root": str(manifest.base)}
    return {"env": environment(), "dataset": dataset, "input": described,
            "settings": {"batch_size": B, "num_frames": T, "crop_size": S, "amp": amp,
                         "channels_last": cl, "compile": runtime.compile,
                         "compile_backend": cfg.train.compile_backend,
                         "cudnn_benchmark": runtime.cudnn_benchmark,
                         "steps": steps, "warmup": warmup, "workers": cfg.loader.num_workers,
                         "source": resolved, "stages": stages,
                         "data_bound_share": DATA_BOUND_SHARE, "flops": "2 per MAC"},
            "results": results, "unavailable": unavailable}


def bench_train_ab(cfg: Config, manifest: Manifest | None, backends: list[str], *,
                   quick: bool = False, **kw) -> dict:
    """`--ab`: eager vs compiled, channels_last vs contiguous, fp16 vs bf16, one bench per
    variant (AB_VARIANTS; `quick` skips the compiled one), merged: each row carries its
    `variant` and `settings`."""
    from meld_dali.config import apply_overrides

    merged: dict | None = None
    for name, overrides in AB_VARIANTS:
        if quick and name == "compiled":
            continue
        report = bench_train(apply_overrides(cfg, overrides), manifest, backends,
                             variant=name, **kw)
        for r in report["results"]:
            r["settings"] = {k: report["settings"][k]
                             for k in ("amp", "channels_last", "compile")}
        if merged is None:
            merged = report
            merged["settings"]["variants"] = [n for n, _ in AB_VARIANTS
                                              if not (quick and n == "compiled")]
        else:
            merged["results"] += report["results"]
    return merged


def render_table(report: dict):
    s = report["settings"]
    kind = (report.get("dataset") or {}).get("kind")
    ab = "variants" in s
    t = compact_table(f"trainer throughput{f', {kind} data' if kind else ''} (batch "
                      f"{s['batch_size']}, T={s['num_frames']}, {s['crop_size']} px"
                      + ("" if ab else f", amp {s['amp']}, channels_last {s['channels_last']}"
                                       f", compile {s['compile']}")
                      + f", GPU: {report['env']['gpu']}; TFLOP/s: training FLOPs (2 per MAC) "
                      "per second, MFU: of the dense fp16/bf16 peak; PSS: peak memory of the "
                      "process tree, GPU: peak device memory NVML "
                      "lists for the process (in (): torch's allocations alone), both MB)",
                      with_unavailable(_caption(report), report))
    cols = ["loader", *(["variant"] if ab else []), "stage", "clips/s", "TFLOP/s", "MFU",
            "data wait", "verdict", "PSS", "GPU"]
    for col in cols:
        t.add_column(col, justify="left" if col in ("loader", "variant", "stage", "verdict")
                     else "right")
    line = False
    for r in report["results"]:
        if r.get("peer") and not line and t.rows:
            t.add_section()  # the peers below a line
        line = line or bool(r.get("peer"))
        t.add_row(redone_label(r["backend"], r), *([r.get("variant", "")] if ab else []),
                  r["stage"],
                  f"{r['clips_per_s']:.2f}", f"{r['achieved_tflops']:.2f}",
                  f"{r['mfu']:.0%}" if r.get("mfu") is not None else "-",
                  f"{r['data_wait_share']:.0%}", r["verdict"], f"{r['peak_mem_mb']:.0f}",
                  gpu_mem_cell(r))
    for u in report["unavailable"]:
        t.add_row(u["backend"], *([""] if ab else []), "-", "-", "-", "-", "-", "n/a", "-",
                  "-")  # the reasons are in the caption
    return t


def _caption(report: dict) -> str | None:
    """What our loaders read, and what each peer read."""
    d, src = report.get("input"), report["settings"]["source"]
    lines = [f"{src}: {input_label(d)}"] if d else []
    peers = {r["backend"]: r for r in report["results"] if r.get("peer")}
    lines += [f"peer {name} ({r['source']}): {input_label(r['input'])}"
              for name, r in peers.items()]
    lines += [f"warning: {w}" for w in redone_warnings(report["results"])]
    return "\n".join(lines) or None

