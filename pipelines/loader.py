"""DaliLoader: the DALI graphs behind the same interface and Batch as the CPU loader.

Every batch is a fixed slice of the plans of this rank's `ClipOrder` (B plans, like the CPU
loader; the plans made by the same `ClipDataset.plan`), so the order, frame indices,
augmentation draws, test views and the position (epoch, plans consumed) are the CPU
loader's. The loader builds the pipelines, starts a `Pass` (the sources read its plans) and
merges the pipelines' outputs. Three things keep the decoders fed:
- the pipelines are built once and reset at each epoch (a rebuild only after a decode
  failure, or when a pass was left before its last batch);
- files are read by a thread pool, `prefetch` batches ahead of the decoders;
- `n_pipes` pipelines each decode a share of every batch (position p goes to pipeline
  p % n_pipes): one decode session cannot use more than one NVDEC engine, and the driver
  spreads simultaneous sessions over the engines. The shares are merged back in order.
A file that cannot be read is skipped and reported. A decoder failure fails its whole batch
inside DALI: `faults.classify` reads it. A device fault (no NVDEC, a CUDA error, device
memory) stops the run at once. Any other decoder failure is redone by the CPU path: a clip
the CPU path cannot read either is a bad clip, skipped and reported; a batch it reads whole
is the backend's fault, counted (`counts.cpu_redone_batches`), and `FAULT_LIMIT` of those in
a row stop the run in one line. Any other error (a bug) surfaces as it is.
"""

from __future__ import annotations

import logging
import warnings
from collections import deque
from collections.abc import Iterator

import torch
from meld_dali.pipelines.faults import FAULT_LIMIT, DaliFailure, classify
from meld_dali.pipelines.graphs import clip_pipeline, outputs
from meld_dali.pipelines.sources import FILLER, FileReader, Pass, ShareSource
from nvidia.dali import types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from meld_dali.config import DataConfig, LoaderConfig
from meld_dali.data.base import Batch, LoaderSpec, ManifestLoader
from meld_dali.data.decode import clip_source_path
from meld_dali.data.plan import ClipPlan
from meld_dali.data.torch_loader import ClipDataset, collate
from meld_dali.errors import BackendFault
from meld_dali.hardware import DECODERS, decodes, nvdec_engines

log = logging.getLogger("meld_dali.pipelines")
# DALI has no bfloat16: a bf16 run gets float16 from DALI (normalized pixels fit it easily)
# and `deliver` casts on the GPU, half the bytes of a float32 round trip.
DALI_DTYPES = {torch.float16: types.FLOAT16, torch.bfloat16: types.FLOAT16,
               torch.float32: types.FLOAT}


def auto_pipelines(device: str, kind: str, device_index: int = 0) -> int:
    """How many pipelines (decode sessions) to run: for video on a GPU, one per NVDEC engine
    (hardware.GPUS; 2 on a GPU not in the table); else one."""
    if device != "gpu" or kind != "video" or not torch.cuda.is_available():
        return 1
    return nvdec_engines(torch.cuda.get_device_name(device_index))



