"""The recipe's pieces the Trainer is built from: AdamW and OneCycle, early stopping, the
unfreezing schedule, and the running figures of an epoch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from meld_dali.model import STAGES


@dataclass
class EarlyStopping:
    """Stop when weighted F1 has not improved by min_delta for `patience` epochs,
    never before `min_epochs` epochs have run."""
    patience: int
    min_epochs: int
    min_delta: float
    best: float = -math.inf
    bad_epochs: int = 0

    def update(self, score: float) -> bool:
        if score >= self.best + self.min_delta:
            self.best, self.bad_epochs = score, 0
            return True
        self.bad_epochs += 1
        return False

    def should_stop(self, epoch: int) -> bool:
        return epoch + 1 >= self.min_epochs and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, sd: dict) -> None:
        self.best, self.bad_epochs = sd["best"], sd["bad_epochs"]


@dataclass
class EpochStats:
    """The running epoch's figures. The loss is summed on the training device (`add`: no
    GPU sync per micro-batch) and read, one sync, only when a figure is wanted
    (`mean_loss`, `as_dict`, `state_dict`): by the progress display at its interval, the
    per-step log, the end of the epoch and checkpoints.

    `data_wait` is the time the loop spent blocked on the loader, `step_time` the rest
    (launching forward/backward/optimizer, and GPU work wherever the CPU waited for it: at
    a loss read, the optimizer step's scaler/log reads and the end-of-epoch sync). Their
    sum is the epoch's wall time; the data-wait share is an upper bound on the GPU's
    data starvation (GPU work still queued during a loader wait counts as wait)."""
    loss_sum: float = 0.0
    clips: int = 0
    data_wait: float = 0.0
    step_time: float = 0.0
    # who made the epoch's batches (the loader's LoaderCounts over the epoch): a DALI run
    # whose cpu_redone_batches is not 0 trained partly on CPU-decoded batches
    backend_batches: int = 0
    cpu_redone_batches: int = 0
    pending: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def add(self, loss: torch.Tensor, clips: int) -> None:
        """Count a micro-batch's mean loss (a device tensor) over `clips` clips; no sync."""
        part = loss.detach().double() * clips  # float64 like the old Python float sum
        self.pending = part if self.pending is None else self.pending + part
        self.clips += clips

    def add_counts(self, counts) -> None:
        """Add a loader's `LoaderCounts` over some batches of this epoch."""
        self.backend_batches += counts.backend_batches
        self.cpu_redone_batches += counts.cpu_redone_batches

    def flush(self) -> None:
        """Move the device-side sum into `loss_sum` (the one GPU sync)."""
        if self.pending is not None:
            self.loss_sum += float(self.pending)
            self.pending = None

    def mean_loss(self) -> float:
        self.flush()
        return self.loss_sum / max(self.clips, 1)

    def state_dict(self) -> dict:
        """Plain data (floats) for checkpoints."""
        self.flush()
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "pending"}

    def load_state_dict(self, sd: dict) -> None:
        self.loss_sum, self.clips = sd["loss_sum"], sd["clips"]
        self.data_wait, self.step_time = sd["data_wait"], sd["step_time"]
        # absent from checkpoints written before the counts existed: nothing counted then
        self.backend_batches = sd.get("backend_batches", 0)
        self.cpu_redone_batches = sd.get("cpu_redone_batches", 0)
        self.pending = None

    def as_dict(self) -> dict:
        return {"train_loss": self.mean_loss(), "train_clips": self.clips,
                "data_wait_s": self.data_wait, "step_time_s": self.step_time,
                "data_wait_share": self.data_wait / max(self.data_wait + self.step_time, 1e-9),
                "backend_batches": self.backend_batches,
                "cpu_redone_batches": self.cpu_redone_batches}


def stages_for_epoch(train, epoch: int) -> set[str]:
    if not train.freeze_backbone:
        return set(STAGES)
    return {name for ep, name in train.unfreeze.items() if ep <= epoch}


def build_optimizer(model: nn.Module, optim) -> torch.optim.Optimizer:
    """AdamW over every parameter (frozen ones included, so unfreezing resets nothing);
    no weight decay on norms and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": optim.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=optim.base_lr, betas=tuple(optim.betas))


def build_scheduler(opt, optim, total_steps: int):
    """OneCycle: base_lr -> max_lr over warmup_pct, cosine back down to base_lr."""
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=optim.max_lr, total_steps=max(total_steps, 1), pct_start=optim.warmup_pct,
        anneal_strategy=optim.anneal, div_factor=optim.max_lr / optim.base_lr, final_div_factor=1.0,
        cycle_momentum=False)
