"""DaliLoader: the DALI graphs behind the same interface and Batch as the CPU loader.

Every batch is a fixed slice of this rank's `ClipOrder` (B rows, like the CPU loader), so the
order, frame indices, augmentation draws and the position (epoch, clips consumed) are the
CPU loader's. Three things keep the decoders fed:
- the pipelines are built once and reset at each epoch (a rebuild only after a decode
  failure, or when a pass was left before its last batch);
- files are read by a thread pool, `prefetch` batches ahead of the decoders;
- `n_pipes` pipelines each decode a share of every batch (position p goes to pipeline
  p % n_pipes): one decode session cannot use more than one NVDEC engine, and the driver
  spreads simultaneous sessions over the engines. The shares are merged back in order.
A file that cannot be read is skipped and reported; a clip DALI cannot decode fails its
whole batch inside DALI: that batch is redone by the CPU path, the clip named, and the
pipelines rebuilt after it. Any other error (out of memory, a bug) surfaces.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from meld_dali.pipelines.graphs import OUTPUTS, clip_pipeline, dali_params
from nvidia.dali import types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from meld_dali.config import DataConfig, LoaderConfig
from meld_dali.data.base import Batch, ClipFailure, LoaderSpec, ManifestLoader
from meld_dali.data.decode import clip_source_path
from meld_dali.data.torch_loader import ClipDataset, collate
from meld_dali.hardware import decodes, nvdec_engines
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
    if not any(op in text for op in DECODERS) or any(
            s in text for s in ("out of memory", "CUDA error", "cudaError")):
        return None
    after = text.split("encountered:", 1)[-1]
    return next((ln.strip() for ln in after.splitlines() if ln.strip()), "decoder error")


def auto_pipelines(device: str, kind: str, device_index: int = 0) -> int:
    """How many pipelines (decode sessions) to run: for video on a GPU, one per NVDEC engine
    (hardware.GPUS; 2 on a GPU not in the table); else one."""
    if device != "gpu" or kind != "video" or not torch.cuda.is_available():
        return 1
    return nvdec_engines(torch.cuda.get_device_name(device_index))


class FileReader:
    """Reads clips' encoded bytes in a thread pool, ahead of the pipelines (np.fromfile
    releases the GIL). A read error is kept and reported when the clip is taken."""

    def __init__(self, loader: DaliLoader, threads: int):
        self.loader = weakref.proxy(loader)  # no cycle: the loader frees its pipelines
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="dali-read")
        self.pending: dict[tuple[int, int], Future] = {}

    def read(self, epoch: int, row: int) -> list[np.ndarray]:
        s, m = self.loader.spec, self.loader.spec.manifest
        clip = m.clips[row]
        if self.loader.kind == "video":
            return [np.fromfile(clip_source_path(m, clip, s.source), dtype=np.uint8)]
        folder = clip_source_path(m, clip, s.source)
        idx, mask = self.loader.indices(row, epoch)
        files = [folder / f"{i:06d}.jpg" for i in idx[mask]]
        files += [files[-1]] * (len(idx) - len(files))  # padded slots: zeroed after decoding
        return [np.fromfile(f, dtype=np.uint8) for f in files]

    def ahead(self, epoch: int, rows: list[int]) -> None:
        for r in rows:
            if (epoch, r) not in self.pending:
                self.pending[(epoch, r)] = self.pool.submit(self.read, epoch, r)

    def take(self, epoch: int, row: int) -> list[np.ndarray]:
        fut = self.pending.pop((epoch, row), None) or self.pool.submit(self.read, epoch, row)
        return fut.result()  # raises the read error, if any

    def clear(self) -> None:
        for f in self.pending.values():
            f.cancel()
        self.pending.clear()

    def close(self) -> None:
        self.clear()
        self.pool.shutdown(wait=False, cancel_futures=True)


class ShareSource:
    """Batch-mode external source of one pipeline: its share (positions j, j+n, ...) of each
    batch of the current pass. Batch i of a pass is rows[i*B:(i+1)*B]."""

    def __init__(self, loader: DaliLoader, share: int):
        # a weak reference: pipeline -> source -> loader -> pipeline would be a cycle, freed
        # only by the garbage collector, possibly inside a forked DataLoader worker, where a
        # DALI pipeline's destructor waits forever for threads that were not forked
        self.loader, self.share = weakref.proxy(loader), share
        self.i = 0
        self.failures: dict[int, list[ClipFailure]] = {}  # batch -> read failures
        self.emitted: dict[int, list[int]] = {}  # batch -> rows sent, in order (-1: filler)

    def start(self) -> None:
        self.i = 0
        self.failures.clear()
        self.emitted.clear()

    def __call__(self, info):
        L = self.loader
        rows = L.batch_rows(self.i)
        if not rows:
            raise StopIteration
        i, self.i = self.i, self.i + 1
        for k in range(1, L.cfg.prefetch + 1):  # keep the readers ahead of the decoder
            L.reader.ahead(L.pass_epoch, L.batch_rows(i + k)[self.share::L.n_pipes])
        out: list[list] = [[], [], [], [], [], []]
        fails, sent = self.failures.setdefault(i, []), self.emitted.setdefault(i, [])
        for row in rows[self.share::L.n_pipes]:
            try:
                encoded = L.reader.take(L.pass_epoch, row)
            except OSError as e:
                path = str(clip_source_path(L.spec.manifest, L.spec.manifest.clips[row],
                                            L.spec.source))
                fails.append(ClipFailure(row, path, f"{type(e).__name__}: {e}"))
                continue
            L.add_samples(out, row, encoded)
            sent.append(row)
        if not out[0]:  # nothing of this share is readable: one filler clip, dropped later
            L.add_samples(out, *L.filler(rows), filler=True)
            sent.append(-1)
        return out


class DaliLoader(ManifestLoader):
    """Yields Batch from DALI pipelines (device 'gpu' = NVDEC/nvJPEG + GPU augmentation,
    'cpu' = DALI's CPU operators). Same interface and position as the CPU loader."""

    def __init__(self, spec: LoaderSpec, data: DataConfig, cfg: LoaderConfig, device: str):
        super().__init__(spec)
        self.data, self.cfg, self.device = data, cfg, device
        self.backend = f"dali-{device}"
        self.kind = "frames" if spec.source == "frames" else "video"
        self.dali_dtype = DALI_DTYPES[spec.dtype]
        dev_index = spec.device.index or 0
        wanted = cfg.dali_pipelines or auto_pipelines(device, self.kind, dev_index)
        self.n_pipes = max(1, min(wanted, spec.batch_size))  # no pipeline without a clip
        self.reader = FileReader(self, cfg.num_workers)
        self.its: list[DALIGenericIterator] = []  # one per pipeline, run in lockstep
        self.sources: list[ShareSource] = []
        self.pass_rows: list[int] = []  # the rows this pass reads (the rest of an epoch)
        self.pass_epoch = -1
        self.builds = 0  # pipelines built so far (tests: reused across epochs)
        self._clean = False  # the last pass ran to the end: the pipelines can be reset

    # ------------------------------------------------------------------ samples

    def indices(self, row: int, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        n = self.spec.manifest.clips[row].num_frames
        return clip_indices(n, self.data.num_frames, train=self.spec.train, seed=self.spec.seed,
                            epoch=self.pass_epoch if epoch is None else epoch, clip=row)

    def add_samples(self, out: list[list], row: int, encoded: list[np.ndarray],
                    filler: bool = False) -> None:
        """One clip's samples (one per clip for video, one per frame for frame folders); a
        filler's samples carry index -1 and are dropped after decoding."""
        s, T = self.spec, self.data.num_frames
        clip = s.manifest.clips[row]
        idx, mask = self.indices(row)
        params = dali_params(draw_params(self.data, seed=s.seed, epoch=self.pass_epoch,
                                         clip=row) if s.train else EVAL_PARAMS, self.data)
        label, index = np.array(clip.label, np.int64), np.array(-1 if filler else row, np.int64)
        if self.kind == "video":
            # padded slots ask for frames past the end: the decoder fills them with 0
            idx = np.where(mask, idx, clip.num_frames + np.arange(T)).astype(np.int32)
            items = [(encoded[0], idx, params, label, index, mask.astype(np.uint8))]
        else:  # one sample per frame, each with its clip's draw
            items = [(e, idx[:1].astype(np.int32), params, label, index, np.array(m, np.uint8))
                     for e, m in zip(encoded, mask, strict=True)]
        for item in items:
            for col, value in zip(out, item, strict=True):
                col.append(value)

    def filler(self, rows: list[int]) -> tuple[int, list[np.ndarray]]:
        """(row, bytes) of a readable clip to stand in for a share with nothing readable."""
        for r in [*rows, *self.pass_rows]:
            try:
                return r, self.reader.take(self.pass_epoch, r)
            except OSError:
                continue
        raise RuntimeError("no readable clip left in this epoch")

    def batch_rows(self, i: int) -> list[int]:
        B = self.spec.batch_size
        return self.pass_rows[i * B:(i + 1) * B]

    # ------------------------------------------------------------------ pipelines

    def _build(self) -> None:
        self._close_pipelines()
        self.sources = [ShareSource(self, j) for j in range(self.n_pipes)]
        per_clip = 1 if self.kind == "video" else self.data.num_frames
        B = -(-self.spec.batch_size // self.n_pipes)  # the largest share of a batch
        dev = self.spec.device
        resize = not self._at_short_side()
        pipes = [clip_pipeline(
            source=src, cfg=self.data, is_training=self.spec.train, kind=self.kind,
            device=self.device, dtype=self.dali_dtype, batch_size=B * per_clip,
            num_threads=max(1, self.cfg.num_workers // self.n_pipes),
            device_id=(dev.index or 0) if self.device == "gpu" else None,
            prefetch_queue_depth=max(1, self.cfg.prefetch), seed=self.spec.seed,
            resize=resize) for src in self.sources]
        with warnings.catch_warnings():
            # eval graphs leave the augmentation parameters unused: expected, not a problem
            warnings.filterwarnings("ignore", message=".*external source node.*")
            # one iterator per pipeline: DALI's own takes several only with a known size
            self.its = [DALIGenericIterator([p], list(OUTPUTS),
                                            last_batch_policy=LastBatchPolicy.PARTIAL,
                                            auto_reset=False, prepare_first_batch=False)
                        for p in pipes]
        self.builds += 1

    def _at_short_side(self) -> bool:
        """Every clip this loader reads is stored at the training short side already (frame
        folders, or a cache with no clip left to its source video): no resize in the graph."""
        m, S = self.spec.manifest, self.data.short_side
        if self.spec.source == "frames":
            return m.meta.get("short_side") == S
        if self.spec.source == "cache":
            return m.cache_short_side == S and all(
                m.clips[r].cache for r in m.ok(self.spec.split))
        return False

    def _start_pass(self) -> None:
        """Point the sources at the rest of the current epoch: reset the pipelines when the
        last pass ended cleanly, build them otherwise."""
        self.pass_rows, self.pass_epoch = self.remaining(), self.position.epoch
        self.reader.clear()
        for src in self.sources:
            src.start()
        if self.its and self._clean:
            for it in self.its:  # DALI calls the sources again: they read the new pass
                it.reset()
        else:
            self._build()
        self._clean = False

    def _close_pipelines(self) -> None:
        self.its = []

    def _batches(self) -> Iterator[Batch]:
        pos = self.position
        while pos.consumed < self.num_clips:
            self._start_pass()
            i = 0
            try:
                while not self._clean:
                    try:  # the sources stop together: batch rows run out for every share
                        outs = [next(it)[0] for it in self.its]
                    except StopIteration:
                        self._clean = True
                        break
                    rows = self.batch_rows(i)
                    _, sent = self._take_records(i)
                    pos.consumed += len(rows)
                    i += 1
                    batch = self._merge(outs, rows, sent)
                    if not self.batch_rows(i):
                        self._end_pass()
                    if batch is not None:
                        yield batch
            except RuntimeError as e:
                reason = decode_failure(e)
                if reason is None:  # out of memory, a bug, ...: not the clips' fault
                    raise
                # a clip DALI could not decode: redo this batch on the CPU path, then build
                # the pipelines again from the next batch
                rows = self.batch_rows(i)
                read_failed, _ = self._take_records(i)
                pos.consumed += len(rows)
                self._close_pipelines()
                batch = self._recover([r for r in rows if r not in read_failed], reason)
                if batch is not None:
                    yield batch
                continue
            break

    def _end_pass(self) -> None:
        """After the pass's last batch, let the iterators reach their end now (the sources
        have no rows left), so a consumer that stops right after that batch, as the trainer
        does, still leaves pipelines that the next epoch resets instead of rebuilding."""
        for it in self.its:
            try:
                next(it)
            except StopIteration:
                continue
            raise RuntimeError("DALI produced a batch past the end of the pass")  # a bug
        self._clean = True

    def _take_records(self, i: int) -> tuple[set[int], list[int]]:
        """Batch i's read failures (reported now) and the rows the shares sent, in the order
        of the pipelines' outputs (-1 for a filler)."""
        failed = [f for src in self.sources for f in src.failures.pop(i, [])]
        for f in failed:
            self.report(f)
        sent = [r for src in self.sources for r in src.emitted.pop(i, [])]
        return {f.index for f in failed}, sent

    def _merge(self, outs: list[dict], rows: list[int], sent: list[int]) -> Batch | None:
        """The pipelines' shares -> one Batch in the order of `rows`, fillers dropped. The
        order is worked out on the host from what the sources sent: reading anything back
        from the GPU here would wait for the training step queued before it."""
        parts = [self._clips_of(d) for d in outs]
        video, mask, label, index = (parts[0] if len(parts) == 1 else
                                     (torch.cat([p[k] for p in parts]) for k in range(4)))
        where = {r: k for k, r in enumerate(rows)}
        perm = sorted((k for k, r in enumerate(sent) if r >= 0), key=lambda k: where[sent[k]])
        if not perm:
            return None
        if perm != list(range(len(sent))):
            idx = torch.tensor(perm)
            if video.is_cuda:
                idx = idx.pin_memory().to(video.device, non_blocking=True)
            video, mask, label, index = (t.index_select(0, idx)
                                         for t in (video, mask, label, index))
        # padded slots: exactly 0 after normalization, like the CPU loader
        video = video * mask[:, None, :, None, None].to(video.dtype)
        return self.deliver(Batch(video, mask, label, index))

    def _clips_of(self, d: dict):
        video, label, index = d["video"], d["label"].view(-1), d["index"].view(-1)
        if self.kind == "frames":  # [B*T, C, H, W] -> [B, C, T, H, W]
            T = self.data.num_frames
            B = video.shape[0] // T
            video = video.view(B, T, *video.shape[1:]).transpose(1, 2)
            return video, d["mask"].view(B, T).bool(), label[::T], index[::T]
        return video, d["mask"].view(video.shape[0], -1).bool(), label, index

    def _recover(self, good_rows: list[int], reason: str) -> Batch | None:
        ds = ClipDataset(self.spec.manifest, self.data, train=self.spec.train,
                         seed=self.spec.seed, source=self.spec.source)
        batch, failures = collate([ds[(self.pass_epoch, r)] for r in good_rows])
        for f in failures:
            self.report(f)
        if not failures:  # DALI fails a batch as a whole: name the likely clips
            m = self.spec.manifest
            clips = [m.clips[r] for r in good_rows]
            # the source's format names suspects only when the source is what DALI read
            odd = ([c for c in clips
                    if not decodes(self.backend, c.codec, c.pix_fmt, c.profile)]
                   if self.spec.source == "video" else [])
            names = ", ".join(str(clip_source_path(m, c, self.spec.source))
                              for c in (odd or clips))
            log.warning("DALI could not decode %s (%s); the CPU path did, its result is used",
                        f"one of {names}" if len(odd or clips) > 1 else names, reason)
        return None if batch is None else self.deliver(batch)

    def close(self) -> None:
        """Free the pipelines and the reader threads now (they are rebuilt if iterated)."""
        self._close_pipelines()
        self._clean = False
        self.reader.clear()

    def __del__(self):
        reader = getattr(self, "reader", None)
        if reader is not None:
            reader.close()
