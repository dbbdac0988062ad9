"""The evaluate stage: the distilled sets against coresets of the same size and the full training split,
for any task (accuracy of classifiers, retrieval recall of dual encoders), in one loop.

    sets, size by size:
        distilled:<method>               the set in <run_dir>/distill/<method>/ipc-<k>/, trained with its
                                         learned step size
        distilled:<method> (best val)    the snapshot best on evaluate.best_snapshot_split (if kept)
        random / herding / kcenter / forgetting
                                         real samples (ipc per class; for pairs, <size> images with one
                                         caption each) chosen from the training split; herding and k-center
                                         on expert 0's embeddings, forgetting from a run with the experts' recipe
    full                                 the whole training split (evaluate.full)
    -> evaluate.repeats fresh networks per set (engine.seeds: never an expert's starting point)
    -> <run_dir>/results.json {"header", "rows"}, results.md, config.yaml

The reported split is used for no choice of any kind. A results.json scored on another split is kept
as results-<split>.json, never overwritten silently.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from engine import storage
from engine.config import to_yaml
from engine.data.manifest import MANIFEST_NAME, ShardManifest
from engine.data.memory import InMemoryData
from engine.data.preprocess import Preprocess
from engine.data.stream import EpochOrder, EpochStream, StreamBatches
from engine.data.text_features import CaptionFeatures
from engine.distill.synthetic import SyntheticSet, list_snapshots
from engine.distill.vl import learned_lr
from engine.errors import DataError
from engine.evaluate.run import EvaluatedSet, evaluate_sets, results_table, score_set
from engine.evaluate.tasks import ClassificationTask, ClipClassificationTask, RetrievalTask, Task
from engine.experiment import DISTILLED, ExperimentConfig
from engine.labels import LABEL_SOURCES
from engine.models.registry import build_model
from engine.plots import metric_by_size_png
from engine.provenance import package_versions, source_commit
from engine.resources import default_device
from engine.seeds import evaluation_seeds, stream_seed
from engine.select import CORESETS, CoresetInputs
from engine.select.features import caption_finds_its_image, joint_embeddings, penultimate_features
from engine.select.forgetting import forgetting_counts
from engine.stages import Runtime
from engine.stages.context import (
    caption_features_of,
    caption_table,
    data_fingerprint,
    distill_dir,
    expert_snapshot,
    fitted_preprocess,
    load_preprocess,
    load_split,
    model_spec,
    prepare_data,
    streamed_split,
)
from engine.storage import StorageConfig
from engine.trajectories.experts import build_shared_frozen
from engine.trajectories.store import TrajectoryStore

RESULTS = "results.json"


# --- what is trained on: the training split as a pool of candidates -------------------------------------


@dataclass
class Pool:
    """The training split as candidates for coresets, in its canonical order (shard after shard): a
    coreset of size k picks k per class (``groups``), or k of ``candidates`` when there are no classes
    (pairs, one unit per caption). Only labels, keys and (N, D) embeddings are held; the chosen samples
    are fetched from the stream by position."""

    targets: Tensor  # per unit: labels, or caption features
    groups: Tensor | None  # class of each unit
    candidates: Callable[[torch.Generator], Tensor]  # the units a coreset of this draw may pick from
    features: Callable[[], Tensor]  # expert 0's embedding of every unit
    counts: Callable[[], Tensor]  # forgetting events of every unit
    images_of: Callable[[Tensor], Tensor]  # units -> their images (model-input space), fetched from the stream
    full_size: int  # what the full-data row is called: images per class, or pairs

    def coreset(self, method: str, size: int, seed: int) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(stream_seed("coreset", seed, size))
        allowed = self.candidates(generator)
        groups = None if self.groups is None else self.groups[allowed].cpu()
        inputs = CoresetInputs(len(allowed), groups, lambda: self.features()[allowed], lambda: self.counts()[allowed])
        if groups is None and size > len(allowed):
            raise DataError(f"a coreset of {size} pairs needs {size} training images; the split has {len(allowed)}")
        index = allowed[CORESETS[method](size, inputs, generator)]
        return self.images_of(index), self.targets[index.to(self.targets.device)]


def one_caption_per_image(caption_image: Tensor, num_images: int, generator: torch.Generator) -> Tensor:
    """(images with a caption,) caption indices: one caption of each image drawn at random, by image. As in
    the VL paper's baselines, a pair coreset is a set of distinct images with one caption each."""
    order = torch.randperm(len(caption_image), generator=generator)
    first = torch.full((num_images,), len(order), dtype=torch.long)
    first.scatter_reduce_(0, caption_image[order], torch.arange(len(order)), reduce="amin")
    return order[first[first < len(order)]]


