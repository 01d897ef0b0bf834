"""The train-ready clip cache (`meld-dali prepare ROOT --cache DIR`).

Decoding MELD's 1280x720 H.264 at full resolution is the data path's bottleneck, and the
first thing training does is shrink every frame to the short side (256). The cache does that
once: every `ok` clip is re-encoded to `DIR/{split}/{clip_id}{ext}` with its shorter side at
`short_side` (even dimensions, aspect kept), 8-bit 4:2:0, constant frame rate at the source's
average rate, and exactly the source's frame count (frame i of the cache is decoded frame i of
the source, so the sampling spec's indices mean the same frames; VFR sources get pts = i).

- h264 (`.mp4`): libx264, yuv420p, CRF 23, no B-frames, a keyframe every `gop` (16) frames,
  so a seek decodes at most 15 frames it does not need. NVDEC and PyAV read it.
- mjpeg (`.avi`): every frame a JPEG (yuvj420p); the only cache DALI's CPU video decoder
  (VP8/VP9/MJPEG) can read.

`auto` (the default) picks by the loader that will read it (`auto_codec`): H.264 where
dali-gpu can run (NVDEC takes no MJPEG), else MJPEG (the CPU loader decodes just the frames
it samples: 1.2-1.6x the H.264 cache's clips/s on textured 720p-sourced clips, for 7.9x the
disk).

Each clip is written to a unique temp file and renamed, so a file with its final name is
complete; a killed build resumes and reuses every finished file whose probed frame count
and size are right.

The cache folder is the cache's own. `meld-dali-cache.json` marks a folder as a cache: a
non-empty folder without it, or one inside the source tree, is refused (nothing of the
user's is ever deleted). Each set of settings gets its own subfolder (`h264-s256-crf23-g16`
with its `cache_settings.json`), so a `prepare` with other settings never removes the files
another manifest reads; the only files ever deleted are this build's own unfinished ones. A
build holds the folder's lock. A clip that cannot be re-encoded is reported (path and reason)
and keeps its source row: nothing is lost silently.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

from meld_dali.clips import Clip
from meld_dali.errors import UserError
from meld_dali.fileio import TMP_SUFFIX, FolderLock, atomic_write, claim_folder, temp_path
from meld_dali.hardware import decodes
from meld_dali.probe import probe, run_parallel

# codec -> (encoder, pixel format, file extension)
CACHE_CODECS = {"h264": ("libx264", "yuv420p", ".mp4"), "mjpeg": ("mjpeg", "yuvj420p", ".avi")}
SETTINGS_NAME = "cache_settings.json"  # in each settings subfolder
MARKER_NAME = "meld-dali-cache.json"  # in the cache folder: "this folder is a cache"
MARKER = {"format": "meld-dali-cache", "version": 2}
INTERPOLATION = "AREA"  # box filter down (antialiased), bilinear-like up


def auto_codec() -> tuple[str, str]:
    """The cache codec for the loader this machine would train with, and why: H.264 for
    dali-gpu (NVDEC reads H.264; MJPEG it does not take), MJPEG for the CPU loaders. Measured
    on 2 cores, 120 textured 1280x720 clips cached at short side 256 (`meld-dali bench loader
    --backends torch --sources cache`, 5 alternating rounds): the torch loader read the MJPEG
    cache at 1.27-1.65x the H.264 cache's clips/s (intra-only: just the sampled frames are
    decoded; H.264 decodes the frames around them too); 112 MB against 14 MB on disk."""
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("nvidia.dali") is not None:
        return "h264", "dali-gpu will read it: NVDEC takes H.264, not MJPEG"
    return "mjpeg", ("no GPU decoder here: the CPU loaders read MJPEG fastest (only the "
                     "sampled frames are decoded)")


class CacheError(RuntimeError):
    """A clip could not be re-encoded into the cache (the reason is the message)."""


@dataclass(frozen=True)
class CacheSpec:
    """Where the cache lives and how its files are encoded (all of it fingerprinted).
    `crf` is x264's constant rate factor (h264); `qscale` the JPEG quantizer (mjpeg, 2..31)."""
    dir: str
    short_side: int = 256
    codec: str = "h264"
    crf: int = 23
    gop: int = 16
    qscale: int = 3

    def __post_init__(self):
        if self.codec not in CACHE_CODECS:
            raise ValueError(f"cache codec must be one of {list(CACHE_CODECS)}, "
                             f"got {self.codec!r}")
        if self.short_side < 2:
            raise ValueError(f"cache short side must be at least 2, got {self.short_side}")

    @property
    def ext(self) -> str:
        return CACHE_CODECS[self.codec][2]

    def settings(self) -> dict[str, Any]:
        """What the files depend on (not where they are)."""
        s = {"short_side": self.short_side, "codec": self.codec, "ext": self.ext}
        if self.codec == "h264":
            s.update(crf=self.crf, gop=self.gop)
        else:
            s.update(qscale=self.qscale, gop=1)
        return s

    def key(self) -> str:
        """For the manifest fingerprint."""
        return json.dumps({"dir": str(Path(self.dir).resolve()), **self.settings()},
                          sort_keys=True)

    @property
    def stamp(self) -> str:
        """The settings subfolder's name: caches made with other settings live apart."""
        tail = f"crf{self.crf}-g{self.gop}" if self.codec == "h264" else f"q{self.qscale}"
        return f"{self.codec}-s{self.short_side}-{tail}"

    @property
    def files_dir(self) -> Path:
        """Where this spec's files are: DIR/<stamp>."""
        return Path(self.dir).resolve() / self.stamp

    def meta(self, manifest_dir: Path) -> dict[str, Any]:
        """`meta["cache"]` of the manifest: the files' folder relative to the manifest
        folder, and the settings the files were made with."""
        return {"dir": os.path.relpath(self.files_dir, Path(manifest_dir).resolve()),
                **self.settings()}

    def rel_path(self, split: str, clip_id: str) -> str:
        return f"{split}/{clip_id}{self.ext}"


