"""The Batch contract, the CPU fallback loader (PyAV / PIL) and `build_loader`.

Every backend yields `Batch` on the training device; the trainer never branches on which
backend produced it. The DALI backends live in meld_dali.pipelines and are imported lazily
by `build_loader` only, so everything else works where DALI is absent.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from meld_dali.config import DataConfig, LoaderConfig
from meld_dali.errors import UserError
from meld_dali.manifest import Manifest
from meld_dali.sampling import clip_indices
from meld_dali.transforms import EVAL_PARAMS, apply_clip, draw_params

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


@dataclass
class ClipFailure:
    index: int
    path: str
    error: str


# ----------------------------------------------------------------------------- decoding


SEEK_GAP = 96  # frames: skipping more than this many pays for a seek to a keyframe


def read_video_frames(path: str | Path, indices: np.ndarray,
                      seek_gap: int = SEEK_GAP) -> np.ndarray:
    """Decode the frames at sorted `indices` (uint8 [k, H, W, 3]).

    Decoding streams forward and stops at the last wanted frame; across a gap of more than
    `seek_gap` frames (MELD's long outliers) it seeks to the keyframe before the next
    wanted frame and numbers frames by their timestamps from there. Frames a lying container
    does not actually hold are returned as fewer rows."""
    wanted = [int(i) for i in indices]
    out: list[np.ndarray] = []
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        rate, tb = stream.average_rate, stream.time_base
        ticks = float(1 / (rate * tb)) if rate and tb else None  # pts ticks per frame
        t0 = stream.start_time or 0
        frames = c.decode(stream)
        pos, j, by_pts, sought = -1, 0, False, -1

        def worth_seeking() -> bool:  # far ahead, and not the frame just sought
            return bool(ticks) and wanted[j] - pos > seek_gap and wanted[j] != sought

        while j < len(wanted):
            if worth_seeking():
                sought = wanted[j]
                c.seek(t0 + int(sought * ticks), stream=stream, backward=True)
                frames, by_pts = c.decode(stream), True
            decoded = False
            for frame in frames:
                decoded = True
                pos = (round((frame.pts - t0) / ticks) if by_pts and frame.pts is not None
                       else pos + 1)
                while j < len(wanted) and wanted[j] < pos:  # overshot: not in the file
                    j += 1
                if j < len(wanted) and wanted[j] == pos:
                    img = frame.to_ndarray(format="rgb24")
                    while j < len(wanted) and wanted[j] == pos:
                        out.append(img)
                        j += 1
                if j == len(wanted) or worth_seeking():
                    break
            if not decoded:
                break  # end of stream
    if not out:
        raise ValueError("no frame could be decoded")
    return np.stack(out)


def read_frame_folder(folder: str | Path, indices: np.ndarray) -> np.ndarray:
    folder = Path(folder)
    return np.stack([np.asarray(Image.open(folder / f"{i:06d}.jpg").convert("RGB"))
                     for i in indices.tolist()])


def clip_source_path(manifest: Manifest, clip: dict, use_frames: bool) -> Path:
    return manifest.frames_path(clip) if use_frames else manifest.video_path(clip)


def read_clip(manifest: Manifest, clip: dict, indices: np.ndarray,
              use_frames: bool) -> np.ndarray:
    """Frames uint8 [k, H, W, 3] of one manifest clip, from its frame folder or its video."""
    read = read_frame_folder if use_frames else read_video_frames
    return read(clip_source_path(manifest, clip, use_frames), indices)


def to_clip(frames: np.ndarray, cfg: DataConfig, params) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded uint8 [k, H, W, 3] frames -> (video [3, T, S, S] transformed and normalized,
    exactly 0 in the T - k padded slots; mask bool [T], True for the k real frames)."""
    x = apply_clip(torch.from_numpy(frames).permute(0, 3, 1, 2), cfg, params)
    k = x.shape[1]
    video = torch.zeros(3, cfg.num_frames, cfg.crop_size, cfg.crop_size)
    video[:, :k] = x
    mask = torch.zeros(cfg.num_frames, dtype=torch.bool)
    mask[:k] = True
    return video, mask


# ----------------------------------------------------------------------------- dataset


class ClipDataset(Dataset):
    """Items are (epoch, row): the epoch travels with the request, so persistent workers
    need no shared state and every (seed, epoch, clip) sees the same draw."""

    def __init__(self, manifest: Manifest, cfg: DataConfig, *, train: bool, seed: int,
                 use_frames: bool):
        self.m, self.cfg, self.train, self.seed, self.use_frames = (
            manifest, cfg, train, seed, use_frames)

    def __len__(self) -> int:
        return len(self.m.clips)

    def __getitem__(self, item: tuple[int, int]):
        epoch, row = item
        clip = self.m.clips[row]
        idx, mask = clip_indices(clip["num_frames"], self.cfg.num_frames, train=self.train,
                                 seed=self.seed, epoch=epoch, clip=row)
        try:
            frames = read_clip(self.m, clip, idx[mask], self.use_frames)
        except Exception as e:  # noqa: BLE001 - a bad clip is skipped and reported
            path = clip_source_path(self.m, clip, self.use_frames)
            return ClipFailure(row, str(path), f"{type(e).__name__}: {e}")
        params = (draw_params(self.cfg, seed=self.seed, epoch=epoch, clip=row)
                  if self.train else EVAL_PARAMS)
        video, mask = to_clip(frames, self.cfg, params)
        return video, mask, clip["label"], row


def collate(items) -> tuple[Batch | None, list[ClipFailure]]:
    failures = [it for it in items if isinstance(it, ClipFailure)]
    good = [it for it in items if not isinstance(it, ClipFailure)]
    if not good:
        return None, failures
    video, mask, label, index = zip(*good, strict=True)
    return Batch(torch.stack(video), torch.stack(mask), torch.tensor(label, dtype=torch.int64),
                 torch.tensor(index, dtype=torch.int64)), failures


# ----------------------------------------------------------------------------- order


class ClipOrder(Sampler):
    """Deterministic, resumable, sharded order of manifest rows for one epoch.

    train: a permutation seeded by (seed, epoch), the same on every rank, each rank takes
    every world-th clip and all ranks take the same count (the tail is dropped so DDP stays
    in step); a lone last clip (a batch of 1 breaks BatchNorm) is dropped too.
    eval: manifest order, every clip exactly once over all ranks (shards may differ by one).
    """

    def __init__(self, rows: list[int], *, train: bool, seed: int, batch_size: int,
                 rank: int = 0, world: int = 1):
        self.rows, self.train, self.seed, self.batch_size = list(rows), train, seed, batch_size
        self.rank, self.world = rank, world
        self.epoch, self.skip = 0, 0

    def order(self, epoch: int) -> list[int]:
        rows = np.array(self.rows, dtype=np.int64)
        if self.train:
            rows = rows[np.random.default_rng([self.seed, epoch, 7]).permutation(len(rows))]
            n = len(rows) // self.world
            mine = rows[self.rank::self.world][:n]
            if len(mine) % self.batch_size == 1 and len(mine) > 1:
                mine = mine[:-1]
            return mine.tolist()
        return rows[self.rank::self.world].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, skip = self.epoch, self.skip
        self.skip = 0  # a resume offset applies to one pass only
        for row in self.order(epoch)[skip:]:
            yield epoch, row

    def __len__(self) -> int:
        return len(self.order(self.epoch)) - self.skip


# ----------------------------------------------------------------------------- loader


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
    use_frames: bool = False


class ClipLoader:
    """What every backend shares: the clip order of this rank and the position in it
    (epoch, clips consumed), which is all a resume needs, and the failure report."""

    backend = "?"

    def __init__(self, spec: LoaderSpec):
        self.spec = spec
        self.order = ClipOrder(spec.manifest.ok(spec.split), train=spec.train, seed=spec.seed,
                               batch_size=spec.batch_size, rank=spec.rank, world=spec.world)
        self.epoch, self.consumed = 0, 0
        self.failures: list[ClipFailure] = []

    @property
    def num_clips(self) -> int:
        return len(self.order.order(self.epoch))

    def __len__(self) -> int:
        return -(-self.num_clips // self.spec.batch_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def report(self, f: ClipFailure) -> None:
        self.failures.append(f)
        log.warning("skipped clip %s (manifest row %d): %s", f.path, f.index, f.error)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.spec.seed}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("seed", self.spec.seed) != self.spec.seed:
            raise UserError(f"loader state was saved with seed {sd['seed']}, "
                            f"this run uses {self.spec.seed}")
        self.epoch, self.consumed = int(sd["epoch"]), int(sd["consumed"])


class TorchLoader(ClipLoader):
    """CPU fallback: torch DataLoader over ClipDataset, yielding Batch on the device."""

    backend = "torch"

    def __init__(self, spec: LoaderSpec, data: DataConfig, cfg: LoaderConfig):
        super().__init__(spec)
        ds = ClipDataset(spec.manifest, data, train=spec.train, seed=spec.seed,
                         use_frames=spec.use_frames)
        workers = max(0, cfg.workers)
        # its own generator: creating an iterator must not draw from the global torch RNG,
        # or a resumed run would see different dropout masks than an uninterrupted one
        self.dl = DataLoader(ds, batch_size=spec.batch_size, sampler=self.order,
                             collate_fn=collate, num_workers=workers,
                             pin_memory=spec.device.type == "cuda",
                             persistent_workers=workers > 0,
                             prefetch_factor=cfg.prefetch if workers > 0 else None,
                             generator=torch.Generator().manual_seed(spec.seed))

    def __iter__(self) -> Iterator[Batch]:
        self.order.epoch, self.order.skip = self.epoch, self.consumed
        s = self.spec
        for batch, failures in self.dl:
            self.consumed += len(failures) + (len(batch) if batch is not None else 0)
            for f in failures:
                self.report(f)
            if batch is not None:
                yield batch.to(s.device, s.dtype, s.channels_last)
        # the pass is complete: the next epoch starts from its beginning
        self.epoch, self.consumed = self.epoch + 1, 0


# ----------------------------------------------------------------------------- selection

BACKENDS = ("dali-gpu", "dali-cpu", "torch")
DALI_CPU_CODECS = {"vp8", "vp9", "mjpeg"}


def dali_available() -> tuple[bool, str]:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        return False, f"NVIDIA DALI is not installed ({e})"
    return True, ""


def use_frames(manifest: Manifest, source: str) -> bool:
    if source == "frames":
        if not manifest.has_frames:
            raise UserError(f"{manifest.path}: data.source=frames but no frame folders were "
                            "extracted (run `meld-dali prepare ROOT --frames DIR`)")
        return True
    return source == "auto" and manifest.has_frames


def backend_problem(backend: str, manifest: Manifest, split: str, frames: bool) -> str:
    """Why `backend` cannot run here on this data ('' when it can)."""
    if backend == "torch":
        return ""
    ok, why = dali_available()
    if not ok:
        return why
    if backend == "dali-gpu":
        return "" if torch.cuda.is_available() else "no CUDA device is visible"
    if frames:
        return ""
    codecs = {manifest.clips[i]["codec"] for i in manifest.ok(split)}
    bad = codecs - DALI_CPU_CODECS
    return (f"DALI's CPU video decoder takes VP8/VP9/MJPEG only; this data is "
            f"{', '.join(sorted(c or '?' for c in bad))} (use dali-gpu, torch, or frame "
            "folders from `prepare --frames`)") if bad else ""


def resolve_backend(requested: str, manifest: Manifest, split: str, frames: bool) -> str:
    if requested == "auto":
        for b in ("dali-gpu", "dali-cpu"):
            if not backend_problem(b, manifest, split, frames):
                # dali-cpu only where it beats the fallback: frame folders or VP9/MJPEG
                return b
        return "torch"
    if requested not in BACKENDS:
        raise UserError(f"unknown loader backend '{requested}' (choose from auto, "
                        f"{', '.join(BACKENDS)})")
    why = backend_problem(requested, manifest, split, frames)
    if why:
        raise UserError(f"backend {requested} cannot run here: {why}")
    return requested


def build_loader(spec: LoaderSpec, data: DataConfig, cfg: LoaderConfig, backend: str):
    """The one place that knows the backends. `backend` must be resolved already."""
    if backend == "torch":
        return TorchLoader(spec, data, cfg)
    from meld_dali.pipelines.loader import DaliLoader  # lazy: DALI is optional

    return DaliLoader(spec, data, cfg, device=backend.split("-")[1])


class SyntheticLoader:
    """In-memory batches with no decoding at all: times the model without the loader
    (bench train) and gives tests exact, repeatable batches. Same interface as the others."""

    backend = "synthetic"

    def __init__(self, video: torch.Tensor, mask: torch.Tensor, label: torch.Tensor,
                 batch_size: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None, channels_last: bool = False):
        self.video, self.mask, self.label = video, mask, label
        self.batch_size, self.device, self.dtype = batch_size, torch.device(device), dtype
        self.channels_last = channels_last
        self.epoch, self.consumed = 0, 0
        self.failures: list[ClipFailure] = []

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

    @property
    def num_clips(self) -> int:
        return len(self.label)

    def __len__(self) -> int:
        return -(-self.num_clips // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def __iter__(self) -> Iterator[Batch]:
        while self.consumed < self.num_clips:
            s = slice(self.consumed, self.consumed + self.batch_size)
            self.consumed = min(self.consumed + self.batch_size, self.num_clips)
            idx = torch.arange(self.num_clips, device=self.label.device)[s]
            yield Batch(self.video[s], self.mask[s], self.label[s], idx).to(
                self.device, self.dtype, self.channels_last)
        self.epoch, self.consumed = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, sd: dict) -> None:
        self.epoch, self.consumed = sd["epoch"], sd["consumed"]
