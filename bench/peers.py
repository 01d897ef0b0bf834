"""Peers: the loader's work done the way other tools' users write it, for the side-by-side
rows of `meld-dali bench loader --peers` and `bench train --peers`.

Each peer does what our loaders do, on the same manifest and split: the sampling spec (T
frames, segment-random in train, short clips padded with a mask), the train augmentation
of the same kinds (resize shorter side, random crop, flip, rotation, brightness/contrast,
ImageNet normalization; one draw per clip), a [B, 3, T, S, S] batch on the training device.
Each is written as that library's users write it, with its usual settings:

- `seed`: the seed project's way: a `MELDDataset` over JPEG frame folders read with PIL,
  torchvision transforms, a DataLoader with shuffle, pin memory and workers. It reads frame
  folders only: the manifest's, else folders the bench extracts once under
  `runs/bench-seed-frames`.
- `pytorchvideo`: `LabeledVideoDataset` (EncodedVideo over PyAV, a random clip sampler
  whose window spans the whole clip, so the spec's segments cover it as ours do).
- `torchcodec`: `VideoDecoder(seek_mode="approximate")` and `get_frames_at` on the
  sampled indices, the resize and crop done by the decoder (its decoder transforms);
  `torchcodec-cuda` decodes on the GPU (NVDEC) where one is present.

The DataLoaders get the worker count and prefetch of ours and persistent workers (except
where the library's sampler needs fresh workers each epoch): settings that can only help a
peer. What a peer has no equivalent of is listed in its `gaps`, shown in its row. Nothing
here is used by training: peers live in the bench only.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2 as v2
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2.functional import pil_to_tensor

from meld_dali.config import DataConfig, LoaderConfig
from meld_dali.data.base import Batch, ClipLoader, LoaderSpec, zero_padding
from meld_dali.data.decode import clip_source_path
from meld_dali.manifest import Manifest
from meld_dali.prepare import extract_frames
from meld_dali.probe import run_parallel
from meld_dali.sampling import sample_indices

log = logging.getLogger("meld_dali.bench")

EXTRA = 'pip install -e ".[peers]"'
SEED_FRAMES = Path("runs") / "bench-seed-frames"  # the seed peer's own storage, made once
NO_REPLAY = "draws not reproducible per (seed, epoch, clip): no exact resume"
BY_HAND = "no pad + mask: spec indices, padding and mask written by hand"


# ----------------------------------------------------------------------------- shared steps

def augmentation(data: DataConfig, resize_crop: bool = True) -> v2.Compose:
    """The train augmentation in torchvision.transforms.v2. One call draws once, so a clip
    stacked as [t, 3, H, W] gets the same crop, flip, angle and colour on every frame; uint8
    or float in [0, 1] in, normalized float32 out. Resize is a no-op on frames already at the
    short side; the rotation interpolates as ours does (`data.rotate_interp`)."""
    interp = (v2.InterpolationMode.NEAREST if data.rotate_interp == "nearest"
              else v2.InterpolationMode.BILINEAR)
    first = ([v2.Resize(data.short_side, antialias=True), v2.RandomCrop(data.crop_size)]
             if resize_crop else [])
    return v2.Compose([*first, v2.RandomHorizontalFlip(data.flip_p),
                       v2.RandomRotation(data.rotate_deg, interpolation=interp),
                       v2.ColorJitter(brightness=tuple(data.brightness),
                                      contrast=tuple(data.contrast)),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(data.mean, data.std)])


def spec_indices(n: int, T: int) -> tuple[np.ndarray, np.ndarray]:
    """The sampling spec (train) with a fresh random draw: (indices of the real frames,
    mask [T])."""
    idx, mask = sample_indices(n, T, train=True, rng=np.random.default_rng())
    return idx[mask], mask


def padded(x: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmented frames [k, 3, S, S] -> (video [3, T, S, S], exactly 0 after the k real
    frames; mask bool [T])."""
    k = x.shape[0]
    video = x.new_zeros(3, T, *x.shape[2:])
    video[:, :k] = x.transpose(0, 1)
    return video, torch.arange(T) < k