def held_out_data(config: ExperimentConfig, manifest: ShardManifest) -> tuple[ExperimentConfig, ShardManifest]:
    """The config reading ``evaluate.test_shards`` as its data, and that folder's manifest: the same kind of
    data (modality, classes) as the training shards, never written from ``prepare``."""
    url = config.evaluate.test_shards
    assert url is not None
    if not storage.exists(storage.join(url, MANIFEST_NAME), config.storage):
        raise DataError(f"evaluate.test_shards: {storage.redact(url)} holds no shards (no {MANIFEST_NAME})")
    held_out = ShardManifest.load(url, config.storage)
    if held_out.modality != manifest.modality:
        raise DataError(f"evaluate.test_shards: {storage.redact(url)} holds {held_out.modality} data, the training "
                        f"shards {manifest.modality}")
    if [c.id for c in held_out.classes] != [c.id for c in manifest.classes]:
        raise DataError(f"evaluate.test_shards: the classes of {storage.redact(url)} differ from the training "
                        f"data's ({len(held_out.classes)} vs {len(manifest.classes)} classes)")
    if config.evaluate.split not in held_out.splits:
        raise DataError(f"evaluate.test_shards: {storage.redact(url)} has no {config.evaluate.split!r} split "
                        f"(it has {', '.join(held_out.splits)}); set evaluate.split")
    return config.model_copy(update={"data": config.data.model_copy(update={"shards": url})}), held_out


def results_dir(config: ExperimentConfig) -> str:
    """Where results.json goes: the run folder, or for held-out data <run_dir>/heldout/<its folder name>."""
    if config.evaluate.test_shards is None:
        return config.run_dir
    return storage.join(config.run_dir, "heldout", config.evaluate.test_shards.rstrip("/").rsplit("/", 1)[-1])


