"""The train-ready clip cache (`prepare --cache`): quality, frame counts, stream layout,
resume after a kill, odd sources (VFR, 10-bit, 4:4:4), failures, the DALI CPU path, and the
HD synth's MELD-like bitrate."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from rich.console import Console

from meld_dali.cache import (
    CacheError,
    CacheSpec,
    auto_codec,
    cache_size,
    encode_clip,
    nvdec_unsupported,
)
from meld_dali.clips import Clip
from meld_dali.data.decode import read_video_frames
from meld_dali.prepare import prepare
from meld_dali.probe import probe
from meld_dali.sampling import clip_indices
from meld_dali.synth import SynthSpec, _encoder_options, render_clip, synth, write_video
from meld_dali.tables import print_report


def write_clip(path: Path, frames: np.ndarray, pix_fmt: str = "yuv420p",
               pts: list[int] | None = None, tb: str = "1/1000") -> Path:
    """libx264 clip in any pixel format; `pts` (in `tb`) makes it variable-rate."""
    from fractions import Fraction

    with av.open(str(path), mode="w") as out:
        s = out.add_stream("libx264", rate=24, options={"crf": "18", "preset": "ultrafast"})
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        if pts is not None:
            s.codec_context.time_base = Fraction(tb)
        for i, img in enumerate(frames):
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            if pts is not None:
                f.pts, f.time_base = pts[i], Fraction(tb)
            for p in s.encode(f):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return path


def stream_layout(path: Path) -> dict:
    """Pixel format, profile, picture types, keyframe positions and pts of every frame."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = [(int(f.pict_type), f.key_frame, f.pts) for f in c.decode(s)]
        return {"pix_fmt": s.codec_context.pix_fmt, "profile": s.codec_context.profile,
                "codec": s.codec_context.name, "width": s.codec_context.width,
                "height": s.codec_context.height, "types": [t for t, _, _ in frames],
                "keys": [i for i, (_, k, _) in enumerate(frames) if k],
                "pts": [p for _, _, p in frames]}


def textured(n: int = 40, w: int = 128, h: int = 96, seed: int = 0) -> np.ndarray:
    return render_clip(3, n, w, h, np.random.default_rng(seed), texture=True)


