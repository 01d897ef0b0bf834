"""`meld-dali synth`: a small MELD-shaped dataset that a video model can learn.

Layout, CSV columns, class imbalance and clip lengths follow MELD (MELD's published statistics):
    OUT/train/train_sent_emo.csv     OUT/train/train_splits/dia{D}_utt{U}.mp4
    OUT/dev_sent_emo.csv             OUT/dev/dev_splits_complete/...
    OUT/test_sent_emo.csv            OUT/test/output_repeated_splits_test/...
The signal: a square whose colour and pulse rate depend on the emotion, on a random
background with a grey distractor square that moves at random. Colour survives the
brightness/contrast jitter, pulse rate survives flips and crops.
At HD sizes (640x360 and up) the background is a panning multi-scale texture with film-like
grain, and H.264 is encoded like MELD's (High profile, B-frames, about 2.2 Mbit/s at 720p,
scaled with the pixel count), so decoding synthetic data costs what decoding MELD costs.
`faults=True` adds MELD's kinds of defects and records them in OUT/synth.json.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image

from meld_dali.config import EMOTIONS
from meld_dali.meld import CSV_HEADER, CSV_NAMES, VIDEO_DIRS
from meld_dali.probe import run_parallel

# MELD train class shares (MELD's published statistics), in EMOTIONS order.
CLASS_SHARE = {"neutral": 0.47, "surprise": 0.12, "fear": 0.027, "sadness": 0.068,
               "joy": 0.175, "disgust": 0.027, "anger": 0.111}
SPLIT_SHARE = {"train": 0.6, "dev": 0.2, "test": 0.2}
SENTIMENT = {"neutral": "neutral", "joy": "positive", "surprise": "positive",
             "fear": "negative", "sadness": "negative", "disgust": "negative", "anger": "negative"}
# One hue per class (RGB), far apart; pulse periods in frames.
CLASS_RGB = np.array([[0, 220, 220], [255, 220, 0], [255, 0, 200], [0, 40, 255],
                      [0, 200, 0], [130, 80, 0], [255, 0, 0]], dtype=np.float32)
CLASS_PERIOD = [0, 4, 6, 8, 10, 12, 14]  # 0 = no pulse
HD_PIXELS = 640 * 360  # from here on: textured background, MELD-like H.264 bitrate
HD_BITS_PER_PIXEL = 2.2e6 / (1280 * 720 * 24)  # MELD-like 2.2 Mbit/s at 720p24
CODECS = {"h264": ("libx264", "yuv420p", {"preset": "ultrafast", "crf": "23"}),
          "vp9": ("libvpx-vp9", "yuv420p", {"deadline": "realtime", "cpu-used": "8",
                                             "crf": "32", "b": "0"}),
          "mjpeg": ("mjpeg", "yuvj420p", {"q:v": "5"})}


@dataclass
class SynthSpec:
    clips: int = 300
    codec: str = "h264"
    width: int = 64
    height: int = 48
    seed: int = 0
    faults: bool = False
    fps: int = 24


def _class_counts(total: int, rng: np.random.Generator) -> list[int]:
    """Largest-remainder split of `total` over the classes, each class at least 1."""
    shares = np.array([CLASS_SHARE[e] for e in EMOTIONS])
    raw = shares / shares.sum() * total
    counts = np.maximum(1, np.floor(raw)).astype(int)
    order = np.argsort(-(raw - np.floor(raw)))
    i = 0
    while counts.sum() < total:
        counts[order[i % len(order)]] += 1
        i += 1
    while counts.sum() > total:
        counts[int(np.argmax(counts))] -= 1
    return counts.tolist()


def _clip_length(rng: np.random.Generator) -> int:
    """MELD-like: about a fifth under 32 frames, most 32-120, a few long ones."""
    u = rng.random()
    if u < 0.2:
        return int(rng.integers(3, 32))
    if u < 0.96:
        return int(rng.integers(32, 121))
    return int(rng.integers(150, 241))


def render_clip(label: int, n: int, width: int, height: int,
                rng: np.random.Generator, texture: bool = False) -> np.ndarray:
    """uint8 [n, H, W, 3] frames carrying the class signal plus distractors.
    `texture`: a panning textured background with grain (HD sizes) instead of a gradient."""
    if texture:
        return _render_textured(label, n, width, height, rng)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    bg0, bg1 = rng.uniform(20, 120, size=(2, 3)).astype(np.float32)
    grad = (xx / max(width - 1, 1))[..., None]
    background = bg0 * (1 - grad) + bg1 * grad
    side = int(min(width, height) * rng.uniform(0.35, 0.5))
    cx, cy = rng.uniform(side / 2, [width - side / 2, height - side / 2])
    vx, vy = rng.uniform(-1.0, 1.0, size=2)
    dside = int(min(width, height) * 0.3)
    dx, dy = rng.uniform(0, [width - dside, height - dside])
    dvx, dvy = rng.uniform(-2, 2, size=2)
    grey = float(rng.uniform(60, 200))
    color = CLASS_RGB[label] * rng.uniform(0.85, 1.0)
    period = CLASS_PERIOD[label]
    phase = rng.uniform(0, 2 * math.pi)
    frames = np.empty((n, height, width, 3), dtype=np.uint8)
    for t in range(n):
        img = background + rng.normal(0, 3, size=background.shape).astype(np.float32)
        # grey distractor, bouncing
        x0 = int(abs((dx + dvx * t) % (2 * (width - dside))) - 0)
        x0 = x0 if x0 <= width - dside else 2 * (width - dside) - x0
        y0 = int(abs((dy + dvy * t) % (2 * (height - dside))))
        y0 = y0 if y0 <= height - dside else 2 * (height - dside) - y0
        img[y0:y0 + dside, x0:x0 + dside] = grey
        # the emotion square: colour = class, pulsing size at the class's rate
        scale = 1.0 if period == 0 else 0.7 + 0.3 * math.sin(2 * math.pi * t / period + phase)
        half = max(2, int(side * scale / 2))
        px = float(np.clip(cx + vx * t, half, width - half))
        py = float(np.clip(cy + vy * t, half, height - half))
        inside = (np.abs(xx - px) < half) & (np.abs(yy - py) < half)
        img[inside] = color
        frames[t] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """float32 [h, w, 3] in about [-1, 1]: random values on a `cell`-px grid, bicubic."""
    small = rng.uniform(-1, 1, size=(h // cell + 2, w // cell + 2, 3)).astype(np.float32)
    img = Image.fromarray(((small + 1) * 127.5).astype(np.uint8))
    big = np.asarray(img.resize((w + 2 * cell, h + 2 * cell), Image.BICUBIC), np.float32)
    return big[cell:cell + h, cell:cell + w] / 127.5 - 1


def _render_textured(label: int, n: int, width: int, height: int,
                     rng: np.random.Generator) -> np.ndarray:
    """The same class signal (colour + pulse of the square, a grey distractor) on a panning
    multi-scale texture with a slow light change and grain: content that compresses like
    filmed video. Integer slicing only, so 720p renders at a few ms per frame."""
    m = min(width, height)
    pad = max(8, m // 4)  # room to pan
    th, tw = height + 2 * pad, width + 2 * pad
    base = rng.uniform(40, 150, size=3).astype(np.float32)
    tex = base + 45 * _smooth_noise(rng, th, tw, max(8, m // 6))
    tex += 20 * _smooth_noise(rng, th, tw, max(4, m // 40))
    tex += 8 * _smooth_noise(rng, th, tw, 2)
    tex = np.clip(tex, 0, 255).astype(np.int16)
    grain = rng.normal(0, 3.0, size=(6, height + 16, width + 16, 1)).astype(np.int16)
    ox, oy = rng.uniform(0, 2 * pad, size=2)
    vx, vy = rng.uniform(-1.5, 1.5, size=2) * m / 360
    side = int(m * rng.uniform(0.35, 0.5))
    cx, cy = rng.uniform(side / 2, [width - side / 2, height - side / 2])
    sx, sy = rng.uniform(-1.0, 1.0, size=2) * m / 120
    dside = int(m * 0.3)
    dx, dy = rng.uniform(0, [width - dside, height - dside])
    dvx, dvy = rng.uniform(-2, 2, size=2) * m / 120
    grey = int(rng.uniform(60, 200))
    color = (CLASS_RGB[label] * rng.uniform(0.85, 1.0)).astype(np.int16)
    period = CLASS_PERIOD[label]
    phase, light_f = rng.uniform(0, 2 * math.pi), rng.uniform(0.01, 0.04)
    goff = rng.integers(0, 16, size=(n, 2))

    def bounce(p: float, span: int) -> int:
        p = abs(p) % (2 * span) if span > 0 else 0
        return int(p if p <= span else 2 * span - p)

    frames = np.empty((n, height, width, 3), dtype=np.uint8)
    for t in range(n):
        x0, y0 = bounce(ox + vx * t, 2 * pad), bounce(oy + vy * t, 2 * pad)
        img = tex[y0:y0 + height, x0:x0 + width].copy()
        img += int(12 * math.sin(2 * math.pi * light_f * t))
        gy, gx = goff[t]
        img += grain[t % len(grain), gy:gy + height, gx:gx + width]
        x1, y1 = bounce(dx + dvx * t, width - dside), bounce(dy + dvy * t, height - dside)
        img[y1:y1 + dside, x1:x1 + dside] = grey
        scale = 1.0 if period == 0 else 0.7 + 0.3 * math.sin(2 * math.pi * t / period + phase)
        half = max(2, int(side * scale / 2))
        px = int(np.clip(cx + sx * t, half, width - half))
        py = int(np.clip(cy + sy * t, half, height - half))
        img[py - half:py + half, px - half:px + half] = color
        np.clip(img, 0, 255, out=img)
        frames[t] = img
    return frames


def _encoder_options(codec: str, width: int, height: int, fps: int) -> tuple[dict, int]:
    """(options, bit_rate) for the encoder: MELD-like rate control at HD sizes (H.264 High
    profile with B-frames, ABR at 2.2 Mbit/s per 720p24, VBV-capped), else CODECS'."""
    options = dict(CODECS[codec][2])
    if codec != "h264" or width * height < HD_PIXELS:
        return options, 0
    rate = int(HD_BITS_PER_PIXEL * width * height * fps)
    return ({"preset": "superfast", "bf": "3", "maxrate": str(int(rate * 1.4)),
             "bufsize": str(int(rate * 2))}, rate)


