"""The training engine: the seed recipe on top of the Batch contract.

`Trainer.train()` reads like the recipe; `train_one_epoch` is one screen. The loaders are
any backend (they all yield Batch), the model is a plain nn.Module: no backend branches.
Where checkpoints go (CheckpointSaver), what an epoch reports (EpochReporter) and how a
split is scored (evaluation) live in their own modules; the Trainer only trains.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from meld_dali import checkpoint as ckpt_io
from meld_dali.config import EMOTIONS, Config
from meld_dali.evaluation import Dist, predict_loader, score, share_rank0_buffers
from meld_dali.losses import FocalLoss, inverse_sqrt_weights
from meld_dali.model import STAGES
from meld_dali.reporting import EpochReporter


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
    (`mean_loss`, `as_dict`, `state`): by the progress display at its interval, the
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
    pending: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def add(self, loss: torch.Tensor, clips: int) -> None:
        """Count a micro-batch's mean loss (a device tensor) over `clips` clips; no sync."""
        part = loss.detach().double() * clips  # float64 like the old Python float sum
        self.pending = part if self.pending is None else self.pending + part
        self.clips += clips

    def flush(self) -> None:
        """Move the device-side sum into `loss_sum` (the one GPU sync)."""
        if self.pending is not None:
            self.loss_sum += float(self.pending)
            self.pending = None

    def mean_loss(self) -> float:
        self.flush()
        return self.loss_sum / max(self.clips, 1)

    def state(self) -> dict:
        """Plain data (floats) for checkpoints."""
        self.flush()
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "pending"}

    def as_dict(self) -> dict:
        return {"train_loss": self.mean_loss(), "train_clips": self.clips,
                "data_wait_s": self.data_wait, "step_time_s": self.step_time,
                "data_wait_share": self.data_wait / max(self.data_wait + self.step_time, 1e-9)}

    @classmethod
    def from_state(cls, sd: dict) -> EpochStats:
        known = {f.name for f in fields(cls)} - {"pending"}  # older ones held more fields
        return cls(**{k: v for k, v in sd.items() if k in known})


def stages_for_epoch(cfg_train, epoch: int) -> set[str]:
    if not cfg_train.freeze_backbone:
        return set(STAGES)
    return {name for ep, name in cfg_train.unfreeze.items() if ep <= epoch}


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW over every parameter (frozen ones included, so unfreezing resets nothing);
    no weight decay on norms and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.base_lr, betas=tuple(cfg.betas))


def build_scheduler(opt, cfg, total_steps: int):
    """OneCycle: base_lr -> max_lr over warmup_pct, cosine back down to base_lr."""
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.max_lr, total_steps=max(total_steps, 1), pct_start=cfg.warmup_pct,
        anneal_strategy=cfg.anneal, div_factor=cfg.max_lr / cfg.base_lr, final_div_factor=1.0,
        cycle_momentum=False)


