"""Does a loader backend deliver what the CPU reference path delivers, here, on these clips?

The reference is the CPU path every backend is specified against: PyAV / PIL decoding and
`to_clip` (resize, crop, flip, rotation, colour, normalize, pad and mask), run in this
process (`ClipDataset`) on the same clip plans as the backend. A backend passes when, on every
clip, its output has the same mask and lies within the tolerance of the reference, in eval
mode (the centre view) or in train mode (each clip's augmentation draws: flip, rotation,
colour and the GPU's per-sample normalization). A backend passes only on batches it made
itself: one whose loader redid a batch on the CPU path (DALI failed on it) fails, since the
CPU path compared with itself verifies nothing. Used by `meld-dali doctor` (generated clips
and the first clips of --data), `gpu_check`, and before a run on a DALI backend
(`loader.verify`, eval mode).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from meld_dali.clips import Clip
from meld_dali.config import EMOTIONS, Config, DataConfig, LoaderConfig
from meld_dali.data.base import ClipFailure, LoaderSpec
from meld_dali.data.decode import clip_source_path
from meld_dali.data.plan import CENTRE, train_views
from meld_dali.data.select import build_loader
from meld_dali.data.torch_loader import ClipDataset
from meld_dali.errors import BackendFault, UserError
from meld_dali.manifest import Manifest
from meld_dali.prepare import extract_frames
from meld_dali.probe import probe
from meld_dali.synth import render_clip, write_video

log = logging.getLogger("meld_dali.verify")

# Tolerance, in normalized units (one grey level = 1 / (255 * std) ~ 0.017). Decoders differ
# in YUV->RGB conversion and chroma upsampling, resize kernels in their filters: measured,
# DALI CPU vs the reference on VP9/MJPEG 0.00x-0.03 mean (edges give up to ~1.3 at a pixel),
# dali-gpu on an H100 0.017 (frames) and 0.033 (H.264). A wrong frame, crop or colour moves
# the mean far more (one frame off: > 0.1 on generated clips); MAX_TOL only catches garbage.
MEAN_TOL = 0.05
MAX_TOL = 2.5
# Train mode (flip, rotation, colour) is held to the same tolerance: measured with dali-cpu
# on the doctor's textured 640x360 clips, train 0.021 mean / 0.66 max (VP9) and 0.014 / 0.68
# (MJPEG), eval 0.021 / 0.78 and 0.015 / 0.84; the rotation's sign reversed gives 0.40 / 4.6.
CLIPS = 4  # clips compared per check: seconds on a CPU


@dataclass
class Verdict:
    """One backend on one source: ok None = could not run (error says why)."""
    backend: str
    source: str
    data: str  # what was read: "generated vp9 640x360" or the --data root
    mode: str = "eval"  # eval: the centre view; train: each clip's augmentation draws
    ok: bool | None = None
    clips: int = 0
    mean_abs_diff: float | None = None  # the largest per-clip mean over the clips
    max_abs_diff: float | None = None
    worst: str = ""  # the clip with the largest mean difference
    backend_batches: int = 0  # batches the backend made itself
    cpu_redone_batches: int = 0  # batches the CPU path redid (DALI failed): a failed check
    error: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        """One line saying what failed, for an error message or the doctor's list."""
        what = f"{self.backend} on {self.data} ({self.source}, {self.mode})"
        if self.error:
            return f"{what}: {self.error}"
        return (f"{what}: {self.worst} differs from the CPU reference by {self.mean_abs_diff:.3f}"
                f" mean, {self.max_abs_diff:.2f} max (tolerance {MEAN_TOL} mean, {MAX_TOL} max)")

    def to_dict(self) -> dict:
        return asdict(self)


def first_clips(manifest: Manifest, split: str, n: int = CLIPS) -> Manifest:
    """The same manifest with only the first `n` loadable clips of `split` (same folder, so
    every relative path still resolves)."""
    rows = manifest.ok(split)[:n]
    return Manifest(manifest.path, [manifest.clips[i] for i in rows], manifest.meta)


