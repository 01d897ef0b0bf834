"""Learning curves of a run, from its history rows (the dicts of metrics.jsonl).

`curve_series` is what gets plotted (tests check it); `plot_curves` draws it: train loss,
dev accuracy / macro F1 / weighted F1 against the all-neutral baseline, the LR, and the
epochs where the set of trainable backbone stages changes (progressive unfreezing).
"""

from __future__ import annotations

from pathlib import Path

METRICS = ("accuracy", "macro_f1", "weighted_f1")


def stage_label(stages) -> str:
    return "+".join(stages) if stages else "head only"


def curve_series(rows: list[dict]) -> dict:
    """{epoch, train_loss, accuracy, macro_f1, weighted_f1, baseline_weighted_f1, lr: lists
    with one value per row; stage_changes: [(epoch, added stages, all trainable stages)]}.

    A stage change is marked where a row's `stages` differ from the row before; before the
    first row the backbone counts as frozen, so a run with nothing frozen is marked at its
    first epoch."""
    rows = sorted(rows, key=lambda r: r["epoch"])
    series: dict = {"epoch": [r["epoch"] for r in rows]}
    for key in ("train_loss", *METRICS, "baseline_weighted_f1", "lr"):
        series[key] = [r.get(key, float("nan")) for r in rows]
    changes, before = [], []
    for r in rows:
        stages = list(r.get("stages", []))
        if stages != before:
            changes.append((r["epoch"], [s for s in stages if s not in before], stages))
        before = stages
    series["stage_changes"] = changes
    return series


def plot_curves(rows: list[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    s = curve_series(rows)
    ep = s["epoch"]
    fig, (loss_ax, dev_ax, lr_ax) = plt.subplots(1, 3, figsize=(13, 4))
    loss_ax.plot(ep, s["train_loss"], "o-", color="tab:red")
    loss_ax.set_title("train loss (focal)")
    for key, label in zip(METRICS, ("accuracy", "macro F1", "weighted F1"), strict=True):
        dev_ax.plot(ep, s[key], "o-", label=label)
    dev_ax.plot(ep, s["baseline_weighted_f1"], "--", color="grey",
                label="weighted F1, all-neutral")
    dev_ax.set_title("dev")
    dev_ax.set_ylim(0, 1)
    lr_ax.plot(ep, s["lr"], "o-", color="tab:green")
    lr_ax.set_title("learning rate (end of epoch)")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in (loss_ax, dev_ax, lr_ax):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        for epoch, _, _ in s["stage_changes"]:
            ax.axvline(epoch, color="purple", linestyle=":", alpha=0.7)
    for epoch, added, _ in s["stage_changes"]:
        dev_ax.text(epoch, 0.98, " +" + stage_label(added), rotation=90, va="top",
                    fontsize=7, color="purple")
    dev_ax.legend(fontsize=7, loc="best")
    fig.suptitle("learning curves (dotted: backbone stages unfrozen)", fontsize=9)
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
