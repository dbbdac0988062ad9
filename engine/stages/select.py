"""The select stage (BiLP level 1): which training samples every later stage uses.

    selection.method loss:
        K scoring runs (selection.scoring_runs) with the experts' model and recipe for scoring_epochs
        epochs each, side by side on Ray, into their own trajectory store <folder>/runs (resumable
        after SIGKILL like any expert)
        -> one streamed pass over the training split: every sample's loss under each run's parameters at
           the scored epoch, averaged over the runs -> scores.json (sample key -> score)
    selection.method random: a seeded uniform score per sample (a random subset of the same size)
    -> within each class, the keep_ratio lowest-scoring samples -> kept-<ratio>.json (sample keys)

``<folder>`` is ``<selection.dir>/<selector>-<settings>`` (``context.selection_folder``): keep ratios of one
way of scoring share its runs and scores. Every later stage (buffer, distill, evaluate) reads the split
through the kept subset, and the subset's fingerprint enters the data fingerprint, so a trajectory store
trained on the whole split refuses a subset run and the other way round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from engine import storage
from engine.data.manifest import ShardManifest
from engine.data.stream import EpochOrder, EpochStream, images_of
from engine.errors import ConfigError, DataError
from engine.experiment import ExperimentConfig
from engine.models.params import set_flat
from engine.resources import default_device
from engine.select.bilp import keep_lowest
from engine.select.subset import Subset, keys_fingerprint
from engine.stages import Runtime
from engine.stages import buffer as buffer_stage
from engine.stages.context import data_fingerprint, model_spec, prepare_data, selection_folder, subset_url
from engine.trajectories.experts import build_shared_frozen
from engine.trajectories.store import TrajectoryStore

SCORES = "scores.json"
BATCH = 512


@dataclass
class SplitIndex:
    """The whole training split, in its canonical order: what a selector scores and a subset is cut from."""

    keys: list[str]
    labels: Tensor
    shards: list[str]


def split_index(config: ExperimentConfig, runtime: Runtime) -> SplitIndex:
    source = runtime.source(config.data, config.storage, ("key", "label", "shard"))
    keys, labels, shards = [], [], []
    for batch in EpochStream(source, EpochOrder(0), 4096):
        keys += [str(k) for k in batch["key"]]
        labels.append(batch["label"])
        shards += [str(s) for s in batch["shard"]]
    return SplitIndex(keys, torch.cat(labels), shards)


# --- scorers: per-sample scores in the index's order; lower = kept first ----------------------------------


def scoring_config(config: ExperimentConfig) -> ExperimentConfig:
    """The scoring runs as an experiment of their own: the experts' model and recipe for scoring_epochs epochs,
    on the whole split, as "experts" 0 .. K-1 of a store in <folder>/runs, seeded from selection.seed (with the
    experts' base seed they start as experts 0 .. K-1 do: harmless, they only score)."""
    sel = config.selection
    train = config.experts.train.model_copy(update={"epochs": sel.scoring_epochs})
    return config.model_copy(update={
        "run_dir": storage.join(selection_folder(config, prepare_data(config)), "runs"),
        "experts": config.experts.model_copy(update={"num_experts": sel.scoring_runs, "seed": sel.seed,
                                                     "val_split": None, "store": None, "train": train}),
        "selection": sel.model_copy(update={"method": "none"}),
    })


def loss_scores(config: ExperimentConfig, manifest: ShardManifest, index: SplitIndex, runtime: Runtime) -> Tensor:
    """Mean per-sample loss of the scoring runs at the scored epoch (module docstring)."""
    if manifest.modality != "image" and manifest.modality != "video":
        raise ConfigError(f"selection.method loss scores classification data; the shards hold {manifest.modality} "
                          "data (image-text selection by clusters is not implemented yet)")
    scoring = scoring_config(config)
    plan, preprocess = buffer_stage.build_plan(scoring, manifest, model_spec(scoring, manifest), runtime)
    runs = config.selection.scoring_runs
    store = buffer_stage.open_store(plan)
    while len(store.experts()) < runs:
        claimable = store.pending(runs)
        if not claimable:
            raise DataError(f"scoring runs in {storage.redact(store.url)} are held by another job; run select again "
                            "when it ends")
        print(f"scoring runs: training {len(claimable)} of {runs} for {config.selection.scoring_epochs} epochs",
              flush=True)
        runtime.train_experts(plan, claimable, buffer_stage.print_progress)
        store = buffer_stage.open_store(plan)
    ids = list(range(runs))
    return per_sample_losses(scoring, manifest, store, ids, config.selection.score_epoch, preprocess, runtime, index)


@torch.no_grad()
def per_sample_losses(config: ExperimentConfig, manifest: ShardManifest, store: TrajectoryStore, ids: list[int],
                      epoch: int, preprocess, runtime: Runtime, index: SplitIndex) -> Tensor:
    """(N,) cross-entropy of every training sample (no augmentation, eval mode) averaged over the runs
    ``ids`` at ``epoch``: one streamed pass, every run's model on each batch."""
    device = default_device()
    spec = model_spec(config, manifest)
    models = []
    for run in ids:
        model, names = build_shared_frozen(spec, config.experts.record, frozen_seed=config.experts.seed,
                                           seed=config.experts.seed)
        params = store.load_epochs(run, [epoch])[epoch]
        set_flat(model, names, torch.cat([params[n].flatten() for n in names]))
        models.append(model.to(device).eval())
    media = "video" if manifest.modality == "video" else "image"
    source = runtime.source(config.data, config.storage, (media, "label", "key"))
    transform = preprocess.to(device).apply
    losses, keys = [], []
    for batch in EpochStream(source, EpochOrder(0), BATCH):
        x, y = transform(images_of(batch).to(device)), batch["label"].to(device)
        losses.append(torch.stack([F.cross_entropy(m(x), y, reduction="none") for m in models]).mean(0).cpu())
        keys += [str(k) for k in batch["key"]]
    if keys != index.keys:
        raise DataError("the training split changed while it was scored (another order of keys)")
    return torch.cat(losses)


def random_scores(config: ExperimentConfig, manifest: ShardManifest, index: SplitIndex, runtime: Runtime) -> Tensor:
    """A seeded uniform score per sample: keeping the lowest is a random subset of each class."""
    return torch.rand(len(index.keys), generator=torch.Generator().manual_seed(config.selection.seed),
                      dtype=torch.float64)


Scorer = Callable[[ExperimentConfig, ShardManifest, SplitIndex, Runtime], Tensor]
SCORERS: dict[str, Scorer] = {"loss": loss_scores, "random": random_scores}


# --- the stage ----------------------------------------------------------------------------------------------


def run(config: ExperimentConfig, runtime: Runtime) -> Subset | None:
    """Choose (or reuse) the kept subset the config's selection names; None when it selects nothing."""
    sel = config.selection
    if not sel.active:
        return None
    manifest = prepare_data(config)
    url = subset_url(config, manifest)
    if storage.exists(url, config.storage):
        subset = Subset.load(url, config.storage)
        print(f"kept subset: {len(subset):,} samples in {storage.redact(url)} (already chosen)", flush=True)
        return subset
    index = split_index(config, runtime)
    scores = scores_of(config, manifest, index, runtime)
    minimum = max([*config.pipeline.ipcs, *config.pipeline.per_ipc])
    kept = keep_lowest(scores, index.labels, sel.keep_ratio, minimum=minimum)
    subset = make_subset(config, manifest, index, kept, scores)
    subset.save(url, config.storage)
    print(summary(subset, scores, kept, index, url), flush=True)
    return subset


def scores_of(config: ExperimentConfig, manifest: ShardManifest, index: SplitIndex, runtime: Runtime) -> Tensor:
    """The selector's scores in the index's order: from the folder's scores.json (keyed by sample key, so it
    holds for any order or shard layout of the same samples), or computed and written there."""
    url = storage.join(selection_folder(config, manifest), SCORES)
    if storage.exists(url, config.storage):
        keyed = storage.read_json(url, config.storage)["scores"]
        missing = [k for k in index.keys if k not in keyed]
        if missing:
            raise DataError(f"{storage.redact(url)} has no score for {len(missing):,} samples (e.g. {missing[0]}); "
                            "delete it to score again")
        return torch.tensor([keyed[k] for k in index.keys], dtype=torch.float64)
    scores = SCORERS[config.selection.method](config, manifest, index, runtime).double()
    header = {"selection": config.selection.model_dump(mode="json", exclude={"keep_ratio", "dir"}),
              "data": data_fingerprint(config, manifest, whole_split=True), "samples": len(index.keys)}
    storage.write_json(url, {"header": header, "scores": dict(zip(index.keys, scores.tolist(), strict=True))},
                       config.storage)
    return scores


def make_subset(config: ExperimentConfig, manifest: ShardManifest, index: SplitIndex, kept: Tensor,
                scores: Tensor) -> Subset:
    keys = [index.keys[i] for i in kept.tolist()]
    shard_counts: dict[str, int] = {}
    for i in kept.tolist():
        shard_counts[index.shards[i]] = shard_counts.get(index.shards[i], 0) + 1
    num_classes = len(manifest.classes)
    header: dict[str, Any] = {
        "selection": config.selection.model_dump(mode="json", exclude={"dir"}),
        "data": data_fingerprint(config, manifest, whole_split=True), "split": config.data.split,
        "samples": len(index.keys), "kept": len(keys), "keys_fingerprint": keys_fingerprint(keys),
        "kept_mean_score": float(scores[kept].mean()), "all_mean_score": float(scores.mean()),
    }
    return Subset(frozenset(keys), manifest.fingerprint(), shard_counts,
                  torch.bincount(index.labels[kept], minlength=num_classes).tolist(), header)


def summary(subset: Subset, scores: Tensor, kept: Tensor, index: SplitIndex, url: str) -> str:
    totals = torch.bincount(index.labels, minlength=len(subset.class_counts)).tolist()
    per_class = ", ".join(f"{k}/{t}" for k, t in zip(subset.class_counts, totals, strict=True))
    dropped = torch.ones(len(scores), dtype=torch.bool)
    dropped[kept] = False
    dropped_mean = float(scores[dropped].mean()) if dropped.any() else float("nan")
    return (f"kept {len(subset):,} of {len(index.keys):,} training samples ({len(subset) / len(index.keys):.1%}) in "
            f"{storage.redact(url)}\n  per class (kept/all): {per_class}\n  mean score: kept "
            f"{float(scores[kept].mean()):.4f}, dropped {dropped_mean:.4f}")

