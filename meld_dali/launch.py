"""Assembling a training run from a resolved Config: data, loaders, model, trainer, state.

The CLI parses arguments and calls `run_training`; tests call it directly; `bench train`
builds its model and loaders with the same functions.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from meld_dali import checkpoint as ckpt_io
from meld_dali import hub
from meld_dali.config import Config, apply_overrides, config_from_saved, dump_config
from meld_dali.data.base import LoaderSpec
from meld_dali.data.select import build_loader, resolve_backend, resolve_source
from meld_dali.distributed import Dist, from_env
from meld_dali.errors import UserError
from meld_dali.fileio import FolderLock, check_writable
from meld_dali.manifest import MANIFEST_NAME, Manifest
from meld_dali.model import build_model
from meld_dali.prepare import prepare, stale_reason
from meld_dali.reporting import METRICS_NAME, EpochReporter
from meld_dali.runtime import Runtime, pick_device
from meld_dali.signals import stop_on_signals
from meld_dali.tracking import build_tracker
from meld_dali.trainer import Trainer
from meld_dali.verify import check_backend

log = logging.getLogger("meld_dali.launch")


def open_manifest(root: str | Path, console=None, workers: int = 2,
                  dist: Dist | None = None) -> Manifest:
    """The manifest of a dataset root (or file); prepares a raw MELD root on first use.
    A manifest whose CSVs or clips changed since `prepare` is refused with the command that
    updates it. Several ranks: rank 0 prepares, the others wait for its manifest."""
    p = Path(root)
    if dist is not None and not dist.main:
        return wait_for_manifest(p)
    if p.is_file() or (p / MANIFEST_NAME).exists():
        m = Manifest.load(p)
        why = stale_reason(m)
        if why:
            raise UserError(f"{m.path} is out of date: {why}; update it with "
                            f"`{m.prepare_command()}`")
        return m
    if not p.exists():
        raise UserError(f"data folder not found: {p}")
    check_writable(p, "the data folder", f"prepare it elsewhere with `meld-dali prepare {p} "
                   "--out DIR`, then pass --data DIR")
    if console:
        console.print(f"[bold]no manifest in {p}: running `meld-dali prepare {p}` first")
    manifest, _ = prepare(p, workers=workers)
    return manifest


def wait_for_manifest(p: Path, poll_s: float = 1.0) -> Manifest:
    """A rank other than 0: rank 0's manifest once it is on disk (written atomically).

    Polling the file, not a barrier: preparing all of MELD can outlast a process group's
    timeout, and if rank 0 fails, torchrun stops this rank. Needs the data root on a file
    system every rank sees (one node, or a shared one)."""
    announced = False
    while not (p.is_file() or (p / MANIFEST_NAME).exists()):
        if not announced:
            log.info("waiting for rank 0 to prepare %s", p)
            announced = True
        time.sleep(poll_s)
    return Manifest.load(p)


def build_loaders(cfg: Config, manifest: Manifest, runtime: Runtime, dist: Dist,
                  backend: str | None = None):
    """(backend, train loader, eval loader) per the config (or the given backend)."""
    source = resolve_source(manifest, cfg.data.source)
    backend = resolve_backend(backend or cfg.loader.backend, manifest, cfg.data.train_split,
                              source)
    backend = check_backend(cfg, manifest, source, backend, runtime.device)  # loader.verify
    common = dict(manifest=manifest, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                  device=runtime.device, dtype=runtime.video_dtype,
                  channels_last=runtime.channels_last, rank=dist.rank, world=dist.world,
                  source=source)
    train = build_loader(LoaderSpec(split=cfg.data.train_split, train=True,
                                    views_per_decode=cfg.loader.views_per_decode, **common),
                         cfg.data, cfg.loader, backend)
    evl = build_loader(LoaderSpec(split=cfg.data.eval_split, train=False, **common),
                       cfg.data, cfg.loader, backend)
    return backend, train, evl


def run_training(cfg: Config, run_dir: str | Path, resume: str | None = None, console=None,
                 dist: Dist | None = None, overrides: list[str] | None = None) -> dict:
    """Train per `cfg` into `run_dir`; `resume` is None, 'auto' or a checkpoint path.
    `overrides`: `cfg` was made from defaults plus these `--set`s, with no config file named;
    a resumed run then takes the checkpoint's own config with the same overrides on top."""
    trainer, backend = build_trainer(cfg, run_dir, resume, console, dist, overrides)
    t0 = time.perf_counter()
    try:
        with stop_on_signals(trainer.request_stop):
            result = trainer.train()
    finally:
        trainer.reporter.finish()
        if trainer.saver and isinstance(trainer.saver.on_best, hub.BackgroundPush):
            trainer.saver.on_best.join()  # a best-model push still uploading finishes first
        if trainer.run_lock:
            trainer.run_lock.release()
    result.update(seconds=time.perf_counter() - t0, run_dir=str(run_dir), backend=backend,
                  history=list(trainer.history))
    if trainer.dist.main and not result["interrupted"] and trainer.cfg.hub.push == "end":
        result["hub_pushed"] = hub.push(trainer.cfg.hub, Path(run_dir))
    return result


def holds_run(run_dir: Path) -> bool:
    """A folder holds a run once it has any checkpoint or any metrics."""
    ck = run_dir / "checkpoints"
    return (run_dir / METRICS_NAME).exists() or (ck.is_dir() and any(ck.glob("*.pt")))


