"""Where and how the model runs: device, AMP dtype, video dtype, memory format, compile.

Resolved once from the config and the machine (`Runtime.resolve`) and handed to the trainer,
the loaders, `evaluate`, `predict` and the bench, so a checkpoint evaluated later runs
exactly as the trainer's own dev pass did (same autocast, same memory format).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from meld_dali.config import Config
from meld_dali.errors import UserError
from meld_dali.hardware import gpu_facts

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# 32 ResBlocks share one forward code object (~16 shapes x frozen/trainable); dynamo's
# default recompile limit (8) would silently leave the rest eager.
RECOMPILE_LIMIT = 64


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but no CUDA device is visible")
    return dev


def flag(value: str, device: torch.device) -> bool:
    """'auto' flags are on with CUDA, off on CPU."""
    return device.type == "cuda" if value == "auto" else value == "true"


def compile_enabled(train, device: torch.device) -> bool:
    """train.compile: true/false as given; auto = on only on a GPU where regional compile
    was measured faster than eager (hardware.GPUS: none so far)."""
    if train.compile != "auto":
        return train.compile == "true"
    if device.type != "cuda":
        return False
    gpu = gpu_facts(torch.cuda.get_device_name(device))
    return bool(gpu and gpu.compile_faster)


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp: torch.dtype | None  # autocast dtype; None = full precision
    video_dtype: torch.dtype  # what the loaders deliver
    channels_last: bool  # channels_last_3d for the model and the loaders' video
    compile: bool  # regional torch.compile of the ResBlocks
    compile_backend: str = "inductor"
    cudnn_benchmark: bool = False

    @classmethod
    def resolve(cls, cfg: Config, device: torch.device | None = None) -> Runtime:
        """The config's choices on this machine (`device`: already chosen, e.g. a rank's)."""
        t = cfg.train
        device = device if device is not None else pick_device(t.device)
        cuda = device.type == "cuda"
        amp = AMP_DTYPES.get(t.amp) if cuda else None  # AMP is off on CPU regardless
        if amp is None:  # no autocast: the model computes in fp32, so its input must be too
            video = torch.float32  # (a GPU run's loader.dtype=float16 evaluated on a CPU)
        elif cfg.loader.dtype != "auto":
            video = getattr(torch, cfg.loader.dtype)
        else:  # the dtype autocast computes in: half the bytes from loader to model
            video = amp
        return cls(device, amp, video, flag(cfg.loader.channels_last, device),
                   compile_enabled(t, device), t.compile_backend,
                   flag(t.cudnn_benchmark, device) and cuda)

    @property
    def fp16_scaling(self) -> bool:
        """Whether the loss needs a GradScaler (fp16; bf16 and fp32 do not)."""
        return self.amp == torch.float16

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp or torch.float32,
                              enabled=self.amp is not None)

    def apply(self) -> None:
        """Process-wide switches: cuDNN autotuning."""
        torch.backends.cudnn.benchmark = self.cudnn_benchmark

    def place(self, model: nn.Module) -> nn.Module:
        """The model on the device, in the memory format the loaders deliver."""
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        return model

    def compiled(self, model: nn.Module) -> nn.Module:
        """The model with its ResBlocks compiled in place when compile is on (once;
        parameters and state_dict keys unchanged, so checkpoints never hold compiled code)."""
        if self.compile:
            compile_regional(model, self.compile_backend)
        return model


def compile_regional(model: nn.Module, backend: str = "inductor") -> int:
    """Compile each pytorchvideo ResBlock in place (regional compilation): blocks of the same
    shape share compiled code, an unfreezing recompiles only the blocks whose gradients
    change, and the batch dim is marked dynamic at each block's input so the short last
    batch does not recompile. Stem, fusions, pooling and head stay eager (a small share of
    the FLOPs). Parameters and state_dict keys are untouched. Returns the blocks compiled
    (0 when already done)."""
    import torch._dynamo
    from pytorchvideo.models.resnet import ResBlock

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               RECOMPILE_LIMIT)
    n = 0
    for block in model.modules():
        if isinstance(block, ResBlock) and not getattr(block, "_meld_compiled", False):
            compiled = torch.compile(block.forward, backend=backend)

            def forward(x, _compiled=compiled):
                torch._dynamo.maybe_mark_dynamic(x, 0)  # any batch size: one graph
                return _compiled(x)

            block.forward, block._meld_compiled = forward, True
            n += 1
    return n
