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
from torch import Tensor, nn

from engine import storage
from engine.data.manifest import ShardManifest
from engine.data.preprocess import Preprocess
from engine.data.stream import EpochOrder, EpochStream, images_of
from engine.errors import DataError
from engine.experiment import ExperimentConfig
from engine.models.params import set_flat
from engine.resources import default_device
from engine.select.bilp import keep_lowest, kmeans
from engine.select.subset import Subset, keys_fingerprint
from engine.stages import Runtime
from engine.stages import buffer as buffer_stage
from engine.stages.context import (
    caption_table,
    data_fingerprint,
    model_spec,
    prepare_data,
    selection_folder,
    subset_url,
)
from engine.stages.pretrain import ensure_tower
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


def trained_scoring_runs(config: ExperimentConfig, manifest: ShardManifest,
                         runtime: Runtime) -> tuple[ExperimentConfig, TrajectoryStore, Preprocess]:
    """Train (or resume, or find complete) the scoring runs; their config, store and input transform."""
    scoring = scoring_config(config)
    ensure_tower(scoring, runtime)  # image-text models: the pre-trained image tower the experts use
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
    return scoring, store, preprocess


def scoring_models(scoring: ExperimentConfig, manifest: ShardManifest, store: TrajectoryStore,
                   device: torch.device) -> list[nn.Module]:
    """Every scoring run's model at the scored epoch, in eval mode."""
    epoch, spec, models = scoring.selection.score_epoch, model_spec(scoring, manifest), []
    for run in range(scoring.selection.scoring_runs):
        model, names = build_shared_frozen(spec, scoring.experts.record, frozen_seed=scoring.experts.seed,
                                           seed=scoring.experts.seed)
        params = store.load_epochs(run, [epoch])[epoch]
        set_flat(model, names, torch.cat([params[n].flatten() for n in names]))
        models.append(model.to(device).eval())
    return models


def loss_scores(config: ExperimentConfig, manifest: ShardManifest, index: SplitIndex,
                runtime: Runtime) -> tuple[Tensor, Tensor]:
    """Classes: (N,) cross-entropy of every training sample (no augmentation, eval mode) averaged over the
    scoring runs at the scored epoch, in one streamed pass; grouped by class. Image-text pairs:
    ``pair_loss_scores``."""
    scoring, store, preprocess = trained_scoring_runs(config, manifest, runtime)
    device = default_device()
    models = scoring_models(scoring, manifest, store, device)
    if manifest.modality == "image-text":
        return pair_loss_scores(scoring, manifest, index, runtime, models, preprocess.to(device), device)
    return class_loss_scores(config, manifest, index, runtime, models, preprocess.to(device), device)


@torch.no_grad()
def class_loss_scores(config: ExperimentConfig, manifest: ShardManifest, index: SplitIndex, runtime: Runtime,
                      models: list[nn.Module], preprocess: Preprocess, device: torch.device) -> tuple[Tensor, Tensor]:
    media = "video" if manifest.modality == "video" else "image"
    source = runtime.source(config.data, config.storage, (media, "label", "key"))
    losses, keys = [], []
    for batch in EpochStream(source, EpochOrder(0), BATCH):
        x, y = preprocess.apply(images_of(batch).to(device)), batch["label"].to(device)
        losses.append(torch.stack([F.cross_entropy(m(x), y, reduction="none") for m in models]).mean(0).cpu())
        keys += [str(k) for k in batch["key"]]
    check_order(keys, index)
    return torch.cat(losses), index.labels


@torch.no_grad()
def pair_loss_scores(scoring: ExperimentConfig, manifest: ShardManifest, index: SplitIndex, runtime: Runtime,
                     models: list[nn.Module], preprocess: Preprocess, device: torch.device) -> tuple[Tensor, Tensor]:
    """Image-text pairs have no classes: a sample's score is the mean symmetric InfoNCE loss of its (image,
    caption) pairs, each within a batch of the experts' size drawn as the experts draw theirs (a seeded
    shuffle, so a batch rarely holds two captions of one image), averaged over the runs; the groups are
    k-means clusters (selection.clusters) of the last run's image embeddings."""
    table = caption_table(scoring, manifest, model_spec(scoring, manifest), scoring.data.split, runtime)

    def pairs_of(row: dict) -> list[dict]:
        return [{**pair, "key": row["key"]} for pair in table.expand(row)]

    source = runtime.source(scoring.data, scoring.storage, ("image", "label", "key"))
    stream = EpochStream(source, EpochOrder(scoring.selection.seed, scoring.data.shuffle_buffer),
                         scoring.experts.train.batch_size, pairs_of)
    tau = scoring.experts.train.temperature
    totals, counts = torch.zeros(len(index.keys), dtype=torch.float64), torch.zeros(len(index.keys))
    position = {key: i for i, key in enumerate(index.keys)}
    for batch in stream.epoch(0):
        images, text = preprocess.apply(batch["image"].to(device)), batch["text"].to(device)
        losses = torch.stack([pair_infonce(m.encode_image(images), m.encode_text_features(text), tau)
                              for m in models]).mean(0).cpu()
        rows = torch.tensor([position[str(k)] for k in batch["key"]])
        totals.index_add_(0, rows, losses.double())
        counts.index_add_(0, rows, torch.ones(len(rows)))
    embeddings = torch.cat([models[-1].encode_image(preprocess.apply(b.to(device))).cpu()
                            for b in (images_of(batch) for batch in EpochStream(source, EpochOrder(0), BATCH))])
    clusters = kmeans(embeddings, min(scoring.selection.clusters, len(index.keys)),
                      torch.Generator().manual_seed(scoring.selection.seed))
    return totals / counts.clamp(min=1), clusters


