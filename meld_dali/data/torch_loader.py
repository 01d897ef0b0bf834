"""The CPU fallback loader: PyAV / PIL decoding and torchvision transforms in DataLoader
workers. Runs everywhere; the reference the DALI backends are tested against."""

from __future__ import annotations

import weakref
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from meld_dali.config import DataConfig, LoaderConfig
from meld_dali.data.base import Batch, ClipFailure, LoaderSpec, ManifestLoader
from meld_dali.data.decode import clip_source_path, read_clip, to_clip
from meld_dali.manifest import Manifest
from meld_dali.sampling import clip_indices
from meld_dali.signals import kill_workers_at_exit, worker_init
from meld_dali.transforms import EVAL_PARAMS, draw_params


class ClipDataset(Dataset):
    """Items are (epoch, row): the epoch travels with the request, so persistent workers
    need no shared state and every (seed, epoch, clip) sees the same draw."""

    def __init__(self, manifest: Manifest, cfg: DataConfig, *, train: bool, seed: int,
                 source: str):
        self.m, self.cfg, self.train, self.seed, self.source = (
            manifest, cfg, train, seed, source)

    def __len__(self) -> int:
        return len(self.m.clips)

    def __getitem__(self, item: tuple[int, int]):
        epoch, row = item
        clip = self.m.clips[row]
        idx, mask = clip_indices(clip.num_frames, self.cfg.num_frames, train=self.train,
                                 seed=self.seed, epoch=epoch, clip=row)
        try:
            frames = read_clip(self.m, clip, idx[mask], self.source)
        except Exception as e:  # noqa: BLE001 - a bad clip is skipped and reported
            path = clip_source_path(self.m, clip, self.source)
            return ClipFailure(row, str(path), f"{type(e).__name__}: {e}")
        params = (draw_params(self.cfg, seed=self.seed, epoch=epoch, clip=row)
                  if self.train else EVAL_PARAMS)
        video, mask = to_clip(frames, self.cfg, params)
        return video, mask, clip.label, row


def collate(items) -> tuple[Batch | None, list[ClipFailure]]:
    failures = [it for it in items if isinstance(it, ClipFailure)]
    good = [it for it in items if not isinstance(it, ClipFailure)]
    if not good:
        return None, failures
    video, mask, label, index = zip(*good, strict=True)
    return Batch(_stack(video), torch.stack(mask), torch.tensor(label, dtype=torch.int64),
                 torch.tensor(index, dtype=torch.int64)), failures


def _stack(tensors) -> torch.Tensor:
    """torch.stack; in a DataLoader worker straight into shared memory (as default_collate
    does), so the batch is not copied once more on its way to the main process."""
    if get_worker_info() is None:
        return torch.stack(tensors)
    first = tensors[0]
    storage = first.untyped_storage()._new_shared(len(tensors) * first.nbytes)
    out = first.new(storage).view(len(tensors), *first.shape)
    return torch.stack(tensors, out=out)


class _Remaining(Sampler):
    """(epoch, row) for the rows the loader has not taken yet, fixed when iteration starts
    (the DataLoader asks for it once per pass, before any batch is consumed)."""

    def __init__(self, loader: ManifestLoader):
        # a weak reference: loader -> DataLoader -> sampler -> loader would be a cycle, freed
        # only by the garbage collector, which then waits ~5 s per worker to stop it
        self.loader = weakref.proxy(loader)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.loader.position.epoch
        return iter([(epoch, row) for row in self.loader.remaining()])

    def __len__(self) -> int:
        return len(self.loader.remaining())


class TorchLoader(ManifestLoader):
    """CPU fallback: torch DataLoader over ClipDataset, yielding Batch on the device."""

    backend = "torch"

    def __init__(self, spec: LoaderSpec, data: DataConfig, cfg: LoaderConfig):
        super().__init__(spec)
        ds = ClipDataset(spec.manifest, data, train=spec.train, seed=spec.seed,
                         source=spec.source)
        workers = cfg.num_workers
        # its own generator: creating an iterator must not draw from the global torch RNG,
        # or a resumed run would see different dropout masks than an uninterrupted one
        self.dl = DataLoader(ds, batch_size=spec.batch_size, sampler=_Remaining(self),
                             collate_fn=collate, num_workers=workers,
                             pin_memory=spec.device.type == "cuda",
                             persistent_workers=workers > 0,
                             prefetch_factor=cfg.prefetch if workers > 0 else None,
                             # a group SIGTERM/SIGINT must not kill the workers mid-step: the
                             # main process finishes the step, saves, then shuts them down
                             worker_init_fn=worker_init,
                             generator=torch.Generator().manual_seed(spec.seed))
        if workers:
            kill_workers_at_exit()

    def _batches(self) -> Iterator[Batch]:
        for batch, failures in self.dl:
            self.position.consumed += len(failures) + (len(batch) if batch is not None else 0)
            for f in failures:
                self.report(f)
            if batch is not None:
                yield self.deliver(batch)
