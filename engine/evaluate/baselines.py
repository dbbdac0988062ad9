"""The evaluation of a classification experiment: distilled sets against coresets of the same size.

    for each size (images per class):
        distilled   the set in <run_dir>/distill/ipc-<k>/, trained with its learned step size
        random / herding / kcenter / forgetting   real images chosen from the training split;
                    herding and k-center on an expert's penultimate features, forgetting from
                    counts of one training run with the experts' recipe
        fresh networks trained ``evaluate.repeats`` times on each set, accuracy on ``evaluate.split``
    optionally ``full``: the whole training split (the upper bound)

Rows: ``{"method", "size", "metric": "accuracy", "mean", "std", "runs"}`` with accuracy in percent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from engine import storage
from engine.distill.synthetic import SyntheticSet, list_snapshots
from engine.evaluate.classification import Scores, TrainConfig, evaluate_set
from engine.experiment import ExperimentConfig, load_preprocess, load_split, model_spec, prepare_data
from engine.models.params import select_parameters, set_flat
from engine.models.registry import build_model
from engine.seeds import evaluation_seeds, stream_seed
from engine.select import coresets
from engine.select.forgetting import forgetting_counts
from engine.trajectories.store import TrajectoryStore
from engine.trajectories.train import ExpertData, build_seeded

FEATURE_BATCH = 1024
BEST_SNAPSHOT = "distilled (best val)"  # the row of the snapshot chosen on the validation split


@dataclass
class ClassificationData:
    train_images: Tensor  # model-input space
    train_labels: Tensor
    eval_images: Tensor
    eval_labels: Tensor
    num_classes: int
    build: Callable[[], nn.Module]  # the evaluation network
    fingerprint: str


def load_classification_data(config: ExperimentConfig, device: torch.device) -> ClassificationData:
    manifest = prepare_data(config)
    train = load_split(config, config.data.split)
    spec = model_spec(config, manifest, config.evaluate.model)
    return ClassificationData(
        load_preprocess(config).apply(train.images).to(device), train.labels.to(device),
        *held_out_split(config, config.evaluate.split, device),
        len(manifest.classes), lambda: build_model(spec), manifest.fingerprint(),
    )


def held_out_split(config: ExperimentConfig, split: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """(images in model-input space, labels) of a split that is scored, not trained on."""
    data = load_split(config, split)
    return load_preprocess(config).apply(data.images).to(device), data.labels.to(device)


def row(method: str, size: int, scores: Scores, metric: str = "accuracy", **details: Any) -> dict[str, Any]:
    """One result: what was measured, and how (``details``: lr, epochs, the snapshot chosen...)."""
    return {"method": method, "size": size, "metric": metric, "mean": round(scores.mean, 4),
            "std": round(scores.std, 4), "runs": [round(v, 4) for v in scores.values], "seeds": scores.seeds,
            **details}


def best_snapshot(config: ExperimentConfig, size: int,
                  score: Callable[[SyntheticSet], float]) -> tuple[int, SyntheticSet, float] | None:
    """The snapshot of the distilled set at ``size`` (``distill.snapshot_every``) that ``score`` (measured on
    ``evaluate.best_snapshot_split``, never the reported split) rates best, the latest on ties; None if
    the run kept no snapshots or the selection is off."""
    snapshots = list_snapshots(config.distill_dir(size), config.storage)
    if not config.evaluate.selects_best_snapshot or not snapshots:
        return None
    best: tuple[int, SyntheticSet, float] | None = None
    for iteration, url in snapshots.items():
        synthetic = SyntheticSet.from_bytes(storage.read_bytes(url, config.storage), storage.redact(url))
        value = score(synthetic)
        if best is None or value >= best[2]:
            best = (iteration, synthetic, value)
    return best


def classification_rows(config: ExperimentConfig, sizes: list[int], device: torch.device,
                        log: Callable[[str], None] = print) -> Iterator[dict[str, Any]]:
    """Evaluate every configured method at every size; yields rows as they are measured."""
    ev = config.evaluate
    data = load_classification_data(config, device)
    seeds = evaluation_seeds(ev.seed, ev.repeats)

    def score(images: Tensor, targets: Tensor, lr: float, train: TrainConfig = ev.train,
              on: ClassificationData = data) -> Scores:
        return evaluate_set(on.build, images, targets, on.eval_images, on.eval_labels, train, lr, seeds)

    def report(method: str, size: int, scores: Scores, lr: float, **details: Any) -> dict[str, Any]:
        log(f"  {method:<10} ipc {size:<4} accuracy {scores.mean:6.2f} ± {scores.std:.2f}")
        return row(method, size, scores, lr=lr, epochs=details.pop("epochs", ev.train.epochs), **details)

    chooser = CoresetChooser(config, data, device)
    for size in sizes:
        for method in ev.methods:
            if method == "distilled":
                yield from distilled_rows(config, size, data, score, report, device)
            else:
                index = chooser.choose(method, size)
                scores = score(data.train_images[index], data.train_labels[index], ev.train.lr)
                yield report(method, size, scores, ev.train.lr)
    if ev.full:
        full = ev.train.model_copy(update={"epochs": ev.full_epochs})
        size = round(len(data.train_labels) / data.num_classes)
        yield report("full", size, score(data.train_images, data.train_labels, ev.train.lr, full), ev.train.lr,
                     epochs=ev.full_epochs)


def distilled_rows(config: ExperimentConfig, size: int, data: ClassificationData, score, report,
                   device: torch.device) -> Iterator[dict[str, Any]]:
    """The final distilled set, then (if snapshots were kept) the snapshot best on the selection split."""
    ev = config.evaluate

    def lr_of(synthetic: SyntheticSet) -> float:
        return float(synthetic.alphas.mean()) if ev.use_learned_lr else ev.train.lr

    synthetic = SyntheticSet.load(config.distill_dir(size), config.storage)
    yield report("distilled", size, score(synthetic.images.to(device), synthetic.labels.to(device),
                                          lr_of(synthetic)), lr_of(synthetic))
    if not ev.selects_best_snapshot or not list_snapshots(config.distill_dir(size), config.storage):
        return
    selection = replace(data, **dict(zip(("eval_images", "eval_labels"),
                                         held_out_split(config, ev.best_snapshot_split, device), strict=True)))
    best = best_snapshot(config, size, lambda s: score(s.images.to(device), s.labels.to(device), lr_of(s),
                                                        on=selection).mean)
    if best is not None:
        iteration, chosen, value = best
        scores = score(chosen.images.to(device), chosen.labels.to(device), lr_of(chosen))
        yield report(BEST_SNAPSHOT, size, scores, lr_of(chosen), iteration=iteration,
                     selected_on={"split": ev.best_snapshot_split, "accuracy": round(value, 4)})


def quick_score(config: ExperimentConfig) -> Callable[[SyntheticSet], float]:
    """A fast proxy of a synthetic set's quality for sweeps: one network trained for
    ``sweep.eval_epochs`` epochs; accuracy (or, for pairs, rsum) on ``evaluate.split``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = load_classification_data(config, device)
    ev = config.evaluate
    train = ev.train.model_copy(update={"epochs": config.sweep.eval_epochs})
    if config.contrastive:
        from engine.distill.vl import learned_lr
        from engine.evaluate.pairs import evaluate_pairs, load_pair_data

        pairs = load_pair_data(config, device)
        once = config.model_copy(update={"evaluate": ev.model_copy(update={"repeats": 1, "train": train})})

        def rsum(synthetic: SyntheticSet) -> float:
            lr = learned_lr(synthetic.alphas) if ev.use_learned_lr else train.lr
            return evaluate_pairs(pairs, synthetic.images.to(device), synthetic.text.to(device), once, lr)["rsum"].mean

        return rsum

    def score(synthetic: SyntheticSet) -> float:
        lr = float(synthetic.alphas.mean()) if ev.use_learned_lr else train.lr
        return evaluate_set(data.build, synthetic.images.to(device), synthetic.labels.to(device), data.eval_images,
                            data.eval_labels, train, lr, evaluation_seeds(ev.seed, 1)).mean

    return score


