"""What a finished epoch leaves behind: a `metrics.jsonl` row, a confusion-matrix PNG, the
tracker's epoch log and one console line. Only the main rank reports."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from meld_dali.metrics import plot_confusion
from meld_dali.tracking import NullTracker

log = logging.getLogger("meld_dali.trainer")


class EpochReporter:
    def __init__(self, run_dir: str | Path | None = None, tracker=None, console=None,
                 enabled: bool = True):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.tracker = tracker or NullTracker()
        self.console, self.enabled = console, enabled

    def say(self, msg: str) -> None:
        if self.enabled:
            (self.console.print if self.console else log.info)(msg)

    def log_step(self, data: dict, step: int) -> None:
        if self.enabled:
            self.tracker.log(data, step)

    def epoch_end(self, row: dict, metrics: dict, predictions: list[dict],
                  improved: bool) -> None:
        if not self.enabled:
            return
        epoch = row["epoch"]
        png = None
        if self.run_dir is not None:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            png = self.run_dir / f"confusion_epoch{epoch:03d}.png"
            plot_confusion(metrics["confusion"], png, f"dev, epoch {epoch}")
        self.tracker.log_epoch(metrics, row["step"], predictions, str(png) if png else None)
        self.say(f"epoch {epoch}: loss {row['train_loss']:.4f}  acc {metrics['accuracy']:.3f}  "
                 f"macro-F1 {metrics['macro_f1']:.3f}  weighted-F1 {metrics['weighted_f1']:.3f}"
                 f"  (all-neutral {metrics['baseline_weighted_f1']:.3f})  data-wait "
                 f"{row['data_wait_share']:.0%}{'  *best*' if improved else ''}")

    def rewind(self, epochs_done: int) -> None:
        """Resuming from a checkpoint of `epochs_done` epochs (maybe `last.prev.pt`, older
        than the newest rows): drop rows of epochs it does not hold, so none is doubled."""
        path = self.run_dir / "metrics.jsonl" if self.run_dir is not None else None
        if not (self.enabled and path and path.exists()):
            return
        rows = path.read_text().splitlines()
        kept = [r for r in rows if r.strip() and json.loads(r)["epoch"] < epochs_done]
        if len(kept) != len(rows):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(r + "\n" for r in kept))
            os.replace(tmp, path)

    def finish(self) -> None:
        self.tracker.finish()
