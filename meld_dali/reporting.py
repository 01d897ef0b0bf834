"""What training shows and leaves behind: live progress of each epoch and evaluation pass,
and per finished epoch a `metrics.jsonl` row, a confusion-matrix PNG, the learning curves
(`curves.png`, rewritten each epoch), the tracker's epoch log and one console line. Only the
main rank reports."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from meld_dali.curves import plot_curves
from meld_dali.fileio import append_line, atomic_write
from meld_dali.metrics import plot_confusion
from meld_dali.progress import PassProgress
from meld_dali.tracking import NullTracker

log = logging.getLogger("meld_dali.trainer")
METRICS_NAME = "metrics.jsonl"


class EpochReporter:
    def __init__(self, run_dir: str | Path | None = None, tracker=None, console=None,
                 enabled: bool = True, progress_every: int = 50):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.tracker = tracker or NullTracker()
        self.console, self.enabled = console, enabled
        self.bar = PassProgress(console, progress_every, enabled)
        self.history: list[dict] = []  # every finished epoch's row: metrics.jsonl's rows

    # ------------------------------------------------------------------ live progress

    def epoch_start(self, epoch: int, total: int, done: int = 0, clips: int = 0) -> None:
        """A training epoch of `total` micro-batches begins (at `done` when resumed)."""
        self.bar.start(f"epoch {epoch}", total, done, clips)

    def progress(self, done: int, stats, lr: float) -> None:
        """One micro-batch done; `stats` is the epoch's running EpochStats. Its loss lives
        on the device: it is read (a GPU sync) only when the display is due to show it."""
        if self.bar.enabled:
            busy = stats.data_wait + stats.step_time
            if self.bar.due(done):
                self._loss = stats.mean_loss()
            self.bar.update(done, stats.clips, loss=getattr(self, "_loss", None), lr=lr,
                            wait=stats.data_wait / busy if busy > 0 else 0.0)

    def eval_start(self, label: str, total: int):
        """An evaluation pass of `total` batches begins: the per-batch callback for
        `evaluation.predict_loader` (None when this rank does not report)."""
        self.bar.start(label, total, 0, 0)
        return self.bar.update if self.bar.enabled else None

    def pass_end(self) -> None:
        self.bar.stop()

    def say(self, msg: str) -> None:
        """One message line; never wrapped (a path or a command in it stays copyable)."""
        if not self.enabled:
            return
        if self.console:
            self.console.print(msg, soft_wrap=True, highlight=False, markup=False)
        else:
            log.info(msg)

    @property
    def records_steps(self) -> bool:
        """Whether per-step figures go anywhere (this rank reports and a tracker runs)."""
        return self.enabled and type(self.tracker) is not NullTracker

    def log_step(self, data: dict, step: int) -> None:
        if self.enabled:
            self.tracker.log(data, step)

    def epoch_end(self, row: dict, metrics: dict, predictions: list[dict],
                  improved: bool) -> None:
        """`row` is the finished epoch's: it joins the history (every rank keeps it; the
        main rank writes it to metrics.jsonl and draws the curves from it)."""
        self.pass_end()
        self.history.append(row)
        if not self.enabled:
            return
        epoch = row["epoch"]
        png = None
        if self.run_dir is not None:  # fsynced: a kill after this cannot take the row back
            append_line(self.run_dir / METRICS_NAME, json.dumps(row))
            png = self.run_dir / f"confusion_epoch{epoch:03d}.png"
            plot_confusion(metrics["confusion"], png, f"dev, epoch {epoch}")
        self.tracker.log_epoch(metrics, row["step"], predictions, str(png) if png else None)
        curves = self.write_curves(self.history)
        if curves is not None:
            self.tracker.log_image("curves", str(curves), row["step"])
        self.say(f"epoch {epoch}: loss {row['train_loss']:.4f}  acc {metrics['accuracy']:.3f}  "
                 f"macro-F1 {metrics['macro_f1']:.3f}  weighted-F1 {metrics['weighted_f1']:.3f}"
                 f"  (all-neutral {metrics['baseline_weighted_f1']:.3f})  data-wait "
                 f"{row['data_wait_share']:.0%}{'  *best*' if improved else ''}"
                 + redone_note(row))


    def write_curves(self, history: list[dict]) -> Path | None:
        """curves.png from the history rows; a plotting failure never stops training."""
        if self.run_dir is None:
            return None
        path = self.run_dir / "curves.png"
        try:
            plot_curves(history, path)
        except Exception as e:  # noqa: BLE001 - a picture is not worth a lost run
            log.warning("could not draw %s: %s", path, e)
            return None
        return path

    def state_dict(self) -> dict:
        """The history and the tracker's run (a resume continues the same W&B run)."""
        return {"history": self.history, "tracker_run_id": self.tracker.run_id}

    def load_state_dict(self, sd: dict) -> None:
        """Resuming: the checkpoint's history, and metrics.jsonl rewritten to it. (The
        tracker's run id is read where the tracker is opened, before this.)"""
        self.history = list(sd["history"])
        self.restore_log()

    def restore_log(self) -> None:
        """metrics.jsonl becomes the history (the checkpoint's: the truth), one row per
        epoch it holds. Rows of epochs it does not hold (a fallback to last.prev.pt) go, and
        so does a torn last line (a kill mid-append), with a warning."""
        path = self.run_dir / METRICS_NAME if self.run_dir is not None else None
        if not (self.enabled and path):
            return
        want = "".join(json.dumps(row) + "\n" for row in self.history)
        have = path.read_text() if path.exists() else ""
        if have == want:
            return
        torn = 0
        for line in have.splitlines():
            try:
                json.loads(line)
            except json.JSONDecodeError:
                torn += 1
        if torn:
            self.say(f"warning: {path}: dropped {torn} unreadable line(s) (a write cut short); "
                     "the checkpoint's history rewrites it")
        with atomic_write(path) as f:
            f.write(want)

    def finish(self) -> None:
        self.pass_end()
        self.tracker.finish()


def redone_note(row: dict) -> str:
    """'' when the loader's backend made every batch of the epoch; else how many the CPU
    path redid (DALI failed on them): a DALI run that is partly CPU-decoded says so."""
    train, dev = row.get("cpu_redone_batches", 0), row.get("eval_cpu_redone_batches", 0)
    if not train and not dev:
        return ""
    return (f"  [{row.get('loader_backend', '?')}: {train} train and {dev} dev batches "
            "redone on the CPU path]")