class Trainer:
    def __init__(self, cfg: Config, model: nn.Module, train_loader, eval_loader,
                 class_counts: list[int], device: torch.device, *, make_net=None,
                 dist: Dist | None = None, saver: ckpt_io.CheckpointSaver | None = None,
                 reporter: EpochReporter | None = None, clip_ids: list[str] = ()):
        self.cfg, self.device = cfg, device
        self.model = model  # unwrapped: what checkpoints hold
        self.make_net = make_net or (lambda m: m)  # -> compiled and/or DDP-wrapped model
        self.net = self.make_net(model)
        self.dist = dist or Dist()
        # eval on each rank's shard without DDP collectives (shards may differ by a batch)
        self.eval_net = self.net if self.dist.world == 1 else model
        self.train_loader, self.eval_loader = train_loader, eval_loader
        self.saver, self.reporter = saver, reporter or EpochReporter(enabled=self.dist.main)
        self.clip_ids = list(clip_ids)
        t, o = cfg.train, cfg.optim
        weights = inverse_sqrt_weights(class_counts) if o.class_weights == "inv_sqrt" else None
        self.criterion = FocalLoss(o.focal_gamma, weights).to(device)
        self.optimizer = build_optimizer(model, o)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch() / t.accum_steps)
        self.scheduler = build_scheduler(self.optimizer, o, t.epochs * self.steps_per_epoch)
        amp = t.amp if device.type == "cuda" else "off"
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.early = EarlyStopping(t.patience, t.min_epochs, t.min_delta)
        self.epoch, self.step = 0, 0
        self.micro = 0  # micro-batches trained in this epoch: fixes the accumulation groups
        self.stats = EpochStats()
        self.stop_requested = False
        self.history: list[dict] = []

    def set_stages(self, stages: set[str]) -> None:
        if stages != self.model.trainable:
            self.model.set_trainable(stages)
            if self.dist.world > 1:
                self.net = self.make_net(self.model)

    def batches_per_epoch(self, max_steps: int = 0) -> int:
        n = len(self.train_loader)
        cap = (max_steps or self.cfg.train.max_steps_per_epoch) * self.cfg.train.accum_steps
        return min(n, cap) if cap else n

    def request_stop(self, why: str) -> bool:
        """Stop after the current optimizer step (a signal handler calls this). False if a
        stop was already requested."""
        if self.stop_requested:
            return False
        self.stop_requested = True
        self.reporter.say(f"{why}: finishing the current step, then saving")
        return True

    # ------------------------------------------------------------------ the recipe

    def train(self, until_epoch: int | None = None) -> dict:
        """Run the recipe to the end (or until `until_epoch` epochs are complete)."""
        t = self.cfg.train
        end = t.epochs if until_epoch is None else min(until_epoch, t.epochs)
        while self.epoch < end and not self.stop_requested:
            self.set_stages(stages_for_epoch(t, self.epoch))
            self.train_one_epoch()
            if self.stop_requested:  # interrupted mid-epoch: state saved, resume later
                break
            metrics, predictions = self.evaluate()
            improved = self.early.update(metrics["weighted_f1"])
            self.end_epoch(metrics, predictions, improved)
            if self.epoch < t.epochs and self.early.should_stop(self.epoch - 1):
                self.reporter.say(f"early stop: no weighted-F1 gain >= {t.min_delta} for "
                                  f"{t.patience} epochs (best {self.early.best:.4f})")
                break
        return {"best_weighted_f1": self.early.best, "epochs": self.epoch,
                "interrupted": self.stop_requested}

    def train_one_epoch(self, max_steps: int = 0) -> None:
        """One pass over the train loader (or its first `max_steps` optimizer steps)."""
        self.net.train()
        accum, total = self.cfg.train.accum_steps, self.batches_per_epoch(max_steps)
        loader = self.train_loader
        loader.set_epoch(self.epoch)
        i = self.micro  # > 0 when resumed mid-epoch (skipped clips never shift it)
        pending = False  # gradients accumulated but not yet applied
        self.reporter.epoch_start(self.epoch, total, i, self.stats.clips)
        tick = time.perf_counter()
        for batch in loader:
            now = time.perf_counter()
            self.stats.data_wait += now - tick
            group_start = i - i % accum
            group = min(accum, total - group_start)  # the last group may be partial
            last_in_group = i + 1 == group_start + group
            with self._no_sync(not last_in_group):
                loss = self.forward_backward(batch, 1.0 / group)  # a device tensor: no sync
            pending = not last_in_group
            if last_in_group:
                self.optimizer_step()
            i = self.micro = i + 1
            # perf (issue 15): the loss stays on the device; it is read (one GPU sync) only
            # when progress prints, at the step log and at the end of the epoch. The
            # progress call sits before the tick so a sync there counts as step time.
            self.stats.add(loss, len(batch))
            self.reporter.progress(i, self.stats, self.scheduler.get_last_lr()[0])
            tick = time.perf_counter()
            self.stats.step_time += tick - now
            if last_in_group:
                if self.stop_requested:
                    return self.pause()
                if self.every_n_steps():
                    self.save_last()
                    tick = time.perf_counter()  # saving is neither data wait nor a step
                if i >= total:  # a capped epoch (max_steps_per_epoch) ends here
                    break
        if pending:  # skipped clips left a group short: apply what was accumulated
            self.optimizer_step()
        self.stats.step_time += self._drain()  # perf: the epoch's sync point (queued GPU work)
        self.reporter.pass_end()
        self.epoch, self.micro = self.epoch + 1, 0

    def forward_backward(self, batch, scale: float) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its mean loss, detached, on the
        device (reading it is a GPU sync: the caller decides when)."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            logits = self.net(batch.video, batch.mask)
            loss = self.criterion(logits, batch.label)
        self.scaler.scale(loss * scale).backward()
        return loss.detach()

    def optimizer_step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler.last_epoch < self.scheduler.total_steps:
            self.scheduler.step()
        self.step += 1
        if self.step % self.cfg.tracking.log_every == 0:
            self.reporter.log_step(
                {"train/loss_avg": self.stats.mean_loss(),  # a sync once per log interval
                 "train/lr": self.scheduler.get_last_lr()[0],
                 "train/grad_norm": float(norm), "epoch": self.epoch}, self.step)

    def every_n_steps(self) -> bool:
        every = self.cfg.train.checkpoint_every_steps
        return bool(every) and self.step % every == 0

    def pause(self) -> None:
        """A stop was requested: the optimizer step is done, save and leave the epoch."""
        self.save_last()
        if self.saver:
            run = self.saver.dir.parent
            self.reporter.say(f"interrupted: saved {self.saver.last}; resume with "
                              f"`meld-dali train --out {run} --resume auto`")

    def take_stats(self) -> EpochStats:
        """The running epoch's figures, and a fresh count from here on."""
        stats, self.stats = self.stats, EpochStats()
        return stats

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> tuple[dict, list[dict]]:
        share_rank0_buffers(self.model, self.dist)
        on_batch = self.reporter.eval_start(f"epoch {self.epoch - 1} {self.cfg.data.eval_split}",
                                            len(self.eval_loader))
        labels, probs, rows = predict_loader(self.eval_net, self.eval_loader, self.device,
                                             self.amp_dtype, self.dist, on_batch)
        self.reporter.pass_end()
        return score(labels, probs, rows, self.clip_ids)

    # ------------------------------------------------------------------ bookkeeping

    def end_epoch(self, metrics: dict, predictions: list[dict], improved: bool) -> None:
        """Record the finished epoch (self.epoch already counts it)."""
        row = {"epoch": self.epoch - 1, "step": self.step, **self.take_stats().as_dict(),
               "lr": self.scheduler.get_last_lr()[0],
               "stages": sorted(self.model.trainable), "best": improved, **metrics}
        self.history.append(row)
        self.reporter.epoch_end(row, metrics, predictions, improved)
        self.save_last()
        if improved and self.saver:
            self.saver.save_best(self.state_dict())

    def save_last(self) -> None:
        if self.saver:
            self.saver.save_last(self.state_dict())

    def state_dict(self) -> dict:
        return {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION,
                "emotions": list(EMOTIONS), "config": self.cfg.to_dict(),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, "step": self.step, "micro_step": self.micro,
                "early_stop": self.early.state_dict(),
                "stages": sorted(self.model.trainable), "epoch_stats": self.stats.state(),
                "history": self.history, "rng": ckpt_io.rng_state(),
                "loader": self.train_loader.state_dict(),
                "tracker_run_id": self.reporter.tracker.run_id}

    def load_state_dict(self, sd: dict) -> None:
        self.model.load_state_dict(sd["model"])
        self.set_stages(set(sd["stages"]))
        self.optimizer.load_state_dict(sd["optimizer"])
        self.epoch, self.step = sd["epoch"], sd["step"]
        # older checkpoints had no micro_step: the loader position is the best guess there
        self.micro = sd.get("micro_step", sd["loader"]["consumed"] // self.cfg.train.batch_size)
        self.load_schedule(sd["scheduler"])
        self.scaler.load_state_dict(sd["scaler"])
        self.early.load_state_dict(sd["early_stop"])
        self.stats = EpochStats.from_state(sd["epoch_stats"])
        self.history = list(sd["history"])
        self.train_loader.load_state_dict(sd["loader"])
        ckpt_io.set_rng_state(sd["rng"])

    def load_schedule(self, saved: dict) -> None:
        """The saved OneCycle state, or, when this run has another number of optimizer steps
        (train.epochs or max_steps_per_epoch changed on resume), this run's schedule
        positioned at the current step: never an LR silently frozen past the old end."""
        if saved["total_steps"] == self.scheduler.total_steps:
            self.scheduler.load_state_dict(saved)
            return
        with warnings.catch_warnings():  # stepping a fresh schedule forward, no optimizer
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(min(self.step, self.scheduler.total_steps)):
                self.scheduler.step()
        self.reporter.say(
            f"schedule rebuilt: this run has {self.scheduler.total_steps} optimizer steps "
            f"(the checkpoint's had {saved['total_steps']}); OneCycle continues from step "
            f"{self.step} at LR {self.scheduler.get_last_lr()[0]:.3g}")

    # ------------------------------------------------------------------ plumbing

    def _drain(self) -> float:
        """Wait for the GPU's queued work (CUDA; nothing on CPU); returns the seconds."""
        t = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats.flush()
        return time.perf_counter() - t

    def _no_sync(self, skip: bool):
        """DDP: no gradient all-reduce on the micro-steps inside an accumulation group."""
        if skip and hasattr(self.net, "no_sync"):
            return self.net.no_sync()
        return contextlib.nullcontext()
