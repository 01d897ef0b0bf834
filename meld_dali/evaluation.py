"""Scoring a split: predictions over every clip once (gathered over DDP ranks), metrics, and
the per-clip rows that tracking shows. Used by the trainer each epoch and by `evaluate`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from meld_dali.config import EMOTIONS
from meld_dali.metrics import classification_metrics


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


@torch.no_grad()
def predict_loader(net: nn.Module, loader, device: torch.device, amp_dtype, dist: Dist,
                   on_batch=None):
    """(labels, probabilities [N, 7], manifest rows) over a whole split, every clip once,
    gathered over ranks; a multi-view loader's views of a clip averaged into one
    (`average_views`). `on_batch(batches_done, clips_done)`, if given, follows progress."""
    net.eval()
    labels, probs, rows = [], [], []
    clips = 0
    for done, batch in enumerate(loader, 1):
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            logits = net(batch.video, batch.mask)
        probs.append(logits.float().softmax(-1).cpu())
        labels.append(batch.label.cpu())
        rows.append(batch.index.cpu())
        clips += len(batch)
        if on_batch is not None:
            on_batch(done, clips)
    if labels:
        labels, probs, rows = average_views(torch.cat(labels), torch.cat(probs),
                                            torch.cat(rows))
    else:
        labels, probs, rows = (torch.zeros(0, dtype=torch.int64),
                               torch.zeros(0, len(EMOTIONS)), torch.zeros(0, dtype=torch.int64))
    return gather(labels, probs, rows, dist)


def average_views(labels: torch.Tensor, probs: torch.Tensor, rows: torch.Tensor):
    """One prediction per manifest row, in row order: the mean softmax of the row's views
    (multi-view testing delivers a clip once per view; a clip's views all go to one rank).
    With one view per row the probabilities come back unchanged, bit for bit."""
    uniq, inverse, counts = torch.unique(rows, return_inverse=True, return_counts=True)
    total = probs.new_zeros(len(uniq), probs.shape[1]).index_add_(0, inverse, probs)
    return uniq.new_empty(len(uniq)).scatter_(0, inverse, labels), total / counts[:, None], uniq


def gather(labels: torch.Tensor, probs: torch.Tensor, rows: torch.Tensor, dist: Dist):
    """All ranks' predictions, each clip once, in manifest order."""
    if dist.world > 1:
        parts = gather_objects((labels, probs, rows), dist)
        labels = torch.cat([p[0] for p in parts])
        probs = torch.cat([p[1] for p in parts])
        rows = torch.cat([p[2] for p in parts])
        order = torch.argsort(rows)
        labels, probs, rows = labels[order], probs[order], rows[order]
    return labels.numpy(), probs.numpy(), rows.numpy()


def agree(flag: bool, dist: Dist, device: torch.device, any_rank: bool = False) -> bool:
    """One flag agreed over ranks: every rank's (MIN) or, with any_rank, any rank's (MAX).
    A collective: every rank calls it at the same point. One process: the flag itself."""
    if dist.world == 1:
        return flag
    import torch.distributed as tdist

    t = torch.tensor([int(flag)], device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX if any_rank else tdist.ReduceOp.MIN)
    return bool(t.item())


def gather_objects(obj, dist: Dist) -> list:
    """Every rank's `obj`, in rank order (a collective; one process: [obj])."""
    if dist.world == 1:
        return [obj]
    import torch.distributed as tdist

    parts: list = [None] * dist.world
    tdist.all_gather_object(parts, obj)
    return parts


def average_grads(model: nn.Module, dist: Dist) -> None:
    """Average gradients over ranks by hand (what DDP's backward does for a synced step)."""
    if dist.world > 1:
        import torch.distributed as tdist

        for p in model.parameters():
            if p.grad is not None:
                tdist.all_reduce(p.grad)
                p.grad.div_(dist.world)


def share_rank0_buffers(model: nn.Module, dist: Dist) -> None:
    """BatchNorm running statistics drift apart per rank (DDP runs with
    broadcast_buffers=False): evaluate every shard with rank 0's, the checkpoint's."""
    if dist.world > 1:
        import torch.distributed as tdist

        for buf in model.buffers():
            tdist.broadcast(buf, src=0)


def score(labels: np.ndarray, probs: np.ndarray, rows: np.ndarray,
          clip_ids: list[str]) -> tuple[dict, list[dict]]:
    """Metrics of the predictions, and one row per clip (id, true, predicted, confidence)."""
    pred = probs.argmax(1)
    conf = probs.max(1)
    predictions = [
        {"clip_id": clip_ids[r] if r < len(clip_ids) else str(r),
         "true": EMOTIONS[y], "predicted": EMOTIONS[p], "confidence": float(c)}
        for r, y, p, c in zip(rows.tolist(), labels.tolist(), pred.tolist(), conf.tolist(),
                              strict=True)]
    return classification_metrics(labels, pred), predictions
