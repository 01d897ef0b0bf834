"""The process group a run trains in: one process (`Dist`) or DDP under torchrun (`DDP`).

Every collective the trainer and evaluation need is a method here, and the single-process
object answers each without communicating, so neither the trainer nor scoring branches on
the number of processes. Every rank calls a collective at the same point of the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterable, Iterator
from datetime import timedelta
from itertools import islice

import torch
from torch import nn

# How long a collective waits for the other ranks before it fails (gloo's default is 30
# minutes, NCCL's 10): a rank whose peer is gone or stuck (its launcher killed, see
# signals.stop_with_launcher) raises instead of hanging, and exits. Ranks never wait on each
# other for long by design: rank 0's `prepare` is waited for by polling a file, not in a
# collective, and hub pushes run in a thread.
PG_TIMEOUT = timedelta(minutes=10)


class Dist:
    """One process: every collective is the identity."""

    rank, world = 0, 1

    @property
    def main(self) -> bool:
        """The rank that writes checkpoints, logs and the run folder."""
        return self.rank == 0

    def start(self, device: torch.device) -> torch.device:
        """Join the process group; returns the device this rank trains on."""
        return device

    def wrap(self, model: nn.Module) -> nn.Module:
        """What runs forward and backward: the model itself."""
        return model

    def no_sync(self, net: nn.Module, skip: bool):
        """A context without the gradient all-reduce (micro-batches inside a group)."""
        return contextlib.nullcontext()

    def agree(self, flag: bool, any_rank: bool = False) -> bool:
        """One flag agreed over ranks: every rank's (all), or with any_rank any rank's."""
        return flag

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order."""
        return [obj]

    def average_grads(self, model: nn.Module) -> None:
        """Average gradients accumulated under no_sync over ranks."""

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Every rank takes rank 0's buffers (BatchNorm statistics)."""

    def batches(self, loader: Iterable, limit: int | None = None) -> Iterator:
        """The loader's batches while every rank has one, at most `limit` (the same on every
        rank) of them: a generator, `close` ends it."""
        it = iter(loader)
        try:
            yield from islice(it, limit)
        finally:
            _close(it)


class DDP(Dist):
    """torchrun's process group: NCCL on GPU, gloo on CPU."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.device = torch.device("cpu")
        self.flags = None  # a gloo group for the flags: CPU tensors, never a GPU sync

    def start(self, device: torch.device) -> torch.device:
        import torch.distributed as tdist

        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        if not tdist.is_initialized():
            tdist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                     timeout=PG_TIMEOUT)
        # the flags (`agree`, `batches`) go over their own gloo group: reading an NCCL
        # result would wait for every kernel queued before it, and a flag on the default
        # group would queue behind the gradient all-reduce
        self.flags = tdist.new_group(backend="gloo", timeout=PG_TIMEOUT)
        self.device = device
        return device

    def wrap(self, model: nn.Module) -> nn.Module:
        # DDP registers only the parameters that require grad when it wraps, so the trainer
        # wraps again at each unfreezing; buffers stay per rank (`broadcast_buffers` before
        # evaluation), which saves a broadcast per forward
        dev = self.device
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None,
            broadcast_buffers=False)

    def no_sync(self, net: nn.Module, skip: bool):
        return net.no_sync() if skip else contextlib.nullcontext()

    def agree(self, flag: bool, any_rank: bool = False) -> bool:
        import torch.distributed as tdist

        t = torch.tensor([int(flag)])  # on the host: `item` waits for no GPU work
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX if any_rank else tdist.ReduceOp.MIN,
                         group=self.flags)
        return bool(t.item())

    def gather(self, obj) -> list:
        import torch.distributed as tdist

        parts: list = [None] * self.world
        tdist.all_gather_object(parts, obj)
        return parts

    def average_grads(self, model: nn.Module) -> None:
        import torch.distributed as tdist

        for p in model.parameters():
            if p.grad is not None:
                tdist.all_reduce(p.grad)
                p.grad.div_(self.world)

    def broadcast_buffers(self, model: nn.Module) -> None:
        import torch.distributed as tdist

        for buf in model.buffers():
            tdist.broadcast(buf, src=0)

    def batches(self, loader: Iterable, limit: int | None = None) -> Iterator:
        # A skipped clip can leave a rank a batch short; DDP needs every rank in every step,
        # so all stop where the first runs out. The flag "I have batch k+1" is fetched and
        # its all-reduce started (async, on the host) before batch k is handed out; its
        # result is read when batch k+1 is due, a micro-batch of compute later, by when every
        # rank has sent it: no host sync per micro-batch, the loader stays one batch ahead.
        # `limit` (the same on every rank) keeps it from decoding a batch past the step cap.
        import torch.distributed as tdist

        it = iter(loader)
        holds = hasattr(loader, "held")  # a ClipLoader: what a save records (see below)
        left = float("inf") if limit is None else limit

        def fetch():
            nonlocal left
            if left <= 0:
                return None
            left -= 1
            batch = next(it, None)
            have = torch.tensor([int(batch is not None)])
            work = tdist.all_reduce(have, op=tdist.ReduceOp.MIN, group=self.flags,
                                    async_op=True)
            return batch, have, work

        try:
            ahead = fetch()
            while ahead is not None:
                batch, have, work = ahead
                work.wait()  # sent a micro-batch ago: done, in the common case
                if not have.item():  # a CPU tensor: no GPU sync
                    return
                mark = dataclasses.replace(loader.position) if holds else None
                ahead = fetch()
                if holds:  # a save before the batch ahead is handed out takes it again
                    loader.held = mark if ahead is not None else None
                yield batch
        finally:
            _close(it)  # the loader pass ends with this generator
            if holds:
                loader.held = None


def _close(it: Iterator) -> None:
    close = getattr(it, "close", None)
    if close is not None:
        close()


def from_env() -> Dist:
    """The process group torchrun describes in the environment (one process without it)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    return DDP(int(os.environ.get("RANK", 0)), world) if world > 1 else Dist()
