"""Scoring a split: predictions over every clip once (gathered over DDP ranks), metrics, and
the per-clip rows that tracking shows. Used by the trainer each epoch and by `evaluate`."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from meld_dali.config import EMOTIONS
from meld_dali.distributed import Dist
from meld_dali.metrics import classification_metrics
from meld_dali.runtime import Runtime


@torch.no_grad()
def predict_loader(net: nn.Module, loader, runtime: Runtime, dist: Dist | None = None,
                   on_batch=None):
    """(labels, probabilities [N, 7], manifest rows) over a whole split, every clip once,
    gathered over ranks, run as `runtime` says (the trainer's own autocast); a multi-view
    loader's views of a clip averaged into one (`average_views`). `on_batch(batches_done,
    clips_done)`, if given, follows progress."""
    net.eval()
    labels, probs, rows = [], [], []
    clips = 0
    for done, batch in enumerate(loader, 1):
        with runtime.autocast():
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
    return gather(labels, probs, rows, dist or Dist())


def average_views(labels: torch.Tensor, probs: torch.Tensor, rows: torch.Tensor):
    """One prediction per manifest row, in row order: the mean softmax of the row's views
    (multi-view testing delivers a clip once per view; a clip's views all go to one rank).
    With one view per row the probabilities come back unchanged, bit for bit."""
    uniq, inverse, counts = torch.unique(rows, return_inverse=True, return_counts=True)
    total = probs.new_zeros(len(uniq), probs.shape[1]).index_add_(0, inverse, probs)
    return uniq.new_empty(len(uniq)).scatter_(0, inverse, labels), total / counts[:, None], uniq


def gather(labels: torch.Tensor, probs: torch.Tensor, rows: torch.Tensor, dist: Dist):
    """All ranks' predictions, each clip once, in manifest order."""
    parts = dist.gather((labels, probs, rows))
    labels, probs, rows = (torch.cat([p[k] for p in parts]) for k in range(3))
    order = torch.argsort(rows, stable=True)
    return labels[order].numpy(), probs[order].numpy(), rows[order].numpy()


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
