"""What every loader shares: the `Batch` contract, the clip order and one position in it.

Every backend yields `Batch` on the training device, so the trainer never branches on which
backend produced it. A loader's whole resumable state is its `Position` (epoch, plans taken
from this rank's order), kept in one object: the order itself is a pure function of
(seed, epoch, rank, world).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from meld_dali.data.plan import View, multi_views, train_views
from meld_dali.errors import UserError
from meld_dali.manifest import Manifest

log = logging.getLogger("meld_dali.data")


@dataclass
class Batch:
    video: torch.Tensor  # [B, 3, T, H, W] normalized, exactly 0 at padded frames
    mask: torch.Tensor  # bool [B, T], True = real frame
    label: torch.Tensor  # int64 [B]
    index: torch.Tensor  # int64 [B], manifest row

    def __len__(self) -> int:
        return self.label.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None,
           channels_last: bool = False) -> Batch:
        nb = torch.device(device).type == "cuda"
        video = self.video.to(device, dtype=dtype or self.video.dtype, non_blocking=nb)
        if channels_last:
            video = video.contiguous(memory_format=torch.channels_last_3d)
        return Batch(video, self.mask.to(device, non_blocking=nb),
                     self.label.to(device, non_blocking=nb), self.index.to(device, non_blocking=nb))

    def pin_memory(self) -> Batch:
        """The batch in page-locked host memory: what a DataLoader's pin_memory thread calls
        (it pins tensors, containers and objects with this method), so the copy to the GPU
        can run asynchronously (`to(..., non_blocking)`)."""
        return Batch(*(t.pin_memory() for t in (self.video, self.mask, self.label,
                                                 self.index)))


@dataclass
class RawBatch:
    """What the CPU loader's workers make: clips in uint8 (resized, cropped, flipped,
    rotated; padded frames 0) and each clip's colour + normalization affine, applied where
    the batch lands (`normalized`): a quarter of the float batch's bytes through shared
    memory, the pinned buffer and the host-to-device copy, and no float pass on the CPU."""
    video: torch.Tensor  # uint8 [B, 3, T, H, W] (channels-last in memory)
    mask: torch.Tensor  # bool [B, T], True = real frame
    label: torch.Tensor  # int64 [B]
    index: torch.Tensor  # int64 [B], manifest row
    scale: torch.Tensor  # float32 [B, 3]: normalized = video * scale + shift, per channel
    shift: torch.Tensor  # float32 [B, 3]

    def __len__(self) -> int:
        return self.label.shape[0]

    def pin_memory(self) -> RawBatch:
        return RawBatch(*(t.pin_memory() for t in (self.video, self.mask, self.label,
                                                    self.index, self.scale, self.shift)))

    def normalized(self, device: torch.device | str, dtype: torch.dtype = torch.float32,
                   channels_last: bool = False) -> Batch:
        """The `Batch` on `device`: copied there in uint8, then one multiply-add in float32
        written straight in `dtype` and the memory format asked for, its scale and shift 0
        at padded frames, so those come out exactly 0 (0 * x + 0) in the same pass."""
        device = torch.device(device)
        nb = device.type == "cuda"
        video = self.video.to(device, non_blocking=nb)
        mask = self.mask.to(device, non_blocking=nb)
        real = mask[:, None, :, None, None]  # [B, 1, T, 1, 1]
        scale, shift = (torch.where(real, t.to(device, non_blocking=nb)[:, :, None, None, None],
                                    0.0) for t in (self.scale, self.shift))
        fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
        if nb:  # one fused kernel on the GPU
            out = torch.empty(video.shape, dtype=dtype, device=device, memory_format=fmt)
            torch.addcmul(shift, video, scale, out=out)
        else:  # the CPU's mixed-dtype addcmul is slow: convert, then multiply-add in place
            out = video.to(torch.float32, memory_format=fmt)  # (1.75x faster, 2-core box)
            out = torch.addcmul(shift, out, scale, out=out).to(dtype)
        return Batch(out, mask, self.label.to(device, non_blocking=nb),
                     self.index.to(device, non_blocking=nb))


def zero_padding(video: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`video` [B, C, T, H, W] with the frames `mask` [B, T] marks padded set to exactly 0,
    whatever they held (torch.where keeps channels_last_3d and clears NaN too)."""
    return torch.where(mask[:, None, :, None, None], video, 0.0)


@dataclass
class ClipFailure:
    index: int
    path: str
    error: str


