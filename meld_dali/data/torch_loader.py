"""The CPU fallback loader: PyAV / PIL decoding and torchvision transforms in DataLoader
workers. Runs everywhere; the reference the DALI backends are tested against."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from meld_dali.config import DataConfig, LoaderConfig
from meld_dali.data.base import Batch, ClipFailure, LoaderSpec, ManifestLoader, RawBatch
from meld_dali.data.decode import clip_source_path, read_clip, to_clip, to_clip_uint8
from meld_dali.data.plan import CENTRE, ClipPlan, View, frame_union, make_plan
from meld_dali.manifest import Manifest
from meld_dali.signals import kill_workers_at_exit, worker_init
from meld_dali.transforms import resize_short


class ClipDataset(Dataset):
    """Items are (epoch, row), (epoch, row, view) or (epoch, row, views): the epoch travels
    with the request, so persistent workers need no shared state and every (seed, epoch,
    row) gets the same plan, made where the clip is loaded. A one-view item is `load`'s float
    clip, the reference (`verify`), or with `raw` `load_raw`'s uint8 clip and affine; a
    several-view item (a tuple of views: the CPU loader's) is `load_views`' list of those,
    decoded once."""

    def __init__(self, manifest: Manifest, data: DataConfig, *, train: bool, seed: int,
                 source: str, raw: bool = False):
        self.m, self.data, self.train, self.seed, self.source = (
            manifest, data, train, seed, source)
        self.raw = raw

    def __len__(self) -> int:
        return len(self.m.clips)

    def plan(self, epoch: int, row: int, view: View = CENTRE) -> ClipPlan:
        """The plan of `row` in `epoch`, for this dataset and for the DALI loader over it."""
        return make_plan(self.m.clips[row], self.data, train=self.train, seed=self.seed,
                         epoch=epoch, row=row, view=view)

    def __getitem__(self, item: tuple[int, int] | tuple[int, int, View | tuple[View, ...]]):
        epoch, row, *view = item
        views = view[0] if view else CENTRE
        if isinstance(views, tuple):
            return self.load_views([self.plan(epoch, row, v) for v in views])
        plan = self.plan(epoch, row, views)
        return self.load_raw(plan) if self.raw else self.load(plan)

    def _read(self, plan: ClipPlan, indices: np.ndarray | None = None):
        """The frames of `plan` (or of one clip at `indices`), or the ClipFailure."""
        clip = self.m.clips[plan.row]
        try:
            return read_clip(self.m, clip,
                             plan.indices[plan.mask] if indices is None else indices,
                             self.source)
        except Exception as e:  # noqa: BLE001 - a bad clip is skipped and reported
            path = clip_source_path(self.m, clip, self.source)
            return ClipFailure(plan.row, str(path), f"{type(e).__name__}: {e}")

    def load(self, plan: ClipPlan):
        """(video, mask, label, row) of a plan, the video float32 normalized (`to_clip`, the
        CPU reference), or the ClipFailure that stopped it."""
        frames = self._read(plan)
        if isinstance(frames, ClipFailure):
            return frames
        video, mask = to_clip(frames, self.data, plan.params)
        return video, mask, self.m.clips[plan.row].label, plan.row

    def load_raw(self, plan: ClipPlan, frames=None):
        """(video uint8, mask, label, row, scale, shift) of a plan (`to_clip_uint8`: what
        the loaders deliver after `RawBatch.normalized` equals `load`'s video within float
        rounding), or the ClipFailure that stopped it. `frames`: the plan's, decoded
        already."""
        frames = self._read(plan) if frames is None else frames
        if isinstance(frames, ClipFailure):
            return frames
        video, mask, scale, shift = to_clip_uint8(frames, self.data, plan.params)
        return video, mask, self.m.clips[plan.row].label, plan.row, scale, shift

    def load_views(self, plans: list[ClipPlan]):
        """`load_raw` of several plans of one clip (its training draws, or its test views)
        from one decode: the union of their frames is read once and resized once, then each
        plan's frames are taken from it. A list, one item per plan, or the ClipFailure."""
        if len(plans) == 1:
            item = self.load_raw(plans[0])
            return item if isinstance(item, ClipFailure) else [item]
        union, picks = frame_union([p.indices[p.mask] for p in plans])
        frames = self._read(plans[0], union)
        if isinstance(frames, ClipFailure):
            return frames
        if len(frames) != len(union):  # a container holding fewer frames than it says
            items = [self.load_raw(p) for p in plans]  # which ones is each plan's to find
            bad = next((it for it in items if isinstance(it, ClipFailure)), None)
            return bad or items
        if min(frames.shape[1:3]) != self.data.short_side:  # resized once for all views
            # (a per-frame operation: the same pixels as one by one); [u, 3, h, w]
            frames = resize_short(torch.from_numpy(frames).permute(0, 3, 1, 2),
                                  self.data).numpy()
            pick = lambda sel: torch.from_numpy(frames[sel])  # noqa: E731
        else:
            pick = frames.__getitem__  # NumPy's row copy: ~20x torch's indexing here
        return [self.load_raw(p, pick(sel)) for p, sel in zip(plans, picks, strict=True)]


def collate(items) -> tuple[Batch | RawBatch | None, list[ClipFailure]]:
    """ClipDataset items -> (a Batch of `load`'s items or a RawBatch of `load_raw`'s, or
    None when every clip failed; the failures). Both have `pin_memory()`, so a DataLoader
    with pin_memory=True pins the batch (it pins what has that method, inside the tuple).
    `load_views`' lists are flattened, in order."""
    items = [x for it in items for x in (it if isinstance(it, list) else [it])]
    failures = [it for it in items if isinstance(it, ClipFailure)]
    good = [it for it in items if not isinstance(it, ClipFailure)]
    if not good:
        return None, failures
    video, mask, label, index, *affine = zip(*good, strict=True)
    mask = torch.stack(mask)
    label, index = (torch.tensor(v, dtype=torch.int64) for v in (label, index))
    if not affine:
        return Batch(_stack(video), mask, label, index), failures
    # uint8 [3, T, H, W] clips stored as [T, H, W, 3]: stacked in that order, one plain copy
    thwc = _stack([v.permute(1, 2, 3, 0) for v in video])
    scale, shift = (torch.stack(a) for a in affine)
    return RawBatch(thwc.permute(0, 4, 1, 2, 3), mask, label, index, scale, shift), failures


def _stack(tensors) -> torch.Tensor:
    """torch.stack; in a DataLoader worker straight into shared memory (as default_collate
    does), so the batch is not copied once more on its way to the main process."""
    if get_worker_info() is None:
        return torch.stack(tensors)
    first = tensors[0]
    storage = first.untyped_storage()._new_shared(len(tensors) * first.nbytes)
    out = first.new(storage).view(len(tensors), *first.shape)
    return torch.stack(tensors, out=out)


class _PassBatches(Sampler):
    """The batches of one pass, each a list of (epoch, row, views) items: a batch's plans of
    one clip (its training draws, or its test views) are one item, decoded once. A plain
    list the loader sets before each pass (the DataLoader, given it as its batch_sampler,
    asks for its iterator once per pass, before any batch is consumed). It holds no
    reference to the loader: loader -> DataLoader -> sampler -> loader would be a cycle,
    freed only by the garbage collector, which then waits ~5 s per worker to stop it."""

    def __init__(self):
        self.batches: list[list[tuple[int, int, tuple[View, ...]]]] = []

    def set(self, epoch: int, plans: list[tuple[int, View]], batch_size: int) -> list[int]:
        """Cut `plans` (row, view) into batches; returns each batch's number of plans."""
        self.batches, sizes = [], []
        for i in range(0, len(plans), batch_size):
            chunk = plans[i:i + batch_size]
            items: list[tuple[int, int, tuple[View, ...]]] = []
            for row, view in chunk:
                if items and items[-1][1] == row:  # a clip's plans are consecutive
                    items[-1] = (epoch, row, (*items[-1][2], view))
                else:
                    items.append((epoch, row, (view,)))
            self.batches.append(items)
            sizes.append(len(chunk))
        return sizes

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class TorchLoader(ManifestLoader):
    """CPU fallback: torch DataLoader over ClipDataset, yielding Batch on the device."""

    backend = "torch"

    def __init__(self, spec: LoaderSpec, data: DataConfig, loader_cfg: LoaderConfig):
        super().__init__(spec)
        # workers stop at uint8 clips; `deliver` normalizes them on the training device
        ds = ClipDataset(spec.manifest, data, train=spec.train, seed=spec.seed,
                         source=spec.source, raw=True)
        workers = loader_cfg.num_workers
        self.sampler = _PassBatches()
        # its own generator: creating an iterator must not draw from the global torch RNG,
        # or a resumed run would see different dropout masks than an uninterrupted one
        self.dl = DataLoader(ds, batch_sampler=self.sampler, collate_fn=collate,
                             num_workers=workers,
                             pin_memory=spec.device.type == "cuda",
                             persistent_workers=workers > 0,
                             prefetch_factor=loader_cfg.prefetch if workers > 0 else None,
                             # a group SIGTERM/SIGINT must not kill the workers mid-step: the
                             # main process finishes the step, saves, then shuts them down
                             worker_init_fn=worker_init,
                             generator=torch.Generator().manual_seed(spec.seed))
        if workers:
            kill_workers_at_exit()

    def _batches(self) -> Iterator[Batch]:
        sizes = self.sampler.set(self.position.epoch, self.remaining(), self.spec.batch_size)
        for (batch, failures), plans in zip(self.dl, sizes, strict=True):
            self.position.consumed += plans
            for f in failures:
                self.report(f)
            if batch is not None:
                self.counts.backend_batches += 1
                yield self.deliver(batch)