def compare(manifest: Manifest, split: str, source: str, data: DataConfig, loader: LoaderConfig,
            backend: str, device: torch.device | None = None, label: str = "",
            clips: int = CLIPS, make_loader=build_loader, train: bool = False,
            dtype: torch.dtype = torch.float32, views_per_decode: int = 1) -> Verdict:
    """Run `backend` on the first `clips` loadable clips of `split` (eval mode, or train mode
    with each clip's augmentation draws; output in `dtype`) and compare each clip with the
    reference on the same plan. Train with `views_per_decode` k > 1: each of a clip's k
    samples from one decode (the epoch's 1/k of the clips) against its own draw's plan.
    `make_loader(spec, data, loader, backend)` builds the loader (build_loader; tests pass a
    deliberately wrong one)."""
    m = first_clips(manifest, split, clips)
    k = views_per_decode
    v = Verdict(backend, source, label or str(manifest.base),
                mode=("train" + (f" x{k}" if k > 1 else "")) if train else "eval")
    rows = m.ok(split)
    if not rows:
        v.error = f"no loadable {split} clips"
        return v
    t0 = time.perf_counter()
    # train: batches of 2 over an even count, so the train order drops no lone last clip
    spec = LoaderSpec(m, split, train, min(2, len(rows)) * k, seed=0,
                      device=device or torch.device("cpu"), dtype=dtype, source=source,
                      views_per_decode=k)
    got: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (row, draw)
    try:
        it = make_loader(spec, data, loader, backend)
        for b in it:
            for j, row in enumerate(b.index.tolist()):  # a clip's k draws side by side
                got[row, j % k] = (b.video[j].float().cpu(), b.mask[j].cpu())
        skipped = {f.index: f.error for f in it.failures}
        v.backend_batches = it.counts.backend_batches
        v.cpu_redone_batches = it.counts.cpu_redone_batches
        fault = getattr(it, "last_fault", "")
        del it  # its pipelines or worker processes go now, not at the next check
    except Exception as e:  # noqa: BLE001 - a diagnosis: any failure is a finding
        v.error = f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
        if isinstance(e, BackendFault):  # it runs here, and fails: not "cannot run"
            v.ok = False
        v.seconds = time.perf_counter() - t0
        return v
    if v.cpu_redone_batches:
        v.error = (f"{v.cpu_redone_batches} of {v.cpu_redone_batches + v.backend_batches} "
                   f"batches were made by the CPU path, not {backend} (DALI failed: {fault}): "
                   "nothing of the backend's was verified")
        v.ok = False
        v.seconds = time.perf_counter() - t0
        return v
    ref = ClipDataset(m, data, train=train, seed=0, source=source)
    # train: a lone last clip is dropped; with k draws per decode an epoch holds 1/k of them
    keys = [(r, d) for r in rows for d in range(k)
            if not train or (r, d) in got or r in skipped]
    worst = -1.0
    for row, draw in keys:
        path = str(clip_source_path(m, m.clips[row], source))
        item = ref[(0, row, train_views(k)[draw] if train else CENTRE)]
        if isinstance(item, ClipFailure):
            v.error = f"the CPU reference cannot read {path}: {item.error}"
            break
        if (row, draw) not in got:
            v.error = f"{path} was skipped: {skipped.get(row, 'no batch held it')}"
            break
        video, mask = got[row, draw]
        if not torch.equal(mask, item[1]):
            v.error = f"{path}: the mask of real frames differs from the CPU reference's"
            break
        d = (video - item[0]).abs()
        mean, peak = d.mean().item(), d.max().item()
        v.max_abs_diff = max(v.max_abs_diff or 0.0, peak)
        if mean > worst:
            worst, v.worst, v.mean_abs_diff = mean, path, mean
        v.clips += 1
    v.ok = not v.error and v.mean_abs_diff <= MEAN_TOL and v.max_abs_diff <= MAX_TOL
    v.seconds = time.perf_counter() - t0
    return v


def check_backend(cfg: Config, manifest: Manifest, source: str, backend: str,
                  device: torch.device, make_loader=build_loader) -> str:
    """`loader.verify` before a run: a DALI backend's eval output on a few clips of the eval
    split against the CPU reference. Returns the backend to train with: the same one, or
    `torch` (verify=warn, on a mismatch). verify=auto: a mismatch is a UserError naming the
    clip, the backend and the difference. `torch` is the reference itself: not checked."""
    mode = cfg.loader.verify
    if mode == "off" or backend == "torch":
        return backend
    split = cfg.data.eval_split if manifest.ok(cfg.data.eval_split) else cfg.data.train_split
    v = compare(manifest, split, source, cfg.data, cfg.loader, backend, device,
                label=f"the first {split} clips", make_loader=make_loader)
    if v.ok:
        log.info("verified %s against the CPU reference on %d %s clips (mean abs difference "
                 "%.3f, max %.2f) in %.1f s", backend, v.clips, split, v.mean_abs_diff,
                 v.max_abs_diff, v.seconds)
        return backend
    if mode == "warn":
        log.warning("%s; training with torch instead (loader.verify=warn)", v.line())
        return "torch"
    raise UserError(f"{v.line()}; set loader.verify=warn to train with torch instead, or "
                    "loader.verify=off to skip this check")


# ----------------------------------------------------------------------------- sample clips

# Generated clips for the doctor: one short clip (padded and masked) and longer ones, each
# class colour in turn; few and short, so a check takes seconds.
SAMPLE_FRAMES = (20, 40, 56, 75)


def sample_manifest(folder: str | Path, codec: str, width: int, height: int,
                    frames_short_side: int = 0, fps: int = 24) -> Manifest:
    """A small dev split of clips written by `synth` (textured like MELD at HD sizes) into
    `folder` with `codec` at width x height, probed like `prepare` does, and with JPEG frame
    folders at `frames_short_side` when given. Returns its manifest (in memory)."""
    folder = Path(folder)
    rng = np.random.default_rng(0)
    ext = {"vp9": ".webm", "mjpeg": ".avi"}.get(codec, ".mp4")
    clips = []
    for i, n in enumerate(SAMPLE_FRAMES):
        rel = f"{codec}/dia0_utt{i}{ext}"
        label = i % len(EMOTIONS)
        write_video(folder / rel, render_clip(label, n, width, height, rng,
                                              texture=width * height >= 640 * 360),
                    codec, fps)
        info = probe(str(folder / rel))
        clips.append(Clip(f"dia0_utt{i}", "dev", EMOTIONS[label], label, path=rel,
                          status=info["status"], reason=info.get("reason", ""),
                          num_frames=int(info.get("num_frames") or 0), fps=info.get("fps"),
                          width=info.get("width"), height=info.get("height"),
                          codec=info.get("codec"), pix_fmt=info.get("pix_fmt"),
                          profile=info.get("profile")))
    meta = {"frames_dir": "", "short_side": frames_short_side, "cache": {}}
    if frames_short_side:
        meta["frames_dir"] = f"{codec}-frames"
        for c in clips:
            c.num_frames = extract_frames(str(folder / c.path),
                                          str(folder / meta["frames_dir"] / "dev" / c.clip_id),
                                          frames_short_side)
            c.frames = True
    return Manifest(folder / f"{codec}-manifest.json", clips, meta)