def write_video(path: Path, frames: np.ndarray, codec: str = "h264", fps: int = 24,
                rotation: int = 0) -> None:
    """Encode uint8 [n, H, W, 3] frames with PyAV (n may be 0: an mp4 with no frames).
    `rotation`: display rotation metadata (degrees counterclockwise), as phones write."""
    name, pix_fmt, _ = CODECS[codec]
    options, bit_rate = _encoder_options(codec, frames.shape[2], frames.shape[1], fps)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(name, rate=fps, options=options)
        if bit_rate:
            stream.bit_rate = bit_rate
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        if rotation:
            stream.set_display_rotation(rotation)
        if len(frames) == 0:
            out.start_encoding()  # write the header anyway: a valid mp4 with no frames
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _fmt_time(seconds: float) -> str:
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{int(h)}:{int(m):02d}:{int(s):02d},{int(round((s % 1) * 1000)) % 1000:03d}"


def _layout(out: Path, split: str) -> tuple[Path, Path]:
    """(csv path, video folder) in MELD.Raw's unpacked layout."""
    csv_dir = out / "train" if split == "train" else out
    return csv_dir / CSV_NAMES[split], out / split / VIDEO_DIRS[split]


def _render_write(job: tuple) -> tuple[Path, None]:
    path, label, n, spec, seed = job
    frames = render_clip(label, n, spec.width, spec.height, np.random.default_rng(seed),
                         texture=spec.width * spec.height >= HD_PIXELS)
    write_video(path, frames, spec.codec, spec.fps)
    return path, None  # run_parallel's (key, result)


