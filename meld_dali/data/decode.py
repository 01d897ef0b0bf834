"""Frames of one clip, decoded: from its video (PyAV), its JPEG frame folder (PIL) or its
cached re-encoding, and `to_clip`, the CPU form of the augmentation + pad + mask step.

What `predict`, the CPU loader and the DALI loader's CPU recovery share; no loader lives
here.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter
from PIL import Image

from meld_dali.clips import Clip
from meld_dali.config import DataConfig
from meld_dali.manifest import Manifest
from meld_dali.transforms import AugParams, apply_clip, colour_affine, geometry

SEEK_GAP = 96  # frames: skipping more than this many pays for a seek to a keyframe
# How PyAV/FFmpeg threads a clip's decoder: "NONE" (one thread), "SLICE", "AUTO" or "FRAME"
# (frame threading). Never frame threading: the loader stops decoding before the end of the
# stream, the pattern NVIDIA TAO found stalls loader workers. One thread, by measurement
# (`python -m meld_dali.bench.decoder_threads`: sampled decodes of 32 of 75 frames per s,
# textured H.264, 2 DataLoader workers = one per core on a 2-core box shared with other jobs,
# medians of 3/5/3 interleaved rounds, load 6-8 / 6-10 / 3-5 in runs 1 / 2 / 3):
#   1280x720:            AUTO 3.6 / 2.0 / 2.7     SLICE 3.7 / 1.1 / 2.6    NONE 2.8 / 1.2 / 2.4
#   456x256 (the cache): AUTO 15.4 / 16.4 / 18.3  SLICE 12.9 / 16.4 / 20.0 NONE 16.3 / 19.3 / 18.3
# SLICE and NONE tie within the noise (x264 writes one slice a frame: slice threads have
# nothing to split, FFmpeg only starts a pool of them for each clip it opens). Frame
# threading's lead at 720p (up to 1.3x, by running more threads than cores) is not taken:
# the stall. One thread: no pool per clip, no oversubscription with a worker per core.
# In the main process (0 workers,
# runs 1 / 3): 720p AUTO 1.4 / 1.9, SLICE 1.1 / 2.0, NONE 1.7 / 1.8; 456x256 AUTO 12.7 / 15.9,
# SLICE 8.8 / 18.1, NONE 11.2 / 17.7.
THREADS = "NONE"


def threaded_decoding(stream, threads: str | None = None) -> None:
    """Set `stream`'s decoder threading (`threads`, default THREADS)."""
    threads = threads or THREADS
    if threads == "NONE":
        stream.thread_count = 1
        stream.thread_type = "NONE"
    else:
        stream.thread_type = threads


def read_video_frames(path: str | Path, indices: np.ndarray,
                      seek_gap: int = SEEK_GAP, threads: str | None = None) -> np.ndarray:
    """Decode the frames at sorted `indices` (uint8 [k, H, W, 3]).

    Decoding streams forward and stops at the last wanted frame; across a gap of more than
    `seek_gap` frames (MELD's long outliers) it seeks to the keyframe before the next
    wanted frame and numbers frames by their timestamps from there. Frames a lying container
    does not actually hold are returned as fewer rows. `threads`: the decoder's threading
    (default THREADS)."""
    wanted = [int(i) for i in indices]
    out: list[np.ndarray] = []
    rgb = VideoReformatter()  # one conversion context per clip: `to_ndarray` makes one a frame
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        if stream.codec_context.codec.intra_only:  # MJPEG: each frame decodes on its own
            return _stack(_intra_frames(c, stream, wanted, rgb))
        threaded_decoding(stream, threads)
        rate, tb = stream.average_rate, stream.time_base
        ticks = float(1 / (rate * tb)) if rate and tb else None  # pts ticks per frame
        t0 = stream.start_time or 0
        frames = c.decode(stream)
        pos, j, by_pts, sought = -1, 0, False, -1

        def worth_seeking() -> bool:  # far ahead, and not the frame just sought
            return bool(ticks) and wanted[j] - pos > seek_gap and wanted[j] != sought

        while j < len(wanted):
            if worth_seeking():
                sought = wanted[j]
                c.seek(t0 + int(sought * ticks), stream=stream, backward=True)
                frames, by_pts = c.decode(stream), True
            decoded = False
            for frame in frames:
                decoded = True
                pos = (round((frame.pts - t0) / ticks) if by_pts and frame.pts is not None
                       else pos + 1)
                while j < len(wanted) and wanted[j] < pos:  # overshot: not in the file
                    j += 1
                if j < len(wanted) and wanted[j] == pos:
                    img = rgb.reformat(frame, format="rgb24").to_ndarray()
                    while j < len(wanted) and wanted[j] == pos:
                        out.append(img)
                        j += 1
                if j == len(wanted) or worth_seeking():
                    break
            if not decoded:
                break  # end of stream
    return _stack(out)


