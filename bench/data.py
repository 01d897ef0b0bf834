"""The bench's own data sets: MELD-shaped synthetic clips, made once per machine and
prepared (manifest, frame folders, clip cache) by the same code as real MELD."""

from __future__ import annotations

import json
import os
from pathlib import Path

from meld_dali.errors import UserError

# The default bench set: MELD's inputs where they matter for speed (1280x720 H.264 at
# MELD-like bitrates, MELD's clip-length mix). 120 clips = 72 train clips = 9 batches of 8;
# the default window (warm-up + 10 batches x 3 repeats x 8 clips) spans several epochs by
# design: on 2 cores 720p synthesis costs ~5-6 s per clip, so a set large enough for one
# epoch (~450 clips) would take the better part of an hour. `epochs_in_window` records it.
MELD_SHAPED = {"clips": 120, "codec": "h264", "width": 1280, "height": 720, "seed": 0}
# --quick: small and fast, for smoke tests and CI (VP9: DALI's CPU decoder reads it).
QUICK = {"clips": 48, "codec": "vp9", "width": 160, "height": 120, "seed": 0}
# gpu_check on a lent GPU: 280 clips = 168 train = 10 batches of 16
GPU_CHECK = {**MELD_SHAPED, "clips": 280}
SPECS = {"meld-shaped": MELD_SHAPED, "quick": QUICK, "gpu-check": GPU_CHECK}
DATA_ROOTS = {"meld-shaped": Path("runs") / "bench-data-720p",
              "quick": Path("runs") / "bench-data-quick"}
MARKER = "bench-spec.json"


def bench_spec(kind: str):
    """The SynthSpec of a bench data set kind ("meld-shaped", "quick" or "gpu-check")."""
    from meld_dali.synth import SynthSpec

    return SynthSpec(**SPECS[kind])


def size_mb(root: Path) -> float:
    return sum(f.stat().st_size for f in Path(root).rglob("*") if f.is_file()) / 2**20


def ensure_bench_data(kind: str, short_side: int, root: Path | None = None, progress=None,
                      say=print, frames: bool = True) -> tuple[Path, dict]:
    """Synthesize (once: a changed spec synthesizes again) and prepare, with JPEG frame
    folders and a clip cache, the bench set of `kind`. The cache is H.264 where a GPU can
    decode it (NVDEC), MJPEG elsewhere (DALI's CPU decoder reads it). `prepare` itself
    reuses what still fits (its fingerprint covers the short side and the cache settings;
    frame folders and cached clips made otherwise are made again). Returns (root, the
    dataset record)."""
    import dataclasses
    import shutil

    from meld_dali.prepare import prepare
    from meld_dali.synth import synth

    root = Path(root or DATA_ROOTS[kind])
    spec = dataclasses.asdict(bench_spec(kind))
    workers = max(1, min(16, os.cpu_count() or 1))  # 720p synthesis: ~1.3 CPU-s a clip
    marker = root / MARKER
    cache = root.with_name(root.name + "-cache")  # the cache lives outside the source tree
    if not marker.exists() or json.loads(marker.read_text()).get("spec") != spec:
        if not marker.exists() and root.is_dir() and any(root.iterdir()):
            raise UserError(f"{root}: not empty and not a bench data set (no {MARKER}): "
                            "choose a new folder for the bench data")
        from meld_dali.cache import MARKER_NAME

        if root.exists():  # the bench's own (its marker says so) or empty
            shutil.rmtree(root)
        if (cache / MARKER_NAME).exists():  # a cache (only ever of this bench set)
            shutil.rmtree(cache)
        say(f"[bold]bench: synthesizing {spec['clips']} {spec['codec']} clips "
            f"({spec['width']}x{spec['height']}, {kind}) in {root}")
        synth(root, bench_spec(kind), progress=progress, workers=workers)
        marker.write_text(json.dumps({"spec": spec}))
    from meld_dali.cache import auto_codec

    cache_codec, _ = auto_codec()  # what prepare picks here: the loader auto would use
    prepare(root, frames=root / "frames" if frames else None, short_side=short_side,
            workers=workers, progress=progress, cache=cache, cache_codec=cache_codec)
    mb = size_mb(root)
    say(f"bench data: {root} ({kind}, {mb:.0f} MB on disk)")
    return root, {"kind": kind, "root": str(root), "spec": spec, "short_side": short_side,
                  "cache_codec": cache_codec, "size_mb": mb}


def bench_manifest(data: Path | None, short_side: int, quick: bool, console,
                   progress) -> tuple[object, dict]:
    """(manifest, dataset record) to benchmark on: `data` (--data), else a synthetic set made
    once under runs/: MELD-shaped (1280x720 H.264, MELD's clip lengths) or, with `quick`, a
    small fast VP9 one; both with JPEG frame folders and a clip cache. `progress()` makes
    the progress display."""
    from meld_dali.launch import open_manifest

    if data is not None:
        if quick:
            raise UserError("--quick picks the built-in small data set; drop --data or --quick")
        return open_manifest(data, console), {"kind": "user", "root": str(data)}
    kind = "quick" if quick else "meld-shaped"
    with progress() as p:
        root, record = ensure_bench_data(kind, short_side, progress=p, say=console.print)
    return open_manifest(root, console), record
