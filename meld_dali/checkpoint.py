"""Atomic checkpoints (temp file + fsync + rename) and finding the one to resume from.

`last.pt` is replaced atomically; the one it replaces is kept as `last.prev.pt`, so a
checkpoint spoilt after the fact (disk trouble, a manual copy gone wrong) still leaves a
complete one to resume from. A kill during a write leaves only a `*.tmp` behind; a full disk
leaves nothing behind but a one-line error.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from meld_dali.config import EMOTIONS
from meld_dali.errors import UserError
from meld_dali.fileio import atomic_write, link_or_copy

FORMAT = "meld-dali-checkpoint"
VERSION = 2  # v2: the state tree (one entry per part); v1 (one flat dict) is not read


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


class Part:
    """A Stateful from two functions: for a part whose restore needs more than its own
    state_dict (the schedule on a changed run length, an empty scaler state)."""

    def __init__(self, save: Callable[[], Any], load: Callable[[Any], Any]):
        self.state_dict, self.load_state_dict = save, load


class RankStates:
    """Every rank's loader position and RNG states, in rank order (a collective under DDP:
    every rank builds the list; rank 0 writes it). On another number of processes the shards
    differ: refused mid-epoch; at an epoch boundary the epoch restarts, sharded anew."""

    def __init__(self, loader, dist, say: Callable[[str], None]):
        self.loader, self.dist, self.say = loader, dist, say

    def state_dict(self) -> list[dict]:
        return self.dist.gather({"loader": self.loader.state_dict(), "rng": rng_state()})

    def load_state_dict(self, ranks: list[dict]) -> None:
        world, here = len(ranks), self.dist.world
        if world == here:
            mine = ranks[self.dist.rank]
        else:
            pos = ranks[0]["loader"]
            if pos["consumed"]:
                raise UserError(f"checkpoint was written by {world} processes, this run has "
                                f"{here}: it stopped mid-epoch (epoch {pos['epoch']}), so "
                                f"resume with --nproc_per_node={world}, or from a checkpoint "
                                "at an epoch boundary")
            self.say(f"warning: checkpoint was written by {world} processes, this run has "
                     f"{here}: epoch {pos['epoch']} starts from its beginning, sharded for "
                     "this run (same clips, another split over ranks)")
            mine = ranks[0]
        self.loader.load_state_dict(mine["loader"])
        set_rng_state(mine["rng"])


def snapshot(states: dict[str, Stateful], cfg) -> dict:
    """The checkpoint tree: each part's own state_dict under its name, plus the config and
    the class names. A collective under DDP (RankStates): every rank calls it."""
    return {"format": FORMAT, "version": VERSION, "emotions": list(EMOTIONS),
            "config": cfg.to_dict(), **{name: part.state_dict() for name, part in states.items()}}


def restore(states: dict[str, Stateful], ckpt: dict) -> None:
    """Each part from its entry, in the order of `states`."""
    for name, part in states.items():
        part.load_state_dict(ckpt[name])


class _WriteErrors:
    """A file proxy that remembers the OSError a write raised: torch.save reports a failed
    write as a RuntimeError of its zip writer, which would hide a full disk."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_save(obj: Any, path: str | Path, keep_previous: bool = False) -> None:
    """torch.save through atomic_write: a full disk is a one-line DiskFullError, the temp
    file removed and the previous file intact."""
    with atomic_write(path, "wb", keep_previous) as f:
        w = _WriteErrors(f)
        try:
            torch.save(obj, w)
        except RuntimeError:
            if w.error is not None:
                raise w.error from None  # atomic_write turns ENOSPC/EFBIG into one line
            raise


