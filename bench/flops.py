"""FLOPs for `bench train`: per clip and per training step, on an uncompiled model.

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode, which counts 2 FLOPs per
multiply-accumulate (FLOPs = 2 x MACs): pytorchvideo's 65.7 GMACs per SlowFast R50 8x8 clip
read ~131 GFLOPs here. `fwd_gflops_per_clip` is one forward of one clip; the training FLOPs
are counted over a real forward+backward of one micro-batch at the row's stage (a frozen
backbone has no backward through it, so no 3x-forward rule of thumb is used). They are
counted on an uncompiled copy of the model, never on the compiled one: a compiled callable
first run under FlopCounterMode stays on its eager fallback (PyTorch issue #140909), so the
compiled row would time eager code.
"""

from __future__ import annotations

import torch

from meld_dali.hardware import gpu_facts
from meld_dali.runtime import Runtime


def peak_tflops(device: torch.device) -> float | None:
    """The device's dense fp16/bf16 peak (hardware.GPUS); None on CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    gpu = gpu_facts(torch.cuda.get_device_name(device))
    return gpu.peak_tflops if gpu else None


def count_flops(fn) -> int:
    """FLOPs (2 per MAC) that `fn()` runs, counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def forward_flops(model: torch.nn.Module, T: int, S: int, device: torch.device,
                  dtype: torch.dtype = torch.float32) -> int:
    """FLOPs of one forward of one clip [1, 3, T, S, S] (eval mode, no grad)."""
    video = torch.zeros(1, 3, T, S, S, device=device, dtype=dtype)
    mask = torch.ones(1, T, dtype=torch.bool, device=device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return count_flops(lambda: model(video, mask))
    finally:
        model.train(was)


def train_step_flops(model: torch.nn.Module, runtime: Runtime, criterion, batch) -> int:
    """FLOPs of the forward+backward of one micro-batch as the trainer runs it (autocast,
    loss) on `model`, an uncompiled copy at the row's stage; its gradients are dropped."""
    def step():
        with runtime.autocast():
            loss = criterion(model(batch.video, batch.mask), batch.label)
        loss.backward()

    was = model.training
    model.train()
    try:
        return count_flops(step)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was)


def uncompiled(model: torch.nn.Module) -> torch.nn.Module:
    """`model` itself, refused if any block of it was compiled (runtime.compile_regional
    marks them): FLOPs are never counted through compiled code."""
    if any(getattr(m, "_meld_compiled", False) for m in model.modules()):
        raise RuntimeError("FLOPs must be counted on an uncompiled model (PyTorch #140909: "
                           "a compiled callable first run under FlopCounterMode stays eager)")
    return model