def synth(out_dir: str | Path, spec: SynthSpec, progress=None, workers: int = 1) -> dict:
    """Write the dataset; return (and save as synth.json) a description incl. the faults.
    `workers` > 1 renders and encodes clips in that many processes (same output)."""
    if spec.codec not in CODECS:
        raise ValueError(f"codec must be one of {list(CODECS)}")
    if spec.width % 2 or spec.height % 2:
        raise ValueError("width and height must be even (yuv420p)")
    out = Path(out_dir)
    rng = np.random.default_rng(spec.seed)
    info: dict = {"spec": spec.__dict__, "splits": {}, "faults": {}}
    plan = []  # (split, dialogue, utterance, label, n)
    for split, share in SPLIT_SHARE.items():
        total = max(len(EMOTIONS), int(round(spec.clips * share)))
        labels = np.repeat(np.arange(len(EMOTIONS)), _class_counts(total, rng))
        rng.shuffle(labels)
        info["splits"][split] = {e: int((labels == i).sum()) for i, e in enumerate(EMOTIONS)}
        dia, utt = 0, 0
        for label in labels:
            plan.append((split, dia, utt, int(label), _clip_length(rng)))
            utt += 1
            if utt >= int(rng.integers(3, 10)):
                dia, utt = dia + (2 if rng.random() < 0.05 else 1), 0  # gaps like MELD's
    rows: dict[str, list[list]] = {s: [] for s in SPLIT_SHARE}
    sr = 0
    jobs = []
    for split, dia, utt, label, n in plan:
        _, vdir = _layout(out, split)
        jobs.append((vdir / f"dia{dia}_utt{utt}.mp4", label, n, spec,
                     [spec.seed, dia, utt, list(SPLIT_SHARE).index(split)]))
        start = 60.0 + 10 * dia + 4 * utt
        sr += 1 + (1 if rng.random() < 0.1 else 0)  # Sr No. has gaps
        emotion = EMOTIONS[label]
        text = "I\u0092m fine, really." if rng.random() < 0.1 else f"Line {sr} of the scene."
        rows[split].append([sr, text, "Speaker", emotion, SENTIMENT[emotion], dia, utt,
                            1 + dia % 10, 1 + utt % 24, _fmt_time(start),
                            _fmt_time(start + n / spec.fps)])
    for _ in run_parallel(_render_write, jobs, workers, progress, "synth clips"):
        pass
    if spec.faults:
        info["faults"] = _add_faults(out, spec, rows)
    for split, split_rows in rows.items():
        csv_path, _ = _layout(out, split)
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(CSV_HEADER)
            w.writerows(split_rows)
    (out / "synth.json").write_text(json.dumps(info, indent=2))
    return info


