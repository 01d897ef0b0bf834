"""DALI pipeline graphs: video files and JPEG frame folders, train and eval, GPU and CPU.

One function builds every variant (`clip_pipeline`), keyed by `is_training`, the input kind
and the device; the GPU and CPU variants differ only in the decoder backend and where the
data moves to the GPU. Frame indices and augmentation parameters are not drawn inside DALI:
they come from the external source, from the clip's plan (`meld_dali.data.plan`), the CPU
loader's own, so both backends see the same frames, draw and test view for a clip.
"""

from __future__ import annotations

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from meld_dali.config import DataConfig
from meld_dali.transforms import AugParams, colour_affine

# columns of `dali_params`
CROP_Y, CROP_X, FLIP, ANGLE = range(4)
MEAN, STD = slice(4, 7), slice(7, 10)
OUTPUTS = ("video", "label", "index", "mask")


def outputs(views: int = 1) -> tuple[str, ...]:
    """The pipeline's outputs: OUTPUTS, or with several training draws per decoded clip
    (`views` > 1) one video and one mask per draw."""
    if views == 1:
        return OUTPUTS
    return (*(f"video{v}" for v in range(views)), "label", "index",
            *(f"mask{v}" for v in range(views)))


def dali_params(p: AugParams, data: DataConfig) -> np.ndarray:
    """One clip's draw in the form the fused graph applies it (float32 [10]).

    - flip then rotate by a == rotate by -a then flip, so the flip can move into
      crop_mirror_normalize (one pass over the pixels instead of two);
    - contrast/brightness then normalization is one affine map x * scale + shift
      (`transforms.colour_affine`, the CPU loader's too) = (x - m') / s' with s' = 1 / scale,
      m' = -shift / scale: the per-sample mean/std of the normalization, so colour costs
      nothing."""
    scale, shift = (v.double().numpy() for v in colour_affine(p, data))
    std = 1 / scale
    angle = -p.angle if p.flip else p.angle
    return np.concatenate([[p.crop_y, p.crop_x, float(p.flip), angle], -shift * std, std]
                          ).astype(np.float32)


def augment(frames, params, data: DataConfig, is_training: bool, dtype, layout: str = "CFHW",
            resize: bool = True):
    """The augmentation spec on a sequence (FHWC uint8) or frame (HWC), one draw per sample:
    resize shorter side -> crop -> flip -> rotate -> contrast/brightness -> normalize
    (fused as resize -> crop -> rotate -> flip+colour+normalize, see `dali_params`),
    returned as `layout` in `dtype`. Eval: resize -> crop at the plan's view (the centre
    crop, or a multi-view test's) -> normalize.
    `resize=False` when the input already has the configured shorter side (frame folders, or a
    clip cache at data.short_side)."""
    if resize:
        frames = resize_short(frames, data)
    size = (data.crop_size, data.crop_size)
    if not is_training:
        return fn.crop_mirror_normalize(frames, crop=size, crop_pos_y=params[CROP_Y],
                                        crop_pos_x=params[CROP_X], out_of_bounds_policy="pad",
                                        fill_values=0, dtype=dtype, output_layout=layout,
                                        mean=[255 * m for m in data.mean],
                                        std=[255 * s for s in data.std])
    frames = fn.crop(frames, crop=size, crop_pos_y=params[CROP_Y], crop_pos_x=params[CROP_X],
                     out_of_bounds_policy="pad", fill_values=0)
    if data.rotate_deg:  # DALI's warp costs the same at angle 0: leave it out of the graph
        interp = types.INTERP_NN if data.rotate_interp == "nearest" else types.INTERP_LINEAR
        frames = fn.rotate(frames, angle=params[ANGLE], keep_size=True, fill_value=0,
                           interp_type=interp)
    return fn.crop_mirror_normalize(frames, mirror=fn.cast(params[FLIP], dtype=types.INT32),
                                    mean=params[MEAN], std=params[STD], dtype=dtype,
                                    output_layout=layout)


def resize_short(frames, data: DataConfig):
    """Frames to the training short side (per frame: a sequence's frames one by one)."""
    return fn.resize(frames, resize_shorter=data.short_side, antialias=True,
                     interp_type=types.INTERP_LINEAR)


@pipeline_def(enable_conditionals=False)
def clip_pipeline(source, data: DataConfig, is_training: bool, kind: str, device: str, dtype,
                  resize: bool = True, views: int = 1):
    """kind 'video': one encoded file per sample, decoded at the given frame indices (out of
    range = padded slots, filled with 0). kind 'frames': one JPEG per sample (B*T samples,
    each carrying its clip's parameters); the loader regroups them into clips.
    `views` > 1 (kind 'video', training): `views` draws per clip from one decode
    (`decode_views`)."""
    if views > 1:
        return decode_views(source, data, device, dtype, resize, views)
    encoded, frame_idx, params, label, index, mask = fn.external_source(
        source=source, num_outputs=6, batch=True, batch_info=True, parallel=False,
        dtype=[types.UINT8, types.INT32, types.FLOAT, types.INT64, types.INT64, types.UINT8])
    decoder = "mixed" if device == "gpu" else "cpu"
    if kind == "video":
        frames = fn.decoders.video(encoded, device=decoder, frames=frame_idx,
                                   pad_mode="constant", fill_value=0)
    else:
        frames = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
    video = augment(frames, params, data, is_training, dtype,
                    "CFHW" if kind == "video" else "CHW", resize)
    if device == "gpu":
        label, index, mask = label.gpu(), index.gpu(), mask.gpu()
    return video, label, index, mask


def decode_views(source, data: DataConfig, device: str, dtype, resize: bool, views: int):
    """Several training draws of each clip from one decode (`loader.views_per_decode`):
    the union of the draws' frames is decoded and resized once, then each draw takes its
    frames from it (`sequence_rearrange`, by its order in the union) and gets its own
    augmentation. Outputs `outputs(views)`."""
    per_view = [types.INT32, types.FLOAT, types.UINT8]  # order in the union, draw, mask
    encoded, union, label, index, *drawn = fn.external_source(
        source=source, num_outputs=4 + 3 * views, batch=True, batch_info=True, parallel=False,
        dtype=[types.UINT8, types.INT32, types.INT64, types.INT64, *per_view * views])
    frames = fn.decoders.video(encoded, device="mixed" if device == "gpu" else "cpu",
                               frames=union, pad_mode="constant", fill_value=0)
    if resize:
        frames = resize_short(frames, data)
    videos = [augment(fn.sequence_rearrange(frames, new_order=order), params, data, True,
                      dtype, "CFHW", resize=False)
              for order, params in zip(drawn[0::3], drawn[1::3], strict=True)]
    masks = drawn[2::3]
    if device == "gpu":
        label, index, masks = label.gpu(), index.gpu(), [m.gpu() for m in masks]
    return (*videos, label, index, *masks)
