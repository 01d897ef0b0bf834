"""Focal loss and MELD's class weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def inverse_sqrt_weights(counts: list[int]) -> torch.Tensor:
    """Class weights proportional to 1/sqrt(count), normalized to mean 1.
    A class absent from the data counts as 1 clip (the largest weight), never a division by 0."""
    c = torch.tensor(counts, dtype=torch.float64).clamp_min(1)
    w = c.rsqrt()
    return (w / w.mean()).float()


class FocalLoss(nn.Module):
    """FL = -w_y (1 - p_y)^gamma log p_y, averaged like F.cross_entropy with weights
    (sum of w_y * loss / sum of w_y), so gamma = 0 is exactly weighted cross-entropy."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=-1).gather(1, target[:, None]).squeeze(1)
        loss = -((1 - logp.exp()).clamp_min(0) ** self.gamma) * logp
        if self.weight is None:
            return loss.mean()
        w = self.weight[target]
        return (w * loss).sum() / w.sum()
