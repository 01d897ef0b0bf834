"""Experiment tracking. W&B is offline by default without an API key, off with
`tracking.wandb=false`, and a W&B failure only ever logs a warning: training goes on."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from meld_dali.config import TrackingConfig

log = logging.getLogger("meld_dali.tracking")


class NullTracker:
    run_id: str | None = None

    def log(self, data: dict, step: int) -> None: ...

    def log_epoch(self, metrics: dict, step: int, predictions: list[dict] | None = None,
                  confusion_png: str | None = None) -> None: ...

    def log_image(self, key: str, path: str, step: int) -> None: ...

    def finish(self) -> None: ...


class WandbTracker(NullTracker):
    """Thin, failure-proof wrapper around a wandb run."""

    def __init__(self, tracking: TrackingConfig, run_dir: Path, config: dict, run_id: str | None,
                 name: str):
        self.tracking, self.run = tracking, None
        mode = tracking.mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        try:
            import wandb

            self.wandb = wandb
            self.run = wandb.init(project=tracking.project, entity=tracking.entity or None,
                                  dir=str(run_dir), config=config, mode=mode, id=run_id,
                                  resume="allow", name=name, reinit="finish_previous",
                                  settings=wandb.Settings(silent=True, console="off"))
            self.run_id = self.run.id
            log.info("W&B: %s run %s in %s", mode, self.run.id, run_dir / "wandb")
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            log.warning("W&B disabled for this run: %s", e)
            self.run = None

    def _safe(self, fn, *args, **kwargs) -> None:
        if self.run is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            log.warning("W&B logging failed (training goes on): %s", e)

    def log(self, data: dict, step: int) -> None:
        self._safe(self.run.log, data, step=step)

    def log_epoch(self, metrics, step, predictions=None, confusion_png=None) -> None:
        flat = {f"dev/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        flat.update({f"dev/f1_{e}": m["f1"] for e, m in metrics.get("per_class", {}).items()})
        if confusion_png:
            flat["dev/confusion"] = self.wandb.Image(confusion_png)
        if predictions:
            table = self.wandb.Table(columns=["clip_id", "true", "predicted", "confidence"])
            for p in predictions[: self.tracking.sample_predictions]:
                table.add_data(p["clip_id"], p["true"], p["predicted"], p["confidence"])
            flat["dev/predictions"] = table
        self._safe(self.run.log, flat, step=step)

    def log_image(self, key: str, path: str, step: int) -> None:
        if self.run is not None:
            self._safe(lambda: self.run.log({key: self.wandb.Image(path)}, step=step))

    def finish(self) -> None:
        self._safe(self.run.finish)


def build_tracker(tracking: TrackingConfig, run_dir: Path, config: dict, run_id: str | None,
                  enabled: bool = True) -> NullTracker:
    if not (tracking.wandb and enabled):
        return NullTracker()
    return WandbTracker(tracking, run_dir, config, run_id, name=run_dir.name)

