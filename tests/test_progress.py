"""Issue 18: live progress, learning curves, 80-column tables, the closing summary."""

from __future__ import annotations

import io
import json
import re

import pytest
from rich.console import Console

from meld_dali.config import EMOTIONS
from meld_dali.curves import curve_series
from meld_dali.progress import PassProgress, fmt_duration, iterate
from meld_dali.recipe import EpochStats
from meld_dali.reporting import EpochReporter
from meld_dali.tables import class_table, evaluation_table, run_summary, status_table


def plain(width: int = 80) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=False, width=width), buf


def screen(written: str) -> list[str]:
    """The lines a terminal shows after `written` (rich's live output): text, \\r, \\n,
    cursor up (ESC[nA) and erase line (ESC[2K) are applied; other escapes (colours, cursor
    visibility) draw nothing. Trailing blank lines are dropped."""
    rows, row, col = [""], 0, 0
    for esc, arg, cmd, ch in re.findall(r"(\x1b\[([?0-9;]*)([A-Za-z]))|(.)", written, re.S):
        if esc:
            if cmd == "A":
                row = max(row - int(arg or 1), 0)
            elif cmd == "K" and arg == "2":
                rows[row] = ""
            elif cmd in "KJ":
                raise AssertionError(f"screen(): escape {esc!r} not emulated")
        elif ch == "\r":
            col = 0
        elif ch == "\n":
            row, col = row + 1, 0
            rows += [""] * (row + 1 - len(rows))
        else:
            line = rows[row].ljust(col)
            rows[row] = line[:col] + ch + line[col + 1:]
            col += 1
    while rows and not rows[-1].strip():
        rows.pop()
    return rows


def text_of(*renderables, width: int = 80) -> str:
    con, buf = plain(width)
    for r in renderables:
        con.print(r)
    return buf.getvalue()


def test_plain_progress_lines_every_n_with_the_figures():
    con, buf = plain()
    rep = EpochReporter(console=con, progress_every=2)
    rep.epoch_start(3, total=5)
    stats = EpochStats()
    for i in range(1, 6):
        stats.clips += 4
        stats.loss_sum += 4 * 1.25
        stats.data_wait += 0.1
        stats.step_time += 0.3
        rep.progress(i, stats, 2.5e-4)
    on_batch = rep.eval_start("epoch 3 dev", 3)
    for i in range(1, 4):
        on_batch(i, 4 * i)
    rep.pass_end()
    lines = buf.getvalue().splitlines()
    train = [ln for ln in lines if ln.startswith("epoch 3 ") and "dev" not in ln]
    assert [ln.split()[2] for ln in train] == ["2/5", "4/5", "5/5"]  # every 2, and the last
    for ln in train:
        assert "clips/s" in ln and "loss 1.250" in ln and "lr 2.5e-04" in ln
        assert "wait 25%" in ln and "eta " in ln
    dev = [ln for ln in lines if ln.startswith("epoch 3 dev")]
    assert [ln.split()[3] for ln in dev] == ["2/3", "3/3"] and "clips/s" in dev[0]
    assert all(len(ln) <= 80 for ln in lines)


def test_terminal_bar_prints_no_lines_and_disabled_prints_nothing():
    buf = io.StringIO()
    bar = PassProgress(Console(file=buf, force_terminal=True, width=80), every=1)
    bar.start("epoch 0", 3)
    assert bar.live
    bar.update(1, 4, loss=1.0)
    bar.stop()
    assert not bar.live
    assert "1/3" in buf.getvalue()  # the bar did draw its step...
    assert screen(buf.getvalue()) == []  # ...and, transient, left no line on the terminal
    con, out = plain()
    off = PassProgress(con, every=1, enabled=False)
    assert list(iterate([1, 2], off, "x")) == [1, 2] and out.getvalue() == ""
    assert fmt_duration(75) == "1:15" and fmt_duration(3725) == "1:02:05"
    assert fmt_duration(float("nan")) == "-:--"


def rows_of(stages_per_epoch):
    return [{"epoch": e, "step": e + 1, "train_loss": 1.0 / (e + 1), "accuracy": 0.4,
             "macro_f1": 0.2, "weighted_f1": 0.3 + e / 100, "baseline_weighted_f1": 0.25,
             "lr": 1e-4, "stages": s, "best": True, "data_wait_share": 0.1 * (e + 1),
             "per_class": {c: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 3}
                           for c in EMOTIONS}}
            for e, s in enumerate(stages_per_epoch)]


