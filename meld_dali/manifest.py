"""The manifest (`meld-dali prepare`): one row per labelled clip, probed from the file.

It is the extraction checkpoint: each probed clip is appended to `manifest.partial.jsonl`
as it finishes (an interrupted prepare resumes without re-probing), the final
`manifest.json` is written atomically (temp + rename) and reused while the inputs are
unchanged. Statuses: ok, missing, unreadable, empty. Loaders read only `ok` rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

from meld_dali.cache import CacheSpec, build_cache, nvdec_unsupported
from meld_dali.clips import Clip
from meld_dali.config import EMOTIONS, DataConfig
from meld_dali.errors import UserError
from meld_dali.fileio import atomic_write
from meld_dali.meld import SPLITS, clip_path, find_sources, read_csv, unlabelled_files
from meld_dali.probe import probe, run_parallel

MANIFEST_NAME = "manifest.json"
PARTIAL_NAME = "manifest.partial.jsonl"
REPORT_NAME = "prepare_report.json"
VERSION = 1
STATUSES = ("ok", "missing", "unreadable", "empty")


def extract_frames(video: str, dest: str, short_side: int) -> int:
    """Decode every frame, resize the shorter side to `short_side`, save JPEGs
    `000000.jpg ...` into `dest`. Written to `dest.tmp` and renamed: a folder that exists
    is complete, and is kept if its frames have this short side (one JPEG header read);
    one made at another short side is extracted again. Returns the number of frames."""
    d = Path(dest)
    if d.is_dir():
        first = d / "000000.jpg"
        if first.exists():
            with Image.open(first) as img:
                if min(img.size) == short_side:
                    return len(list(d.glob("*.jpg")))
        shutil.rmtree(d)
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n = 0
    with av.open(video) as c:
        for frame in c.decode(video=0):
            img = frame.to_image()
            w, h = img.size
            scale = short_side / min(w, h)
            if scale != 1:
                img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                 resample=3)  # bicubic
            img.save(tmp / f"{n:06d}.jpg", quality=90)
            n += 1
    os.replace(tmp, d)
    return n


def _probe_job(args: tuple[int, str]) -> tuple[int, dict]:
    key, path = args
    return key, probe(path)


def _extract_job(args: tuple[int, str, str, int]) -> tuple[int, int, str]:
    key, video, dest, short_side = args
    try:
        return key, extract_frames(video, dest, short_side), ""
    except Exception as e:  # noqa: BLE001 - a bad clip is reported, never fatal
        return key, 0, f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------- manifest


@dataclass
class Manifest:
    path: Path  # manifest.json
    clips: list[Clip]
    meta: dict[str, Any]

    @property
    def base(self) -> Path:
        return self.path.parent

    @property
    def has_frames(self) -> bool:
        return bool(self.meta.get("frames_dir"))

    def video_path(self, clip: Clip) -> Path:
        return (self.base / clip.path).resolve()

    @property
    def has_cache(self) -> bool:
        """True when `prepare --cache` built a re-encoded clip cache (see meld_dali.cache)."""
        return bool((self.meta.get("cache") or {}).get("dir"))

    @property
    def cache_short_side(self) -> int | None:
        """Shorter side (px) of every cached clip, or None without a cache."""
        return (self.meta.get("cache") or {}).get("short_side") if self.has_cache else None

    def cache_path(self, clip: Clip) -> Path | None:
        """The clip's cached file, or None when it has none (no cache, or its re-encode
        failed: then read its source video)."""
        if not self.has_cache or not clip.cache:
            return None
        return (self.base / self.meta["cache"]["dir"] / clip.cache).resolve()

    def frames_path(self, clip: Clip) -> Path | None:
        if not clip.frames:
            return None
        return (self.base / self.meta["frames_dir"] / clip.split / clip.clip_id).resolve()

    def ok(self, split: str) -> list[int]:
        """Row indices of loadable clips of a split (row index = Batch.index)."""
        return [i for i, c in enumerate(self.clips)
                if c.split == split and c.loadable]

    def labels(self, rows: list[int]) -> np.ndarray:
        return np.array([self.clips[i].label for i in rows], dtype=np.int64)

    def class_counts(self, split: str) -> list[int]:
        counts = np.bincount(self.labels(self.ok(split)), minlength=len(EMOTIONS))
        return counts.tolist()

    @classmethod
    def load(cls, where: str | Path) -> Manifest:
        """Load from a manifest file, or a folder holding one (a prepared dataset root)."""
        p = Path(where)
        if p.is_dir():
            p = p / MANIFEST_NAME
        if not p.exists():
            raise UserError(f"no manifest at {p}: run `meld-dali prepare {Path(where)}` first")
        try:
            data = json.loads(p.read_text())
            return cls(p, [Clip.from_dict(c) for c in data["clips"]], data["meta"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{p}: not a meld-dali manifest ({e}); delete it and re-run "
                            "`meld-dali prepare`") from None


def _atomic_write_json(path: Path, obj: Any) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f)


def _fingerprint(sources, paths: list[Path | None], frames: str | None, short_side: int,
                 cache: str = "") -> str:
    """Changes when a CSV, a clip file (size/mtime), the extraction or cache settings change."""
    h = hashlib.sha256(f"v{VERSION}|{frames}|{short_side}|{cache}".encode())
    for src in sources.values():
        h.update(src.csv.read_bytes())
    for p in paths:
        try:
            st = p.stat() if p else None
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode() if st else f"{p}|-".encode())
        except OSError:
            h.update(f"{p}|-".encode())
    return h.hexdigest()


def prepare(root: str | Path, out: str | Path | None = None, frames: str | Path | None = None,
            short_side: int = 256, workers: int = 2, progress=None,
            cache: str | Path | None = None, cache_codec: str = "h264"
            ) -> tuple[Manifest, dict]:
    """Build (or reuse, or resume) the manifest for a MELD root. Returns (manifest, report).
    With `cache`, every ok clip is also re-encoded there at `short_side` (meld_dali.cache)."""
    root = Path(root)
    out_dir = Path(out) if out else root
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = find_sources(root)
    rows, bad_rows, unlabelled = [], [], []
    for split, src in sources.items():
        parsed = read_csv(src.csv, split)
        rows += [(r, clip_path(src, r)) for r in parsed.rows]
        bad_rows += [{"split": split, "csv": str(src.csv), "line": ln, "reason": why}
                     for ln, why in parsed.bad_rows]
        unlabelled += [str(p) for p in unlabelled_files(src, parsed.rows)]
    frames_dir = Path(frames).resolve() if frames else None
    cache_spec = CacheSpec(str(Path(cache).resolve()), short_side, cache_codec) if cache else None
    fp = _fingerprint(sources, [p for _, p in rows], str(frames_dir), short_side,
                      cache_spec.key() if cache_spec else "")

    mpath = out_dir / MANIFEST_NAME
    if mpath.exists():
        try:
            m = Manifest.load(mpath)
            if m.meta.get("fingerprint") == fp:
                report = json.loads((out_dir / REPORT_NAME).read_text())
                report["reused"] = True
                return m, report
        except (UserError, OSError, json.JSONDecodeError):
            pass  # unreadable or stale: rebuild

    # resume: results of a previous interrupted run with the same inputs
    partial = out_dir / PARTIAL_NAME
    done: dict[str, dict] = {}
    if partial.exists():
        lines = partial.read_text().splitlines()
        if lines and json.loads(lines[0]).get("fingerprint") == fp:
            for line in lines[1:]:
                try:
                    rec = json.loads(line)
                    done[rec["key"]] = rec
                except (json.JSONDecodeError, KeyError):
                    break  # a torn last line from a kill: re-probe from there
        else:
            partial.unlink()
    if not partial.exists():
        partial.write_text(json.dumps({"fingerprint": fp}) + "\n")

    def key(row) -> str:
        return f"{row.split}/{row.clip_id}"

    todo = [(i, str(p) if p else "") for i, (r, p) in enumerate(rows) if key(r) not in done]
    resumed = len(rows) - len(todo)
    with open(partial, "a") as log:
        for i, result in run_parallel(_probe_job, todo, workers, progress, "probe clips"):
            rec = {"key": key(rows[i][0]), **result}
            done[rec["key"]] = rec
            log.write(json.dumps(rec) + "\n")
            log.flush()

    clips = []
    for r, p in rows:
        rec = done[key(r)]
        rel = os.path.relpath(p, out_dir) if p else ""
        clips.append(Clip(
            r.clip_id, r.split, r.emotion, EMOTIONS.index(r.emotion), path=rel,
            status=rec["status"], reason=rec.get("reason", ""),
            num_frames=int(rec.get("num_frames", 0) or 0), fps=rec.get("fps"),
            width=rec.get("width"), height=rec.get("height"), codec=rec.get("codec"),
            pix_fmt=rec.get("pix_fmt"), profile=rec.get("profile"),
            csv_seconds=(r.end_s - r.start_s) if r.start_s is not None
            and r.end_s is not None else None))

    meta = {"version": VERSION, "fingerprint": fp, "root": os.path.relpath(root, out_dir),
            "frames_dir": os.path.relpath(frames_dir, out_dir) if frames_dir else "",
            "short_side": short_side, "emotions": list(EMOTIONS),
            "cache": cache_spec.meta(out_dir) if cache_spec else {}}
    if frames_dir:
        jobs = [(i, str(out_dir / c.path), str(frames_dir / c.split / c.clip_id),
                 short_side) for i, c in enumerate(clips) if c.status == "ok"]
        for i, (n, err) in run_parallel(_extract_job, jobs, workers, progress,
                                         "extract frames"):
            c = clips[i]
            if err or n == 0:
                c.status = "unreadable"
                c.reason = f"frame extraction failed: {err or 'no frames'}"
            else:
                # the decoder's own count is the truth for the frame folder
                c.frames, c.num_frames = True, n

    built = build_cache(clips, out_dir, cache_spec, workers, progress) if cache_spec else None

    m = Manifest(mpath, clips, meta)
    report = build_report(m, bad_rows, unlabelled)
    if built:
        report["cache"] = {"dir": str(cache_spec.dir), "built": built["built"],
                           "reused": built["reused"], "failed": len(built["failures"])}
        report["cache_failures"] = built["failures"]
    report["resumed_probes"] = resumed
    _atomic_write_json(out_dir / REPORT_NAME, report)
    _atomic_write_json(mpath, {"meta": meta, "clips": [c.to_dict() for c in clips]})
    partial.unlink(missing_ok=True)
    report["reused"] = False
    return m, report


# "short" clips in the report: fewer frames than the seed recipe samples (padded and masked)
SHORT_CLIP_FRAMES = DataConfig.model_fields["num_frames"].default


def build_report(m: Manifest, bad_rows: list[dict], unlabelled: list[str]) -> dict:
    """Per split: the labelled rows of the CSVs per class beside the usable (ok) ones, the
    status counts, and every problem with its path."""
    counts: dict[str, dict] = {}
    for split in SPLITS:
        in_split = [c for c in m.clips if c.split == split]
        if not in_split:
            continue
        status = Counter(c.status for c in in_split)
        ok = Counter(c.emotion for c in in_split if c.status == "ok")
        labelled = Counter(c.emotion for c in in_split)  # one manifest row per CSV row
        counts[split] = {"rows": len(in_split), **{s: status.get(s, 0) for s in STATUSES},
                         "labelled_per_class": {e: labelled.get(e, 0) for e in EMOTIONS},
                         "ok_per_class": {e: ok.get(e, 0) for e in EMOTIONS},
                         "short_clips": sum(1 for c in in_split if c.status == "ok"
                                            and c.num_frames < SHORT_CLIP_FRAMES)}
    problems = [{"split": c.split, "clip": c.clip_id, "path": str(m.video_path(c)),
                 "status": c.status, "reason": c.reason}
                for c in m.clips if c.status != "ok"]
    nvdec = [c for c in m.clips if c.status == "ok" and nvdec_unsupported(c)]
    return {"manifest": str(m.path), "splits": counts, "problems": problems,
            "bad_rows": bad_rows, "unlabelled_files": unlabelled,
            "nvdec_unsupported": len(nvdec),
            "nvdec_unsupported_examples": [str(m.video_path(c)) for c in nvdec[:5]],
            "short_clip_frames": SHORT_CLIP_FRAMES, "cache": {}, "cache_failures": []}