def _dataloader(ds, spec: LoaderSpec, loader_cfg: LoaderConfig, *, workers: int | None = None,
                persistent: bool = True, **kw) -> DataLoader:
    workers = loader_cfg.workers if workers is None else workers
    return DataLoader(ds, batch_size=spec.batch_size, num_workers=workers,
                      pin_memory=spec.device.type == "cuda" and workers > 0,
                      persistent_workers=persistent and workers > 0,
                      prefetch_factor=loader_cfg.prefetch if workers > 0 else None, **kw)


class PeerLoader(ClipLoader):
    """A peer's DataLoader behind the interface the bench and the trainer use: `Batch` on
    the training device, epochs, a position. The order is the peer's own shuffle."""

    def __init__(self, name: str, spec: LoaderSpec, dl: DataLoader, rows: list[int],
                 paths: list[Path], batches_per_epoch: int | None = None):
        super().__init__(spec.batch_size, spec.seed)
        self.backend, self.spec, self.dl, self.paths = name, spec, dl, paths
        self._rows, self._len = rows, batches_per_epoch

    def rows(self, epoch: int) -> list[int]:
        return self._rows

    def __len__(self) -> int:
        return self._len if self._len is not None else super().__len__()

    def _batches(self) -> Iterator[Batch]:
        s = self.spec
        for b in self.dl:
            if isinstance(b, dict):  # pytorchvideo's samples are dicts
                b = (b["video"], b["mask"], b["label"], b["index"])
            batch = Batch(*b).to(s.device, s.dtype, s.channels_last)
            batch.video = zero_padding(batch.video, batch.mask)  # the Batch contract
            self.position.consumed += len(batch)
            self.counts.backend_batches += 1  # the peer's own: it has no CPU redo path
            yield batch


def _clips(spec: LoaderSpec):
    return [(row, spec.manifest.clips[row]) for row in spec.manifest.ok(spec.split)]


# ----------------------------------------------------------------------------- seed

class MELDDataset(Dataset):
    """The seed's dataset: one clip = one folder of JPEG frames, read with PIL."""

    def __init__(self, items: list[tuple[Path, int, int]], data: DataConfig):
        self.items, self.T, self.transform = items, data.num_frames, augmentation(data)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        folder, label, row = self.items[i]
        names = sorted(os.listdir(folder))
        idx, _ = spec_indices(len(names), self.T)
        frames = torch.stack([pil_to_tensor(Image.open(folder / names[j]).convert("RGB"))
                              for j in idx])
        video, mask = padded(self.transform(frames), self.T)
        return video, mask, label, row


def seed_folders(manifest: Manifest, split: str, short_side: int,
                 root: Path = SEED_FRAMES) -> dict[int, Path]:
    """Row -> JPEG frame folder of each ok clip of `split`: the manifest's frame folders
    when it has them, else folders extracted once (at `short_side`) under `root`."""
    rows = manifest.ok(split)
    if manifest.has_frames:  # a clip whose extraction failed has none: the seed skips it
        return {r: f for r in rows if (f := manifest.frames_path(manifest.clips[r]))}
    import hashlib

    tag = hashlib.sha1(str(manifest.path.resolve()).encode()).hexdigest()[:8]
    base = Path(root) / f"{manifest.base.name}-{tag}-{short_side}"
    out = {r: base / manifest.clips[r].split / manifest.clips[r].clip_id for r in rows}
    todo = [(r, str(manifest.video_path(manifest.clips[r])), str(out[r]), short_side)
            for r in rows if not out[r].is_dir()]
    if todo:
        log.info("seed peer: extracting JPEG frame folders of %d clips into %s", len(todo),
                 base)
    for r, (_, err) in run_parallel(_extract, todo, os.cpu_count() or 1, None, "frames"):
        if err:
            raise RuntimeError(f"seed peer: cannot extract {out[r]}: {err}")
    return out


def _extract(job: tuple[int, str, str, int]) -> tuple[int, tuple[int, str]]:
    row, video, dest, short_side = job
    try:
        return row, (extract_frames(video, dest, short_side), "")
    except Exception as e:  # noqa: BLE001 - reported with the clip's path
        return row, (0, f"{type(e).__name__}: {e}")


