"""`Clip`: one manifest row, the typed record every part reads (loaders, cache, report).

What a labelled MELD utterance is (id, split, label) and what probing its file found (frame
count, rate, size, codec), with its status and where its frame folder or cached re-encoding
lives. Stored in manifest.json as a plain object per row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class Clip:
    clip_id: str  # dia{D}_utt{U}
    split: str  # train | dev | test
    emotion: str
    label: int  # index in config.EMOTIONS
    path: str = ""  # source video, relative to the manifest folder ("" when not found)
    status: str = "ok"  # ok | missing | unreadable | empty (loaders read only ok)
    reason: str = ""  # why not ok
    num_frames: int = 0  # probed from the file, not from the CSV times
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    codec: str | None = None
    pix_fmt: str | None = None
    profile: str | None = None  # e.g. High, High 10 (NVDEC cannot take High 10 or 4:4:4)
    rotation: int = 0  # display rotation (degrees counterclockwise) the file asks for
    frames: bool = False  # a JPEG frame folder was extracted
    cache: str = ""  # re-encoded file, relative to the cache folder ("" = none)
    cache_frames: int = 0
    csv_seconds: float | None = None  # the CSV's end - start, for reference only

    @property
    def loadable(self) -> bool:
        return self.status == "ok" and self.num_frames > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Clip:
        """A row of manifest.json (keys a newer version added are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
