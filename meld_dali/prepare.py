"""`meld-dali prepare`: probe every labelled clip into the manifest, and optionally extract
JPEG frame folders and build the clip cache.

It is the extraction checkpoint: each probed clip is appended (fsynced) to
`manifest.partial.jsonl` as it finishes (an interrupted prepare resumes without re-probing),
the final `manifest.json` is written atomically and reused while the inputs are unchanged
(the fingerprint: CSVs, clip sizes and times, settings). Safety: the folder the manifest goes
to must be writable (a read-only MELD mount is told to use `--out`, before any work), one
`prepare` at a time writes a manifest folder (a lock), the frame and cache folders must be
the project's own (never a folder of the user's files), and the source videos are only read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import av
from PIL import Image

from meld_dali.cache import CacheSpec, auto_codec, build_cache, nvdec_unsupported
from meld_dali.clips import Clip
from meld_dali.config import EMOTIONS, DataConfig
from meld_dali.errors import UserError
from meld_dali.fileio import (
    TMP_SUFFIX,
    FolderLock,
    Journal,
    atomic_write,
    check_writable,
    claim_folder,
)
from meld_dali.manifest import (
    MANIFEST_NAME,
    PARTIAL_NAME,
    REPORT_NAME,
    STATUSES,
    VERSION,
    Manifest,
)
from meld_dali.meld import SPLITS, clip_path, find_sources, read_csv, unlabelled_files
from meld_dali.probe import probe, run_parallel

FRAMES_MARKER = "meld-dali-frames.json"


def extract_frames(video: str, dest: str, short_side: int) -> int:
    """Decode every frame, resize the shorter side to `short_side`, save JPEGs
    `000000.jpg ...` into `dest`. Written to a unique temp folder and renamed: a folder that
    exists is complete, and is kept if its frames have this short side (one JPEG header
    read); one made at another short side is extracted again. Returns the number of frames."""
    d = Path(dest)
    if d.is_dir():
        first = d / "000000.jpg"
        if first.exists():
            with Image.open(first) as img:
                if min(img.size) == short_side:
                    return len(list(d.glob("*.jpg")))
        shutil.rmtree(d)  # inside the frames folder, which only ever holds our folders
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=d.parent, prefix=d.name + ".", suffix=TMP_SUFFIX))
    n = 0
    try:
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def claim_frames_dir(frames: Path) -> None:
    """The frames folder must be the project's own (frame folders made at another short
    side are replaced, and that must never hit user files): new, empty, marked, or made by
    an earlier version (nothing but split folders in it)."""
    def made_earlier(d: Path) -> bool:
        return all((p.is_dir() and p.name in SPLITS) or p.name == FolderLock.NAME
                   for p in d.iterdir())

    claim_folder(frames, "--frames", "frames folder", FRAMES_MARKER,
                 {"format": "meld-dali-frames", "version": 1}, made_earlier)


# ----------------------------------------------------------------------------- inputs


def scan(root: Path):
    """The root's CSVs: (sources, [(Row, video path)], bad rows, unlabelled files)."""
    sources = find_sources(root)
    rows, bad_rows, unlabelled = [], [], []
    for split, src in sources.items():
        parsed = read_csv(src.csv, split)
        rows += [(r, clip_path(src, r)) for r in parsed.rows]
        bad_rows += [{"split": split, "csv": str(src.csv), "line": ln, "reason": why}
                     for ln, why in parsed.bad_rows]
        unlabelled += [str(p) for p in unlabelled_files(src, parsed.rows)]
    return sources, rows, bad_rows, unlabelled


def fingerprint(root: Path, out_dir: Path, sources, paths: list[Path | None],
                frames: Path | None, short_side: int, cache: CacheSpec | None) -> str:
    """Changes when a CSV, a clip file (size/mtime), the extraction or cache settings
    change. Paths count relative to the root (and the output folders relative to the
    manifest folder), so the same data spelled another way, or moved whole, is the same."""
    out = out_dir.resolve()

    def rel(p: Path | None, base: Path) -> str:
        return os.path.relpath(Path(p).resolve(), base) if p else "-"

    settings = cache.settings() if cache else {}
    h = hashlib.sha256(f"v{VERSION}|{rel(frames, out)}|{short_side}|"
                       f"{rel(cache.dir if cache else None, out)}|"
                       f"{json.dumps(settings, sort_keys=True)}".encode())
    for src in sources.values():
        h.update(src.csv.read_bytes())
    base = root.resolve()
    for p in paths:
        try:
            st = p.stat() if p else None
        except OSError:
            st = None
        h.update(f"{rel(p, base)}|{st.st_size}|{st.st_mtime_ns}".encode() if st
                 else f"{rel(p, base)}|-".encode())
    return h.hexdigest()


def manifest_inputs(m: Manifest) -> tuple[Path, Path | None, CacheSpec | None]:
    """(root, frames folder, cache spec) a manifest was prepared with, from its meta."""
    meta, base = m.meta, m.base
    frames = (base / meta["frames_dir"]).resolve() if meta.get("frames_dir") else None
    spec = None
    if m.has_cache:
        c = meta["cache"]
        spec = CacheSpec(str((base / c["dir"]).resolve().parent), c["short_side"], c["codec"],
                         **{k: c[k] for k in ("crf", "gop", "qscale") if k in c
                            and not (k == "gop" and c["codec"] == "mjpeg")})
    return (base / meta.get("root", ".")).resolve(), frames, spec