def _add_faults(out: Path, spec: SynthSpec, rows: dict[str, list[list]]) -> dict:
    """MELD's defects: a row without its file, a corrupt file, an empty clip, a file
    without a row, and a row with an emotion outside the 7."""

    def next_dia(split: str) -> int:
        return max(r[5] for r in rows[split]) + 1

    def add_row(split: str, dia: int, emotion: str) -> None:
        rows[split].append([len(rows[split]) + 1000, "fault", "Speaker", emotion, "neutral",
                            dia, 0, 1, 1, "0:01:00,000", "0:01:02,000"])

    faults = {}
    d = next_dia("dev")
    add_row("dev", d, "neutral")  # row whose file is missing (like dev dia110_utt7)
    faults["missing"] = {"split": "dev", "clip": f"dia{d}_utt0"}
    d = next_dia("train")
    add_row("train", d, "joy")  # corrupt file (like train dia125_utt3)
    _, vdir = _layout(out, "train")
    junk = np.random.default_rng(spec.seed).bytes(4096)
    (vdir / f"dia{d}_utt0.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + junk)
    faults["corrupt"] = {"split": "train", "clip": f"dia{d}_utt0"}
    add_row("train", d + 1, "sadness")  # a clip with no frames
    write_video(vdir / f"dia{d + 1}_utt0.mp4",
                np.zeros((0, spec.height, spec.width, 3), np.uint8), spec.codec, spec.fps)
    faults["empty"] = {"split": "train", "clip": f"dia{d + 1}_utt0"}
    d = next_dia("dev")
    _, vdir = _layout(out, "dev")  # a file with no CSV row (like dev dia66_utt9)
    write_video(vdir / f"dia{d + 5}_utt0.mp4",
                render_clip(0, 8, spec.width, spec.height, np.random.default_rng(1)),
                spec.codec, spec.fps)
    faults["unlabelled"] = {"split": "dev", "clip": f"dia{d + 5}_utt0"}
    d = next_dia("test")
    add_row("test", d, "confused")  # an emotion outside the 7: reported, never guessed
    faults["bad_label"] = {"split": "test", "clip": f"dia{d}_utt0"}
    return faults
