"""The training engine: the seed recipe on top of the Batch contract.

`Trainer.train()` reads like the recipe, `train_one_epoch` is one screen and `train_step`
is one optimizer step over an accumulation group. The loaders are any backend (they all
yield Batch), the model is a plain nn.Module, the process group is an object (`Dist` or
`DDP`) and the runtime (device, AMP, memory format, compile) was resolved before: no
backend, device or world-size branches here. The recipe's pieces (AdamW, OneCycle, early
stopping, unfreezing) are in `recipe`; where checkpoints go (CheckpointSaver), what an epoch
reports (EpochReporter) and how a split is scored (evaluation) live in their own modules.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn

from meld_dali import checkpoint as ckpt_io
from meld_dali.config import Config
from meld_dali.distributed import Dist
from meld_dali.evaluation import predict_loader, score
from meld_dali.losses import FocalLoss, inverse_sqrt_weights
from meld_dali.recipe import (
    EarlyStopping,
    EpochStats,
    build_optimizer,
    build_scheduler,
    stages_for_epoch,
)
from meld_dali.reporting import EpochReporter
from meld_dali.runtime import Runtime


class Trainer:
    def __init__(self, cfg: Config, model: nn.Module, train_loader, eval_loader,
                 class_counts: list[int], runtime: Runtime, *, dist: Dist | None = None,
                 saver: ckpt_io.CheckpointSaver | None = None,
                 reporter: EpochReporter | None = None, clip_ids: list[str] = ()):
        self.cfg, self.runtime = cfg, runtime
        self.model = model  # unwrapped and uncompiled state: what checkpoints hold
        self.dist = dist or Dist()
        self.net = self.dist.wrap(runtime.compiled(model))  # what runs forward/backward
        self.train_loader, self.eval_loader = train_loader, eval_loader
        self.saver, self.reporter = saver, reporter or EpochReporter(enabled=self.dist.main)
        self.clip_ids = list(clip_ids)
        t, o = cfg.train, cfg.optim
        weights = inverse_sqrt_weights(class_counts) if o.class_weights == "inv_sqrt" else None
        self.criterion = FocalLoss(o.focal_gamma, weights).to(runtime.device)
        self.optimizer = build_optimizer(model, o)
        self.steps_per_epoch = -(-self.batches_per_epoch() // t.accum_steps)
        self.scheduler = build_scheduler(self.optimizer, o, t.epochs * self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.fp16_scaling)
        self.early = EarlyStopping(t.patience, t.min_epochs, t.min_delta)
        self.epoch, self.step = 0, 0  # epochs completed, optimizer steps taken
        self.stats = EpochStats()
        self.stop_requested = False
        self.signalled = False  # a stop signal reached this process (request_stop)
        self.rank_weights: list[str] = []  # each rank's weights_digest at the last evaluation
        self.run_lock = None  # the run folder's lock (launch.build_trainer takes it)

    def set_stages(self, stages: set[str]) -> None:
        if stages != self.model.trainable:
            self.model.set_trainable(stages)
            self.net = self.dist.wrap(self.model)  # DDP registers the trainable ones anew

    def batches_per_epoch(self, max_steps: int = 0) -> int:
        n = len(self.train_loader)
        cap = (max_steps or self.cfg.train.max_steps_per_epoch) * self.cfg.train.accum_steps
        return min(n, cap) if cap else n

    def request_stop(self, why: str) -> bool:
        """Stop after the current optimizer step (a signal handler calls this). False if a
        signal had already reached this process: a second one interrupts at once. A stop
        another rank asked for first (`agree_stop`) is no second signal here: the launcher's
        death signals every rank at once."""
        if self.signalled:
            return False
        self.signalled = True
        if not self.stop_requested:
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
        """One pass over the train loader (or its first `max_steps` optimizer steps), one
        accumulation group per optimizer step. True when a stop request paused it mid-epoch
        (state saved)."""
        self.net.train()
        accum, total = self.cfg.train.accum_steps, self.batches_per_epoch(max_steps)
        loader = self.train_loader
        loader.set_epoch(self.epoch)
        done = loader.position.delivered  # > 0 when resumed mid-epoch
        self.reporter.epoch_start(self.epoch, total, min(done, total), self.stats.clips)
        # DDP: every rank runs the same micro-batches, and no more than the epoch's
        batches = self.dist.batches(loader, limit=max(0, total - done))
        counted = loader.counts.copy()  # who made the batches: the backend or the CPU path
        while done < total:  # resumed past a lowered step cap: the epoch is over at once
            size = min(accum, total - done)  # the last group may be partial
            trained = self.train_step(islice(batches, size), size, done)
            self.stats.add_counts(loader.counts - counted)
            counted = loader.counts.copy()
            done += trained
            if trained < size:  # skipped clips left a loader short: the epoch ends here
                self.reporter.say(f"epoch {self.epoch} ends at micro-batch {done} of {total} "
                                  "on every rank (skipped clips left a loader short)")
                break
            if self.agree_stop():  # DDP: every rank stops after the same optimizer step
                return self.pause()
            if self.every_n_steps():
                self.save_last()
        batches.close()  # the loader pass ends here, not whenever it is garbage collected
        self.stats.step_time += self._drain()  # perf: the epoch's sync point (queued GPU work)
        self.reporter.pass_end()
        self.epoch += 1
        loader.set_epoch(self.epoch)  # an epoch cut short still saves its position as done
        return False

    def train_step(self, group: Iterable, size: int, done: int = 0) -> int:
        """One optimizer step over an accumulation group of up to `size` micro-batches (the
        gradient of their mean loss); returns how many the group had. `done`: micro-batches
        of the epoch before this group (progress only)."""
        trained = 0
        tick = time.perf_counter()
        for batch in group:
            now = time.perf_counter()
            self.stats.data_wait += now - tick
            trained += 1
            # DDP: gradients all-reduce once, in the group's last backward
            with self.dist.no_sync(self.net, skip=trained < size):
                loss = self.forward_backward(batch, 1.0 / size)  # a device tensor: no sync
            if trained == size:
                self.optimizer_step()
            # perf (issue 15): the loss stays on the device; it is read (one GPU sync) only
            # when progress prints, at the step log and at the end of the epoch. The
            # progress call sits before the tick so a sync there counts as step time.
            self.stats.add(loss, len(batch))
            self.reporter.progress(done + trained, self.stats, self.scheduler.get_last_lr()[0])
            tick = time.perf_counter()
            self.stats.step_time += tick - now
        if 0 < trained < size:  # the loader ran short: apply what was accumulated
            self.dist.average_grads(self.model)  # (DDP: those backwards ran under no_sync)
            self.optimizer_step()
        return trained

    def forward_backward(self, batch, scale: float) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its mean loss, detached, on the
        device (reading it is a GPU sync: the caller decides when)."""
        with self.runtime.autocast():
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
        self.dist.broadcast_buffers(self.model)  # every shard scored with rank 0's BatchNorm
        self.check_ranks_agree()
        on_batch = self.reporter.eval_start(f"epoch {self.epoch - 1} {self.cfg.data.eval_split}",
                                            len(self.eval_loader))
        # the model itself, not DDP's wrapper: each rank scores its own shard, no collectives
        counted = self.eval_loader.counts.copy()
        labels, probs, rows = predict_loader(self.model, self.eval_loader, self.runtime,
                                             self.dist, on_batch)
        self.reporter.pass_end()
        metrics, predictions = score(labels, probs, rows, self.clip_ids)
        made = self.eval_loader.counts - counted
        metrics.update(eval_backend_batches=made.backend_batches,
                       eval_cpu_redone_batches=made.cpu_redone_batches)
        return metrics, predictions

    def check_ranks_agree(self) -> None:
        """DDP: every rank holds the same weights, every parameter and buffer bit for bit,
        before each scores its shard with them (gathered metrics of several models would be
        no model's). Identical gradients and steps keep them equal: a difference is a bug,
        and the run stops on every rank."""
        if self.dist.world == 1:
            return
        self.rank_weights = self.dist.gather(weights_digest(self.model.state_dict()))
        odd = [r for r, d in enumerate(self.rank_weights) if d != self.rank_weights[0]]
        if odd:
            raise RuntimeError(f"after epoch {self.epoch - 1} the weights of rank(s) "
                               f"{odd} differ from rank 0's: DDP kept the ranks apart (a bug)")

    # ------------------------------------------------------------------ state

    def end_epoch(self, metrics: dict, predictions: list[dict], improved: bool) -> None:
        """Record the finished epoch (self.epoch already counts it)."""
        row = {"epoch": self.epoch - 1, "step": self.step, **self.take_stats().as_dict(),
               "loader_backend": self.train_loader.backend,
               "lr": self.scheduler.get_last_lr()[0],
               "stages": sorted(self.model.trainable), "best": improved, **metrics}
        self.reporter.epoch_end(row, metrics, predictions, improved)
        self.save_last()
        if improved and self.saver:
            self.saver.save_best()  # best.pt: a link to that last.pt

    @property
    def history(self) -> list[dict]:
        return self.reporter.history

    def save_last(self) -> None:
        if self.saver:
            self.saver.save_last(self.states(), self.cfg)

    def states(self) -> dict[str, ckpt_io.Stateful]:
        """Every part with state, in the order a resume restores them: the train counters
        first (the schedule reads the step), the reporter last (it rewrites metrics.jsonl:
        every check that can refuse the resume, the world size of `ranks` included, comes
        before a file is touched)."""
        return {"train": self, "model": self.model, "optimizer": self.optimizer,
                "scheduler": ckpt_io.Part(self.scheduler.state_dict, self.load_schedule),
                "scaler": ckpt_io.Part(self.scaler.state_dict, self.load_scaler),
                "early_stop": self.early,
                "ranks": ckpt_io.RankStates(self.train_loader, self.dist, self.reporter.say),
                "reporter": self.reporter}

    def checkpoint(self) -> dict:
        """The whole checkpoint tree (a collective under DDP: every rank calls it)."""
        return ckpt_io.snapshot(self.states(), self.cfg)

    def restore(self, ckpt: dict) -> None:
        ckpt_io.restore(self.states(), ckpt)

    def state_dict(self) -> dict:
        """The train counters: epochs done, optimizer steps, the running epoch's figures.
        The unfreezing stage is not stored: it derives from the epoch."""
        return {"epoch": self.epoch, "step": self.step, "epoch_stats": self.stats.state_dict(),
                "rank_weights": self.rank_weights}

    def load_state_dict(self, sd: dict) -> None:
        self.epoch, self.step = sd["epoch"], sd["step"]
        self.rank_weights = list(sd.get("rank_weights", []))
        self.stats = EpochStats()
        self.stats.load_state_dict(sd["epoch_stats"])
        self.set_stages(stages_for_epoch(self.cfg.train, self.epoch))

    def load_scaler(self, sd: dict) -> None:
        if sd:  # {} from a run without fp16 scaling (CPU, bf16): nothing to restore
            self.scaler.load_state_dict(sd)

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

    def agree_stop(self) -> bool:
        """Whether any rank was asked to stop (every rank calls this at the same step)."""
        stop = self.dist.agree(self.stop_requested, any_rank=True)
        if stop and not self.stop_requested:
            self.stop_requested = True
            self.reporter.say("another rank was asked to stop: finishing the current step, "
                              "then saving")
        return stop

    def _drain(self) -> float:
        """Wait for the GPU's queued work (CUDA; nothing on CPU); returns the seconds."""
        t = time.perf_counter()
        if self.runtime.device.type == "cuda":
            torch.cuda.synchronize(self.runtime.device)
        self.stats.flush()
        return time.perf_counter() - t


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a model's state_dict (every parameter and buffer: names, dtypes, shapes
    and bytes): equal digests are equal weights."""
    h = hashlib.sha256()
    for name, t in state.items():
        h.update(f"{name} {t.dtype} {tuple(t.shape)};".encode())
        h.update(t.detach().reshape(-1).cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
