"""DALI pipeline graphs: video files and JPEG frame folders, train and eval, GPU and CPU.

One function builds every variant (`clip_pipeline`), keyed by `is_training`, the input kind
and the device; the GPU and CPU variants differ only in the decoder backend and where the
data moves to the GPU. Frame indices and augmentation parameters are not drawn inside DALI:
they come from the external source, computed by the same sampling spec and `draw_params`
as the CPU loader, so both backends see the same frames and the same draw for a clip.
"""

from __future__ import annotations

from nvidia.dali import fn, pipeline_def, types

from meld_dali.config import DataConfig

# columns of AugParams.as_array()
CROP_Y, CROP_X, FLIP, ANGLE, BRIGHTNESS, CONTRAST = range(6)
OUTPUTS = ("video", "label", "index", "mask")


def augment(frames, params, cfg: DataConfig, is_training: bool, dtype, layout: str = "CFHW"):
    """The augmentation spec on a sequence (FHWC uint8) with one draw per sample:
    resize shorter side -> crop -> flip -> rotate -> contrast/brightness -> normalize,
    returned as `layout` (CFHW for sequences, CHW for single frames) in `dtype`.
    Eval: resize -> center crop -> normalize."""
    frames = fn.resize(frames, resize_shorter=cfg.short_side, antialias=True,
                       interp_type=types.INTERP_LINEAR)
    size = (cfg.crop_size, cfg.crop_size)
    if is_training:
        frames = fn.crop(frames, crop=size, crop_pos_y=params[CROP_Y], crop_pos_x=params[CROP_X],
                         out_of_bounds_policy="pad", fill_values=0)
        frames = fn.flip(frames, horizontal=fn.cast(params[FLIP], dtype=types.INT32))
        frames = fn.rotate(frames, angle=params[ANGLE], keep_size=True, fill_value=0,
                           interp_type=types.INTERP_LINEAR)
        # b * (c0 + c * (x - c0)) with c0 = mid-range: DALI's formula, as the CPU loader's
        frames = fn.brightness_contrast(frames, brightness=params[BRIGHTNESS],
                                        contrast=params[CONTRAST], contrast_center=127.5,
                                        dtype=types.FLOAT)
    else:
        frames = fn.crop(frames, crop=size, out_of_bounds_policy="pad", fill_values=0)
    return fn.crop_mirror_normalize(frames, dtype=dtype, output_layout=layout,
                                    mean=[255 * m for m in cfg.mean],
                                    std=[255 * s for s in cfg.std])


@pipeline_def(enable_conditionals=False)
def clip_pipeline(source, cfg: DataConfig, is_training: bool, kind: str, device: str, dtype):
    """kind 'video': one encoded file per sample, decoded at the given frame indices (out of
    range = padded slots, filled with 0). kind 'frames': one JPEG per sample (B*T samples,
    each carrying its clip's parameters); the loader regroups them into clips."""
    encoded, frame_idx, params, label, index, mask = fn.external_source(
        source=source, num_outputs=6, batch=True, batch_info=True, parallel=False,
        dtype=[types.UINT8, types.INT32, types.FLOAT, types.INT64, types.INT64, types.UINT8])
    decoder = "mixed" if device == "gpu" else "cpu"
    if kind == "video":
        frames = fn.decoders.video(encoded, device=decoder, frames=frame_idx,
                                   pad_mode="constant", fill_value=0)
    else:
        frames = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
    video = augment(frames, params, cfg, is_training, dtype,
                    "CFHW" if kind == "video" else "CHW")
    if device == "gpu":
        label, index, mask = label.gpu(), index.gpu(), mask.gpu()
    return video, label, index, mask
