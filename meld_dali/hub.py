"""Versioning on the Hugging Face Hub: the best model, its config, metrics and a model card,
pushed as one commit. Without a token or network it is skipped with one clear line; an
upload failure is retried with backoff and never touches the local run folder."""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml

from meld_dali.checkpoint import load_checkpoint
from meld_dali.config import EMOTIONS, HubConfig

log = logging.getLogger("meld_dali.hub")


def model_card(repo_id: str, config: dict, metrics: dict, epoch: int) -> str:
    per_class = metrics.get("per_class", {})
    rows = "\n".join(f"| {e} | {per_class[e]['precision']:.3f} | {per_class[e]['recall']:.3f} | "
                     f"{per_class[e]['f1']:.3f} | {per_class[e]['support']} |"
                     for e in EMOTIONS if e in per_class)
    t, o, d = config["train"], config["optim"], config["data"]

    def m(key: str) -> str:
        return f"{metrics[key]:.4f}" if key in metrics else "n/a"

    return f"""---
tags: [video-classification, emotion-recognition, meld, slowfast, nvidia-dali]
datasets: [declare-lab/MELD]
metrics: [accuracy, f1]
---
# {repo_id}

SlowFast R50 (pytorchvideo) fine-tuned for utterance-level emotion recognition from video
on MELD with [meld-dali](https://github.com/), best dev checkpoint (epoch {epoch}).

Classes, in order: {", ".join(f"{i} {e}" for i, e in enumerate(EMOTIONS))}.

## Dev results
| metric | model | all-neutral baseline |
|---|---|---|
| accuracy | {m('accuracy')} | {m('baseline_accuracy')} |
| weighted F1 | {m('weighted_f1')} | {m('baseline_weighted_f1')} |
| macro F1 | {m('macro_f1')} | |

| class | precision | recall | F1 | support |
|---|---|---|---|---|
{rows}

Published video-only results on MELD reach a weighted F1 of about 0.33-0.36.

## Recipe
{d['num_frames']} frames at {d['crop_size']} px (shorter side {d['short_side']}), batch
{t['batch_size']} x {t['accum_steps']} accumulation, focal loss (gamma {o['focal_gamma']},
class weights {o['class_weights']}), AdamW (wd {o['weight_decay']}), OneCycle
{o['base_lr']} -> {o['max_lr']}, AMP {t['amp']}, progressive unfreezing {t['unfreeze']}.
Full config: `config.yaml`. Load `model.pt` with `meld-dali predict model.pt VIDEO`.
"""


def public_config(config: dict) -> dict:
    """The config as published: no local paths (data root, caches, a local weights file);
    the pushed model.pt holds every weight, so nothing is lost."""
    out = copy.deepcopy(config)
    out["data"]["root"] = ""
    out["model"]["cache_dir"] = ""
    pretrained = out["model"]["pretrained"]
    if pretrained and not pretrained.startswith(("k400", "http://", "https://", "hf://")):
        out["model"]["pretrained"] = ""
    return out


def inference_state(ckpt: dict) -> dict:
    """What inference needs from a training checkpoint: no optimizer, no RNG, no loader,
    no local paths."""
    keep = ("format", "version", "emotions", "model")
    train = {k: ckpt["train"][k] for k in ("epoch", "step")}
    return {**{k: ckpt[k] for k in keep}, "train": train,
            "config": public_config(ckpt["config"])}


def _token(api) -> str | None:
    try:
        from huggingface_hub import get_token

        return getattr(api, "token", None) or get_token()
    except Exception:  # noqa: BLE001
        return None


def push(hub_cfg: HubConfig, run_dir: Path, api=None, sleep=time.sleep) -> bool:
    """Push run_dir's best checkpoint as one commit to hub_cfg.repo_id; True on success."""
    if not hub_cfg.repo_id or hub_cfg.push == "never":
        return False
    best = Path(run_dir) / "checkpoints" / "best.pt"
    if not best.exists():
        log.warning("hub: no best checkpoint in %s yet: nothing to push", run_dir)
        return False
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    if not _token(api):
        log.warning("hub: no Hugging Face token (set HF_TOKEN or `huggingface-cli login`): "
                    "skipping the push to %s", hub_cfg.repo_id)
        return False
    from huggingface_hub import CommitOperationAdd

    ckpt = load_checkpoint(best)  # read-only use, data only
    history = ckpt["reporter"]["history"] or [{}]
    metrics = max(history, key=lambda r: r.get("weighted_f1", -1))
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp)
        model = inference_state(ckpt)
        torch.save(model, staged / "model.pt")
        config = model["config"]  # already public: no local paths
        (staged / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (staged / "metrics.json").write_text(json.dumps(
            {"best": metrics, "history": history}, indent=2))
        (staged / "README.md").write_text(model_card(hub_cfg.repo_id, config, metrics,
                                                     metrics.get("epoch", ckpt["train"]["epoch"])))
        ops = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p))
               for p in sorted(staged.iterdir())]
        for attempt in range(1, hub_cfg.retries + 1):
            try:
                api.create_repo(hub_cfg.repo_id, private=hub_cfg.private, exist_ok=True)
                api.create_commit(hub_cfg.repo_id, operations=ops,
                                  commit_message=f"meld-dali: best of {Path(run_dir).name} "
                                                 f"(epoch {metrics.get('epoch')}, weighted F1 "
                                                 f"{metrics.get('weighted_f1', 0):.4f})")
                log.info("hub: pushed model, config, metrics and card to %s", hub_cfg.repo_id)
                return True
            except Exception as e:  # noqa: BLE001 - network trouble: retry, then give up
                if attempt == hub_cfg.retries:
                    log.warning("hub: push to %s failed after %d tries (%s); the local run "
                                "folder is untouched", hub_cfg.repo_id, attempt, e)
                    return False
                wait = 2 ** attempt
                log.warning("hub: push failed (%s); retrying in %ds", e, wait)
                sleep(wait)
    return False


class BackgroundPush:
    """`push()` off the training thread, for hub.push=best (rank 0 only).

    Under DDP the other ranks wait in the next collective while rank 0 trains on; a push
    with retries and backoff inside `end_epoch` would keep them there up to the process
    group's timeout. Here the push runs in one worker thread, outside any collective. It
    reads best.pt when it starts; best.pt is only ever replaced by an atomic rename, so it
    reads one complete checkpoint even if a newer best lands meanwhile. A new best that
    arrives while a push is queued (not started) needs no second push: the queued one
    will read it. `join()` (end of the run) waits for the pushes still running."""

    def __init__(self, push_fn):
        self.push_fn = push_fn
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-push")
        self.lock = threading.Lock()
        self.queued = False
        self.results: list[bool] = []

    def __call__(self) -> None:
        with self.lock:
            if self.queued:
                return
            self.queued = True
        self.pool.submit(self._run)

    def _run(self) -> None:
        with self.lock:
            self.queued = False  # from here, a newer best queues its own push
        try:
            self.results.append(bool(self.push_fn()))
        except Exception as e:  # noqa: BLE001 - a failed push never stops training
            log.warning("hub: push failed (%s); the local run folder is untouched", e)
            self.results.append(False)

    def join(self) -> None:
        self.pool.shutdown(wait=True)