def cache_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(W, H) with the shorter side = `short_side` (rounded to even), aspect kept, both even."""
    scale = short_side / min(width, height)

    def even(v: float) -> int:
        return max(2, 2 * round(v / 2))

    return even(width * scale), even(height * scale)


def encode_clip(src: str | Path, dest: str | Path, spec: CacheSpec,
                expected_frames: int | None = None) -> int:
    """Re-encode one clip into `dest` (atomically); return the frames written.

    Raises CacheError when the source cannot be decoded to the end or the frame count
    differs from `expected_frames` (the manifest's), leaving no file at `dest`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dest, dest.suffix)  # unique; the extension tells PyAV the container
    encoder, pix_fmt, _ = CACHE_CODECS[spec.codec]
    n = 0
    try:
        with av.open(str(src)) as inp, av.open(str(tmp), mode="w") as out:
            s = inp.streams.video[0]
            s.thread_type = "AUTO"
            rate = Fraction(s.average_rate or s.guessed_rate or 24).limit_denominator(1001)
            ost = None
            for frame in inp.decode(s):
                if ost is None:
                    w, h = cache_size(frame.width, frame.height, spec.short_side)
                    ost = _add_stream(out, encoder, pix_fmt, rate, w, h, spec)
                img = frame.reformat(w, h, format=pix_fmt, interpolation=INTERPOLATION)
                img.pts, img.time_base = n, ost.codec_context.time_base  # constant rate
                for packet in ost.encode(img):
                    out.mux(packet)
                n += 1
            if ost is None:
                raise CacheError("no frame could be decoded")
            for packet in ost.encode():
                out.mux(packet)
    except CacheError:
        tmp.unlink(missing_ok=True)
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError) as e:
        tmp.unlink(missing_ok=True)
        raise CacheError(f"after {n} frames: {type(e).__name__}: {e}") from None
    except BaseException:  # an interrupt: no torn file left behind
        tmp.unlink(missing_ok=True)
        raise
    if expected_frames is not None and n != expected_frames:
        tmp.unlink(missing_ok=True)
        raise CacheError(f"decoded {n} frames, the manifest counts {expected_frames}")
    os.replace(tmp, dest)
    return n


def _add_stream(out, encoder: str, pix_fmt: str, rate: Fraction, w: int, h: int,
                spec: CacheSpec):
    if spec.codec == "h264":
        g = str(spec.gop)
        options = {"crf": str(spec.crf), "preset": "veryfast", "bf": "0", "g": g,
                   "x264-params": f"keyint={g}:min-keyint={g}:scenecut=0:bframes=0"}
    else:
        options = {"qmin": str(spec.qscale), "qmax": str(spec.qscale)}
    ost = out.add_stream(encoder, rate=rate, options=options)
    ost.width, ost.height, ost.pix_fmt = w, h, pix_fmt
    ost.codec_context.time_base = 1 / rate
    ost.codec_context.framerate = rate
    if spec.codec == "mjpeg":
        ost.codec_context.color_range = 2  # JPEG: full range
    return ost


def _reusable(dest: Path, expected: int, size: tuple[int, int] | None) -> int:
    """Frames of a finished cache file if it can be kept (count and size right), else 0."""

    if not dest.exists():
        return 0
    info = probe(str(dest))
    if info.get("status") != "ok" or info.get("num_frames") != expected:
        return 0
    if size and (info.get("width"), info.get("height")) != size:
        return 0
    return expected


