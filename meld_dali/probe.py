"""Probing video files (frame count, rate, size, codec) and running per-clip jobs in
parallel: what `prepare` and the clip cache share."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import av

from meld_dali.signals import worker_init


def probe(path: str) -> dict[str, Any]:
    """Frame count, fps, size, codec and pixel format of one clip; never raises.

    The frame count is the number of video packets demuxed (one per frame for MELD's
    codecs); where the container's own count disagrees, frames are decoded and counted.
    The first frame is always decoded, so a file that cannot be decoded is `unreadable`.
    """
    p = Path(path)
    if not path or not p.is_file():  # "" = the split's video folder was not found
        return {"status": "missing", "reason": "file not found"}
    try:
        with av.open(str(p)) as c:
            if not c.streams.video:
                return {"status": "empty", "reason": "no video stream"}
            s = c.streams.video[0]
            info = {"fps": float(s.average_rate or s.guessed_rate or 0) or None,
                    "width": s.codec_context.width, "height": s.codec_context.height,
                    "codec": s.codec_context.name, "pix_fmt": s.codec_context.pix_fmt,
                    "profile": s.codec_context.profile}
            claimed = int(s.frames or 0)
            packets = 0
            first = None
            for packet in c.demux(s):
                if packet.size == 0:
                    continue
                packets += 1
                if first is None:
                    first = next(iter(packet.decode()), None)
            if first is None and packets:
                # a decoder may hold frames back until flushed
                first = next(iter(s.codec_context.decode(None)), None)
            first_ok = first is not None
            # display rotation (phone clips): MELD has none; prepare reports it, predict
            # applies it
            info["rotation"] = int(round(first.rotation)) % 360 if first_ok else 0
        n = packets
        if claimed and claimed != packets:
            n = count_decoded(str(p))
        if packets == 0:
            return {**info, "status": "empty", "num_frames": 0, "reason": "no video frames"}
        if not first_ok:
            return {**info, "status": "unreadable", "num_frames": 0,
                    "reason": "no frame could be decoded"}
        return {**info, "status": "ok", "num_frames": n, "reason": ""}
    except (av.FFmpegError, OSError, ValueError, IndexError) as e:
        return {"status": "unreadable", "reason": f"{type(e).__name__}: {e}"}


def count_decoded(path: str) -> int:
    with av.open(path) as c:
        return sum(1 for _ in c.decode(video=0))


def run_parallel(fn, jobs: list, workers: int, progress, label: str):
    """Yield (key, result) for each job, in a process pool when workers > 1."""
    task = progress.add_task(label, total=len(jobs)) if progress and jobs else None
    if workers <= 1 or len(jobs) < 8:
        results = map(fn, jobs)
        pool = None
    else:
        # workers ignore SIGINT/SIGTERM (the parent decides) and die with the parent
        pool = ProcessPoolExecutor(max_workers=workers, initializer=worker_init)
        results = pool.map(fn, jobs, chunksize=4)
    try:
        for key, *rest in results:
            yield key, rest[0] if len(rest) == 1 else tuple(rest)
            if task is not None:  # after the caller has recorded the result
                progress.advance(task)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)