def pair_infonce(image_emb: Tensor, text_emb: Tensor, temperature: float) -> Tensor:
    """(B,) each pair's symmetric InfoNCE loss in its batch (``engine.losses.infonce_loss`` is their mean)."""
    logits = image_emb @ text_emb.T / temperature
    positives = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, positives, reduction="none")
            + F.cross_entropy(logits.T, positives, reduction="none")) / 2


def check_order(keys: list[str], index: SplitIndex) -> None:
    if keys != index.keys:
        raise DataError("the training split changed while it was scored (another order of keys)")


def random_scores(config: ExperimentConfig, manifest: ShardManifest, index: SplitIndex,
                  runtime: Runtime) -> tuple[Tensor, Tensor]:
    """A seeded uniform score per sample: keeping the lowest is a random subset of each class (of the whole
    split for image-text pairs)."""
    scores = torch.rand(len(index.keys), generator=torch.Generator().manual_seed(config.selection.seed),
                        dtype=torch.float64)
    return scores, index.labels if manifest.modality != "image-text" else torch.zeros(len(index.keys), dtype=torch.long)


Scorer = Callable[[ExperimentConfig, ShardManifest, SplitIndex, Runtime], tuple[Tensor, Tensor]]  # scores, groups
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
    scores, groups = scores_of(config, manifest, index, runtime)
    minimum = 1 if manifest.modality == "image-text" else max([*config.pipeline.ipcs, *config.pipeline.per_ipc])
    kept = keep_lowest(scores, groups, sel.keep_ratio, minimum=minimum)
    subset = make_subset(config, manifest, index, kept, scores, groups)
    subset.save(url, config.storage)
    print(summary(subset, scores, kept, groups, url), flush=True)
    return subset


def scores_of(config: ExperimentConfig, manifest: ShardManifest, index: SplitIndex,
              runtime: Runtime) -> tuple[Tensor, Tensor]:
    """The selector's scores and groups (classes, or clusters of pairs) in the index's order: from the folder's
    scores.json (keyed by sample key, so it holds for any order or shard layout of the same samples), or
    computed and written there."""
    url = storage.join(selection_folder(config, manifest), SCORES)
    if storage.exists(url, config.storage):
        stored = storage.read_json(url, config.storage)
        made_on = stored.get("header", {}).get("data")
        if made_on != (ours := data_fingerprint(config, manifest, whole_split=True)):
            raise DataError(f"{storage.redact(url)} scores other data ({made_on}, not {ours}); delete it to score again")
        keyed, groups = stored["scores"], stored["groups"]
        missing = [k for k in index.keys if k not in keyed]
        if missing:
            raise DataError(f"{storage.redact(url)} has no score for {len(missing):,} samples (e.g. {missing[0]}); "
                            "delete it to score again")
        return (torch.tensor([keyed[k] for k in index.keys], dtype=torch.float64),
                torch.tensor([groups[k] for k in index.keys], dtype=torch.long))
    scores, groups = SCORERS[config.selection.method](config, manifest, index, runtime)
    header = {"selection": config.selection.model_dump(mode="json", exclude={"keep_ratio", "dir"}),
              "data": data_fingerprint(config, manifest, whole_split=True), "samples": len(index.keys)}
    storage.write_json(url, {"header": header, "scores": dict(zip(index.keys, scores.double().tolist(), strict=True)),
                             "groups": dict(zip(index.keys, groups.tolist(), strict=True))}, config.storage)
    return scores.double(), groups


def make_subset(config: ExperimentConfig, manifest: ShardManifest, index: SplitIndex, kept: Tensor,
                scores: Tensor, groups: Tensor) -> Subset:
    keys = [index.keys[i] for i in kept.tolist()]
    shard_counts: dict[str, int] = {}
    for i in kept.tolist():
        shard_counts[index.shards[i]] = shard_counts.get(index.shards[i], 0) + 1
    classes = manifest.modality != "image-text"
    header: dict[str, Any] = {
        "selection": config.selection.model_dump(mode="json", exclude={"dir"}),
        "data": data_fingerprint(config, manifest, whole_split=True), "split": config.data.split,
        "samples": len(index.keys), "kept": len(keys), "keys_fingerprint": keys_fingerprint(keys),
        "kept_mean_score": float(scores[kept].mean()), "all_mean_score": float(scores.mean()),
        "groups": "class" if classes else "cluster", "kept_per_group": torch.bincount(groups[kept]).tolist(),
    }
    class_counts = torch.bincount(index.labels[kept], minlength=len(manifest.classes)).tolist() if classes else []
    return Subset(frozenset(keys), manifest.fingerprint(), shard_counts, class_counts, header)


def summary(subset: Subset, scores: Tensor, kept: Tensor, groups: Tensor, url: str) -> str:
    totals = torch.bincount(groups).tolist()
    per_group = ", ".join(f"{k}/{t}" for k, t in zip(subset.header["kept_per_group"], totals, strict=False))
    dropped = torch.ones(len(scores), dtype=torch.bool)
    dropped[kept] = False
    dropped_mean = float(scores[dropped].mean()) if dropped.any() else float("nan")
    return (f"kept {len(subset):,} of {len(scores):,} training samples ({len(subset) / len(scores):.1%}) in "
            f"{storage.redact(url)}\n  per {subset.header['groups']} (kept/all): "
            f"{per_group}\n  mean score: kept {float(scores[kept].mean()):.4f}, dropped {dropped_mean:.4f}")