class CoresetChooser:
    """Coreset indices into the training split; expert features and forgetting counts computed once."""

    def __init__(self, config: ExperimentConfig, data: ClassificationData, device: torch.device):
        self.config, self.data, self.device = config, data, device
        self._features: Tensor | None = None
        self._counts: Tensor | None = None

    def choose(self, method: str, ipc: int) -> Tensor:
        labels = self.data.train_labels.cpu()
        generator = torch.Generator().manual_seed(stream_seed("coreset", self.config.evaluate.seed, ipc))
        return coresets.choose(method, ipc, len(labels), labels, generator, self.features, self.counts)

    def expert_model(self) -> nn.Module:
        """Expert 0 of the store at its last epoch."""
        store = TrajectoryStore.open(self.config.store_url, self.config.storage)
        expert = store.experts()[0]
        model = build_model(model_spec(self.config, prepare_data(self.config))).to(self.device)
        params = store.load_epochs(expert, [store.num_epochs])[store.num_epochs]
        set_flat(model, store.param_names, torch.cat([params[n].flatten() for n in store.param_names]).to(self.device))
        return model.eval()

    @torch.no_grad()
    def features(self) -> Tensor:
        if self._features is None:
            model = self.expert_model()
            self._features = torch.cat([model.features(x).cpu() for x in self.data.train_images.split(FEATURE_BATCH)])
        return self._features

    def counts(self) -> Tensor:
        """Forgetting counts, cached in <run_dir>/evaluate/ (keyed by the data) so reruns reuse them."""
        if self._counts is not None:
            return self._counts
        url = storage.join(self.config.run_dir, "evaluate", f"forgetting-{self.data.fingerprint}.safetensors")
        if storage.exists(url, self.config.storage):
            self._counts = load_safetensors(storage.read_bytes(url, self.config.storage))["counts"]
            return self._counts
        spec = model_spec(self.config, prepare_data(self.config))
        seed = stream_seed("forgetting", self.config.evaluate.seed)
        model = build_seeded(lambda: build_model(spec), seed).to(self.device)
        recorded = select_parameters(model, self.config.experts.record)
        data = ExpertData(self.data.train_images, self.data.train_labels)
        self._counts = forgetting_counts(model, data, self.config.experts.train, recorded, seed=seed).cpu()
        storage.write_bytes(url, save_safetensors({"counts": self._counts.contiguous()}), self.config.storage)
        return self._counts


def results_table(rows: list[dict[str, Any]]) -> str:
    """Markdown, ``mean ± std``: one metric (accuracy) -> a row per method and a column per size;
    several (retrieval recalls) -> a row per (method, size) and a column per metric."""
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    if len(metrics) > 1:
        return _metric_columns(rows, metrics)
    return _size_columns(rows)


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
