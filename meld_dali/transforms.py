"""The augmentation spec for the CPU loader (torchvision resize, OpenCV warp, torch).

One draw of parameters per clip (`draw_params`), applied alike to every frame
(`apply_clip`). The DALI graphs consume the same `AugParams` (fed per sample), so both
backends apply the same crop position, flip, angle and colour factors to the same clip.
Order: resize shorter side -> crop -> flip -> rotate -> contrast/brightness -> normalize.
Colour follows DALI's brightness_contrast: out = b * (0.5 + c * (x - 0.5)), x in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torchvision.transforms.v2.functional as F

from meld_dali.config import DataConfig
from meld_dali.sampling import clip_rng

cv2.setNumThreads(1)  # one clip per DataLoader worker: no thread pool inside each warp


@dataclass(frozen=True)
class AugParams:
    crop_y: float = 0.5  # crop anchor as a fraction of the free room (0 = top, 1 = bottom)
    crop_x: float = 0.5
    flip: bool = False
    angle: float = 0.0  # degrees, counter-clockwise
    brightness: float = 1.0
    contrast: float = 1.0


def draw_params(data: DataConfig, *, seed: int, epoch: int, row: int,
                draw: int = 0) -> AugParams:
    """The per-clip random draw; seeded like the frame indices (separate stream)."""
    rng = clip_rng(seed, epoch, row, 1, draw)
    y, x, flip_u, angle_u, b_u, c_u = rng.random(6)
    return AugParams(
        crop_y=float(y), crop_x=float(x), flip=bool(flip_u < data.flip_p),
        angle=float((2 * angle_u - 1) * data.rotate_deg),
        brightness=float(data.brightness[0] + b_u * (data.brightness[1] - data.brightness[0])),
        contrast=float(data.contrast[0] + c_u * (data.contrast[1] - data.contrast[0])))


def crop_box(h: int, w: int, size: int, p: AugParams) -> tuple[int, int]:
    """Top-left corner of the size x size crop (DALI's crop_pos semantics)."""
    top = int(round(p.crop_y * max(h - size, 0)))
    left = int(round(p.crop_x * max(w - size, 0)))
    return top, left


def rotation(p: AugParams, size: int) -> np.ndarray:
    """The 2x3 map (source -> output pixel) of flip-then-rotate by p.angle degrees
    counter-clockwise about the crop's centre (torchvision's and DALI's convention)."""
    c = (size - 1) / 2
    m = cv2.getRotationMatrix2D((c, c), p.angle, 1.0)
    if p.flip:  # x -> size - 1 - x first
        m = m @ np.array([[-1.0, 0, size - 1], [0, 1, 0], [0, 0, 1]])
    return m


def colour_affine(p: AugParams, data: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Brightness/contrast then normalization as one affine map of the uint8 pixel x:
    ((b * (0.5 + c * (x / 255 - 0.5))) - mean) / std = x * scale + shift, per channel
    (float32 [3] each). The CPU loader applies it as one multiply-add; DALI's graph as the
    per-sample mean/std of its normalization (`pipelines.graphs.dali_params`)."""
    mean, std = torch.tensor(data.mean), torch.tensor(data.std)
    b, c = p.brightness, p.contrast
    return b * c / (255 * std), (b * 0.5 * (1 - c) - mean) / std


def resize_short(frames: torch.Tensor, data: DataConfig) -> torch.Tensor:
    """uint8 [t, 3, H, W] at the training short side: the augmentation's first step, one
    frame at a time, so several views of one decode can share it (frames at that size
    already come back untouched)."""
    return F.resize(frames, [data.short_side], antialias=True)


def geometry(frames: torch.Tensor, data: DataConfig, p: AugParams) -> np.ndarray:
    """uint8 [t, 3, H, W] -> uint8 [t, crop, crop, 3]: resize, crop, flip and rotation, the
    part of the augmentation that moves pixels (the CPU loader's workers stop here; the
    colour + normalization affine is applied where the batch lands, `colour_affine`).

    Cheap where it can be (the CPU loader's cost on a clip cache is mostly here): frames
    already at the short side (cached clips, frame folders) come back from the resize
    untouched (torchvision returns its input when the size is unchanged); flip and rotation
    in one OpenCV warp per frame (~4x faster than torchvision's grid sampling, same map)."""
    frames = resize_short(frames, data)
    S = data.crop_size
    top, left = crop_box(frames.shape[-2], frames.shape[-1], S, p)
    hwc = frames[..., top:top + S, left:left + S].permute(0, 2, 3, 1).numpy()  # [t, S, S, 3]
    if p.angle:
        m = rotation(p, S)
        interp = cv2.INTER_NEAREST if data.rotate_interp == "nearest" else cv2.INTER_LINEAR
        hwc = np.stack([cv2.warpAffine(np.ascontiguousarray(f), m, (S, S), flags=interp,
                                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)
                        for f in hwc])
    elif p.flip:
        hwc = hwc[:, :, ::-1]
    return hwc


def apply_clip(frames: torch.Tensor, data: DataConfig, p: AugParams) -> torch.Tensor:
    """uint8 [t, 3, H, W] -> float32 [3, t, crop, crop], normalized: `geometry`, then
    colour and normalization in one multiply-add. The float reference (`verify`, `predict`,
    tests); the CPU loader delivers `geometry`'s uint8 and the affine instead."""
    hwc = geometry(frames, data, p)
    x = torch.from_numpy(np.ascontiguousarray(hwc)).permute(3, 0, 1, 2).contiguous()
    scale, shift = (v.view(3, 1, 1, 1) for v in colour_affine(p, data))
    return torch.addcmul(shift, x.float(), scale)
