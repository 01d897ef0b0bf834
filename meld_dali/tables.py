"""Rich tables for the CLI: `prepare`'s report, `evaluate`'s scores and the summary that
closes `train`. Each fits 80 columns (a terminal's or a CI log's width); every figure is
also in the JSON files."""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from meld_dali.config import EMOTIONS
from meld_dali.manifest import STATUSES


def print_report(report: dict, console: Console) -> None:
    if report.get("reused"):
        console.print(f"manifest up to date (inputs unchanged): {report['manifest']}")
    console.print(class_table(report))
    console.print(status_table(report))
    for p in report["problems"]:
        console.print(f"[yellow]{p['status']}[/yellow] {p['split']} {p['clip']}: {p['path']} "
                      f"({p['reason']})", highlight=False, soft_wrap=True)
    for b in report["bad_rows"]:
        console.print(f"[yellow]bad row[/yellow] {b['csv']} line {b['line']}: {b['reason']}",
                      highlight=False, soft_wrap=True)
    if report["unlabelled_files"]:
        n = len(report["unlabelled_files"])
        console.print(f"ignored {n} video file(s) with no CSV row, e.g. "
                      f"{report['unlabelled_files'][0]}", highlight=False, soft_wrap=True)
    for f in report.get("cache_failures", []):
        console.print(f"[yellow]not cached[/yellow] {f['split']} {f['clip']}: {f['path']} "
                      f"({f['reason']}); its source video is kept", highlight=False,
                      soft_wrap=True)
    if report.get("cache"):
        c = report["cache"]
        codec = f" ({c['codec']}: {c['codec_why']})" if c.get("codec") else ""
        console.print(f"clip cache {c['dir']}{codec}: {c['built']} encoded, {c['reused']} "
                      f"reused, {c['failed']} failed", highlight=False, soft_wrap=True)
    if report.get("nvdec_unsupported"):
        n = report["nvdec_unsupported"]
        hint = ("" if report.get("cache") else
                "; build the cache (`meld-dali prepare ROOT --cache DIR`) to train on them "
                "with dali-gpu")
        console.print(f"[yellow]{n} clip(s) are H.264 the GPU decoder (NVDEC) cannot take "
                      f"(10-bit, 4:2:2 or 4:4:4), e.g. "
                      f"{report['nvdec_unsupported_examples'][0]}{hint}",
                      highlight=False, soft_wrap=True)
    console.print(f"manifest: {report['manifest']}", highlight=False, soft_wrap=True)


def class_table(report: dict) -> Table:
    """Usable clips beside the labelled rows of the CSVs, one row per class and one column
    per split (fits 80 columns): a missing or broken video shows as a gap."""
    splits = report["splits"]
    t = Table(title="usable (ok) / labelled clips (CSV rows)")
    t.add_column("class")
    for split in splits:
        t.add_column(split, justify="right")

    def cell(ok: int, labelled: int | None) -> str:
        return f"{ok:,}" if labelled is None else f"{ok:,} / {labelled:,}"

    for e in EMOTIONS:
        t.add_row(e, *[cell(c["ok_per_class"][e], c.get("labelled_per_class", {}).get(e))
                       for c in splits.values()])
    t.add_section()
    t.add_row("total", *[cell(c["ok"], c.get("rows")) for c in splits.values()],
              style="bold")
    return t


def status_table(report: dict) -> Table:
    """Clips per status (and short clips), one column per split."""
    splits = report["splits"]
    short = report.get("short_clip_frames", 32)
    t = Table(title="clips per status", caption=f"short: < {short} frames (padded)")
    t.add_column("status")
    for split in splits:
        t.add_column(split, justify="right")
    for s in STATUSES:
        t.add_row(s, *[str(c[s]) for c in splits.values()])
    t.add_row("short", *[str(c["short_clips"]) for c in splits.values()])
    return t


def evaluation_table(result: dict) -> Table:
    """Per-class scores (0-1) with the headline metrics and the all-neutral baseline below
    them; fits 80 columns. Every figure is in the JSON (`evaluate --json`)."""
    mv = result.get("multi_view")
    t = Table(title=f"{result['split']}: scores 0-1, support in clips",
              caption=f"all-neutral: every clip called neutral (accuracy "
                      f"{result['baseline_accuracy']:.3f})"
                      + (f"; mv: multi-view {mv['views']['temporal']}x"
                         f"{mv['views']['spatial']}" if mv else ""))
    t.add_column("class")
    for col in ("prec", "recall", "F1", "clips", *(("F1 mv",) if mv else ())):
        t.add_column(col, justify="right")
    for e in EMOTIONS:
        c = result["per_class"][e]
        t.add_row(e, f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}",
                  str(c["support"]), *((f"{mv['per_class'][e]['f1']:.3f}",) if mv else ()))
    t.add_section()
    n = str(result.get("n", sum(result["per_class"][e]["support"] for e in EMOTIONS)))
    extra = (lambda k: (f"{mv[k]:.3f}",)) if mv else (lambda k: ())
    t.add_row("accuracy", "", "", f"{result['accuracy']:.3f}", n, *extra("accuracy"))
    t.add_row("macro F1", "", "", f"{result['macro_f1']:.3f}", n, *extra("macro_f1"))
    t.add_row("weighted F1", "", "", f"{result['weighted_f1']:.3f}", n, *extra("weighted_f1"),
              style="bold")
    t.add_row("all-neutral", "", "", f"{result['baseline_weighted_f1']:.3f}", n,
              *extra("baseline_weighted_f1"), style="dim")
    return t


