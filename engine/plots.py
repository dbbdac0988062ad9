"""Pictures of a run, as PNG bytes: the matching loss over iterations, and a metric against set size.

Built on matplotlib's object API (a ``Figure`` per picture, no pyplot state), so it is safe in any
process and needs no display.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure


def loss_png(losses: Sequence[float], history: Sequence[dict[str, float]], title: str) -> bytes:
    """Every iteration's loss (thin) and the mean of each checkpoint interval (points joined)."""
    figure = Figure(figsize=(6.4, 3.6), layout="constrained")
    axes = figure.subplots()
    if losses:
        axes.plot(range(1, len(losses) + 1), losses, linewidth=0.6, alpha=0.5, label="iteration")
    if history:
        axes.plot([h["iteration"] for h in history], [h["loss"] for h in history], marker="o", linewidth=1.5,
                  label="interval mean")
    axes.set(xlabel="iteration", ylabel="matching loss", title=title)
    if losses and min(losses) > 0 and max(losses) / min(losses) > 20:
        axes.set_yscale("log")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right")
    return _png(figure)


def metric_by_size_png(rows: Sequence[dict[str, Any]], title: str) -> bytes:
    """For each metric, a panel: one line per method of mean ± std (error bars) against set size; the
    ``full`` row (all the data) as a horizontal line."""
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    figure = Figure(figsize=(6.4, 3.6 * len(metrics)), layout="constrained")
    for axes, metric in zip(figure.subplots(len(metrics), 1, squeeze=False)[:, 0], metrics, strict=True):
        of_metric = [r for r in rows if r["metric"] == metric]
        for method in dict.fromkeys(r["method"] for r in of_metric):
            points = sorted((r["size"], r["mean"], r["std"]) for r in of_metric if r["method"] == method)
            if method == "full":
                size, mean, std = points[0]
                axes.axhline(mean, color="black", linestyle="--", linewidth=1, label=f"full ({size})")
                axes.axhspan(mean - std, mean + std, color="black", alpha=0.08)
                continue
            sizes, means, stds = zip(*points, strict=True)
            axes.errorbar(sizes, means, yerr=stds, marker="o", capsize=3, label=method)
        sizes = sorted({r["size"] for r in of_metric if r["method"] != "full"})
        if len(sizes) > 1 and sizes[-1] / sizes[0] >= 10:
            axes.set_xscale("log")
        axes.set_xticks(sizes, [str(s) for s in sizes])
        axes.set(xlabel="set size (per class for classification, pairs for image-text)", ylabel=metric,
                 title=title if metric == metrics[0] else None)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small", loc="best")
    return _png(figure)


def _png(figure: Figure) -> bytes:
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=120)
    return out.getvalue()