@dataclass
class LoaderCounts:
    """Who made the batches a loader delivered: its own backend (DALI's graphs for a DALI
    loader, the workers for the CPU loader) or the CPU path redoing a batch the backend failed
    on. A DALI figure or check is honest only where `cpu_redone_batches` is 0."""
    backend_batches: int = 0
    cpu_redone_batches: int = 0

    def __sub__(self, other: LoaderCounts) -> LoaderCounts:
        return LoaderCounts(self.backend_batches - other.backend_batches,
                            self.cpu_redone_batches - other.cpu_redone_batches)

    def copy(self) -> LoaderCounts:
        return LoaderCounts(self.backend_batches, self.cpu_redone_batches)

    def to_dict(self) -> dict:
        return {"backend_batches": self.backend_batches,
                "cpu_redone_batches": self.cpu_redone_batches}


@dataclass
class LoaderSpec:
    """What every backend needs to know to build a loader (no component config leaks)."""
    manifest: Manifest
    split: str
    train: bool
    batch_size: int
    seed: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    rank: int = 0
    world: int = 1
    source: str = "video"  # resolved data.source: video | frames | cache
    views: tuple[int, int] = (1, 1)  # (temporal, spatial) test views per clip: eval only
    # training samples per decoded clip (`loader.views_per_decode`), each its own random
    # draw; a batch of batch_size samples holds batch_size / views_per_decode clips
    views_per_decode: int = 1