def build_seed(spec: LoaderSpec, data: DataConfig, loader_cfg: LoaderConfig) -> PeerLoader:
    folders = seed_folders(spec.manifest, spec.split, data.short_side)
    items = [(folders[row], c.label, row) for row, c in _clips(spec) if row in folders]
    dl = _dataloader(MELDDataset(items, data), spec, loader_cfg, shuffle=True)
    return PeerLoader("seed", spec, dl, [r for _, _, r in items], [f for f, _, _ in items])


# ----------------------------------------------------------------------------- pytorchvideo

class PytorchvideoTransform:
    """What a pytorchvideo user puts in `transform=`: subsample the decoded clip (the
    spec's indices, standing in for UniformTemporalSubsample), x / 255, augment, pad."""

    def __init__(self, data: DataConfig):
        self.T, self.transform = data.num_frames, augmentation(data)

    def __call__(self, sample: dict) -> dict:
        video = sample["video"]  # float32 [C, n, H, W] in [0, 255], every decoded frame
        idx, _ = spec_indices(video.shape[1], self.T)
        frames = video[:, torch.from_numpy(idx)].transpose(0, 1) / 255.0
        clip, mask = padded(self.transform(frames), self.T)
        return {"video": clip, "mask": mask, "label": sample["label"],
                "index": sample["index"]}


