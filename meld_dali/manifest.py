"""The manifest: one row per labelled clip, probed from the file (`meld-dali prepare`
writes it: meld_dali.prepare).

`manifest.json` is written atomically and reused while the inputs are unchanged; it records
where the frame folders and the clip cache are. Statuses: ok, missing, unreadable, empty.
Loaders read only `ok` rows. Opening a manifest checks that its clip cache is still the one
it was made with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meld_dali.cache import check_cache
from meld_dali.clips import Clip
from meld_dali.config import EMOTIONS
from meld_dali.errors import UserError

MANIFEST_NAME = "manifest.json"
PARTIAL_NAME = "manifest.partial.jsonl"
REPORT_NAME = "prepare_report.json"
VERSION = 1
STATUSES = ("ok", "missing", "unreadable", "empty")


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
            m = cls(p, [Clip.from_dict(c) for c in data["clips"]], data["meta"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{p}: not a meld-dali manifest ({e}); delete it and re-run "
                            "`meld-dali prepare`") from None
        m.check_cache()
        return m

    def check_cache(self) -> None:
        """The clip cache the manifest records must still hold files made with its
        settings (another `prepare` may have rebuilt or removed it): else a one-line error
        with the command that rebuilds it."""
        if not self.has_cache:
            return
        c = self.meta["cache"]
        files = (self.base / c["dir"]).resolve()
        why = check_cache(files, {k: v for k, v in c.items() if k != "dir"})
        if why:
            raise UserError(f"{self.path}: its clip cache does not match: {why}; rebuild "
                            f"it with `{self.prepare_command()}`")

    def prepare_command(self) -> str:
        """The `meld-dali prepare` command that makes this manifest again (same options)."""
        meta, base = self.meta, self.base.resolve()
        cmd = f"meld-dali prepare {(base / meta.get('root', '.')).resolve()} --out {base}"
        if self.has_frames:
            cmd += f" --frames {(base / meta['frames_dir']).resolve()}"
        if self.has_cache:
            c = meta["cache"]
            cmd += (f" --cache {(base / c['dir']).resolve().parent} --cache-codec "
                    f"{c['codec']}")
        return cmd + f" --short-side {meta.get('short_side', 256)}"
