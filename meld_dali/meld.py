"""MELD metadata: find each split's CSV and video folder under a root, parse the label CSVs.

The raw release is moved around by users (MELD.Raw/MELD.Raw/... is common), so files are
found by name, not by a fixed path. CSV quirks handled here: C1 control characters from a
wrong cp1252 decode (text only; ids and labels are clean), quoted one-digit-hour times,
gaps in `Sr No.`. A row whose emotion is not one of the 7 is reported, never guessed.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from meld_dali.config import EMOTIONS, SPLITS
from meld_dali.errors import UserError

CSV_NAMES = {s: f"{s}_sent_emo.csv" for s in SPLITS}
VIDEO_DIRS = {"train": "train_splits", "dev": "dev_splits_complete",
              "test": "output_repeated_splits_test"}
CSV_HEADER = ["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID",
              "Utterance_ID", "Season", "Episode", "StartTime", "EndTime"]
CLIP_RE = re.compile(r"^dia(\d+)_utt(\d+)$")
_TIME_RE = re.compile(r"^(\d{1,2}):(\d{2}):(\d{2})[,.](\d{1,3})$")
_MAX_DEPTH = 5  # how deep under ROOT to look for the files


@dataclass
class Row:
    split: str
    dialogue: int
    utterance: int
    emotion: str
    start_s: float | None
    end_s: float | None

    @property
    def clip_id(self) -> str:
        return f"dia{self.dialogue}_utt{self.utterance}"


@dataclass
class SplitSource:
    split: str
    csv: Path
    video_dir: Path | None


@dataclass
class ParsedCSV:
    rows: list[Row] = field(default_factory=list)
    bad_rows: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)


def parse_time(text: str) -> float | None:
    """'0:12:43,012' -> 763.012 seconds; None when the field is not a time."""
    m = _TIME_RE.match(text.strip())
    if not m:
        return None
    h, mi, s, ms = m.groups()
    return int(h) * 3600 + int(mi) * 60 + int(s) + int(ms.ljust(3, "0")) / 1000


# MELD's utterances are short; a longer field is a broken file, but it is read (and its row
# judged on its ids and label) rather than stopping the whole parse at csv's 128 KiB default
CSV_FIELD_LIMIT = 1 << 30


def read_csv(path: Path, split: str) -> ParsedCSV:
    """Parse one MELD label CSV. Unknown emotions, broken ids and repeated clips (the second
    row of a dia/utt pair: it would train twice per epoch) go to `bad_rows`."""
    out = ParsedCSV()
    first_line: dict[tuple[int, int], int] = {}
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    line = 1
    try:
        # utf-8 with C1 characters decodes fine; errors="replace" keeps a truly broken byte
        # in the free text from killing the parse (ids and labels are ASCII).
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f)
            missing = {"Emotion", "Dialogue_ID", "Utterance_ID"} - set(reader.fieldnames or [])
            if missing:
                raise UserError(f"{path}: not a MELD label CSV (missing columns {sorted(missing)})")
            for rec in reader:
                line = reader.line_num
                emotion = (rec.get("Emotion") or "").strip().lower()
                try:
                    dia, utt = int(rec["Dialogue_ID"]), int(rec["Utterance_ID"])
                except (TypeError, ValueError):
                    out.bad_rows.append((line, f"bad Dialogue_ID/Utterance_ID "
                                               f"{rec.get('Dialogue_ID')!r}/{rec.get('Utterance_ID')!r}"))
                    continue
                if emotion not in EMOTIONS:
                    out.bad_rows.append((line, f"dia{dia}_utt{utt}: unknown emotion {emotion!r}"))
                    continue
                if (dia, utt) in first_line:
                    out.bad_rows.append((line, f"dia{dia}_utt{utt}: duplicate row (first at "
                                               f"line {first_line[dia, utt]}); ignored"))
                    continue
                first_line[dia, utt] = line
                out.rows.append(Row(split, dia, utt, emotion,
                                    parse_time(rec.get("StartTime") or ""),
                                    parse_time(rec.get("EndTime") or "")))
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except csv.Error as e:
        raise UserError(f"{path}:{line}: not a readable CSV ({e})") from None
    return out


def _walk(root: Path):
    """os.walk limited to _MAX_DEPTH, shallowest first; yields (dir, subdirs, files)."""
    base = len(root.parts)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).parts) - base
        if depth >= _MAX_DEPTH:
            dirnames[:] = []
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.append((depth, Path(dirpath), list(dirnames), filenames))
    found.sort(key=lambda t: (t[0], str(t[1])))
    return found


def find_sources(root: str | Path) -> dict[str, SplitSource]:
    """Locate each split's CSV and video folder under `root` (any of MELD's layouts)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: not a directory")
    csvs: dict[str, Path] = {}
    dirs: dict[str, Path] = {}
    for _, d, subdirs, files in _walk(root):
        for split in SPLITS:
            if split not in csvs and CSV_NAMES[split] in files:
                csvs[split] = d / CSV_NAMES[split]
            if split not in dirs and VIDEO_DIRS[split] in subdirs:
                dirs[split] = d / VIDEO_DIRS[split]
    if not csvs:
        raise UserError(f"{root}: no MELD label CSVs found (looked for "
                        f"{', '.join(CSV_NAMES.values())} up to {_MAX_DEPTH} levels deep)")
    return {s: SplitSource(s, csvs[s], dirs.get(s)) for s in SPLITS if s in csvs}


def clip_path(src: SplitSource, row: Row) -> Path | None:
    return None if src.video_dir is None else src.video_dir / f"{row.clip_id}.mp4"


def unlabelled_files(src: SplitSource, rows: list[Row]) -> list[Path]:
    """Video files in the split folder that have no CSV row (ignored, but reported)."""
    if src.video_dir is None or not src.video_dir.is_dir():
        return []
    known = {r.clip_id for r in rows}
    return sorted(p for p in src.video_dir.iterdir()
                  if p.suffix == ".mp4" and p.stem not in known)