@dataclass
class ClipOrder:
    """Deterministic, sharded order of manifest rows for one epoch (a pure function).

    train: a permutation seeded by (seed, epoch), the same on every rank, each rank takes
    every world-th clip and all ranks take the same count (the tail is dropped so DDP stays
    in step); a lone last clip (a batch of 1 breaks BatchNorm) is dropped too.
    eval: manifest order, every clip exactly once over all ranks (shards may differ by one).

    train with `views` samples per decoded clip (`loader.views_per_decode` = k): an epoch
    keeps its number of samples, so its optimizer steps and the schedule are the recipe's,
    and decodes 1/k of the clips: a permutation seeded by (seed, epoch // k) is cut into k
    parts, epoch e takes part e % k, so every k epochs each clip is decoded once (k
    samples). k = 1 is the permutation above.
    """
    rows: list[int]
    train: bool
    seed: int
    batch_size: int
    rank: int = 0
    world: int = 1
    views: int = 1

    def order(self, epoch: int) -> list[int]:
        rows = np.array(self.rows, dtype=np.int64)
        if self.train:
            k = self.views
            rows = rows[np.random.default_rng([self.seed, epoch // k, 7]).permutation(len(rows))]
            if k > 1:
                rows = np.array_split(rows, k)[epoch % k]
            n = len(rows) // self.world
            mine = rows[self.rank::self.world][:n]
            if len(mine) * k % self.batch_size == 1 and len(mine) > 1:
                mine = mine[:-1]
            return mine.tolist()
        return rows[self.rank::self.world].tolist()


@dataclass
class Position:
    """Where a loader stands: the epoch, how many plans of its order it has taken
    (delivered or skipped as failures; one plan per clip, except in multi-view testing) and
    how many batches it has delivered in the epoch. All a resume needs: the trainer's place
    in the epoch is `delivered` (skipped clips never shift its accumulation groups), the
    order's is `consumed`."""
    epoch: int = 0
    consumed: int = 0
    delivered: int = 0


class ClipLoader:
    """The base of every loader: the position, the failure report, epochs.

    A subclass gives `rows(epoch)` (its order) and `_batches()`, which yields the Batches
    of the rest of the current epoch and advances `position.consumed` by every plan it takes
    from the order; a completed pass moves the position to the next epoch's start."""

    backend = "?"
    views_per_clip = 1  # plans per clip: several only in multi-view testing

    def __init__(self, batch_size: int, seed: int = 0):
        self.batch_size, self.seed = batch_size, seed
        self.position = Position()
        # where a save puts the loader while its consumer holds a batch it took ahead and
        # has not used yet (DDP's `batches` runs one batch ahead): before that batch
        self.held: Position | None = None
        self.failures: list[ClipFailure] = []
        # since the loader was made (not saved: a resumed run counts its own batches);
        # per epoch: the difference of two copies
        self.counts = LoaderCounts()

    def rows(self, epoch: int) -> list[int]:
        raise NotImplementedError

    def _batches(self) -> Iterator[Batch]:
        raise NotImplementedError

    @property
    def num_clips(self) -> int:
        return len(self.rows(self.position.epoch))

    @property
    def num_plans(self) -> int:
        return self.num_clips * self.views_per_clip

    def __len__(self) -> int:
        return -(-self.num_plans // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.position.epoch:
            self.position = Position(epoch, 0)

    def __iter__(self) -> Iterator[Batch]:
        for batch in self._batches():
            self.position.delivered += 1
            yield batch
        # the pass is complete: the next epoch starts from its beginning
        self.position = Position(self.position.epoch + 1)

    def report(self, f: ClipFailure) -> None:
        self.failures.append(f)
        log.warning("skipped clip %s (manifest row %d): %s", f.path, f.index, f.error)

    def state_dict(self) -> dict:
        p = self.held or self.position
        return {"epoch": p.epoch, "consumed": p.consumed, "delivered": p.delivered,
                "seed": self.seed}

    def load_state_dict(self, sd: dict) -> None:
        if sd["seed"] != self.seed:
            raise UserError(f"loader state was saved with seed {sd['seed']}, "
                            f"this run uses {self.seed}")
        self.position = Position(int(sd["epoch"]), int(sd["consumed"]), int(sd["delivered"]))


class ManifestLoader(ClipLoader):
    """A loader over manifest rows: this rank's `ClipOrder` of one split, each clip taken as
    one plan per view (`spec.views`; one view except in multi-view testing)."""

    def __init__(self, spec: LoaderSpec):
        if spec.train and spec.views != (1, 1):
            raise ValueError(f"views={spec.views}: multi-view testing is for evaluation, a "
                             "training loader takes random draws (views_per_decode)")
        k = spec.views_per_decode
        if k != 1 and (not spec.train or spec.batch_size % k):
            raise ValueError(f"views_per_decode={k}: a training loader's, dividing the batch "
                             f"size ({spec.batch_size}{'' if spec.train else ', eval'})")
        super().__init__(spec.batch_size, spec.seed)
        self.spec = spec
        self.views = train_views(k) if spec.train else multi_views(*spec.views)
        self.views_per_clip = len(self.views)
        self.order = ClipOrder(spec.manifest.ok(spec.split), train=spec.train, seed=spec.seed,
                               batch_size=spec.batch_size, rank=spec.rank, world=spec.world,
                               views=k)

    def rows(self, epoch: int) -> list[int]:
        return self.order.order(epoch)

    def remaining(self) -> list[tuple[int, View]]:
        """(row, view) of the current epoch's plans not yet taken, a clip's views together."""
        rows = self.rows(self.position.epoch)
        return [(r, v) for r in rows for v in self.views][self.position.consumed:]

    def deliver(self, batch: Batch | RawBatch) -> Batch:
        """A batch of any backend -> the training device, dtype and memory format, with its
        padded frames exactly 0. The one place the Batch contract's normalization and zero
        padding are made: every backend's batch passes here, after the copy, so on a GPU it
        runs where the batch already is and costs no host pass over the pixels. The CPU
        path's `RawBatch` (uint8, its affine beside it) is normalized here; a DALI batch
        comes normalized, its blank padded frames at -mean/std, and is zeroed here."""
        s = self.spec
        if isinstance(batch, RawBatch):
            return batch.normalized(s.device, s.dtype, s.channels_last)
        b = batch.to(s.device, s.dtype, s.channels_last)
        return Batch(zero_padding(b.video, b.mask), b.mask, b.label, b.index)


class SyntheticLoader(ClipLoader):
    """In-memory batches with no decoding at all: times the model without the loader
    (bench train) and gives tests exact, repeatable batches."""

    backend = "synthetic"

    def __init__(self, video: torch.Tensor, mask: torch.Tensor, label: torch.Tensor,
                 batch_size: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None, channels_last: bool = False):
        super().__init__(batch_size)
        self.video, self.mask, self.label = video, mask, label
        self.device, self.dtype = torch.device(device), dtype
        self.channels_last = channels_last

    @classmethod
    def random(cls, n: int, num_frames: int, size: int, batch_size: int, seed: int = 0, **kw):
        g = torch.Generator().manual_seed(seed)
        video = torch.randn(n, 3, num_frames, size, size, generator=g)
        mask = torch.ones(n, num_frames, dtype=torch.bool)
        label = torch.randint(0, 7, (n,), generator=g)
        # made once, already where the model runs: no copy per step (bench: model alone)
        dev, dtype = kw.get("device", "cpu"), kw.get("dtype") or video.dtype
        video = video.to(dev, dtype)
        if kw.get("channels_last"):
            video = video.contiguous(memory_format=torch.channels_last_3d)
        return cls(video, mask.to(dev), label.to(dev), batch_size, **kw)

    def rows(self, epoch: int) -> list[int]:
        return list(range(len(self.label)))

    def _batches(self) -> Iterator[Batch]:
        n = len(self.label)
        while self.position.consumed < n:
            s = slice(self.position.consumed, self.position.consumed + self.batch_size)
            self.position.consumed = min(self.position.consumed + self.batch_size, n)
            self.counts.backend_batches += 1
            idx = torch.arange(n, device=self.label.device)[s]
            yield Batch(self.video[s], self.mask[s], self.label[s], idx).to(
                self.device, self.dtype, self.channels_last)