class Experiment:
    """The task and the training pool of one config's evaluation. The training split is never held: it
    is read as a stream (``runtime.source``) for embeddings, forgetting runs, the chosen coreset samples
    and the full-data row; held-out splits are small and stay in memory."""

    def __init__(self, config: ExperimentConfig, runtime: Runtime, split: str, device: torch.device):
        self.config, self.runtime, self.device = config, runtime, device
        self.manifest = prepare_data(config)
        self.spec = model_spec(config, self.manifest, config.evaluate.model)
        self.preprocess = fitted_preprocess(config, self.manifest, runtime).to(device)
        self.pairs = self.manifest.modality == "image-text"
        split_data = streamed_split(config, self.manifest, config.data.split, runtime, self.preprocess)
        self.source, self.train_images = split_data.images.source, split_data.images.to(device)
        self.keys, self.labels = split_data.keys, split_data.labels
        self.text = None
        if self.pairs:
            captions = caption_table(config, self.manifest, self.spec, config.data.split, runtime)
            self.text = CaptionFeatures(captions.features, torch.tensor(
                [i for i, key in enumerate(self.keys) for _ in range(captions.rows[key][1])]))
            self.captions = captions
        self.task = self.task_on(split)
        self.pool = self.make_pool()

    def task_on(self, split: str, preprocess: Preprocess | None = None) -> Task:
        """The task scored on ``split``, its images in ``preprocess`` (default: this config's transform)."""
        config, manifest = self.config, self.manifest
        if split == config.evaluate.split and config.evaluate.test_shards:
            config, manifest = held_out_data(config, self.manifest)
        held_out = self.held_out(split)
        images = (preprocess.to(self.device) if preprocess else self.preprocess).apply(held_out.images.to(self.device))
        if not self.pairs:
            clips = self.manifest.modality == "video" and len(self.manifest.classes) >= 10
            task = ClipClassificationTask if clips else ClassificationTask
            return task(lambda: build_model(self.spec), images, held_out.labels.to(self.device),
                        LABEL_SOURCES[self.config.evaluate.labels]())
        text = caption_features_of(config, manifest, self.spec, held_out.captions, split)
        return RetrievalTask(self.fresh_dual_encoder, images, text.features.to(self.device),
                             text.image_index.to(self.device), self.config.experts.train.temperature)

    @functools.cache  # noqa: B019  (one Experiment per evaluation run)
    def held_out(self, split: str) -> InMemoryData:
        """A held-out split in memory (pixels), read once."""
        config = self.config
        if split == config.evaluate.split and config.evaluate.test_shards:
            config, _ = held_out_data(config, self.manifest)
        return load_split(config, split, self.runtime)

    def fresh_dual_encoder(self, seed: int) -> tuple[nn.Module, list[str]]:
        """The experts' dual encoder with their frozen parts and freshly initialised recorded parameters."""
        return build_shared_frozen(self.spec, self.config.experts.record, frozen_seed=self.config.experts.seed,
                                   seed=seed)

    # --- the training split as a stream ---

    def images(self) -> Iterator[Tensor]:
        """The training split's images in model-input space, batch after batch, in canonical order."""
        return self.train_images.batches()

    def training_batches(self, seed: int, batch_size: int | None = None) -> StreamBatches:
        """Every epoch of the training split in its seeded order: the full-data row and forgetting runs
        (image-text data: one row per caption)."""
        expand = self.captions.expand if self.pairs else None
        stream = EpochStream(self.source, EpochOrder(seed, self.config.data.shuffle_buffer),
                             batch_size or self.config.evaluate.train.batch_size, expand)
        return StreamBatches(stream, self.preprocess.apply, "text" if self.pairs else "label", self.device)

    def make_pool(self) -> Pool:
        if not self.pairs:
            labels = self.labels.to(self.device)
            return Pool(labels, self.labels, lambda _: torch.arange(len(labels)), self.classifier_features,
                        self.forgetting, self.train_images.__getitem__, round(len(labels) / len(self.manifest.classes)))
        text, caption_image = self.text.features.to(self.device), self.text.image_index
        return Pool(text, None, lambda generator: one_caption_per_image(caption_image, len(self.keys), generator),
                    self.pair_embeddings, self.forgetting, lambda units: self.train_images[caption_image[units.cpu()]],
                    len(text))

    # --- what herding, k-center and forgetting look at ---

    def expert_model(self) -> nn.Module:
        """Expert 0 of the store at its last epoch."""
        store = TrajectoryStore.open(self.config.store_url, self.config.storage)
        return expert_snapshot(self.config, self.manifest, store.experts()[0], None, self.device)

    @functools.cache  # noqa: B019  (one Experiment per evaluation run)
    def classifier_features(self) -> Tensor:
        return penultimate_features(self.expert_model(), self.images())

    @functools.cache  # noqa: B019
    def pair_embeddings(self) -> Tensor:
        return joint_embeddings(self.expert_model(), self.images(), self.text.features.to(self.device),
                                self.text.image_index.to(self.device))

    @functools.cache  # noqa: B019
    def forgetting(self) -> Tensor:
        """Forgetting events per unit from one run with the experts' recipe on the training stream, cached
        in <run_dir>/evaluate/ under a key of everything they depend on (data, model, recipe, recorded
        parameters, seed)."""
        config = self.config
        seed = stream_seed("forgetting", config.evaluate.seed)
        key = json.dumps({"data": data_fingerprint(config, self.manifest), "spec": model_spec(config, self.manifest)
                          .model_dump(mode="json"), "recipe": config.experts.train.model_dump(mode="json"),
                          "record": config.experts.record, "seed": seed, "frozen_seed": config.experts.seed},
                         sort_keys=True)
        url = storage.join(config.run_dir, "evaluate",
                           f"forgetting-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors")
        if storage.exists(url, config.storage):
            return load_safetensors(storage.read_bytes(url, config.storage))["counts"]
        model, names = build_shared_frozen(model_spec(config, self.manifest), config.experts.record,
                                           frozen_seed=config.experts.seed, seed=seed)
        model.to(self.device)
        recipe = config.experts.train
        batches = self.training_batches(seed, recipe.batch_size)
        if self.pairs:
            judge = caption_finds_its_image(self.images, self.text.features.to(self.device),
                                            self.text.image_index.to(self.device))
        else:
            labels = self.labels.to(self.device)

            def judge(m: nn.Module) -> Tensor:
                m.eval()
                with torch.no_grad():
                    return torch.cat([m(x).argmax(1) for x in self.images()]) == labels

        counts = forgetting_counts(model, batches, recipe, names, seed=seed, correct=judge).cpu()
        storage.write_bytes(url, save_safetensors({"counts": counts.contiguous()}), config.storage)
        return counts


