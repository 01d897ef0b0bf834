"""DaliLoader: the DALI graphs behind the same interface and Batch as the CPU loader.

The external source walks the same `ClipOrder` as the CPU loader (sharded by rank, seeded by
(seed, epoch)), so the order, frame indices and augmentation draws are identical, and the
position (epoch, clips consumed) is all a resume needs. A clip whose file cannot be read is
skipped in the source; a clip DALI cannot decode fails its batch inside DALI: that batch is
redone by the CPU path, the bad clip reported and skipped, and the pipeline rebuilt after it.
"""

from __future__ import annotations

import logging
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from meld_dali.pipelines.graphs import OUTPUTS, clip_pipeline, dali_params
from nvidia.dali import types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from meld_dali.config import DataConfig, LoaderConfig
from meld_dali.data.base import Batch, ClipFailure, LoaderSpec, ManifestLoader
from meld_dali.data.decode import clip_source_path
from meld_dali.data.torch_loader import ClipDataset, collate
from meld_dali.sampling import clip_indices
from meld_dali.transforms import EVAL_PARAMS, draw_params

log = logging.getLogger("meld_dali.pipelines")
# DALI has no bfloat16: a bf16 run gets float16 from DALI (normalized pixels fit it easily)
# and `deliver` casts on the GPU, half the bytes of a float32 round trip.
DALI_DTYPES = {torch.float16: types.FLOAT16, torch.bfloat16: types.FLOAT16,
               torch.float32: types.FLOAT}


DECODERS = ("fn.decoders.video", "fn.decoders.image")


def decode_failure(e: RuntimeError) -> str | None:
    """The reason DALI gives when a decoder failed on the data, or None for any other error
    (out of memory, a bug in the graph or the source), which must surface, not be recovered."""
    text = str(e)
    if not any(op in text for op in DECODERS):
        return None
    after = text.split("encountered:", 1)[-1]
    return next((ln.strip() for ln in after.splitlines() if ln.strip()), "decoder error")


@dataclass
class Span:
    """What one pipeline batch took from the order: the rows read and the ones skipped."""
    rows: list[int]
    failures: list[ClipFailure]


class ClipSource:
    """Batch-mode external source over this rank's order for one epoch."""

    def __init__(self, spec: LoaderSpec, cfg: DataConfig, items: list[int], epoch: int,
                 kind: str):
        # kind: the graph's input, "video" (one encoded file per clip) or "frames" (JPEGs)
        self.spec, self.cfg, self.items, self.epoch, self.kind = spec, cfg, items, epoch, kind
        self.pos = 0
        self.spans: deque[Span] = deque()

    def clip_sample(self, row: int):
        """(encoded, frame indices, params, mask) of one clip; raises OSError on a bad file."""
        m, s, T = self.spec.manifest, self.spec, self.cfg.num_frames
        clip = m.clips[row]
        n = clip["num_frames"]
        idx, mask = clip_indices(n, T, train=s.train, seed=s.seed, epoch=self.epoch, clip=row)
        params = dali_params(draw_params(self.cfg, seed=s.seed, epoch=self.epoch, clip=row)
                             if s.train else EVAL_PARAMS, self.cfg)
        if self.kind == "video":
            encoded = [np.fromfile(clip_source_path(m, clip, s.source), dtype=np.uint8)]
            # padded slots ask for frames past the end: the decoder fills them with 0
            idx = np.where(mask, idx, n + np.arange(T)).astype(np.int32)
        else:
            folder = m.frames_path(clip)
            real = idx[mask]
            files = [folder / f"{i:06d}.jpg" for i in real]
            files += [files[-1]] * (T - len(real))  # padded slots: zeroed after decoding
            encoded = [np.fromfile(f, dtype=np.uint8) for f in files]
        return encoded, idx.astype(np.int32), params, mask

    def __call__(self, info):
        B = self.spec.batch_size
        out: list[list] = [[], [], [], [], [], []]
        span = Span([], [])
        while len(span.rows) - len(span.failures) < B and self.pos < len(self.items):
            row = self.items[self.pos]
            self.pos += 1
            span.rows.append(row)
            try:
                encoded, idx, params, mask = self.clip_sample(row)
            except OSError as e:
                path = str(clip_source_path(self.spec.manifest, self.spec.manifest.clips[row],
                                            self.spec.source))
                span.failures.append(ClipFailure(row, path, f"{type(e).__name__}: {e}"))
                continue
            label = np.array(self.spec.manifest.clips[row]["label"], dtype=np.int64)
            index = np.array(row, dtype=np.int64)
            if self.kind == "video":
                items = [(encoded[0], idx, params, label, index, mask.astype(np.uint8))]
            else:  # one sample per frame, each with its clip's draw
                items = [(e, idx[:1], params, label, index, np.array(m, dtype=np.uint8))
                         for e, m in zip(encoded, mask, strict=True)]
            for item in items:
                for col, value in zip(out, item, strict=True):
                    col.append(value)
        if not out[0]:
            if span.failures:  # only bad clips left: report them with an empty batch
                self.spans.append(span)
            raise StopIteration
        self.spans.append(span)
        return out


