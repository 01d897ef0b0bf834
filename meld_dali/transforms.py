"""The augmentation spec for the CPU loader (torchvision.transforms.v2 functionals).

One draw of parameters per clip (`draw_params`), applied alike to every frame
(`apply_clip`). The DALI graphs consume the same `AugParams` (fed per sample), so both
backends apply the same crop position, flip, angle and colour factors to the same clip.
Order: resize shorter side -> crop -> flip -> rotate -> contrast/brightness -> normalize.
Colour follows DALI's brightness_contrast: out = b * (0.5 + c * (x - 0.5)), x in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as F

from meld_dali.config import DataConfig
from meld_dali.sampling import clip_rng


@dataclass(frozen=True)
class AugParams:
    crop_y: float = 0.5  # crop anchor as a fraction of the free room (0 = top, 1 = bottom)
    crop_x: float = 0.5
    flip: bool = False
    angle: float = 0.0  # degrees, counter-clockwise
    brightness: float = 1.0
    contrast: float = 1.0


EVAL_PARAMS = AugParams()


def draw_params(cfg: DataConfig, *, seed: int, epoch: int, clip: int) -> AugParams:
    """The per-clip random draw; seeded like the frame indices (separate stream)."""
    rng = clip_rng(seed, epoch, clip, 1)
    y, x, flip_u, angle_u, b_u, c_u = rng.random(6)
    return AugParams(
        crop_y=float(y), crop_x=float(x), flip=bool(flip_u < cfg.flip_p),
        angle=float((2 * angle_u - 1) * cfg.rotate_deg),
        brightness=float(cfg.brightness[0] + b_u * (cfg.brightness[1] - cfg.brightness[0])),
        contrast=float(cfg.contrast[0] + c_u * (cfg.contrast[1] - cfg.contrast[0])))


def crop_box(h: int, w: int, size: int, p: AugParams) -> tuple[int, int]:
    """Top-left corner of the size x size crop (DALI's crop_pos semantics)."""
    top = int(round(p.crop_y * max(h - size, 0)))
    left = int(round(p.crop_x * max(w - size, 0)))
    return top, left


def apply_clip(frames: torch.Tensor, cfg: DataConfig, p: AugParams) -> torch.Tensor:
    """uint8 [t, 3, H, W] -> float32 [3, t, crop, crop], normalized."""
    if min(frames.shape[-2:]) != cfg.short_side:  # cached clips and frames are already there
        frames = F.resize(frames, [cfg.short_side], antialias=True)
    x = frames
    top, left = crop_box(x.shape[-2], x.shape[-1], cfg.crop_size, p)
    x = F.crop(x, top, left, cfg.crop_size, cfg.crop_size)
    if p.flip:
        x = F.horizontal_flip(x)
    if p.angle:
        mode = (F.InterpolationMode.NEAREST if cfg.rotate_interp == "nearest"
                else F.InterpolationMode.BILINEAR)
        x = F.rotate(x, p.angle, interpolation=mode, fill=0)
    x = x.float().div_(255)
    if p.contrast != 1.0 or p.brightness != 1.0:
        x = ((x - 0.5) * p.contrast + 0.5) * p.brightness
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.permute(1, 0, 2, 3).contiguous()
