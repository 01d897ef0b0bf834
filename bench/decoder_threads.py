"""How to thread PyAV's decoder for the CPU loader: FFmpeg frame threading ("AUTO"), slice
threading ("SLICE") or one thread ("NONE"), timed on sampled decodes (the loader's: 32 of a
clip's frames, the decode stopping at the last one) inside DataLoader workers, on textured
1280x720 H.264 clips (MELD-like) and their 456x256 clip-cache re-encodings.

    python -m meld_dali.bench.decoder_threads [--clips 4] [--rounds 3] [--decodes 16]

Rounds interleave the modes (a shared machine's load hits them alike); the median of the
rounds is reported, in sampled decodes per second."""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset

from meld_dali.cache import CacheSpec, encode_clip
from meld_dali.data.decode import read_video_frames
from meld_dali.sampling import clip_indices
from meld_dali.synth import render_clip, write_video

MODES = ("AUTO", "SLICE", "NONE")


class Decodes(Dataset):
    """Item k: the sampled decode k of the clips in turn, with the mode asked for."""

    def __init__(self, paths: list[Path], frames: int, n: int, mode: str, sampled: int = 32):
        self.paths, self.frames, self.n, self.mode, self.sampled = paths, frames, n, mode, sampled

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> int:
        idx, mask = clip_indices(self.frames, self.sampled, train=True, seed=0, epoch=k, row=k)
        out = read_video_frames(self.paths[k % len(self.paths)], idx[mask], threads=self.mode)
        return len(out)


def make_clips(folder: Path, n: int, frames: int = 75) -> tuple[list[Path], list[Path]]:
    rng = np.random.default_rng(0)
    hd, cache = [], []
    spec = CacheSpec(str(folder), short_side=256)
    for i in range(n):
        p = folder / f"hd{i}.mp4"
        write_video(p, render_clip(i % 7, frames, 1280, 720, rng, texture=True), "h264", 24)
        c = folder / f"cache{i}.mp4"
        encode_clip(p, c, spec)
        hd.append(p)
        cache.append(c)
    return hd, cache


def rate(paths: list[Path], frames: int, decodes: int, mode: str, workers: int) -> float:
    ds = Decodes(paths, frames, decodes, mode)
    dl = DataLoader(ds, batch_size=1, num_workers=workers,
                    multiprocessing_context="fork" if workers else None)
    got, t0 = [], 0.0
    for b in dl:  # timed from the first decode out: the workers' start is not the decoder's
        got.append(int(b))
        t0 = t0 or time.perf_counter()
    dt = time.perf_counter() - t0
    assert all(g == ds.sampled for g in got), got
    return (decodes - 1) / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decodes", type=int, default=16)
    ap.add_argument("--workers", default=f"0,2,{os.cpu_count()}")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        hd, cache = make_clips(Path(tmp), a.clips)
        print(f"cores {os.cpu_count()}, load {os.getloadavg()[0]:.1f}; decodes/s "
              f"(median of {a.rounds} interleaved rounds of {a.decodes} at 720p, "
              f"{4 * a.decodes} at 456x256)")
        for name, paths, n in (("1280x720", hd, a.decodes), ("456x256", cache, 4 * a.decodes)):
            for workers in sorted({int(w) for w in a.workers.split(",")}):
                got = {m: [] for m in MODES}
                for _ in range(a.rounds):
                    for m in MODES:
                        got[m].append(rate(paths, 75, n, m, workers))
                row = "  ".join(f"{m} {statistics.median(v):6.1f}" for m, v in got.items())
                print(f"{name} workers={workers}: {row}", flush=True)
        print(f"load after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
