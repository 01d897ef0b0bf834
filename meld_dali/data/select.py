"""Which source and which backend can run here, and `build_loader`: the one place that knows
every backend. The DALI backend (meld_dali.pipelines) is imported lazily, only when chosen,
so everything else works where DALI is absent."""

from __future__ import annotations

import torch

from meld_dali.config import BACKENDS, DataConfig, LoaderConfig
from meld_dali.data.base import ClipLoader, LoaderSpec
from meld_dali.data.torch_loader import TorchLoader
from meld_dali.errors import UserError
from meld_dali.hardware import decodes
from meld_dali.manifest import Manifest


def dali_available() -> tuple[bool, str]:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        return False, f"NVIDIA DALI is not installed ({e})"
    return True, ""


def source_problem(manifest: Manifest, source: str) -> str:
    """Why the manifest cannot be read from `source` ('' when it can)."""
    if source == "frames" and not manifest.has_frames:
        return "no frame folders were extracted (run `meld-dali prepare ROOT --frames DIR`)"
    if source == "cache" and not manifest.has_cache:
        return "no clip cache was built (run `meld-dali prepare ROOT --cache DIR`)"
    return ""


def resolve_source(manifest: Manifest, requested: str) -> str:
    """`data.source` -> what the loaders read: auto = the clip cache when built (clips at the
    training size: the cheapest to decode), else frame folders when extracted, else the
    videos."""
    if requested == "auto":
        return ("cache" if manifest.has_cache else "frames" if manifest.has_frames
                else "video")
    why = source_problem(manifest, requested)
    if why:
        raise UserError(f"{manifest.path}: data.source={requested}, but {why}")
    return requested


def source_codecs(manifest: Manifest, split: str, source: str) -> set[str]:
    """The codecs a backend must decode to read `split` from `source`."""
    if source == "frames":
        return {"jpeg"}
    clips = [manifest.clips[i] for i in manifest.ok(split)]
    if source == "cache":  # clips whose re-encode failed are read from their source video
        return {manifest.meta["cache"]["codec"] if c.cache else c.codec or "?"
                for c in clips}
    return {c.codec or "?" for c in clips}


def backend_problem(backend: str, manifest: Manifest, split: str, source: str) -> str:
    """Why `backend` cannot run here on this data ('' when it can)."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})"
    if backend == "torch":
        return ""
    ok, why = dali_available()
    if not ok:
        return why
    if backend == "dali-gpu":
        return "" if torch.cuda.is_available() else "no CUDA device is visible"
    bad = {c for c in source_codecs(manifest, split, source) if not decodes(backend, c)}
    return (f"DALI's CPU video decoder takes VP8/VP9/MJPEG only; this data is "
            f"{', '.join(sorted(bad))} (use dali-gpu, torch, a cache from `prepare --cache DIR "
            "--cache-codec mjpeg`, or frame folders from `prepare --frames`)") if bad else ""


def resolve_backend(requested: str, manifest: Manifest, split: str, source: str) -> str:
    if requested == "auto":
        # dali-gpu where it runs; else the torch loader: with its OpenCV warp it read frame
        # folders 2.4x and an MJPEG cache 1.7x faster than dali-cpu (2 cores, seed settings;
        # DALI's CPU rotation is its bottleneck). dali-cpu stays available by name.
        return "dali-gpu" if not backend_problem("dali-gpu", manifest, split, source) \
            else "torch"
    why = backend_problem(requested, manifest, split, source)
    if why:
        raise UserError(f"backend {requested} cannot run here: {why}")
    return requested


def build_loader(spec: LoaderSpec, data: DataConfig, loader_cfg: LoaderConfig,
                 backend: str) -> ClipLoader:
    """The one place that knows the backends. `backend` must be resolved already."""
    if backend == "torch":
        return TorchLoader(spec, data, loader_cfg)
    from meld_dali.pipelines.loader import DaliLoader  # lazy: DALI is optional

    return DaliLoader(spec, data, loader_cfg, device=backend.split("-")[1])