def test_curve_series_marks_stage_changes():
    s = curve_series(rows_of([[], [], ["res5"], ["res5"], ["res4", "res5"]]))
    for key in ("train_loss", "accuracy", "macro_f1", "weighted_f1", "baseline_weighted_f1",
                "lr"):
        assert len(s[key]) == 5, key
    assert s["epoch"] == [0, 1, 2, 3, 4] and s["baseline_weighted_f1"] == [0.25] * 5
    assert s["stage_changes"] == [(2, ["res5"], ["res5"]), (4, ["res4"], ["res4", "res5"])]
    # nothing frozen: marked at the first epoch
    assert curve_series(rows_of([["res5"]]))["stage_changes"] == [(0, ["res5"], ["res5"])]


def test_summary_names_every_class_and_groups_data_wait(tmp_path):
    text = text_of(*run_summary(rows_of([[], [], ["res5"]]), tmp_path))
    for e in EMOTIONS:
        assert e in text
    assert "best epoch 2 of 3" in text and "head only" in text and "0-1" in text
    assert "15%" in text and "30%" in text  # mean data wait per trainable set
    assert str(tmp_path) in text


def assert_fits(text: str, headers: list[str]) -> None:
    lines = text.splitlines()
    assert all(len(ln) <= 80 for ln in lines), max(lines, key=len)
    header = " ".join(lines)
    for h in headers:
        assert h in header, h


def test_prepare_tables_fit_80_columns():
    splits = {s: {"ok": 70, "ok_per_class": {e: 10 for e in EMOTIONS}, "missing": 1,
                  "unreadable": 2, "empty": 0, "short_clips": 5}
              for s in ("train", "dev", "test")}
    text = text_of(class_table({"splits": splits}), status_table({"splits": splits}))
    assert_fits(text, ["class", "train", "dev", "test", *EMOTIONS, "total", "missing",
                       "unreadable", "short"])


def test_evaluation_table_fits_80_columns():
    per = {e: {"precision": 0.123, "recall": 0.456, "f1": 0.789, "support": 1234}
           for e in EMOTIONS}
    scores = {"accuracy": 0.5, "macro_f1": 0.3, "weighted_f1": 0.45,
              "baseline_weighted_f1": 0.3, "baseline_accuracy": 0.47, "per_class": per,
              "n": 8638}
    result = {"split": "test", **scores,
              "multi_view": {"views": {"temporal": 3, "spatial": 3}, **scores}}
    text = text_of(evaluation_table(result))
    assert_fits(text, ["class", "prec", "recall", "F1", "clips", "F1 mv", *EMOTIONS,
                       "weighted F1", "all-neutral"])


@pytest.mark.slow
def test_short_run_draws_curves_prints_progress_and_summary(synth_root, tiny_cfg, tmp_path):
    from meld_dali.launch import run_training

    tiny_cfg.data.root = str(synth_root)
    tiny_cfg.train.max_steps_per_epoch = 2
    tiny_cfg.tracking.progress_every = 1
    con, buf = plain()
    run = tmp_path / "run"
    seen = []
    orig = EpochReporter.write_curves

    def spy(self, history):
        path = orig(self, history)
        on_disk = (run / "metrics.jsonl").read_text().splitlines()
        assert history == [json.loads(r) for r in on_disk]  # the curves show what is logged
        seen.append((path.exists(), len(history)))
        return path

    EpochReporter.write_curves = spy
    try:
        result = run_training(tiny_cfg, run, console=con)
    finally:
        EpochReporter.write_curves = orig
    assert seen == [(True, 1), (True, 2)]  # curves.png rewritten after each epoch
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert result["history"] == rows
    s = curve_series(rows)
    assert len(s["weighted_f1"]) == 2
    assert s["baseline_weighted_f1"] == [r["baseline_weighted_f1"] for r in rows]
    assert [c[0] for c in s["stage_changes"]] == [0, 1]  # res5 at 0 (tiny), res4 at 1
    out = buf.getvalue()
    total = 2 * tiny_cfg.train.accum_steps  # micro-batches of a capped epoch
    for epoch in (0, 1):
        for step in range(1, total + 1):
            assert f"epoch {epoch} {step}/{total} " in out
        assert f"epoch {epoch} dev 3/3 " in out  # 12 dev clips, batches of 4
    assert "loss " in out and "clips/s" in out
    text = text_of(*run_summary(result["history"], run))
    assert all(e in text for e in EMOTIONS) and "curves.png" in text