def build_pytorchvideo(spec: LoaderSpec, data: DataConfig, loader_cfg: LoaderConfig) -> PeerLoader:
    from pytorchvideo.data import LabeledVideoDataset, make_clip_sampler

    clips = _clips(spec)
    paths = [clip_source_path(spec.manifest, c, spec.source) for _, c in clips]
    # a window longer than any clip: the sampler starts it at 0, the whole clip is decoded
    longest = max(c.num_frames / (c.fps or 24) for _, c in clips) + 1.0
    ds = LabeledVideoDataset([(str(p), {"label": c.label, "index": row})
                              for p, (row, c) in zip(paths, clips, strict=True)],
                             make_clip_sampler("random", longest),
                             transform=PytorchvideoTransform(data), decode_audio=False,
                             decoder="pyav")
    # its RandomSampler is reseeded when a worker starts: persistent workers would replay
    # the same order every epoch, so the workers start afresh, as in pytorchvideo's examples
    dl = _dataloader(ds, spec, loader_cfg, persistent=False)
    # each worker batches its own share of the videos (MultiProcessSampler)
    shares = np.array_split(np.arange(len(clips)), max(loader_cfg.workers, 1))
    return PeerLoader("pytorchvideo", spec, dl, [r for r, _ in clips], paths,
                      sum(-(-len(s) // spec.batch_size) for s in shares))


# ----------------------------------------------------------------------------- torchcodec

class TorchcodecClips(Dataset):
    """A clip = a `VideoDecoder` and `get_frames_at` on the spec's indices; on the CPU the
    decoder resizes and crops (decoder transforms: one random crop per decoder, so per
    clip), torchvision does the rest."""

    def __init__(self, items: list[tuple[Path, int, int, int, tuple[int, int] | None]],
                 data: DataConfig, device: str):
        self.items, self.data, self.T, self.device = items, data, data.num_frames, device
        self.transform = augmentation(data, resize_crop=device != "cpu")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from torchcodec.decoders import VideoDecoder

        path, n, label, row, size = self.items[i]
        steps = []
        if self.device == "cpu":
            steps = [*([v2.Resize(size)] if size else []), v2.RandomCrop(self.data.crop_size)]
        decoder = VideoDecoder(str(path), seek_mode="approximate", device=self.device,
                               transforms=steps or None)
        idx, _ = spec_indices(n, self.T)
        frames = decoder.get_frames_at(indices=idx.tolist()).data  # uint8 [k, 3, h, w]
        video, mask = padded(self.transform(frames), self.T)
        return video, mask, label, row


def decoder_size(manifest: Manifest, clip, source: str, short_side: int):
    """(height, width) for the decoder's Resize, None when the file has the short side."""
    have = manifest.cache_short_side if source == "cache" and clip.cache else None
    if have == short_side or not (clip.width and clip.height):
        return None
    if min(clip.width, clip.height) == short_side:
        return None
    scale = short_side / min(clip.width, clip.height)
    return round(clip.height * scale), round(clip.width * scale)


def _torchcodec(device: str) -> Callable:
    def build(spec: LoaderSpec, data: DataConfig, loader_cfg: LoaderConfig) -> PeerLoader:
        m = spec.manifest
        items = [(clip_source_path(m, c, spec.source), c.num_frames, c.label, row,
                  decoder_size(m, c, spec.source, data.short_side)) for row, c in _clips(spec)]
        ds = TorchcodecClips(items, data, device)
        # decoding on the GPU happens in this process (CUDA does not survive a fork)
        dl = _dataloader(ds, spec, loader_cfg, shuffle=True,
                         **({"workers": 0} if device == "cuda" else {}))
        name = "torchcodec" if device == "cpu" else "torchcodec-cuda"
        return PeerLoader(name, spec, dl, [it[3] for it in items], [it[0] for it in items])
    return build


# ----------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class Peer:
    name: str  # its rows' name
    family: str  # what --peers names
    sources: tuple[str, ...]  # what it reads
    modules: tuple[str, ...]  # imported to tell whether it can run here
    build: Callable[[LoaderSpec, DataConfig, LoaderConfig], PeerLoader]
    gaps: tuple[str, ...]  # our steps it has no equivalent of
    cuda: bool = False


PEERS: dict[str, Peer] = {p.name: p for p in (
    Peer("seed", "seed", ("frames",), ("PIL", "torchvision"), build_seed,
         ("reads JPEG frame folders only (no video decode)", NO_REPLAY,
          "a bad clip stops the run (no skip-and-report)")),
    Peer("pytorchvideo", "pytorchvideo", ("video", "cache"), ("pytorchvideo.data",),
         build_pytorchvideo,
         ("no frame-index decode: every frame of the clip is decoded and made float32",
          "pytorchvideo.transforms does not import with current torchvision: "
          "torchvision.transforms.v2", BY_HAND, NO_REPLAY)),
    Peer("torchcodec", "torchcodec", ("video", "cache"), ("torchcodec.decoders",),
         _torchcodec("cpu"),
         ("augmentation beyond resize/crop: torchvision.transforms.v2", BY_HAND, NO_REPLAY)),
    Peer("torchcodec-cuda", "torchcodec", ("video", "cache"), ("torchcodec.decoders",),
         _torchcodec("cuda"),
         ("augmentation: torchvision.transforms.v2 on the GPU", BY_HAND, NO_REPLAY),
         cuda=True),
)}
FAMILIES = tuple(dict.fromkeys(p.family for p in PEERS.values()))


def parse_peers(text: str) -> list[Peer]:
    """'all', 'none' or a comma list of seed, pytorchvideo, torchcodec (torchcodec: its CPU
    and its CUDA rows)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["none"]:
        return []
    if names == ["all"]:
        names = list(FAMILIES)
    bad = [n for n in names if n not in FAMILIES]
    if bad or not names:
        raise ValueError(f"unknown peer(s) {bad or text!r}: use all, none or any of "
                         f"{', '.join(FAMILIES)}")
    return [p for p in PEERS.values() if p.family in names]


def peer_problem(peer: Peer) -> str:
    """Why `peer` cannot run here ('' when it can)."""
    if peer.cuda and not torch.cuda.is_available():
        return "no CUDA device is visible (NVDEC decode needs one)"
    for mod in peer.modules:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            return f"{peer.name}: cannot import {mod} ({e}): {EXTRA}"
    if peer.family == "torchcodec":
        import torchcodec

        if torchcodec.ffmpeg_major_version is None:
            return "torchcodec: FFmpeg libraries not found: apt-get install ffmpeg"
    return ""


def peer_sources(peer: Peer, sources: list[str]) -> list[str]:
    """The requested sources a peer reads; the seed reads its frame folders whatever was
    asked (it is the baseline of every run)."""
    return list(peer.sources) if peer.name == "seed" else [
        s for s in sources if s in peer.sources]


def peer_source(peer: Peer, manifest: Manifest, resolved: str) -> str:
    """What a peer reads when our loaders read `resolved` (bench train's one source): the
    same where it can, else its frame folders (seed) or the clip cache when built, else the
    videos."""
    if resolved in peer.sources:
        return resolved
    if peer.name == "seed":
        return "frames"
    return "cache" if manifest.has_cache else "video"