def resized(frames: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.stack([av.VideoFrame.from_ndarray(f, format="rgb24")
                     .reformat(w, h, format="rgb24", interpolation="AREA").to_ndarray()
                     for f in frames])


def test_cache_size_keeps_aspect_with_even_sides():
    assert cache_size(1280, 720, 256) == (456, 256)
    assert cache_size(720, 1280, 256) == (256, 456)
    assert cache_size(64, 48, 36) == (48, 36)
    assert cache_size(1279, 721, 255) == (452, 256)  # odd short side rounds to even


def test_cache_matches_source_resized_and_has_no_b_frames(tmp_path):
    # MELD's downscale ratio (720 -> 256) on textured, grainy content
    src = write_clip(tmp_path / "src.mp4", textured(40, 640, 360))
    n = probe(str(src))["num_frames"]
    dest = tmp_path / "c" / "clip.mp4"
    assert encode_clip(src, dest, CacheSpec(str(tmp_path / "c"), 256), n) == n == 40
    info = probe(str(dest))
    assert info["num_frames"] == n and info["status"] == "ok"
    lay = stream_layout(dest)
    assert (lay["codec"], lay["pix_fmt"], lay["profile"]) == ("h264", "yuv420p", "High")
    assert (lay["width"], lay["height"]) == (456, 256)
    assert 3 not in lay["types"], "B-frames in the cache"
    keys = [*lay["keys"], n]
    assert keys[0] == 0 and max(np.diff(keys)) <= 16
    assert lay["pts"] == sorted(lay["pts"]) and len(set(np.diff(lay["pts"]))) == 1
    idx, mask = clip_indices(n, 32, train=False, seed=0, epoch=0, row=0)
    want = resized(read_video_frames(src, idx[mask]), 456, 256).astype(np.float32)
    got = read_video_frames(dest, idx[mask]).astype(np.float32)
    assert got.shape == want.shape
    assert np.abs(got - want).mean() < 5, np.abs(got - want).mean()


def test_odd_sources_become_constant_rate_8bit_420(tmp_path):
    frames = render_clip(5, 30, 96, 64, np.random.default_rng(1))  # gradient, noise, squares
    rng = np.random.default_rng(0)
    vfr_pts = np.cumsum(rng.choice([30, 42, 55, 80], size=30)).tolist()
    clips = {"vfr": write_clip(tmp_path / "vfr.mp4", frames, pts=vfr_pts),
             "10bit": write_clip(tmp_path / "10bit.mp4", frames, "yuv420p10le"),
             "444": write_clip(tmp_path / "444.mp4", frames, "yuv444p")}
    src = {k: probe(str(p)) for k, p in clips.items()}
    assert src["10bit"]["profile"] == "High 10" and src["10bit"]["pix_fmt"] == "yuv420p10le"
    assert src["444"]["profile"] == "High 4:4:4 Predictive"
    as_clip = {k: Clip.from_dict({"clip_id": k, "split": "train", "emotion": "neutral",
                                  "label": 0, **d}) for k, d in src.items()}
    assert nvdec_unsupported(as_clip["10bit"]) and nvdec_unsupported(as_clip["444"])
    assert not nvdec_unsupported(as_clip["vfr"])
    assert len(set(np.diff(stream_layout(clips["vfr"])["pts"]))) > 1  # really VFR
    for k, p in clips.items():
        n = src[k]["num_frames"]
        assert n == 30, k
        dest = tmp_path / "c" / f"{k}.mp4"
        encode_clip(p, dest, CacheSpec(str(tmp_path / "c"), 32), n)
        lay = stream_layout(dest)
        assert (lay["pix_fmt"], lay["profile"], lay["height"]) == ("yuv420p", "High", 32), k
        assert len(lay["pts"]) == n and len(set(np.diff(lay["pts"]))) == 1, k  # constant
        assert probe(str(dest))["num_frames"] == n
        idx = np.array([0, 7, 15, 29])
        got = read_video_frames(dest, idx)
        want = resized(read_video_frames(p, idx), 48, 32)
        assert got.shape == (4, 32, 48, 3)
        assert np.abs(got.astype(np.float32) - want).mean() < 5, k


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache_synth")
    synth(root, SynthSpec(clips=21, seed=3))
    return root


def _mtimes(cache: Path) -> dict[str, int]:
    return {str(p.relative_to(cache)): p.stat().st_mtime_ns for p in cache.glob("*/*/*.mp4")}


@pytest.mark.slow  # real processes end to end: seconds each
def test_resume_after_kill_reuses_finished_clips_and_fingerprint(tiny_root, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(tiny_root, root)
    cache = tmp_path / "cache"
    m, rep = prepare(root, short_side=32, workers=1, cache=cache, cache_codec="h264")
    ok = m.ok("train") + m.ok("dev") + m.ok("test")
    assert rep["cache"]["built"] == len(ok) and not rep["cache_failures"]
    assert m.has_cache and m.cache_short_side == 32
    assert m.meta["cache"]["dir"] == "../cache/h264-s32-crf23-g16"  # one folder per settings
    assert m.meta["cache"] == {**m.meta["cache"], "codec": "h264", "crf": 23, "gop": 16}
    for i in ok:
        c = m.clips[i]
        assert c.cache_frames == c.num_frames and m.cache_path(c).exists()
    # a kill: the manifest never written, two clips unfinished, one torn temp file
    (root / "manifest.json").unlink()
    gone = [m.cache_path(m.clips[i]) for i in ok[:2]]
    for p in gone:
        p.unlink()
    before = _mtimes(cache)
    torn = gone[0].with_name(gone[0].name + ".x1y2z3.tmp.mp4")  # what temp_path names
    torn.write_bytes(b"\x00" * 100)
    time.sleep(0.01)
    m2, rep2 = prepare(root, short_side=32, workers=1, cache=cache, cache_codec="h264")
    assert rep2["cache"]["built"] == 2 and rep2["cache"]["reused"] == len(ok) - 2
    after = _mtimes(cache)
    assert all(after[k] == v for k, v in before.items())  # finished files untouched
    assert not list(cache.rglob("*.tmp.*"))
    assert all(m2.cache_path(m2.clips[i]).exists() for i in ok)
    # unchanged inputs and settings: reused as is; another short side: built beside it,
    # the first settings' files untouched (another manifest may read them)
    _, rep3 = prepare(root, short_side=32, workers=1, cache=cache, cache_codec="h264")
    assert rep3["reused"]
    m4, rep4 = prepare(root, short_side=24, workers=1, cache=cache, cache_codec="h264")
    assert not rep4["reused"] and rep4["cache"]["built"] == len(ok)
    assert m4.cache_short_side == 24
    c = m4.clips[ok[0]]
    assert min(probe(str(m4.cache_path(c)))[k] for k in ("width", "height")) == 24
    assert _mtimes(cache) == {**after, **_mtimes(cache)}  # the s32 files are all still there
    # no cache asked: the manifest says so
    m5, _ = prepare(root, short_side=24, workers=1)
    assert not m5.has_cache and m5.cache_path(m5.clips[ok[0]]) is None


def test_clip_that_cannot_be_reencoded_is_reported_and_kept(tiny_root, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(tiny_root, root)
    victim = sorted((root / "dev").glob("*/*.mp4"), key=lambda p: -p.stat().st_size)[0]
    b = bytearray(victim.read_bytes())
    i, j = b.find(b"mdat"), b.find(b"moov")
    assert 0 < i < j, "expected mdat before moov"
    lo, hi = i + (j - i) // 2, i + (j - i) * 3 // 4
    b[lo:hi] = bytes(hi - lo)  # zeroed packets mid-stream: probes ok, fails to decode
    victim.write_bytes(bytes(b))
    assert probe(str(victim))["status"] == "ok"
    with pytest.raises(CacheError):
        encode_clip(victim, tmp_path / "x.mp4", CacheSpec(str(tmp_path), 32))
    assert not (tmp_path / "x.mp4").exists() and not list(tmp_path.glob("*.tmp*"))
    m, rep = prepare(root, short_side=32, workers=1, cache=tmp_path / "cache")
    row = next(c for c in m.clips if c.clip_id == victim.stem and c.split == "dev")
    assert row.status == "ok" and row.cache == "" and m.cache_path(row) is None
    assert m.video_path(row) == victim.resolve()
    from meld_dali.data.decode import clip_source_path

    assert clip_source_path(m, row, "cache") == victim.resolve()  # loaders read the source
    fails = rep["cache_failures"]
    assert [f["clip"] for f in fails] == [victim.stem] and fails[0]["path"] == str(
        victim.resolve()) and fails[0]["reason"]
    assert rep["cache"]["failed"] == 1
    saved = json.loads((root / "prepare_report.json").read_text())
    assert saved["cache_failures"] == fails
    console = Console(record=True, width=200)
    print_report(rep, console)
    text = console.export_text()
    assert f"not cached dev {victim.stem}" in text
    # no codec asked: the one the loader this machine would train with reads fastest, and
    # the report says which and why (no CUDA here: MJPEG, for the CPU loaders)
    codec, why = auto_codec()
    assert (rep["cache"]["codec"], rep["cache"]["codec_why"]) == (codec, why)
    assert m.meta["cache"]["codec"] == codec
    assert all(m.cache_path(c).suffix == CacheSpec("x", 32, codec).ext
               for c in m.clips if c.cache)
    assert f"({codec}: {why})" in text
    if not torch.cuda.is_available():
        assert codec == "mjpeg" and "CPU loaders" in why


def test_mjpeg_cache_decodes_with_dali_cpu(tmp_path):
    from nvidia.dali import fn, pipeline_def, types

    src = write_clip(tmp_path / "src.mp4", textured(36, 96, 64))
    spec = CacheSpec(str(tmp_path / "c"), 32, codec="mjpeg")
    dest = tmp_path / "c" / f"clip{spec.ext}"
    assert spec.ext == ".avi"
    assert encode_clip(src, dest, spec, 36) == 36
    info = probe(str(dest))
    assert (info["codec"], info["num_frames"], info["height"]) == ("mjpeg", 36, 32)
    idx, _ = clip_indices(36, 32, train=False, seed=0, epoch=0, row=0)
    data = np.fromfile(dest, dtype=np.uint8)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        enc = fn.external_source(source=lambda: [data], batch=True, dtype=types.UINT8)
        fr = fn.external_source(source=lambda: [idx.astype(np.int32)], batch=True,
                                dtype=types.INT32)
        return fn.decoders.video(enc, device="cpu", frames=fr)

    p = pipe()
    p.build()
    (out,) = p.run()
    got = np.asarray(out[0]).astype(np.float32)
    want = read_video_frames(dest, idx).astype(np.float32)
    assert got.shape == want.shape == (32, 32, 48, 3)
    # the same frames; DALI's YUV->RGB (chroma upsampling) differs a little from swscale's
    assert np.abs(got - want).mean() < 5, np.abs(got - want).mean()
    assert np.abs(got[1:] - want[1:]).mean() < np.abs(got[1:] - want[:-1]).mean()


def test_synth_hd_has_meld_like_bitrate(tmp_path):
    assert _encoder_options("h264", 64, 48, 24) == ({"preset": "ultrafast", "crf": "23"}, 0)
    n = 48
    frames = render_clip(4, n, 1280, 720, np.random.default_rng(0), texture=True)
    path = tmp_path / "hd.mp4"
    write_video(path, frames)
    mbit_s = os.path.getsize(path) * 8 / (n / 24) / 1e6
    assert 1.5 <= mbit_s <= 3.0, mbit_s
    lay = stream_layout(path)
    assert (lay["profile"], lay["pix_fmt"]) == ("High", "yuv420p") and len(lay["pts"]) == n
    again = render_clip(4, 4, 1280, 720, np.random.default_rng(0), texture=True)
    assert np.array_equal(again, frames[:4])  # deterministic for a seed


def _eval_batches(root: Path, source: str, backend: str = "torch"):
    from meld_dali.config import load_config
    from meld_dali.data.base import LoaderSpec
    from meld_dali.data.select import build_loader
    from meld_dali.manifest import Manifest

    cfg = load_config("demo", ["data.num_frames=8", "data.short_side=36", "loader.workers=1"])
    spec = LoaderSpec(Manifest.load(root), "dev", False, 4, seed=0, source=source)
    loader = build_loader(spec, cfg.data, cfg.loader, backend)
    batches = list(loader)
    # the backend made every batch itself (a DALI batch redone by the CPU path would match
    # the CPU reference exactly and hide DALI's result)
    assert loader.counts.cpu_redone_batches == 0
    assert loader.counts.backend_batches == len(batches)
    return batches


def test_loaders_read_the_cache_like_the_source(tiny_root, tmp_path):
    """auto picks the cache; every backend reads it with the same clips, frame indices and
    masks as the source videos, and eval values within the cache's tolerance (5/255 in
    pixels, ~0.09 in normalized units)."""
    from meld_dali.data.select import backend_problem, resolve_source
    from meld_dali.manifest import Manifest

    root = tmp_path / "r"
    shutil.copytree(tiny_root, root)
    prepare(root, short_side=36, workers=1, cache=tmp_path / "cache", cache_codec="mjpeg")
    m = Manifest.load(root)
    assert resolve_source(m, "auto") == "cache"
    assert backend_problem("dali-cpu", m, "dev", "cache") == ""  # mjpeg: DALI's CPU decoder
    assert "--cache-codec mjpeg" in backend_problem("dali-cpu", m, "dev", "video")
    raw, cached = _eval_batches(root, "video"), _eval_batches(root, "cache")
    dali = _eval_batches(root, "cache", "dali-cpu")
    assert len(raw) == len(cached) == len(dali) > 0
    for a, b, d in zip(raw, cached, dali, strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.index, d.index)
        assert torch.equal(a.mask, b.mask) and torch.equal(a.mask, d.mask)
        assert (a.video - b.video).abs().mean() < 0.09
        assert (b.video - d.video).abs().mean() < 0.09  # DALI's vs swscale's YUV->RGB
