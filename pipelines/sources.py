"""What feeds the DALI pipelines: one pass's precomputed plans cut into batches (`Pass`),
the clips' files read ahead in a thread pool (`FileReader`), and one batch-mode external
source per pipeline (`ShareSource`).

None of them refers to the loader. The loader owns the pipelines and the pipelines own
their sources: a reference back would be a cycle, freed only by the garbage collector,
possibly inside a forked DataLoader worker, where a DALI pipeline's destructor waits forever
for threads that were not forked.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from meld_dali.pipelines.graphs import dali_params

from meld_dali.clips import Clip
from meld_dali.config import DataConfig
from meld_dali.data.base import ClipFailure
from meld_dali.data.decode import clip_source_path
from meld_dali.data.plan import ClipPlan, frame_union
from meld_dali.manifest import Manifest

FILLER = -1  # the batch position of a filler clip: decoded, then dropped


class Pass:
    """One pass over the rest of an epoch: its plans in order (batch i = plans[i*B:(i+1)*B]),
    which batch the loader merges next, whether the pipelines reached the pass's end, and
    what each pipeline's source did with each batch (the positions it sent, in order, and
    the reads that failed), kept until the loader merges that batch. Positions count units:
    `group` consecutive plans of one clip that the graph decodes once (a training clip's
    `views_per_decode` draws; 1 = each plan on its own)."""

    def __init__(self, epoch: int, plans: list[ClipPlan], batch_size: int, shares: int,
                 group: int = 1):
        self.epoch, self.plans, self.batch_size, self.shares = epoch, plans, batch_size, shares
        self.group = group
        self.next = 0
        self.done = False  # the pipelines ran to the end: the next pass can reset them
        self.sent: dict[tuple[int, int], list[int]] = {}  # (batch, share) -> positions
        self.failed: dict[tuple[int, int], list[tuple[int, ClipFailure]]] = {}

    def batch(self, i: int) -> list[ClipPlan]:
        return self.plans[i * self.batch_size:(i + 1) * self.batch_size]

    def units(self, i: int | None = None) -> list[list[ClipPlan]]:
        """Batch i (or the whole pass) as units (a batch holds whole units: the batch size
        is a multiple)."""
        plans, g = self.plans if i is None else self.batch(i), self.group
        return [plans[u:u + g] for u in range(0, len(plans), g)]

    def record(self, i: int, share: int, sent: list[int],
               failed: list[tuple[int, ClipFailure]]) -> None:
        self.sent[(i, share)], self.failed[(i, share)] = sent, failed

    def take(self, i: int) -> tuple[list[tuple[int, ClipFailure]], list[int]]:
        """Batch i's (position, failure) reads that failed, and the positions the shares
        sent in the order of the pipelines' outputs (FILLER for a filler); then forgotten."""
        failed = [f for j in range(self.shares) for f in self.failed.pop((i, j), [])]
        sent = [k for j in range(self.shares) for k in self.sent.pop((i, j), [])]
        return failed, sent


class FileReader:
    """Reads clips' encoded bytes in a thread pool, ahead of the pipelines (np.fromfile
    releases the GIL): the whole file of a video, or the plan's frames of a frame folder.
    A read error is kept and raised when the plan is taken."""

    def __init__(self, manifest: Manifest, source: str, threads: int):
        self.manifest, self.source = manifest, source
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="dali-read")
        self.pending: dict[ClipPlan, Future] = {}

    def path(self, plan: ClipPlan) -> Path:
        return clip_source_path(self.manifest, self.manifest.clips[plan.row], self.source)

    def read(self, plan: ClipPlan) -> list[np.ndarray]:
        where = self.path(plan)
        if self.source != "frames":
            return [np.fromfile(where, dtype=np.uint8)]
        files = [where / f"{i:06d}.jpg" for i in plan.indices[plan.mask]]
        files += [files[-1]] * (len(plan.indices) - len(files))  # padded slots: see deliver
        return [np.fromfile(f, dtype=np.uint8) for f in files]

    def ahead(self, plans: list[ClipPlan]) -> None:
        for p in plans:
            if p not in self.pending:
                self.pending[p] = self.pool.submit(self.read, p)

    def take(self, plan: ClipPlan) -> list[np.ndarray]:
        fut = self.pending.pop(plan, None) or self.pool.submit(self.read, plan)
        return fut.result()  # raises the read error, if any

    def failure(self, plan: ClipPlan, e: OSError) -> ClipFailure:
        return ClipFailure(plan.row, str(self.path(plan)), f"{type(e).__name__}: {e}")

    def clear(self) -> None:
        for f in self.pending.values():
            f.cancel()
        self.pending.clear()

    def close(self) -> None:
        self.clear()
        self.pool.shutdown(wait=False, cancel_futures=True)