# --- the sets and the loop --------------------------------------------------------------------------------


def as_evaluated(config: ExperimentConfig, synthetic: SyntheticSet, method: str, size: int, device: torch.device,
                 task: Task | None = None, **details: Any) -> EvaluatedSet:
    """A distilled set to train fresh networks on: with its learned step size (one per side for pairs)."""
    ev = config.evaluate
    targets = synthetic.text if synthetic.text is not None else synthetic.labels
    if "seconds" in synthetic.metadata:
        details = {"distill_seconds": synthetic.metadata["seconds"], **details}
    if not ev.use_learned_lr or not synthetic.alphas.numel():  # a method without a learned step size (DM)
        lr, shown = ev.train.lr, ev.train.lr
    elif synthetic.text is not None:
        lr, shown = learned_lr(synthetic.alphas), synthetic.alphas.tolist()
    else:
        lr = shown = float(synthetic.alphas.mean())
    return EvaluatedSet(method, size, synthetic.images.to(device), targets.to(device), lr, ev.train.epochs,
                        {"lr": shown, **details}, task=task)


def distilled_sets(config: ExperimentConfig, experiment: Experiment, size: int,
                   variant: str | None = None) -> Iterator[EvaluatedSet]:
    """The final distilled set at ``size``, then the snapshot best on the selection split (if kept), of the
    config or of its variant ``variant`` (``pipeline.variants``)."""
    ev = config.evaluate
    name = f"{DISTILLED}:{variant or config.distill.method}"
    source = config.variant(variant) if variant else config
    folder = distill_dir(source, size)
    # A variant trained on a kept subset fitted its input transform there: its set is scored in that transform.
    transform = load_preprocess(source) if variant else None
    if transform is not None and transform.to_bytes() == load_preprocess(config).to_bytes():
        transform = None
    task = experiment.task_on(ev.split, transform) if transform else None
    yield as_evaluated(config, SyntheticSet.load(folder, config.storage), name, size, experiment.device, task=task)
    snapshots = list_snapshots(folder, config.storage)
    if not ev.selects_best_snapshot or not snapshots:
        return
    selection = experiment.task_on(ev.best_snapshot_split, transform)
    seeds = evaluation_seeds(ev.seed, ev.repeats)
    best: tuple[int, SyntheticSet, float] | None = None
    for iteration, url in snapshots.items():  # the latest wins ties
        synthetic = SyntheticSet.from_bytes(storage.read_bytes(url, config.storage), storage.redact(url))
        candidate = as_evaluated(config, synthetic, name, size, experiment.device)
        value = score_set(selection, candidate.data, ev.train, candidate.lr, seeds)
        if best is None or value[selection.primary].mean >= best[2]:
            best = (iteration, synthetic, value[selection.primary].mean)
    iteration, chosen, value = best
    yield as_evaluated(config, chosen, f"{name} (best {ev.best_snapshot_split})", size, experiment.device,
                       task=task, iteration=iteration, selected_on={"split": ev.best_snapshot_split,
                                                                    selection.primary: round(value, 4)})


def evaluation_sets(config: ExperimentConfig, experiment: Experiment, sizes: list[int]) -> Iterator[EvaluatedSet]:
    ev = config.evaluate
    coreset_sizes = ev.sizes or sizes
    for size in sorted(set(sizes) | set(coreset_sizes)):
        if DISTILLED in ev.methods and size in sizes:
            yield from distilled_sets(config, experiment, size)
            for variant in config.pipeline.variants:
                yield from distilled_sets(config, experiment, size, variant)
        if size in coreset_sizes:
            for method in (m for m in ev.methods if m != DISTILLED):
                images, targets = experiment.pool.coreset(method, size, ev.seed)
                yield EvaluatedSet(method, size, images, targets, ev.train.lr, ev.train.epochs)
    if ev.full:
        yield EvaluatedSet("full", experiment.pool.full_size, None, None, ev.train.lr, ev.full_epochs,
                           stream=experiment.training_batches)