def load_resume_state(run_dir: Path, resume: str | None, console=None) -> dict | None:
    """The checkpoint to continue from (None for a fresh run). Nothing the folder holds is
    ever started over: a fresh run into a folder that holds one, or `--resume auto` where
    no checkpoint of it can be read, is a one-line error and nothing is written."""
    say = console.print if console else log.warning
    if resume is None:
        if holds_run(run_dir):
            raise UserError(f"{run_dir} already holds a run: pass --resume auto to continue "
                            "it, or choose another --out")
        return None
    if resume != "auto":
        path = Path(resume)
        if holds_run(run_dir) and run_dir.resolve() not in path.resolve().parents:
            raise UserError(f"{run_dir} already holds another run: resume {path} into a new "
                            "--out, or resume that run with --resume auto")
        return ckpt_io.load_checkpoint(path)
    skipped: list[str] = []
    found = ckpt_io.find_resume(run_dir, log=skipped.append)
    for why in skipped:
        say(f"skipping unusable checkpoint: {why}")
    if found:
        path, state = found
        t = state["train"]
        say(f"resuming from {path} (epoch {t['epoch']}, step {t['step']})")
        return state
    if holds_run(run_dir):
        raise UserError(f"{run_dir} holds a run but no checkpoint of it can be read "
                        f"({'; '.join(skipped) or 'no last.pt or last.prev.pt'}); nothing was "
                        "changed: resume from a checkpoint file with --resume PATH, or start "
                        "a new run with another --out")
    return None


def run_config(cfg: Config, state: dict | None, overrides: list[str] | None) -> Config:
    """The config of the run: `cfg`, or when resuming with no config file named, the
    checkpoint's own with the command line's overrides on top. Either way it must differ
    from the checkpoint's only in keys a resume may change."""
    if state is None:
        return cfg
    saved = config_from_saved(state["config"], "the checkpoint's config")
    if overrides is not None:
        cfg = apply_overrides(saved, overrides)
    diff = ckpt_io.config_mismatch(saved.to_dict(), cfg.to_dict())
    if diff:
        raise UserError(f"checkpoint was trained with another config: {'; '.join(diff)}")
    return cfg


def build_trainer(cfg: Config, run_dir: str | Path, resume: str | None = None, console=None,
                  dist: Dist | None = None, overrides: list[str] | None = None
                  ) -> tuple[Trainer, str]:
    """Everything a run needs, restored from a checkpoint when resuming. The main rank holds
    the run folder's lock (`trainer.run_lock`) from here until the run ends."""
    run_dir = Path(run_dir)
    dist = dist or from_env()
    state = load_resume_state(run_dir, resume, console if dist.main else None)
    cfg = run_config(cfg, state, overrides)
    if not cfg.data.root:
        raise UserError("no data: pass --data DIR (a prepared MELD root) or --demo")
    cfg.data.root = str(Path(cfg.data.root).absolute())  # checkpoints: found from any folder
    return _assemble(cfg, run_dir, state, console, dist)


def _assemble(cfg: Config, run_dir: Path, state: dict | None, console,
              dist: Dist) -> tuple[Trainer, str]:
    """Data, loaders and model first (a mistake there leaves the run folder untouched), then
    the run folder's lock, then everything that writes into it."""
    runtime = Runtime.resolve(cfg, dist.start(pick_device(cfg.train.device)))
    runtime.apply()
    torch.manual_seed(cfg.train.seed)  # same initial weights for the same seed
    manifest = open_manifest(cfg.data.root, console, cfg.loader.num_workers, dist)
    backend, train_loader, eval_loader = build_loaders(cfg, manifest, runtime, dist)
    counts = manifest.class_counts(cfg.data.train_split)
    if sum(counts) == 0:
        raise UserError(f"{manifest.path}: no loadable clips in split "
                        f"'{cfg.data.train_split}'")
    model = runtime.place(build_model(cfg.model))

    lock = FolderLock(run_dir, "run folder").acquire() if dist.main else None
    try:
        if lock and state is None:
            load_resume_state(run_dir, None)  # checked again under the lock: still no run
        trainer = _trainer(cfg, run_dir, state, dist, runtime, manifest, counts, model,
                           train_loader, eval_loader, console)
    except BaseException:
        if lock:
            lock.release()
        raise
    trainer.run_lock = lock
    if console and dist.main:
        console.print(f"run {run_dir}: backend {backend}, device {runtime.device}, "
                      f"{train_loader.num_clips} train / {eval_loader.num_clips} "
                      f"{cfg.data.eval_split} clips, {cfg.train.epochs} epochs")
    return trainer, backend


def _trainer(cfg, run_dir, state, dist, runtime, manifest, counts, model, train_loader,
             eval_loader, console) -> Trainer:
    """The Trainer over the assembled parts, writing into the (locked) run folder."""
    if dist.main:
        dump_config(cfg, run_dir / "config.yaml")
    tracker = build_tracker(cfg.tracking, run_dir, cfg.to_dict(),
                            state["reporter"]["tracker_run_id"] if state else None,
                            enabled=dist.main)
    # rank 0 pushes each new best in a thread: other ranks never wait in a collective on it
    on_best = (hub.BackgroundPush(lambda: hub.push(cfg.hub, run_dir))
               if cfg.hub.push == "best" and dist.main else None)
    trainer = Trainer(
        cfg, model, train_loader, eval_loader, counts, runtime, dist=dist,
        saver=ckpt_io.CheckpointSaver(run_dir / "checkpoints", cfg.train.keep_last, on_best,
                                      enabled=dist.main),
        reporter=EpochReporter(run_dir, tracker, console, enabled=dist.main,
                               progress_every=cfg.tracking.progress_every),
        clip_ids=[c.clip_id for c in manifest.clips])
    if state is not None:
        trainer.restore(state)
    return trainer
