"""The one evaluation loop, for any task: every evaluated set (a distilled set, a coreset, the full split)
is trained on by one fresh network per evaluation seed, and each metric becomes a row.

    for each set (method, size, images, targets, lr, epochs):
        for each seed of engine.seeds.evaluation_seeds:      never an expert's starting point
            network = task.fresh(seed); train_network(network, set's data, lr, seed); task.score(network)
        one row per metric: {method, size, metric, mean, std, runs, seeds, lr, epochs, ...details}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from engine.data.stream import Batches
from engine.evaluate.tasks import Task
from engine.evaluate.train import Scores, TrainConfig, train_network

LearningRate = float | Callable[[str], float]


@dataclass
class EvaluatedSet:
    """A training set to evaluate, and how fresh networks are trained on it: small sets as tensors
    (model-input space), the whole training split as a stream (``stream``: seed -> Batches)."""

    method: str
    size: int  # images per class, or pairs
    images: Tensor | None
    targets: Tensor | None  # labels, soft-label logits or caption features
    lr: LearningRate
    epochs: int
    details: dict[str, Any] = field(default_factory=dict)  # shown in the row: lr values, snapshot iteration...
    stream: Callable[[int], Batches] | None = None
    task: Task | None = None  # scored by this task instead of the loop's (a set in another input transform)

    def data(self, seed: int) -> Batches | tuple[Tensor, Tensor]:
        return self.stream(seed) if self.stream is not None else (self.images, self.targets)


def score_set(task: Task, data: Callable[[int], Batches | tuple[Tensor, Tensor]], train: TrainConfig,
              lr: LearningRate, seeds: Sequence[int]) -> dict[str, Scores]:
    """Each metric of one fresh network per seed, trained on ``data(seed)``."""
    runs = []
    for seed in seeds:
        model = task.fresh(seed)
        train_network(model, data(seed), train, lr, seed, loss=task.loss)
        runs.append(task.score(model))
    return {metric: Scores([r[metric] for r in runs], list(seeds)) for metric in task.metrics}


def evaluate_sets(task: Task, sets: Iterable[EvaluatedSet], train: TrainConfig, seeds: Sequence[int],
                  log: Callable[[str], None] = print) -> Iterator[dict[str, Any]]:
    """Rows for every set, yielded as they are measured."""
    for evaluated in sets:
        config = train.model_copy(update={"epochs": evaluated.epochs})
        scores = score_set(evaluated.task or task, evaluated.data, config, evaluated.lr, seeds)
        shown = "  ".join(f"{m} {scores[m].mean:6.2f}" + (f" ± {scores[m].std:.2f}" if len(scores) == 1 else "")
                          for m in task.metrics)
        log(f"  {evaluated.method:<26} {evaluated.size:>5}  {shown}")
        lr = evaluated.details.get("lr", evaluated.lr)
        for metric in task.metrics:
            yield row(evaluated.method, evaluated.size, scores[metric], metric, epochs=evaluated.epochs,
                      **{**evaluated.details, "lr": lr})


def row(method: str, size: int, scores: Scores, metric: str, **details: Any) -> dict[str, Any]:
    """One result: what was measured, and how (``details``: lr, epochs, the snapshot chosen...)."""
    return {"method": method, "size": size, "metric": metric, "mean": round(scores.mean, 4),
            "std": round(scores.std, 4), "runs": [round(v, 4) for v in scores.values], "seeds": scores.seeds,
            **details}


def results_table(rows: list[dict[str, Any]]) -> str:
    """Markdown, ``mean ± std``: one metric (accuracy) -> a row per method and a column per size;
    several (retrieval recalls) -> a row per (method, size) and a column per metric."""
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    table = _metric_columns(rows, metrics) if len(metrics) > 1 else _size_columns(rows)
    return table + _time_columns(rows)


def _time_columns(rows: list[dict[str, Any]]) -> str:
    """The wall time of each distillation (rows that carry ``distill_seconds``), a column per size."""
    timed = {(r["method"], r["size"]): r["distill_seconds"] for r in rows if "distill_seconds" in r}
    if not timed:
        return ""
    sizes = sorted({size for _, size in timed})
    lines = ["", "| distillation wall time (s): method | " + " | ".join(f"size {s}" for s in sizes) + " |",
             "|" + "---|" * (len(sizes) + 1)]
    for method in dict.fromkeys(method for method, _ in timed):
        cells = [f"{timed[method, s]:.0f}" if (method, s) in timed else "" for s in sizes]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _metric_columns(rows: list[dict[str, Any]], metrics: list[str]) -> str:
    lookup = {(r["method"], r["size"], r["metric"]): r for r in rows}
    keys = list(dict.fromkeys((r["method"], r["size"]) for r in rows))
    lines = ["| method | size | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 2)]
    for method, size in keys:
        cells = [_cell(lookup.get((method, size, m))) for m in metrics]
        lines.append(f"| {method} | {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _size_columns(rows: list[dict[str, Any]]) -> str:
    sizes = sorted({r["size"] for r in rows if r["method"] != "full"})
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lookup = {(r["method"], r["size"], r["metric"]): r for r in rows}
    lines = []
    for metric in metrics:
        header = [f"{metric}: method", *(f"size {s}" for s in sizes)]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for method in methods:
            if method == "full":
                full = next(r for r in rows if r["method"] == "full" and r["metric"] == metric)
                cells = [f"{full['mean']:.2f} ± {full['std']:.2f} (all {full['size']})"] + [""] * (len(sizes) - 1)
            else:
                cells = [_cell(lookup.get((method, s, metric))) for s in sizes]
            lines.append("| " + " | ".join([method, *cells]) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _cell(r: dict[str, Any] | None) -> str:
    return "" if r is None else f"{r['mean']:.2f} ± {r['std']:.2f}"
