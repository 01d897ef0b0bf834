"""The training engine: the seed recipe on top of the Batch contract.

`Trainer.train()` reads like the recipe; `train_one_epoch` is one screen. The loaders are
any backend (they all yield Batch), the model is a plain nn.Module: no backend branches.
The recipe's pieces (AdamW, OneCycle, early stopping, unfreezing) are in `recipe`; where
checkpoints go (CheckpointSaver), what an epoch reports (EpochReporter) and how a split is
scored (evaluation) live in their own modules; the Trainer only trains.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings

import torch
from torch import nn

from meld_dali import checkpoint as ckpt_io
from meld_dali import evaluation as ev
from meld_dali.config import EMOTIONS, Config
from meld_dali.errors import UserError
from meld_dali.evaluation import Dist, predict_loader, score, share_rank0_buffers
from meld_dali.losses import FocalLoss, inverse_sqrt_weights
from meld_dali.recipe import (
    EarlyStopping,
    EpochStats,
    build_optimizer,
    build_scheduler,
    stages_for_epoch,
)
from meld_dali.reporting import EpochReporter


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
        self.run_lock = None  # the run folder's lock (launch.build_trainer takes it)

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
        # the stop flag is agreed over ranks (DDP): a signal seen by one rank stops them all
        while self.epoch < end and not self.agree_stop():
            self.set_stages(stages_for_epoch(t, self.epoch))
            if self.train_one_epoch():  # interrupted mid-epoch: state saved, resume later
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

    def train_one_epoch(self, max_steps: int = 0) -> bool:
        """One pass over the train loader (or its first `max_steps` optimizer steps).
        True when a stop request paused it mid-epoch (state saved)."""
        self.net.train()
        accum, total = self.cfg.train.accum_steps, self.batches_per_epoch(max_steps)
        loader = self.train_loader
        loader.set_epoch(self.epoch)
        i = self.micro  # > 0 when resumed mid-epoch (skipped clips never shift it)
        pending = False  # gradients accumulated but not yet applied
        self.reporter.epoch_start(self.epoch, total, min(i, total), self.stats.clips)
        tick = time.perf_counter()
        # resumed at or past this run's end of the epoch (train.max_steps_per_epoch lowered
        # on resume): the epoch is over, no micro-batch is read
        batches = self.in_step(loader) if i < total else ()
        for batch in batches:  # DDP: every rank runs the same micro-batches
            now = time.perf_counter()
            self.stats.data_wait += now - tick
            group_start = i - i % accum
            group = min(accum, total - group_start)  # the last group may be partial
            assert group >= 1, f"accumulation group of {group} at micro-batch {i} of {total}"
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
                if self.agree_stop():  # DDP: every rank stops after the same optimizer step
                    return self.pause()
                if self.every_n_steps():
                    self.save_last()
                    tick = time.perf_counter()  # saving is neither data wait nor a step
                if i >= total:  # a capped epoch (max_steps_per_epoch) ends here
                    break
        if pending:  # skipped clips left a group short: apply what was accumulated
            self.sync_grads()  # (DDP: that group's backwards ran under no_sync)
            self.optimizer_step()
        self.stats.step_time += self._drain()  # perf: the epoch's sync point (queued GPU work)
        self.reporter.pass_end()
        self.epoch, self.micro = self.epoch + 1, 0
        loader.set_epoch(self.epoch)  # an epoch cut short still saves its position as done
        return False

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
        if self.reporter.records_steps and self.step % self.cfg.tracking.log_every == 0:
            self.reporter.log_step(  # reads the loss and norm: a GPU sync per log interval
                {"train/loss_avg": self.stats.mean_loss(),
                 "train/lr": self.scheduler.get_last_lr()[0],
                 "train/grad_norm": float(norm), "epoch": self.epoch}, self.step)

    def every_n_steps(self) -> bool:
        every = self.cfg.train.checkpoint_every_steps
        return bool(every) and self.step % every == 0

    def pause(self) -> bool:
        """A stop was requested: the optimizer step is done, save and leave the epoch."""
        self.save_last()
        if self.saver:
            run = self.saver.dir.parent
            self.reporter.say(f"interrupted: saved {self.saver.last}; resume with "
                              f"`meld-dali train --out {run} --resume auto`")
        return True

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
        self.reporter.epoch_end(row, metrics, predictions, improved, self.history)
        self.save_last()
        if improved and self.saver:
            self.saver.save_best()  # best.pt: a link to that last.pt

    def save_last(self) -> None:
        if self.saver:
            self.saver.save_last(self.state_dict())

    def state_dict(self) -> dict:
        ranks, me = self.rank_states(), self.dist.rank
        return {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION,
                "emotions": list(EMOTIONS), "config": self.cfg.to_dict(),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, "step": self.step, "micro_step": self.micro,
                "early_stop": self.early.state_dict(),
                "stages": sorted(self.model.trainable), "epoch_stats": self.stats.state(),
                "history": self.history, "tracker_run_id": self.reporter.tracker.run_id,
                # this rank's loader and RNG (rank 0's on disk), then every rank's
                "rng": ranks["rngs"][me], "loader": ranks["loaders"][me], **ranks}

    def rank_states(self) -> dict:
        """Every rank's loader position and RNG state, in rank order, and the world size:
        a collective under DDP (every rank builds the state; only rank 0 writes it)."""
        parts = ev.gather_objects((self.train_loader.state_dict(), ckpt_io.rng_state()),
                               self.dist)
        return {"world_size": self.dist.world, "loaders": [p[0] for p in parts],
                "rngs": [p[1] for p in parts]}

    def load_state_dict(self, sd: dict) -> None:
        self.model.load_state_dict(sd["model"])
        self.set_stages(set(sd["stages"]))
        self.optimizer.load_state_dict(sd["optimizer"])
        self.epoch, self.step = sd["epoch"], sd["step"]
        # older checkpoints had no micro_step: the loader position is the best guess there
        self.micro = sd.get("micro_step", sd["loader"]["consumed"] // self.cfg.train.batch_size)
        self.load_schedule(sd["scheduler"])
        if sd["scaler"]:  # {} from a run without fp16 scaling (CPU, bf16): nothing to restore
            self.scaler.load_state_dict(sd["scaler"])
        self.early.load_state_dict(sd["early_stop"])
        self.stats = EpochStats.from_state(sd["epoch_stats"])
        self.history = list(sd["history"])
        loader, rng = self.rank_position(sd)
        self.train_loader.load_state_dict(loader)
        ckpt_io.set_rng_state(rng)

    def rank_position(self, sd: dict) -> tuple[dict, dict]:
        """This rank's saved (loader state, RNG state). On another number of processes the
        shards differ: refused mid-epoch; at an epoch boundary the epoch's order restarts."""
        world = sd.get("world_size", 1)  # older checkpoints: one process (rank 0's state)
        if world == self.dist.world:
            return sd.get("loaders", [sd["loader"]])[self.dist.rank], \
                sd.get("rngs", [sd["rng"]])[self.dist.rank]
        if self.micro:
            raise UserError(f"checkpoint was written by {world} processes, this run has "
                            f"{self.dist.world}: it stopped mid-epoch (epoch {self.epoch}, "
                            f"step {self.step}), so resume with --nproc_per_node={world}, "
                            "or from a checkpoint at an epoch boundary")
        self.reporter.say(f"warning: checkpoint was written by {world} processes, this run has "
                          f"{self.dist.world}: epoch {self.epoch} starts from its beginning, "
                          "sharded for this run (same clips, another split over ranks)")
        return {**sd["loader"], "epoch": self.epoch, "consumed": 0}, sd["rng"]

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

    def in_step(self, loader):
        """The loader's batches while every rank has one. A skipped clip can leave a rank a
        batch short; DDP needs every rank in every step, so all stop where the first runs
        out (one tiny all-reduce per micro-batch, only with several ranks)."""
        if self.dist.world == 1:
            yield from loader
            return
        batches = iter(loader)
        while True:
            batch = next(batches, None)
            if not ev.agree(batch is not None, self.dist, self.device):
                if self.micro < self.batches_per_epoch():
                    self.reporter.say(f"a rank ran out of batches (skipped clips): epoch "
                                      f"{self.epoch} ends at micro-batch {self.micro} on "
                                      "every rank")
                return
            yield batch

    def agree_stop(self) -> bool:
        """Whether any rank was asked to stop (every rank calls this at the same step)."""
        stop = ev.agree(self.stop_requested, self.dist, self.device, any_rank=True)
        if stop and not self.stop_requested:
            self.stop_requested = True
            self.reporter.say("another rank was asked to stop: finishing the current step, "
                              "then saving")
        return stop

    def sync_grads(self) -> None:
        """DDP: average gradients accumulated under no_sync (a group cut short)."""
        ev.average_grads(self.model, self.dist)

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
