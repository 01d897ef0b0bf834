"""The training engine: the seed recipe on top of the Batch contract.

`Trainer.train()` reads like the recipe; `train_one_epoch` is one screen. The loaders are
any backend (they all yield Batch), the model is a plain nn.Module: no backend branches.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from meld_dali import checkpoint as ckpt_io
from meld_dali.config import EMOTIONS, Config
from meld_dali.losses import FocalLoss, inverse_sqrt_weights
from meld_dali.metrics import classification_metrics, plot_confusion
from meld_dali.model import STAGES
from meld_dali.tracking import NullTracker

log = logging.getLogger("meld_dali.trainer")


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
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    clips: int = 0
    data_wait: float = 0.0
    step_time: float = 0.0
    grad_norm: float = 0.0

    def as_dict(self) -> dict:
        return {"train_loss": self.loss_sum / max(self.clips, 1), "train_clips": self.clips,
                "data_wait_s": self.data_wait, "step_time_s": self.step_time,
                "data_wait_share": self.data_wait / max(self.data_wait + self.step_time, 1e-9)}


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
    def __init__(self, cfg: Config, run_dir: Path, model: nn.Module, train_loader, eval_loader,
                 class_counts: list[int], device: torch.device, *,
                 make_net=None,
                 tracker=None, dist: Dist | None = None, console=None, clip_ids: list[str] = (),
                 on_best=None):
        self.cfg, self.run_dir, self.device = cfg, Path(run_dir), device
        self.model = model  # unwrapped: what checkpoints hold
        self.make_net = make_net or (lambda m: m)  # -> compiled and/or DDP-wrapped model
        self.net = self.make_net(model)
        # eval on each rank's shard without DDP collectives (shards may differ by a batch)
        self.eval_net = self.net if dist is None or dist.world == 1 else model
        self.train_loader, self.eval_loader = train_loader, eval_loader
        self.tracker, self.dist = tracker or NullTracker(), dist or Dist()
        self.console, self.clip_ids, self.on_best = console, list(clip_ids), on_best
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
        self.stats = EpochStats()
        self.stop_requested = False
        self.history: list[dict] = []

    def set_stages(self, stages: set[str]) -> None:
        if stages != self.model.trainable:
            self.model.set_trainable(stages)
            if self.dist.world > 1:
                self.net = self.make_net(self.model)

    def batches_per_epoch(self) -> int:
        n = len(self.train_loader)
        cap = self.cfg.train.max_steps_per_epoch * self.cfg.train.accum_steps
        return min(n, cap) if cap else n

    # ------------------------------------------------------------------ the recipe

    def train(self, until_epoch: int | None = None) -> dict:
        """Run the recipe to the end (or until `until_epoch` epochs are complete)."""
        t = self.cfg.train
        end = t.epochs if until_epoch is None else min(until_epoch, t.epochs)
        with self._signals():
            while self.epoch < end and not self.stop_requested:
                self.set_stages(stages_for_epoch(t, self.epoch))
                self.train_one_epoch()
                if self.stop_requested:  # interrupted mid-epoch: state saved, resume later
                    break
                metrics = self.evaluate()
                improved = self.early.update(metrics["weighted_f1"])
                self.end_epoch(metrics, improved)
                if self.epoch < t.epochs and self.early.should_stop(self.epoch - 1):
                    self.say(f"early stop: no weighted-F1 gain >= {t.min_delta} for "
                             f"{t.patience} epochs (best {self.early.best:.4f})")
                    break
        return {"best_weighted_f1": self.early.best, "epochs": self.epoch,
                "interrupted": self.stop_requested}

    def train_one_epoch(self) -> None:
        self.net.train()
        accum, total = self.cfg.train.accum_steps, self.batches_per_epoch()
        loader = self.train_loader
        loader.set_epoch(self.epoch)
        i = loader.state_dict()["consumed"] // self.cfg.train.batch_size  # resumed mid-epoch
        pending = False  # gradients accumulated but not yet applied
        tick = time.perf_counter()
        for batch in loader:
            now = time.perf_counter()
            self.stats.data_wait += now - tick
            group_start = i - i % accum
            group = min(accum, total - group_start)  # the last group may be partial
            last_in_group = i + 1 == group_start + group
            with self._no_sync(not last_in_group):
                loss = self.forward_backward(batch, 1.0 / group)  # .item(): a GPU sync point
            pending = not last_in_group
            if last_in_group:
                self.optimizer_step()
            i += 1
            self.stats.loss_sum += loss * len(batch)
            self.stats.clips += len(batch)
            tick = time.perf_counter()
            self.stats.step_time += tick - now
            if last_in_group:
                if self.stop_requested:
                    return self.pause()
                if self.every_n_steps():
                    self.save_last()
                if i >= total:  # a capped epoch (max_steps_per_epoch) ends here
                    break
        if pending:  # skipped clips left a group short: apply what was accumulated
            self.optimizer_step()
        self.epoch += 1

    def forward_backward(self, batch, scale: float) -> float:
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            logits = self.net(batch.video, batch.mask)
            loss = self.criterion(logits, batch.label)
        self.scaler.scale(loss * scale).backward()
        return loss.item()

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
        self.stats.grad_norm = float(norm)
        if self.dist.main and self.step % self.cfg.tracking.log_every == 0:
            self.tracker.log({"train/loss_avg": self.stats.loss_sum / max(self.stats.clips, 1),
                              "train/lr": self.scheduler.get_last_lr()[0],
                              "train/grad_norm": float(norm), "epoch": self.epoch}, self.step)

    def every_n_steps(self) -> bool:
        every = self.cfg.train.checkpoint_every_steps
        return bool(every) and self.step % every == 0

    def pause(self) -> None:
        """A signal arrived: the optimizer step is done, save and leave the epoch."""
        self.save_last()
        self.say(f"interrupted: saved {self.run_dir / 'checkpoints/last.pt'}; resume with "
                 f"`meld-dali train --out {self.run_dir} --resume auto`")

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict:
        if self.dist.world > 1:
            # BatchNorm running statistics drift apart per rank (DDP runs with
            # broadcast_buffers=False): evaluate every shard with rank 0's, the checkpoint's
            import torch.distributed as tdist

            for buf in self.model.buffers():
                tdist.broadcast(buf, src=0)
        labels, probs, rows = predict_loader(self.eval_net, self.eval_loader, self.device,
                                             self.amp_dtype, self.dist)
        pred = probs.argmax(1)
        metrics = classification_metrics(labels, pred)
        conf = probs.max(1)
        self.last_predictions = [
            {"clip_id": self.clip_ids[r] if r < len(self.clip_ids) else str(r),
             "true": EMOTIONS[y], "predicted": EMOTIONS[p], "confidence": float(c)}
            for r, y, p, c in zip(rows.tolist(), labels.tolist(), pred.tolist(), conf.tolist(),
                                  strict=True)]
        return metrics

    # ------------------------------------------------------------------ bookkeeping

    def end_epoch(self, metrics: dict, improved: bool) -> None:
        """Record the finished epoch (self.epoch already counts it)."""
        epoch = self.epoch - 1
        row = {"epoch": epoch, "step": self.step, **self.stats.as_dict(),
               "lr": self.scheduler.get_last_lr()[0],
               "stages": sorted(self.model.trainable), "best": improved, **metrics}
        self.history.append(row)
        self.stats = EpochStats()
        if not self.dist.main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        png = self.run_dir / f"confusion_epoch{epoch:03d}.png"
        plot_confusion(metrics["confusion"], png, f"dev, epoch {epoch}")
        self.tracker.log_epoch(metrics, self.step, self.last_predictions, str(png))
        self.say(f"epoch {epoch}: loss {row['train_loss']:.4f}  acc {metrics['accuracy']:.3f}  "
                 f"macro-F1 {metrics['macro_f1']:.3f}  weighted-F1 {metrics['weighted_f1']:.3f}"
                 f"  (all-neutral {metrics['baseline_weighted_f1']:.3f})  data-wait "
                 f"{row['data_wait_share']:.0%}{'  *best*' if improved else ''}")
        self.save_last()
        if improved:
            ckpt_io.atomic_save(self.state_dict(), self.run_dir / "checkpoints" / "best.pt")
            if self.on_best:
                self.on_best()

    def save_last(self) -> None:
        if not self.dist.main:
            return
        ck = self.run_dir / "checkpoints"
        state = self.state_dict()
        ckpt_io.atomic_save(state, ck / "last.pt", keep_previous=True)
        if self.cfg.train.keep_last:  # step-numbered copies, the newest k kept
            ckpt_io.atomic_save(state, ck / f"step{self.step:08d}.pt")
            for old in sorted(ck.glob("step*.pt"))[: -self.cfg.train.keep_last]:
                old.unlink()

    def say(self, msg: str) -> None:
        if self.dist.main:
            (self.console.print if self.console else log.info)(msg)

    def state_dict(self) -> dict:
        return {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION,
                "emotions": list(EMOTIONS), "config": self.cfg.to_dict(),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, "step": self.step, "early_stop": self.early.state_dict(),
                "stages": sorted(self.model.trainable), "epoch_stats": self.stats.__dict__,
                "history": self.history, "rng": ckpt_io.rng_state(),
                "loader": self.train_loader.state_dict(),
                "tracker_run_id": getattr(self.tracker, "run_id", None)}

    def load_state_dict(self, sd: dict) -> None:
        self.model.load_state_dict(sd["model"])
        self.set_stages(set(sd["stages"]))
        self.optimizer.load_state_dict(sd["optimizer"])
        self.scheduler.load_state_dict(sd["scheduler"])
        self.scaler.load_state_dict(sd["scaler"])
        self.epoch, self.step = sd["epoch"], sd["step"]
        self.early.load_state_dict(sd["early_stop"])
        self.stats = EpochStats(**sd["epoch_stats"])
        self.history = list(sd["history"])
        self.train_loader.load_state_dict(sd["loader"])
        ckpt_io.set_rng_state(sd["rng"])

    # ------------------------------------------------------------------ plumbing

    def _no_sync(self, skip: bool):
        """DDP: no gradient all-reduce on the micro-steps inside an accumulation group."""
        if skip and hasattr(self.net, "no_sync"):
            return self.net.no_sync()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _signals(self):
        """SIGINT/SIGTERM: finish the current optimizer step, save `last`, exit cleanly.
        A second signal interrupts at once."""
        def handler(signum, frame):
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True
            self.say(f"{signal.Signals(signum).name}: finishing the current step, then saving")

        old = {}
        try:
            for s in (signal.SIGINT, signal.SIGTERM):
                old[s] = signal.signal(s, handler)
        except ValueError:  # not the main thread: no handlers
            pass
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


@torch.no_grad()
def predict_loader(net: nn.Module, loader, device: torch.device, amp_dtype, dist: Dist):
    """(labels, probabilities [N, 7], manifest rows) over a whole split, every clip once,
    gathered over ranks."""
    net.eval()
    labels, probs, rows = [], [], []
    for batch in loader:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            logits = net(batch.video, batch.mask)
        probs.append(logits.float().softmax(-1).cpu())
        labels.append(batch.label.cpu())
        rows.append(batch.index.cpu())
    if labels:
        labels, probs, rows = torch.cat(labels), torch.cat(probs), torch.cat(rows)
    else:
        labels, probs, rows = (torch.zeros(0, dtype=torch.int64),
                               torch.zeros(0, len(EMOTIONS)), torch.zeros(0, dtype=torch.int64))
    return gather(labels, probs, rows, dist)


def gather(labels: torch.Tensor, probs: torch.Tensor, rows: torch.Tensor, dist: Dist):
    """All ranks' predictions, each clip once, in manifest order."""
    if dist.world > 1:
        import torch.distributed as tdist

        parts: list = [None] * dist.world
        tdist.all_gather_object(parts, (labels, probs, rows))
        labels = torch.cat([p[0] for p in parts])
        probs = torch.cat([p[1] for p in parts])
        rows = torch.cat([p[2] for p in parts])
        order = torch.argsort(rows)
        labels, probs, rows = labels[order], probs[order], rows[order]
    return labels.numpy(), probs.numpy(), rows.numpy()
