"""Using a trained model: load a checkpoint for inference, score a split (`evaluate`, with
optional multi-view testing), and predict the emotion of arbitrary video files (`predict`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from meld_dali.checkpoint import load_checkpoint
from meld_dali.config import EMOTIONS, Config, config_from_saved
from meld_dali.data.base import Batch, LoaderSpec
from meld_dali.data.decode import read_clip, read_video_frames, to_clip, upright
from meld_dali.data.select import build_loader, resolve_backend, resolve_source
from meld_dali.errors import UserError
from meld_dali.evaluation import predict_loader
from meld_dali.launch import open_manifest
from meld_dali.manifest import Manifest
from meld_dali.metrics import classification_metrics
from meld_dali.model import SlowFastMELD
from meld_dali.probe import probe
from meld_dali.progress import PassProgress, iterate
from meld_dali.runtime import Runtime, pick_device
from meld_dali.sampling import sample_indices
from meld_dali.transforms import EVAL_PARAMS, AugParams


@dataclass
class Loaded:
    model: SlowFastMELD
    cfg: Config
    ckpt: dict
    runtime: Runtime  # the checkpoint's config on this machine: the trainer's autocast

    @property
    def device(self) -> torch.device:
        return self.runtime.device


def load_for_inference(path: str | Path, device: str = "auto") -> Loaded:
    """Weights and config only (no optimizer); a GPU-made checkpoint loads on the CPU. It
    runs as the trainer's dev pass did on this machine: same AMP dtype and memory format."""
    ckpt = load_checkpoint(path)
    if list(ckpt.get("emotions", EMOTIONS)) != list(EMOTIONS):
        raise UserError(f"{path}: trained with classes {ckpt['emotions']}, expected {EMOTIONS}")
    cfg = config_from_saved(ckpt["config"], where=str(path))
    cfg.model.pretrained = ""  # the checkpoint holds every weight: no download
    runtime = Runtime.resolve(cfg, pick_device(device))
    model = SlowFastMELD(cfg.model)
    model.load_state_dict(ckpt["model"])
    return Loaded(runtime.place(model).eval(), cfg, ckpt, runtime)


# ----------------------------------------------------------------------------- evaluate


def evaluate(loaded: Loaded, data: str | Path | None, split: str, backend: str = "auto",
             views: tuple[int, int] | None = None, progress: PassProgress | None = None) -> dict:
    """Metrics of a split. `views=(temporal, spatial)` adds PySlowFast-style multi-view
    testing (softmax averaged over views per clip), reported beside the single view.
    `progress` (optional) shows the passes over the split."""
    cfg = loaded.cfg
    root = data or cfg.data.root
    if not root:
        raise UserError("no data: pass --data (the checkpoint's config names none)")
    manifest = open_manifest(root)
    source = resolve_source(manifest, cfg.data.source)
    backend = resolve_backend(backend, manifest, split, source)
    rt = loaded.runtime
    spec = LoaderSpec(manifest, split, False, cfg.train.batch_size, cfg.train.seed,
                      device=rt.device, dtype=rt.video_dtype, channels_last=rt.channels_last,
                      source=source)
    loader = build_loader(spec, cfg.data, cfg.loader, backend)
    on_batch = None
    if progress is not None:
        progress.start(split, len(loader))
        on_batch = progress.update
    try:
        labels, probs, rows = predict_loader(loaded.model, loader, rt, on_batch=on_batch)
    finally:
        if progress is not None:
            progress.stop()
    result = {"split": split, "backend": backend,
              "checkpoint_epoch": loaded.ckpt["train"]["epoch"],
              **classification_metrics(labels, probs.argmax(1))}
    if views:
        mv = multi_view_probs(loaded, manifest, rows.tolist(), source, *views, progress)
        result["multi_view"] = {"views": {"temporal": views[0], "spatial": views[1]},
                                **classification_metrics(labels, mv.argmax(1))}
    return result


def parse_views(text: str) -> tuple[int, int]:
    """'3x3' -> (3, 3); both counts at least 1."""
    bad = UserError(f"--views {text!r}: expected TEMPORALxSPATIAL with counts >= 1, e.g. 3x3")
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise bad
    t, s = (int(p) for p in parts)
    if t < 1 or s < 1:
        raise bad
    return t, s


def spatial_params(h: int, w: int, k: int) -> list[AugParams]:
    """k crops along the longer side (3 = start, centre, end), like PySlowFast's test."""
    pos = [0.5] if k == 1 else [i / (k - 1) for i in range(k)]
    return [AugParams(crop_x=p) if w >= h else AugParams(crop_y=p) for p in pos]


@torch.no_grad()
def multi_view_probs(loaded: Loaded, manifest: Manifest, rows: list[int], source: str,
                     temporal: int, spatial: int,
                     progress: PassProgress | None = None) -> np.ndarray:
    cfg, out = loaded.cfg.data, []
    for row in iterate(rows, progress, f"multi-view {temporal}x{spatial}", unit="clips"):
        clip = manifest.clips[row]
        views = []
        for t in range(temporal):
            idx, mask = sample_indices(clip.num_frames, cfg.num_frames, train=False,
                                       position=(t + 0.5) / temporal)
            raw = read_clip(manifest, clip, idx[mask], source)
            h, w = raw.shape[1:3]
            views += [to_clip(raw, cfg, p) for p in spatial_params(h, w, spatial)]
        video, mask = (torch.stack(v) for v in zip(*views, strict=True))
        out.append(_probs(loaded, video, mask).mean(0))
    return torch.stack(out).numpy()


def _probs(loaded: Loaded, video: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    batch = Batch(video, mask, torch.zeros(len(video), dtype=torch.int64),
                  torch.zeros(len(video), dtype=torch.int64))
    rt = loaded.runtime
    batch = batch.to(rt.device, rt.video_dtype, rt.channels_last)
    with rt.autocast():
        logits = loaded.model(batch.video, batch.mask)
    return logits.float().softmax(-1).cpu()


# ----------------------------------------------------------------------------- predict


@torch.no_grad()
def predict_file(loaded: Loaded, path: str | Path) -> dict:
    """Emotion and the 7 probabilities of one video file (any length, fps, size)."""
    cfg = loaded.cfg.data
    try:
        info = probe(str(path))  # the frame count prepare would record, without a full decode
        if info["status"] != "ok":
            raise ValueError(f"{info['status']}: {info['reason']}")
        n = info["num_frames"]
        idx, mask = sample_indices(n, cfg.num_frames, train=False)
        raw = upright(read_video_frames(path, idx[mask]), info.get("rotation", 0))
    except Exception as e:  # noqa: BLE001 - one bad file never stops the others
        return {"path": str(path), "error": f"cannot read video: {type(e).__name__}: {e}"}
    video, mask_t = to_clip(raw, cfg, EVAL_PARAMS)
    probs = _probs(loaded, video[None], mask_t[None])[0]
    return {"path": str(path), "emotion": EMOTIONS[int(probs.argmax())],
            "probabilities": {e: float(p) for e, p in zip(EMOTIONS, probs, strict=True)},
            "frames": n}