class DaliLoader(ManifestLoader):
    """Yields Batch from DALI pipelines (`dali_device` 'gpu' = NVDEC/nvJPEG + GPU
    augmentation, 'cpu' = DALI's CPU operators; the batches go to `spec.device` either way).
    Same interface and position as the CPU loader."""

    def __init__(self, spec: LoaderSpec, data: DataConfig, loader_cfg: LoaderConfig,
                 device: str):
        super().__init__(spec)
        self.data, self.loader_cfg, self.dali_device = data, loader_cfg, device
        self.backend = f"dali-{device}"
        self.kind = "frames" if spec.source == "frames" else "video"
        self.dali_dtype = DALI_DTYPES[spec.dtype]
        # plans decoded as one: a video clip's training draws (views_per_decode); frame
        # folders decode frame by frame, each draw's own (little of two draws' is shared)
        self.group = spec.views_per_decode if self.kind == "video" else 1
        dev_index = spec.device.index or 0
        wanted = loader_cfg.dali_pipelines or auto_pipelines(device, self.kind, dev_index)
        units = spec.batch_size // self.group
        self.n_pipes = max(1, min(wanted, units))  # no pipeline without a clip
        # the plans (the CPU loader's own) and the CPU path that redoes a batch DALI fails
        self.dataset = ClipDataset(spec.manifest, data, train=spec.train, seed=spec.seed,
                                   source=spec.source)
        self.reader = FileReader(spec.manifest, spec.source, loader_cfg.num_workers)
        self.its: list[DALIGenericIterator] = []  # one per pipeline, run in lockstep
        self.sources: list[ShareSource] = []
        self.run: Pass | None = None  # the current (or last) pass
        self.builds = 0  # pipelines built so far (tests: reused across epochs)
        self.fault_streak = 0  # batches in a row DALI failed and the CPU path read whole
        self.last_fault = ""  # DALI's message for the last batch the CPU path redid
        # each DALI output with the CUDA event after the copy that consumes it (see _hold)
        self._held: deque[tuple[torch.cuda.Event, list[dict]]] = deque()

    # ------------------------------------------------------------------ pipelines

    def _build(self) -> None:
        self._close_pipelines()
        self.sources = [ShareSource(j, self.reader, self.data, self.loader_cfg.prefetch)
                        for j in range(self.n_pipes)]
        for src in self.sources:
            src.start(self.run)
        per_clip = 1 if self.kind == "video" else self.data.num_frames
        B = -(-self.spec.batch_size // self.group // self.n_pipes)  # a share's most units
        dev = self.spec.device
        resize = not self._at_short_side()
        pipes = [clip_pipeline(
            source=src, data=self.data, is_training=self.spec.train, kind=self.kind,
            device=self.dali_device, dtype=self.dali_dtype, batch_size=B * per_clip,
            num_threads=max(1, self.loader_cfg.num_workers // self.n_pipes),
            device_id=(dev.index or 0) if self.dali_device == "gpu" else None,
            prefetch_queue_depth=max(1, self.loader_cfg.prefetch), seed=self.spec.seed,
            resize=resize, views=self.group) for src in self.sources]
        with warnings.catch_warnings():
            # graphs may leave an external source output unused: expected, not a problem
            warnings.filterwarnings("ignore", message=".*external source node.*")
            # one iterator per pipeline: DALI's own takes several only with a known size
            self.its = [DALIGenericIterator([p], list(outputs(self.group)),
                                            last_batch_policy=LastBatchPolicy.PARTIAL,
                                            auto_reset=False, prepare_first_batch=False)
                        for p in pipes]
        self.builds += 1

    def _at_short_side(self) -> bool:
        """Every clip this loader reads is stored at the training short side already (frame
        folders, or a cache with no clip left to its source video): no resize in the graph.
        A graph is built once for all clips, so this is decided from the manifest (the CPU
        path needs no decision: its resize returns frames already at the size untouched)."""
        m, S = self.spec.manifest, self.data.short_side
        if self.spec.source == "frames":
            return m.meta.get("short_side") == S
        if self.spec.source == "cache":
            return m.cache_short_side == S and all(
                m.clips[r].cache for r in m.ok(self.spec.split))
        return False

    def _start_pass(self) -> Pass:
        """A Pass over the rest of the current epoch, its plans made now; the pipelines are
        reset when the last pass ran to its end, built otherwise."""
        epoch = self.position.epoch
        plans = [self.dataset.plan(epoch, row, view) for row, view in self.remaining()]
        reuse = bool(self.its) and self.run is not None and self.run.done
        self.run = Pass(epoch, plans, self.spec.batch_size, self.n_pipes, self.group)
        self.reader.clear()
        if not reuse:
            self._build()
            return self.run
        for src in self.sources:
            src.start(self.run)
        for it in self.its:  # DALI calls the sources again: they read the new pass
            it.reset()
        return self.run

    def _close_pipelines(self) -> None:
        self.its = []
        for done, _ in self._held:  # the pipelines' memory goes with them: copies first
            done.synchronize()
        self._held.clear()

    # ------------------------------------------------------------------ batches

    def _batches(self) -> Iterator[Batch]:
        while self.position.consumed < self.num_plans:
            run = self._start_pass()
            try:
                yield from self._run(run)
            except RuntimeError as e:
                failure = classify(e)
                if failure is None:  # a bug in the graph or the source: surfaces as it is
                    raise
                if failure.kind == "device":  # no NVDEC, a CUDA fault: redoing hides it
                    raise BackendFault(self.backend, failure.reason, failure.cause) from e
                # a decoder failed on this batch: the CPU path redoes it and judges the clips;
                # the pipelines are built again from the next batch
                batch = self._recover(run, failure)
                if batch is not None:
                    yield batch
                continue
            break

    def _run(self, run: Pass) -> Iterator[Batch]:
        """The pass's batches, merged from the pipelines' shares."""
        while not run.done:
            try:  # the sources stop together: the pass's plans run out for every share
                outs = [next(it)[0] for it in self.its]
            except StopIteration:
                run.done = True
                return
            _, sent = self._take(run)
            batch = self._merge(outs, sent)
            if not run.batch(run.next):
                self._end_pass(run)
            if batch is not None:
                self.counts.backend_batches += 1
                self.fault_streak = 0
                yield batch

    def _end_pass(self, run: Pass) -> None:
        """After the pass's last batch, let the iterators reach their end now (the sources
        have no plans left), so a consumer that stops right after that batch, as the trainer
        does, still leaves pipelines that the next epoch resets instead of rebuilding."""
        for it in self.its:
            try:
                next(it)
            except StopIteration:
                continue
            raise RuntimeError("DALI produced a batch past the end of the pass")  # a bug
        run.done = True

    def _take(self, run: Pass) -> tuple[set[int], list[int]]:
        """Take the pass's next batch: its read failures are reported, the position moves
        past all its plans. Returns the positions of the plans whose read failed and the
        units the shares sent, in the order of the pipelines' outputs."""
        failed, sent = run.take(run.next)
        for _, f in failed:
            self.report(f)
        self.position.consumed += len(run.batch(run.next))
        run.next += 1
        g = self.group
        return {pos * g + j for pos, _ in failed for j in range(g)}, sent

    def _merge(self, outs: list[dict], sent: list[int]) -> Batch | None:
        """The pipelines' shares -> one Batch in the order of the batch's plans, fillers
        dropped. The order is worked out on the host from what the sources sent: reading
        anything back from the GPU here would wait for the training step queued before it.
        A unit's draws (views_per_decode) come out together, in draw order."""
        parts = [self._clips_of(d) for d in outs]
        video, mask, label, index = (parts[0] if len(parts) == 1 else
                                     (torch.cat([p[k] for p in parts]) for k in range(4)))
        perm = sorted((k for k, pos in enumerate(sent) if pos != FILLER), key=sent.__getitem__)
        if not perm:
            return None
        if perm != list(range(len(sent))):
            idx = torch.tensor(perm)
            if video.is_cuda:
                idx = idx.pin_memory().to(video.device, non_blocking=True)
            video, mask, label, index = (t.index_select(0, idx)
                                         for t in (video, mask, label, index))
        g = self.group  # [units, draws, ...] -> [plans, ...]
        video, mask = video.flatten(0, 1), mask.flatten(0, 1)
        label, index = label.repeat_interleave(g), index.repeat_interleave(g)
        batch = self.deliver(Batch(video, mask, label, index))  # a copy in new memory
        self._hold(outs)
        return batch

    def _hold(self, outs: list[dict]) -> None:
        """Keep DALI's outputs alive until the GPU has run the copy that reads them. DALI 2.x
        (exec_dynamic, its default) hands each output to torch through DLPack
        (plugin/pytorch DALIGenericIterator: `torch.from_dlpack`, no copy), and the last
        reference dropped returns the memory to DALI's pool, which the next iteration may
        reuse while `deliver`'s kernels are still queued on torch's stream. So each batch's
        outputs stay here, with an event recorded after those kernels, until it has passed.
        On the CPU `deliver` ran to its end already: nothing to hold."""
        video = outs[0]["video" if self.group == 1 else "video0"]
        if not video.is_cuda:
            return
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(video.device))
        self._held.append((done, outs))
        while self._held and self._held[0][0].query():  # passed: DALI may reuse them
            self._held.popleft()

    def _clips_of(self, d: dict):
        """One pipeline's output as units: video [U, draws, C, T, H, W], mask [U, draws,
        T], label and index [U]."""
        label, index = d["label"].view(-1), d["index"].view(-1)
        if self.kind == "frames":  # [B*T, C, H, W] -> [B, 1, C, T, H, W]
            video, T = d["video"], self.data.num_frames
            B = video.shape[0] // T
            video = video.view(B, 1, T, *video.shape[1:]).transpose(2, 3)
            return video, d["mask"].view(B, 1, T).bool(), label[::T], index[::T]
        if self.group == 1:
            video = d["video"]
            return video[:, None], d["mask"].view(video.shape[0], 1, -1).bool(), label, index
        draws = range(self.group)
        video = torch.stack([d[f"video{v}"] for v in draws], 1)
        mask = torch.stack([d[f"mask{v}"].view(video.shape[0], -1) for v in draws], 1)
        return video, mask.bool(), label, index

    def _recover(self, run: Pass, failure: DaliFailure) -> Batch | None:
        """Redo the batch DALI failed on with the CPU path, which judges its clips. A clip
        the CPU path cannot read either is a bad clip (reported: it explains DALI's failure).
        A batch it reads whole was the backend's fault: counted, and the FAULT_LIMIT-th in a
        row stops the run instead of being delivered."""
        plans = run.batch(run.next)
        read_failed, _ = self._take(run)
        self._close_pipelines()
        good = [p for k, p in enumerate(plans) if k not in read_failed]
        batch, failures = collate([self.dataset.load_raw(p) for p in good])
        for f in failures:
            self.report(f)
        if failures:
            self.fault_streak = 0
        elif good:
            self.fault_streak += 1
            if self.fault_streak >= FAULT_LIMIT:
                raise BackendFault(self.backend, failure.reason, self._likely_cause(good))
            self._name_suspects(good, failure.reason)
        if batch is None:
            return None
        self.counts.cpu_redone_batches += 1
        self.last_fault = failure.reason
        return self.deliver(batch)

    def _name_suspects(self, plans: list[ClipPlan], reason: str) -> None:
        m = self.spec.manifest
        clips = list({p.row: m.clips[p.row] for p in plans}.values())
        # the source's format names suspects only when the source is what DALI read
        odd = ([c for c in clips if not decodes(self.backend, c.codec, c.pix_fmt, c.profile)]
               if self.spec.source == "video" else [])
        names = ", ".join(str(clip_source_path(m, c, self.spec.source)) for c in (odd or clips))
        log.warning("DALI could not decode %s (%s); the CPU path did, its result is used "
                    "(%d of %d such batches in a row stop the run)",
                    f"one of {names}" if len(odd or clips) > 1 else names, reason,
                    self.fault_streak, FAULT_LIMIT)

    def _likely_cause(self, plans: list[ClipPlan]) -> str:
        m = self.spec.manifest
        clips = [m.clips[p.row] for p in plans]
        if self.spec.source == "video":
            odd = sorted({c.codec or "?" for c in clips
                          if not decodes(self.backend, c.codec, c.pix_fmt, c.profile)})
            if odd:
                return (f"{DECODERS[self.backend].name} does not take these clips "
                        f"({', '.join(odd)}), on {FAULT_LIMIT} batches in a row; the CPU "
                        "path reads them")
        hint = (" (NVDEC missing or unable to decode them?)" if self.dali_device == "gpu"
                else "")
        return (f"DALI's decoder failed on {FAULT_LIMIT} batches in a row whose clips the CPU "
                f"path reads: the backend is at fault, not the clips{hint}")

    def close(self) -> None:
        """Free the pipelines and the reader threads now (they are rebuilt if iterated)."""
        self._close_pipelines()
        self.run = None
        self.reader.clear()

    def __del__(self):
        reader = getattr(self, "reader", None)
        if reader is not None:
            reader.close()