def cache_job(args: tuple) -> tuple[int, dict[str, Any]]:
    """Pool job: (key, src, dest, spec dict, expected frames, (w, h) or None) ->
    (key, {"frames", "reused", "error"}). Never raises. `dest` is in the spec's own settings
    folder: a file there that is not reusable was made by an earlier build of this cache."""
    key, src, dest, spec_d, expected, size = args
    spec = CacheSpec(**spec_d)
    dest = Path(dest)
    try:
        if n := _reusable(dest, expected, size):
            return key, {"frames": n, "reused": True, "error": ""}
        dest.unlink(missing_ok=True)
        encode_clip(src, dest, spec, expected)
        n = _reusable(dest, expected, None)  # probe what was written, as prepare counts
        if not n:
            dest.unlink(missing_ok=True)
            raise CacheError("the written file does not probe to the source's frame count")
        return key, {"frames": n, "reused": False, "error": ""}
    except CacheError as e:
        return key, {"frames": 0, "reused": False, "error": str(e)}
    except Exception as e:  # noqa: BLE001 - a bad clip is reported, never fatal
        return key, {"frames": 0, "reused": False, "error": f"{type(e).__name__}: {e}"}


def claim_cache_dir(spec: CacheSpec, sources: list[Path]) -> None:
    """Make sure the cache folder is the cache's own before anything is written there: a
    new or empty folder is marked as a cache; one already marked (or made by an earlier
    version: `cache_settings.json` at its top) is reused; anything else is refused, and so is
    a folder inside (or holding) the source tree."""
    root = Path(spec.dir).resolve()
    for src in sources:
        src = src.resolve()
        if root == src or src in root.parents or root in src.parents:
            raise UserError(f"--cache {spec.dir}: the cache folder must be outside the source "
                             f"tree ({src}) and must not hold it: choose a separate folder, "
                             "e.g. next to it")
    # a cache made by an earlier version: its settings file at the top
    claim_folder(root, "--cache", "cache", MARKER_NAME, MARKER,
                 made_earlier=lambda d: (d / SETTINGS_NAME).exists())


def check_cache(files_dir: Path, settings: dict[str, Any]) -> str:
    """Why a manifest's cache no longer matches the settings it recorded ('' when it does)."""
    try:
        found = json.loads((files_dir / SETTINGS_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return f"{files_dir} is missing or has no readable {SETTINGS_NAME}"
    if found != settings:
        diff = [f"{k} {settings.get(k)!r} -> {found.get(k)!r}"
                for k in sorted(set(found) | set(settings)) if found.get(k) != settings.get(k)]
        return f"{files_dir} holds files made with other settings ({', '.join(diff)})"
    return ""


def build_cache(clips: list[Clip], manifest_dir: Path, spec: CacheSpec, workers: int = 2,
                progress=None, sources: list[Path] = ()) -> dict[str, Any]:
    """Re-encode every `ok` clip (updating its row's `cache` / `cache_frames` in place) into
    the settings subfolder of the cache folder, holding the folder's lock. `sources`: the
    folders the source videos live in (the cache must be outside them).
    Returns {"built", "reused", "failures": [{split, clip, path, reason}]}."""
    claim_cache_dir(spec, list(sources))
    with FolderLock(spec.dir, "clip cache"):
        return _build(clips, manifest_dir, spec, workers, progress)


def _build(clips, manifest_dir, spec: CacheSpec, workers, progress) -> dict[str, Any]:
    files = spec.files_dir
    files.mkdir(parents=True, exist_ok=True)
    for stray in files.glob(f"*/*{TMP_SUFFIX}{spec.ext}"):  # torn writes of a killed build
        stray.unlink(missing_ok=True)
    settings = spec.settings()
    with atomic_write(files / SETTINGS_NAME) as f:
        json.dump(settings, f)
    jobs, sources = [], {}
    for i, c in enumerate(clips):
        c.cache, c.cache_frames = "", 0
        if not c.loadable:
            continue
        sources[i] = str((Path(manifest_dir) / c.path).resolve())
        size = (cache_size(c.width, c.height, spec.short_side)
                if c.width and c.height else None)
        jobs.append((i, sources[i], str(files / spec.rel_path(c.split, c.clip_id)),
                     asdict(spec), int(c.num_frames), size))
    built, reused, failures = 0, 0, []
    for i, res in run_parallel(cache_job, jobs, workers, progress, "cache clips"):
        c = clips[i]
        if res["error"]:
            failures.append({"split": c.split, "clip": c.clip_id, "path": sources[i],
                             "reason": res["error"]})
            continue
        c.cache = spec.rel_path(c.split, c.clip_id)
        c.cache_frames = res["frames"]
        reused += res["reused"]
        built += not res["reused"]
    return {"built": built, "reused": reused, "failures": failures}


def nvdec_unsupported(clip: Clip) -> bool:
    """H.264 that NVDEC cannot decode: 10-bit, 4:2:2 or 4:4:4 (by pixel format or profile,
    hardware.DECODERS)."""
    return not decodes("dali-gpu", clip.codec, clip.pix_fmt, clip.profile)