class DaliLoader(ManifestLoader):
    """Yields Batch from a DALI pipeline (device 'gpu' = NVDEC/nvJPEG + GPU augmentation,
    'cpu' = DALI's CPU operators). Same interface and position as data.TorchLoader."""

    def __init__(self, spec: LoaderSpec, data: DataConfig, cfg: LoaderConfig, device: str):
        super().__init__(spec)
        self.data, self.cfg, self.device = data, cfg, device
        self.backend = f"dali-{device}"
        self.kind = "frames" if spec.source == "frames" else "video"
        self.dali_dtype = DALI_DTYPES[spec.dtype]

    # ------------------------------------------------------------------ pipeline

    def _build(self, items: list[int]) -> tuple[DALIGenericIterator, ClipSource]:
        source = ClipSource(self.spec, self.data, items, self.position.epoch, self.kind)
        per_clip = 1 if self.kind == "video" else self.data.num_frames
        dev = self.spec.device
        pipe = clip_pipeline(
            source=source, cfg=self.data, is_training=self.spec.train, kind=self.kind,
            device=self.device, dtype=self.dali_dtype,
            batch_size=self.spec.batch_size * per_clip, num_threads=max(1, self.cfg.workers),
            device_id=(dev.index or 0) if self.device == "gpu" else None,
            prefetch_queue_depth=max(1, self.cfg.prefetch), seed=self.spec.seed,
            resize=not (self.kind == "frames"
                        and self.spec.manifest.meta.get("short_side") == self.data.short_side))
        with warnings.catch_warnings():
            # eval graphs leave the augmentation parameters unused: expected, not a problem
            warnings.filterwarnings("ignore", message=".*external source node.*")
            it = DALIGenericIterator([pipe], list(OUTPUTS),
                                     last_batch_policy=LastBatchPolicy.PARTIAL,
                                     auto_reset=False, prepare_first_batch=False)
        return it, source

    def _to_batch(self, d: dict) -> Batch:
        video, label, index = d["video"], d["label"].view(-1), d["index"].view(-1)
        mask = d["mask"].view(-1).bool()
        if self.kind == "frames":  # [B*T, C, H, W] -> [B, C, T, H, W]
            T = self.data.num_frames
            B = video.shape[0] // T
            video = video.view(B, T, *video.shape[1:]).transpose(1, 2)
            mask, label, index = mask.view(B, T), label[::T], index[::T]
        else:
            mask = d["mask"].view(video.shape[0], -1).bool()
        # padded slots: exactly 0 after normalization, like the CPU loader
        video = video * mask[:, None, :, None, None].to(video.dtype)
        return self.deliver(Batch(video, mask, label, index))

    def _batches(self) -> Iterator[Batch]:
        pos = self.position
        while pos.consumed < self.num_clips:
            it, source = self._build(self.remaining())
            try:
                while True:
                    try:
                        out = next(it)
                    except StopIteration:
                        break
                    span = source.spans.popleft()
                    for f in span.failures:
                        self.report(f)
                    pos.consumed += len(span.rows)
                    yield self._to_batch(out[0])
                # trailing spans that only held failures
                while source.spans:
                    span = source.spans.popleft()
                    for f in span.failures:
                        self.report(f)
                    pos.consumed += len(span.rows)
            except RuntimeError as e:
                reason = decode_failure(e)
                if reason is None:  # out of memory, a bug, ...: not the clips' fault
                    raise
                # a clip DALI could not decode: redo this batch on the CPU path
                span = source.spans.popleft()
                batch = self._recover(span, reason)
                pos.consumed += len(span.rows)
                if batch is not None:
                    yield batch
                continue  # rebuild the pipeline after the failed batch
            finally:
                del it
            break

    def _recover(self, span: Span, reason: str) -> Batch | None:
        ds = ClipDataset(self.spec.manifest, self.data, train=self.spec.train,
                         seed=self.spec.seed, source=self.spec.source)
        good_rows = [r for r in span.rows if r not in {f.index for f in span.failures}]
        batch, failures = collate([ds[(self.position.epoch, r)] for r in good_rows])
        for f in span.failures + failures:
            self.report(f)
        if not failures:  # DALI fails a batch as a whole: name the likely clips
            m = self.spec.manifest
            clips = [m.clips[r] for r in good_rows]
            odd = [c for c in clips if c.get("pix_fmt") not in (None, "yuv420p", "yuvj420p")]
            names = ", ".join(str(clip_source_path(m, c, self.spec.source))
                              for c in (odd or clips))
            log.warning("DALI could not decode %s (%s); the CPU path did, its result is used",
                        f"one of {names}" if len(odd or clips) > 1 else names, reason)
        return None if batch is None else self.deliver(batch)