def stale_reason(m: Manifest) -> str:
    """Why a manifest no longer describes its root's CSVs and clips ('' when it does)."""
    root, frames, spec = manifest_inputs(m)
    try:
        sources, rows, _, _ = scan(root)
    except UserError as e:
        return str(e)
    fp = fingerprint(root, m.base, sources, [p for _, p in rows], frames,
                     m.meta.get("short_side", 256), spec)
    return "" if fp == m.meta.get("fingerprint") else \
        "the label CSVs or the clip files changed since it was prepared"


# ----------------------------------------------------------------------------- prepare


def prepare(root: str | Path, out: str | Path | None = None, frames: str | Path | None = None,
            short_side: int = 256, workers: int = 2, progress=None,
            cache: str | Path | None = None, cache_codec: str = "auto"
            ) -> tuple[Manifest, dict]:
    """Build (or reuse, or resume) the manifest for a MELD root. Returns (manifest, report).
    With `cache`, every ok clip is also re-encoded there at `short_side` (meld_dali.cache),
    in `cache_codec` (auto: `cache.auto_codec`, by the loader this machine would use).
    The manifest folder (`out`, default ROOT) is locked while it is written."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: not a directory")
    out_dir = Path(out) if out else root
    hint = (f"pass --out DIR to write the manifest elsewhere (e.g. `meld-dali prepare {root} "
            f"--out runs/meld-manifest`)") if out is None else "choose another --out"
    check_writable(out_dir, "the manifest folder", hint)
    for folder, flag in ((frames, "--frames"), (cache, "--cache")):
        if folder:
            check_writable(folder, f"the {flag} folder", f"choose another {flag} folder")
    with FolderLock(out_dir, "manifest folder"):
        return _prepare(root, out_dir, frames, short_side, workers, progress, cache,
                        cache_codec)


def _prepare(root: Path, out_dir: Path, frames, short_side: int, workers: int, progress,
             cache, cache_codec: str) -> tuple[Manifest, dict]:
    sources, rows, bad_rows, unlabelled = scan(root)
    frames_dir = Path(frames).resolve() if frames else None
    codec_why = "asked for"
    if cache and cache_codec == "auto":
        cache_codec, codec_why = auto_codec()
    cache_spec = CacheSpec(str(Path(cache).resolve()), short_side, cache_codec) if cache else None
    fp = fingerprint(root, out_dir, sources, [p for _, p in rows], frames_dir, short_side,
                     cache_spec)

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
    if frames_dir:
        claim_frames_dir(frames_dir)

    # resume: results of a previous interrupted run with the same inputs
    partial = out_dir / PARTIAL_NAME
    done: dict[str, dict] = {}
    if partial.exists():
        text = partial.read_text()
        lines = text.splitlines()
        try:
            same = bool(lines) and json.loads(lines[0]).get("fingerprint") == fp
        except json.JSONDecodeError:
            same = False
        if same:
            good = lines[:1]
            for line in lines[1:]:
                try:
                    rec = json.loads(line)
                    done[rec["key"]] = rec
                except (json.JSONDecodeError, KeyError):
                    break  # a torn last line (a crash mid-write): re-probe from there
                good.append(line)
            if len(good) < len(lines) or not text.endswith("\n"):
                # cut the torn tail off before appending: a record written after it would
                # join it on one unreadable line and be lost to every later resume
                with atomic_write(partial) as f:
                    f.write("".join(line + "\n" for line in good))
        else:
            partial.unlink()
    if not partial.exists():
        with atomic_write(partial) as f:
            f.write(json.dumps({"fingerprint": fp}) + "\n")

    def key(row) -> str:
        return f"{row.split}/{row.clip_id}"

    todo = [(i, str(p) if p else "") for i, (r, p) in enumerate(rows) if key(r) not in done]
    resumed = len(rows) - len(todo)
    with Journal(partial) as journal:
        for i, result in run_parallel(_probe_job, todo, workers, progress, "probe clips"):
            rec = {"key": key(rows[i][0]), **result}
            done[rec["key"]] = rec
            journal.append(json.dumps(rec))

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
            rotation=int(rec.get("rotation", 0) or 0),
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

    built = None
    if cache_spec:
        video_dirs = [root] + [s.video_dir for s in sources.values() if s.video_dir]
        built = build_cache(clips, out_dir, cache_spec, workers, progress, sources=video_dirs)

    m = Manifest(mpath, clips, meta)
    report = build_report(m, bad_rows, unlabelled)
    if built:
        report["cache"] = {"dir": str(cache_spec.files_dir), "built": built["built"],
                           "reused": built["reused"], "failed": len(built["failures"]),
                           "codec": cache_codec, "codec_why": codec_why}
        report["cache_failures"] = built["failures"]
    report["resumed_probes"] = resumed
    _atomic_write_json(out_dir / REPORT_NAME, report)
    _atomic_write_json(mpath, {"meta": meta, "clips": [c.to_dict() for c in clips]})
    partial.unlink(missing_ok=True)
    report["reused"] = False
    return m, report


def _atomic_write_json(path: Path, obj: Any) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f)


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
    rotated = [{"split": c.split, "clip": c.clip_id, "path": str(m.video_path(c)),
                "rotation": c.rotation} for c in m.clips if c.status == "ok" and c.rotation]
    return {"manifest": str(m.path), "splits": counts, "problems": problems,
            "bad_rows": bad_rows, "unlabelled_files": unlabelled,
            "nvdec_unsupported": len(nvdec),
            "nvdec_unsupported_examples": [str(m.video_path(c)) for c in nvdec[:5]],
            "rotated": rotated,
            "short_clip_frames": SHORT_CLIP_FRAMES, "cache": {}, "cache_failures": []}