class CheckpointSaver:
    """The run's checkpoint file policy (timm's CheckpointSaver is the model): `last.pt`
    (the one it replaces kept as `last.prev.pt`), `best.pt`, and optionally the newest
    `keep_last` step-numbered copies; every write atomic. `best.pt` and the step copies
    are hard links to the `last.pt` just written (no second ~400 MB write): to slim one,
    write a new file, never `torch.save` over it in place. `on_best` runs after a new
    best.pt is on disk (e.g. the Hub push). Only the main rank writes (enabled)."""

    def __init__(self, directory: str | Path, keep_last: int = 0, on_best=None,
                 enabled: bool = True):
        self.dir, self.keep_last = Path(directory), keep_last
        self.on_best, self.enabled = on_best, enabled

    @property
    def last(self) -> Path:
        return self.dir / "last.pt"

    def save_last(self, states: dict[str, Stateful], cfg) -> None:
        """Write the parts' state as last.pt. Every rank calls it (building the tree is a
        collective under DDP); only the enabled (main) rank writes."""
        ckpt = snapshot(states, cfg)
        if not self.enabled:
            return
        atomic_save(ckpt, self.last, keep_previous=True)
        if self.keep_last:
            link_or_copy(self.last, self.dir / f"step{ckpt['train']['step']:08d}.pt")
            for old in sorted(self.dir.glob("step*.pt"))[: -self.keep_last]:
                old.unlink()

    def save_best(self) -> None:
        """The last.pt just written becomes best.pt."""
        if not self.enabled:
            return
        link_or_copy(self.last, self.dir / "best.pt")
        if self.on_best:
            self.on_best()


def load_data(path: str | Path) -> Any:
    """torch.load as data only (weights_only=True): tensors, numbers, strings and containers.
    A crafted file cannot run code; it fails to load instead."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(path: str | Path) -> dict:
    """Load and validate a checkpoint (as data, never code); a truncated, foreign or crafted
    file is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = load_data(path)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a broken file
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'truncated?'})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path}: not a meld-dali checkpoint")
    if ckpt.get("version") != VERSION:
        raise UserError(f"{path}: checkpoint format v{ckpt.get('version')}, this meld-dali "
                        f"reads v{VERSION} only (written before the state tree of v2; "
                        "train a new run, or evaluate it with the meld-dali that wrote it)")
    return ckpt


def resume_candidates(run_dir: str | Path) -> list[Path]:
    ck = Path(run_dir) / "checkpoints"
    return [p for p in (ck / "last.pt", ck / "last.prev.pt") if p.exists()]


def find_resume(run_dir: str | Path, log=None) -> tuple[Path, dict] | None:
    """The newest complete checkpoint of a run folder (None for a fresh run)."""
    for p in resume_candidates(run_dir):
        try:
            return p, load_checkpoint(p)
        except UserError as e:
            if log:
                log(f"skipping unusable checkpoint: {e}")
    return None


def rng_state() -> dict:
    """Every RNG's state as plain values and tensors (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # resumed with fewer GPUs visible (another CUDA_VISIBLE_DEVICES): the ones there are
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


# Config keys that may change between a checkpoint and the run resuming it.
RESUMABLE_CHANGES = ("train.epochs", "train.device", "train.checkpoint_every_steps",
                     "train.compile", "train.compile_backend", "train.cudnn_benchmark",
                     "train.keep_last", "train.max_steps_per_epoch", "loader.", "tracking.",
                     "hub.", "data.root", "model.pretrained", "model.cache_dir")


def config_mismatch(saved: dict, current: dict) -> list[str]:
    """Keys whose values differ in a way that makes resuming meaningless."""
    out = []
    for section, values in current.items():
        for key, value in values.items():
            name = f"{section}.{key}"
            if any(name == k or (k.endswith(".") and name.startswith(k))
                   for k in RESUMABLE_CHANGES):
                continue
            old = saved.get(section, {}).get(key, value)
            if old != value and not (isinstance(value, dict) and
                                     {str(k): v for k, v in old.items()} ==
                                     {str(k): v for k, v in value.items()}):
                out.append(f"{name} ({old!r} -> {value!r})")
    return out