def run(config: ExperimentConfig, runtime: Runtime, sizes: list[int] | None = None) -> list[dict[str, Any]]:
    """Evaluate every configured method; writes and returns the rows."""
    sizes = sizes or config.pipeline.ipcs
    header = results_header(config)
    where = f" of {storage.redact(config.evaluate.test_shards)}" if config.evaluate.test_shards else ""
    print(f"evaluating at sizes {sizes} on the {config.evaluate.split} split{where} "
          f"({config.evaluate.repeats} networks per set, seeds {header['evaluation_seeds']})", flush=True)
    experiment = Experiment(config, runtime, config.evaluate.split, default_device())
    rows = list(evaluate_sets(experiment.task, evaluation_sets(config, experiment, sizes), config.evaluate.train,
                              header["evaluation_seeds"]))
    write_results(config, header, rows)
    return rows


def quick_score(config: ExperimentConfig, runtime: Runtime) -> Callable[[SyntheticSet], float]:
    """A fast proxy of a synthetic set's quality for sweeps: one network trained for ``sweep.eval_epochs``
    epochs; the task's primary metric (accuracy, or rsum for pairs) on ``evaluate.split``."""
    experiment = Experiment(config, runtime, config.evaluate.split, default_device())
    train = config.evaluate.train.model_copy(update={"epochs": config.sweep.eval_epochs})

    def score(synthetic: SyntheticSet) -> float:
        evaluated = as_evaluated(config, synthetic, DISTILLED, len(synthetic), experiment.device)
        scores = score_set(experiment.task, evaluated.data, train, evaluated.lr, evaluation_seeds(config.evaluate.seed, 1))
        return scores[experiment.task.primary].mean

    return score


# --- results files ----------------------------------------------------------------------------------------


def results_header(config: ExperimentConfig) -> dict[str, Any]:
    """How every row was measured; rows add their own lr, epochs and seeds."""
    ev = config.evaluate
    manifest: ShardManifest = prepare_data(config)
    return {
        "split": ev.split,
        "shards": storage.redact(ev.test_shards or config.data.shards),
        "data": data_fingerprint(config, manifest),
        "distill_method": config.distill.method,
        "evaluation_seeds": evaluation_seeds(ev.seed, ev.repeats),
        "repeats": ev.repeats,
        "train": ev.train.model_dump(mode="json"),
        "full_epochs": ev.full_epochs,
        "use_learned_lr": ev.use_learned_lr,
        "labels": ev.labels,
        "best_snapshot_split": ev.best_snapshot_split if ev.selects_best_snapshot else None,
        "model": (ev.model or config.model).model_dump(mode="json"),
        "store": storage.redact(config.store_url),
        "versions": package_versions(),
        "commit": source_commit(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_results(config: ExperimentConfig, header: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    folder = results_dir(config)
    url = storage.join(folder, RESULTS)
    keep_other_split(folder, header["split"], config.storage)
    table = results_table(rows)
    storage.write_json(url, {"header": header, "rows": rows}, config.storage)
    storage.write_text(storage.join(folder, "results.md"), table, config.storage)
    storage.write_text(storage.join(config.run_dir, "evaluate", "config.yaml"), to_yaml(config), config.storage)
    picture = storage.join(folder, "results.png")
    title = f"{header['split']} split" + (f" of {header['shards'].rstrip('/').rsplit('/', 1)[-1]}"
                                          if config.evaluate.test_shards else "")
    storage.write_bytes(picture, metric_by_size_png(rows, title), config.storage)
    print(f"\n{table}\nresults: {storage.redact(url)}\nplot: {storage.redact(picture)}", flush=True)


def keep_other_split(folder: str, split: str, storage_config: StorageConfig | None) -> None:
    """A results.json scored on another split is renamed to results-<its split>.json (and .md), with a note."""
    url = storage.join(folder, RESULTS)
    if not storage.exists(url, storage_config):
        return
    previous = storage.read_json(url, storage_config)
    old_split = previous.get("header", {}).get("split") if isinstance(previous, dict) else None
    if old_split is None or old_split == split:  # unknown (an old list of rows) or the same split: replaced
        return
    for name in (RESULTS, "results.md", "results.png"):
        old = storage.join(folder, name)
        if storage.exists(old, storage_config):
            kept = storage.join(folder, name.replace("results", f"results-{old_split}"))
            storage.write_bytes(kept, storage.read_bytes(old, storage_config), storage_config)
    print(f"{storage.redact(url)} held scores on the {old_split!r} split; kept as results-{old_split}.json "
          f"before writing the {split!r} results", flush=True)