class ShareSource:
    """Batch-mode external source of one of `n` pipelines: its share (positions share,
    share + n, ...) of each batch of the current pass, as DALI samples."""

    def __init__(self, share: int, reader: FileReader, data: DataConfig, prefetch: int):
        self.share, self.reader, self.data, self.prefetch = share, reader, data, prefetch
        self.run: Pass | None = None
        self.i = 0

    def start(self, run: Pass) -> None:
        self.run, self.i = run, 0

    def __call__(self, info):
        run, n = self.run, self.run.shares
        units = run.units(self.i)
        if not units:
            raise StopIteration
        i, self.i = self.i, self.i + 1
        for k in range(1, self.prefetch + 1):  # keep the readers ahead of the decoder
            self.reader.ahead([u[0] for u in run.units(i + k)[self.share::n]])
        out: list[list] = []
        sent, failed = [], []
        for pos in range(self.share, len(units), n):
            try:
                encoded = self.reader.take(units[pos][0])
            except OSError as e:
                failed.append((pos, self.reader.failure(units[pos][0], e)))
                continue
            self.add(out, units[pos], encoded)
            sent.append(pos)
        if not sent:  # nothing of this share is readable: one filler clip, dropped later
            self.add(out, *self.filler(units), filler=True)
            sent.append(FILLER)
        run.record(i, self.share, sent, failed)
        return out

    def add(self, out: list[list], unit: list[ClipPlan], encoded: list[np.ndarray],
            filler: bool = False) -> None:
        """One unit's samples (one per clip for video, one per frame for frame folders); a
        filler's carry index -1 and are dropped after decoding. A unit of several plans
        (video only) is one sample: the union of their frames, decoded once, and each plan's
        order of them in that union, draw and mask (`graphs.clip_pipeline`, `views`)."""
        plan = unit[0]
        clip: Clip = self.reader.manifest.clips[plan.row]
        label = np.array(clip.label, np.int64)
        index = np.array(-1 if filler else plan.row, np.int64)
        if len(unit) > 1:
            T = len(plan.indices)  # padded slots: frames past the end, decoded as 0
            idx = [np.where(p.mask, p.indices, clip.num_frames + np.arange(T)) for p in unit]
            union, orders = frame_union(idx)
            item = [encoded[0], union.astype(np.int32), label, index]
            for p, order in zip(unit, orders, strict=True):
                item += [order.astype(np.int32), dali_params(p.params, self.data),
                         p.mask.astype(np.uint8)]
            self._append(out, [item])
            return
        params = dali_params(plan.params, self.data)
        if self.reader.source != "frames":
            # padded slots ask for frames past the end: the decoder fills them with 0
            T = len(plan.indices)
            idx = np.where(plan.mask, plan.indices, clip.num_frames + np.arange(T))
            items = [(encoded[0], idx.astype(np.int32), params, label, index,
                      plan.mask.astype(np.uint8))]
        else:  # one sample per frame, each with its clip's draw
            items = [(e, plan.indices[:1].astype(np.int32), params, label, index,
                      np.array(m, np.uint8)) for e, m in zip(encoded, plan.mask, strict=True)]
        self._append(out, items)

    @staticmethod
    def _append(out: list[list], items: list) -> None:
        """Samples (one value per output of the source) onto the columns of `out`."""
        if not out:
            out += [[] for _ in items[0]]
        for item in items:
            for col, value in zip(out, item, strict=True):
                col.append(value)

    def filler(self, units: list[list[ClipPlan]]
               ) -> tuple[list[ClipPlan], list[np.ndarray]]:
        """A readable unit (and its bytes) to stand in for a share with nothing readable."""
        for unit in [*units, *self.run.units()]:
            try:
                return unit, self.reader.take(unit[0])
            except OSError:
                continue
        raise RuntimeError("no readable clip left in this epoch")