def _intra_frames(container, stream, wanted: list[int], rgb) -> list[np.ndarray]:
    """The frames at sorted `wanted` of an intra-only stream: only their packets are
    decoded (a packet is a frame, numbered in stream order; empty packets hold none)."""
    out: list[np.ndarray] = []
    pos, j = -1, 0
    for packet in container.demux(stream):
        if not packet.size:  # the flush packet, or a dropped frame's empty one
            continue
        pos += 1
        if wanted[j] == pos:
            imgs = [rgb.reformat(f, format="rgb24").to_ndarray() for f in stream.decode(packet)]
            while j < len(wanted) and wanted[j] == pos:  # none if undecodable: a row fewer
                out += imgs[:1]
                j += 1
            if j == len(wanted):
                break
    return out


def _stack(frames: list[np.ndarray]) -> np.ndarray:
    if not frames:
        raise ValueError("no frame could be decoded")
    return np.stack(frames)


def upright(frames: np.ndarray, rotation: int) -> np.ndarray:
    """Frames [k, H, W, 3] turned as the file's display rotation asks (degrees
    counterclockwise, a multiple of 90: what phones write)."""
    quarter = round(rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(frames, quarter, axes=(1, 2))) if quarter else frames


def read_frame_folder(folder: str | Path, indices: np.ndarray) -> np.ndarray:
    folder = Path(folder)
    return np.stack([np.asarray(Image.open(folder / f"{i:06d}.jpg").convert("RGB"))
                     for i in indices.tolist()])


def cached_or_video(manifest: Manifest, clip: Clip) -> Path:
    """A clip's re-encoded file, or its source video when its re-encode failed."""
    return manifest.cache_path(clip) or manifest.video_path(clip)


# source -> (where the clip's frames are, how to read them); `data.source` resolves to one
READERS = {"video": (Manifest.video_path, read_video_frames),
           "frames": (Manifest.frames_path, read_frame_folder),
           "cache": (cached_or_video, read_video_frames)}


def clip_source_path(manifest: Manifest, clip: Clip, source: str) -> Path:
    return READERS[source][0](manifest, clip)


def read_clip(manifest: Manifest, clip: Clip, indices: np.ndarray, source: str) -> np.ndarray:
    """Frames uint8 [k, H, W, 3] of one manifest clip from the resolved `source`."""
    where, read = READERS[source]
    return read(where(manifest, clip), indices)


def to_clip(frames: np.ndarray, data: DataConfig,
            params: AugParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded uint8 [k, H, W, 3] frames -> (video [3, T, S, S] transformed and normalized,
    the T - k padded slots added as zeros; mask bool [T], True for the k real frames)."""
    x = apply_clip(torch.from_numpy(frames).permute(0, 3, 1, 2), data, params)
    k = x.shape[1]
    pad = data.num_frames - k
    video = torch.cat([x, x.new_zeros(3, pad, *x.shape[2:])], dim=1) if pad else x
    mask = torch.zeros(data.num_frames, dtype=torch.bool)
    mask[:k] = True
    return video, mask


def to_clip_uint8(frames: np.ndarray | torch.Tensor, data: DataConfig, params: AugParams
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`to_clip` stopped before the colour: decoded uint8 [k, H, W, 3] frames (or
    `transforms.resize_short`'s [k, 3, h, w]) -> (video uint8
    [3, T, S, S] resized, cropped, flipped and rotated, padded slots 0, stored channels-last
    ([T, S, S, 3] in memory); mask bool [T]; scale and shift float32 [3], the colour +
    normalization affine `video * scale + shift` that makes `to_clip`'s video at the real
    frames). What the CPU loader's workers deliver: a quarter of the float clip's bytes, and
    no float pass on the CPU (`base.RawBatch.normalized` does it where the batch lands)."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(frames).permute(0, 3, 1, 2)
    hwc = geometry(frames, data, params)
    k = hwc.shape[0]
    thwc = torch.zeros(data.num_frames, *hwc.shape[1:], dtype=torch.uint8)
    np.copyto(thwc.numpy()[:k], hwc)  # one copy, whatever hwc's strides (a flip)
    mask = torch.zeros(data.num_frames, dtype=torch.bool)
    mask[:k] = True
    scale, shift = colour_affine(params, data)
    return thwc.permute(3, 0, 1, 2), mask, scale, shift
