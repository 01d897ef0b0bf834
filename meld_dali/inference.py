"""Using a trained model: load a checkpoint for inference, score a split (`evaluate`, with
optional multi-view testing), and predict the emotion of arbitrary video files (`predict`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from meld_dali.checkpoint import load_checkpoint
from meld_dali.clips import Clip
from meld_dali.config import EMOTIONS, Config, config_from_saved
from meld_dali.data.base import Batch, LoaderSpec
from meld_dali.data.decode import read_video_frames, to_clip, upright
from meld_dali.data.plan import make_plan
from meld_dali.data.select import build_loader, resolve_backend, resolve_source
from meld_dali.errors import UserError
from meld_dali.evaluation import predict_loader
from meld_dali.launch import open_manifest
from meld_dali.metrics import classification_metrics
from meld_dali.model import SlowFastMELD
from meld_dali.probe import probe
from meld_dali.progress import PassProgress
from meld_dali.runtime import Runtime, pick_device


@dataclass
class Loaded:
    model: SlowFastMELD
    cfg: Config
    ckpt: dict
    runtime: Runtime  # the checkpoint's config on this machine: the trainer's autocast


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
    testing (the loader delivers every view of every clip; the softmax is averaged over a
    clip's views), reported beside the single view. `progress` (optional) shows the passes
    over the split."""
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
    labels, probs = _predict(loaded, spec, backend, split, progress)
    result = {"split": split, "backend": backend,
              "checkpoint_epoch": loaded.ckpt["train"]["epoch"],
              **classification_metrics(labels, probs.argmax(1))}
    if views:
        labels, probs = _predict(loaded, replace(spec, views=views), backend,
                                 f"{split} {views[0]}x{views[1]} views", progress)
        result["multi_view"] = {"views": {"temporal": views[0], "spatial": views[1]},
                                **classification_metrics(labels, probs.argmax(1))}
    return result


def _predict(loaded: Loaded, spec: LoaderSpec, backend: str, label: str,
             progress: PassProgress | None) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) of every clip of the loader `spec` describes."""
    cfg = loaded.cfg
    loader = build_loader(spec, cfg.data, cfg.loader, backend)
    on_batch = None
    if progress is not None:
        progress.start(label, len(loader))
        on_batch = progress.update
    try:
        labels, probs, _ = predict_loader(loaded.model, loader, loaded.runtime,
                                          on_batch=on_batch)
    finally:
        if progress is not None:
            progress.stop()
    return labels, probs


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
        # a file outside any manifest: an unlabelled Clip, planned like any eval clip
        clip = Clip(Path(path).name, "predict", "", -1, num_frames=n,
                    width=info.get("width"), height=info.get("height"))
        plan = make_plan(clip, cfg, train=False, seed=0, epoch=0, row=-1)
        raw = upright(read_video_frames(path, plan.indices[plan.mask]),
                      info.get("rotation", 0))
    except Exception as e:  # noqa: BLE001 - one bad file never stops the others
        return {"path": str(path), "error": f"cannot read video: {type(e).__name__}: {e}"}
    video, mask_t = to_clip(raw, cfg, plan.params)
    probs = _probs(loaded, video[None], mask_t[None])[0]
    return {"path": str(path), "emotion": EMOTIONS[int(probs.argmax())],
            "probabilities": {e: float(p) for e, p in zip(EMOTIONS, probs, strict=True)},
            "frames": n}