def neutral_f1(per_class: dict) -> dict[str, float]:
    """Per-class F1 of the all-neutral baseline: neutral's from its share, 0 elsewhere."""
    n = sum(c["support"] for c in per_class.values())
    share = per_class["neutral"]["support"] / n if n else 0.0
    return {e: (2 * share / (1 + share) if e == "neutral" else 0.0) for e in per_class}


def _epochs(epochs: list[int]) -> str:
    return str(epochs[0]) if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}"


def data_path_line(history: list[dict]) -> Text:
    """Who made the batches of the whole run: the backend itself, or the CPU path redoing
    the batches DALI failed on (red: numbers trained on, or scored, that are not DALI's)."""
    made = sum(r.get("backend_batches", 0) + r.get("eval_backend_batches", 0) for r in history)
    redone = sum(r.get("cpu_redone_batches", 0) + r.get("eval_cpu_redone_batches", 0)
                 for r in history)
    backend = history[-1].get("loader_backend", "?")
    return Text(f"data path: {backend} made {made} batches (train and dev), the CPU path "
                f"redid {redone}", style="red" if redone else "")


def run_summary(history: list[dict], run_dir: str | Path) -> list:
    """What closes `train`: the best epoch, its per-class scores against the all-neutral
    baseline, the data-wait share per unfreezing stage, and where the files are."""
    from meld_dali.curves import stage_label

    if not history:
        return [Text("no epoch finished: nothing to summarize")]
    best = ([r for r in history if r.get("best")] or history)[-1]
    out: list = [Text(
        f"best epoch {best['epoch']} of {len(history)}: weighted F1 "
        f"{best['weighted_f1']:.4f} (all-neutral {best['baseline_weighted_f1']:.4f}), macro F1 "
        f"{best['macro_f1']:.4f}, accuracy {best['accuracy']:.4f}", style="bold")]
    t = Table(title=f"dev, epoch {best['epoch']}: scores 0-1, support in clips",
              caption="base: F1 of calling every clip neutral")
    t.add_column("class")
    for col in ("prec", "recall", "F1", "base", "clips"):
        t.add_column(col, justify="right")
    base = neutral_f1(best["per_class"])
    for e in EMOTIONS:
        c = best["per_class"][e]
        beat = "green" if c["f1"] > base[e] else "red" if c["f1"] < base[e] else ""
        t.add_row(e, f"{c['precision']:.3f}", f"{c['recall']:.3f}",
                  Text(f"{c['f1']:.3f}", style=beat), f"{base[e]:.3f}", str(c["support"]))
    out.append(t)
    groups: dict[tuple, list[dict]] = {}
    for r in history:
        groups.setdefault(tuple(r.get("stages", [])), []).append(r)
    w = Table(title="data wait per trainable set", caption="share of train time")
    for col in ("trainable", "epochs", "wait"):
        w.add_column(col, justify="left" if col == "trainable" else "right")
    for stages, rows in groups.items():
        share = sum(r["data_wait_share"] for r in rows) / len(rows)
        w.add_row(stage_label(stages), _epochs([r["epoch"] for r in rows]), f"{share:.0%}")
    out.append(w)
    out.append(data_path_line(history))
    run = Path(run_dir)
    files = [("run folder", run), ("best weights", run / "checkpoints" / "best.pt"),
             ("last state", run / "checkpoints" / "last.pt"),
             ("curves", run / "curves.png"), ("metrics", run / "metrics.jsonl"),
             ("confusion", run / f"confusion_epoch{best['epoch']:03d}.png")]
    out.append(Text("\n".join(f"{k:>12}: {p}" for k, p in files if p.exists())))
    return out


def distinct_names(paths: list[str]) -> list[str]:
    """Each path's shortest trailing part that no other path ends with: 'clip.mp4' alone,
    'a/clip.mp4' and 'b/clip.mp4' side by side (a path given twice stays whole)."""
    parts = [Path(p).parts for p in paths]
    out = []
    for i, p in enumerate(parts):
        k = next((k for k in range(1, len(p)) if all(
            q[-k:] != p[-k:] for j, q in enumerate(parts) if j != i)), len(p))
        out.append(str(Path(*p[-k:])) if p else "")
    return out


def prediction_table(results: list[dict], title: str, width: int) -> Table:
    """`predict`'s table within `width` columns: each file by its shortest distinct name and
    its emotion, whole, then as many probability columns as fit, the emotions with the
    highest probabilities first (shown in MELD's order). `--json` has all 7."""
    from rich.console import Console
    from rich.measure import Measurement

    rows = [(n, r) for n, r in zip(distinct_names([r["path"] for r in results]), results,
                                   strict=True) if "error" not in r]
    ranked = sorted(EMOTIONS, key=lambda e: -max((r["probabilities"][e] for _, r in rows),
                                                 default=0.0))
    console = Console(width=10_000)  # measures the natural width: nothing clamps it
    for k in range(len(EMOTIONS), -1, -1):
        shown = [e for e in EMOTIONS if e in ranked[:k]]
        t = Table(title=title, caption=None if k == len(EMOTIONS) else
                  f"{k} of {len(EMOTIONS)} probabilities, the highest (all: --json)",
                  box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=0)
        t.add_column("file", no_wrap=True)
        t.add_column("emotion", no_wrap=True)
        for e in shown:
            t.add_column(e, justify="right")
        for name, r in rows:
            t.add_row(name, r["emotion"], *[f"{r['probabilities'][e]:.2f}" for e in shown])
        if Measurement.get(console, console.options, t).maximum <= width:
            break
    return t
