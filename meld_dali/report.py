"""Printing `prepare`'s report with rich."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from meld_dali.config import EMOTIONS
from meld_dali.manifest import STATUSES


def print_report(report: dict, console: Console) -> None:
    if report.get("reused"):
        console.print(f"manifest up to date (inputs unchanged): {report['manifest']}")
    classes = Table(title="usable (ok) clips per split and class")
    status = Table(title="clip status per split")
    short = f"< {report.get('short_clip_frames', 32)} frames"
    for t, cols in ((classes, [*EMOTIONS, "total"]), (status, [*STATUSES, short])):
        t.add_column("split")
        for c in cols:
            t.add_column(c, justify="right")
    for split, c in report["splits"].items():
        classes.add_row(split, *[str(c["ok_per_class"][e]) for e in EMOTIONS], str(c["ok"]))
        status.add_row(split, *[str(c[s]) for s in STATUSES], str(c["short_clips"]))
    console.print(classes)
    console.print(status)
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
        console.print(f"clip cache {c['dir']}: {c['built']} encoded, {c['reused']} reused, "
                      f"{c['failed']} failed", highlight=False, soft_wrap=True)
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


def evaluation_table(result: dict) -> Table:
    """Per-class table with the headline metrics and the all-neutral baseline beside them."""
    mv = result.get("multi_view")
    t = Table(title=f"{result['split']}: accuracy {result['accuracy']:.4f}, macro F1 "
                    f"{result['macro_f1']:.4f}, weighted F1 {result['weighted_f1']:.4f} "
                    f"(all-neutral baseline {result['baseline_weighted_f1']:.4f})"
                    + (f"; multi-view {mv['views']['temporal']}x{mv['views']['spatial']}: "
                       f"weighted F1 {mv['weighted_f1']:.4f}" if mv else ""))
    for col in ("class", "precision", "recall", "F1", "support"):
        t.add_column(col, justify="left" if col == "class" else "right")
    if mv:
        t.add_column("F1 multi-view", justify="right")
    for e in EMOTIONS:
        c = result["per_class"][e]
        row = [e, f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}",
               str(c["support"])]
        if mv:
            row.append(f"{mv['per_class'][e]['f1']:.3f}")
        t.add_row(*row)
    return t
