"""The evaluation of an image-text experiment: retrieval recall of models trained on distilled pairs,
on coresets of real pairs, and on all training pairs.

    distilled   the pairs in <run_dir>/distill/ipc-<M>/ (M = pairs), each side trained with its learned step size
    coresets    M real pairs of M different images: one caption of each training image is drawn, then
        random      M of those pairs chosen uniformly
        herding / kcenter   greedy over joint embeddings [image; caption] of the pairs from an expert
        forgetting  the pairs forgotten most often — a caption's nearest image right, then wrong — during
                    a training run with the experts' recipe
    full        every training pair (upper bound)

Fresh models: the experts' dual encoder with the same frozen parts, the recorded parameters trained
with InfoNCE at the experts' temperature (SGD momentum 0.9, weight decay 5e-4, lr / 10 half-way).
Metrics on ``evaluate.split``: image->text (TR) and text->image (IR) recall@1/5/10 in percent and
``rsum``, one row per metric: ``{"method", "size" (pairs), "metric", "mean", "std", "runs"}``.
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
from engine.distill.vl import learned_lr
from engine.errors import DataError
from engine.evaluate.classification import Scores, train_network
from engine.evaluate.retrieval import embedding_recalls
from engine.experiment import (
    ExperimentConfig,
    caption_features_of,
    load_preprocess,
    load_split,
    model_spec,
    prepare_data,
)
from engine.models.params import set_flat
from engine.seeds import evaluation_seeds, stream_seed
from engine.select import coresets
from engine.select.forgetting import forgetting_counts
from engine.trajectories.experts import build_shared_frozen
from engine.trajectories.store import TrajectoryStore
from engine.trajectories.train import ExpertData, infonce_loss, select_trained

METRICS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum")
EMBED_BATCH = 512


@dataclass
class PairData:
    train_images: Tensor  # (N, C, H, W) model-input space
    train_text: Tensor  # (Ncap, D) features of every training caption
    train_caption_image: Tensor  # (Ncap,) image of each caption
    eval_images: Tensor
    eval_text: Tensor
    eval_caption_image: Tensor
    build: Callable[[int], tuple[nn.Module, list[str]]]  # seed -> fresh model and its trained parameter names
    temperature: float
    fingerprint: str


def load_pair_data(config: ExperimentConfig, device: torch.device) -> PairData:
    manifest = prepare_data(config)
    spec = model_spec(config, manifest)
    train = load_split(config, config.data.split)
    train_text = caption_features_of(config, manifest, spec, train, config.data.split)

    def build(seed: int) -> tuple[nn.Module, list[str]]:
        model, names = build_shared_frozen(spec, config.experts.record, frozen_seed=config.experts.seed, seed=seed)
        return model.to(device), names

    return PairData(
        load_preprocess(config).apply(train.images).to(device), train_text.features.to(device),
        train_text.image_index.to(device), *held_out_pairs(config, config.evaluate.split, device),
        build, config.experts.train.temperature, manifest.fingerprint(),
    )


def held_out_pairs(config: ExperimentConfig, split: str, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(images in model-input space, caption features, image of each caption) of a scored split."""
    manifest = prepare_data(config)
    data = load_split(config, split)
    text = caption_features_of(config, manifest, model_spec(config, manifest), data, split)
    return load_preprocess(config).apply(data.images).to(device), text.features.to(device), text.image_index.to(device)


@torch.no_grad()
def recalls(model: nn.Module, images: Tensor, text: Tensor, caption_image: Tensor) -> dict[str, float]:
    model.eval()
    image_emb = torch.cat([model.encode_image(x) for x in images.split(EMBED_BATCH)])
    text_emb = torch.cat([model.encode_text_features(t) for t in text.split(EMBED_BATCH)])
    return embedding_recalls(image_emb.cpu(), text_emb.cpu(), caption_image.cpu())


def evaluate_pairs(data: PairData, images: Tensor, text: Tensor, config: ExperimentConfig,
                   lr: float | Callable[[str], float], epochs: int | None = None) -> dict[str, Scores]:
    """Recalls of ``evaluate.repeats`` fresh models trained on the pairs (images[i], text[i])."""
    ev = config.evaluate
    train = ev.train if epochs is None else ev.train.model_copy(update={"epochs": epochs})

    def contrastive(model: nn.Module, x: Tensor, t: Tensor) -> Tensor:
        return infonce_loss(*model(x, t), data.temperature)

    seeds = evaluation_seeds(ev.seed, ev.repeats)
    runs: list[dict[str, float]] = []
    for seed in seeds:
        model, names = data.build(seed)
        select_trained(model, names)
        train_network(model, images, text, train, lr, seed, loss=contrastive)
        runs.append(recalls(model, data.eval_images, data.eval_text, data.eval_caption_image))
    return {m: Scores([r[m] for r in runs], seeds) for m in METRICS}


def pair_rows(config: ExperimentConfig, distilled_sizes: list[int], coreset_sizes: list[int], device: torch.device,
              log: Callable[[str], None] = print) -> Iterator[dict[str, Any]]:
    """Evaluate every configured method; yields rows (one per metric) as they are measured."""
    from engine.evaluate.baselines import BEST_SNAPSHOT, best_snapshot, row

    ev = config.evaluate
    data = load_pair_data(config, device)
    chooser = PairCoresets(config, data, device)

    def emit(method: str, size: int, scores: dict[str, Scores], lr: float | list[float],
             epochs: int = ev.train.epochs, **details: Any) -> Iterator[dict[str, Any]]:
        shown = "  ".join(f"{m} {scores[m].mean:5.1f}" for m in METRICS)
        log(f"  {method:<10} {size:>5} pairs  {shown}")
        for metric in METRICS:
            yield row(method, size, scores[metric], metric, lr=lr, epochs=epochs, **details)

    def distilled(synthetic: SyntheticSet, on: PairData = data) -> tuple[dict[str, Scores], float | list[float]]:
        lr = learned_lr(synthetic.alphas) if ev.use_learned_lr else ev.train.lr
        scores = evaluate_pairs(on, synthetic.images.to(device), synthetic.text.to(device), config, lr)
        return scores, synthetic.alphas.tolist() if ev.use_learned_lr else ev.train.lr

    if "distilled" in ev.methods:
        for size in distilled_sizes:
            yield from emit("distilled", size, *distilled(SyntheticSet.load(config.distill_dir(size), config.storage)))
            if not ev.selects_best_snapshot or not list_snapshots(config.distill_dir(size), config.storage):
                continue
            selection = replace(data, **dict(zip(("eval_images", "eval_text", "eval_caption_image"),
                                                 held_out_pairs(config, ev.best_snapshot_split, device), strict=True)))
            best = best_snapshot(config, size, lambda s, on=selection: distilled(s, on)[0]["rsum"].mean)
            if best is not None:
                iteration, chosen, value = best
                yield from emit(BEST_SNAPSHOT, size, *distilled(chosen), iteration=iteration,
                                selected_on={"split": ev.best_snapshot_split, "rsum": round(value, 4)})
    for size in coreset_sizes:
        for method in (m for m in ev.methods if m != "distilled"):
            index = chooser.choose(method, size)
            images = data.train_images[data.train_caption_image[index]]
            yield from emit(method, size, evaluate_pairs(data, images, data.train_text[index], config, ev.train.lr),
                            ev.train.lr)
    if ev.full:
        images = data.train_images[data.train_caption_image]
        yield from emit("full", len(data.train_text), evaluate_pairs(data, images, data.train_text, config,
                                                                     ev.train.lr, ev.full_epochs),
                        ev.train.lr, ev.full_epochs)


def one_caption_per_image(caption_image: Tensor, num_images: int, generator: torch.Generator) -> Tensor:
    """(images with a caption,) caption indices: one caption of each image drawn at random, by image."""
    order = torch.randperm(len(caption_image), generator=generator)
    first = torch.full((num_images,), len(order), dtype=torch.long)
    first.scatter_reduce_(0, caption_image[order], torch.arange(len(order)), reduce="amin")
    return order[first[first < len(order)]]


class PairCoresets:
    """Coresets of real (image, caption) pairs; expert embeddings and forgetting counts computed once."""

    def __init__(self, config: ExperimentConfig, data: PairData, device: torch.device):
        self.config, self.data, self.device = config, data, device
        self._joint: Tensor | None = None
        self._counts: Tensor | None = None

    def choose(self, method: str, size: int) -> Tensor:
        """Indices of ``size`` training captions of ``size`` different images. As in the VL paper's
        baselines, a coreset is a set of images with one caption each: one caption per image is drawn
        first (seeded, the same draw for every method at a size), then the method picks among those pairs."""
        generator = torch.Generator().manual_seed(stream_seed("coreset", self.config.evaluate.seed, size))
        candidates = one_caption_per_image(self.data.train_caption_image.cpu(), len(self.data.train_images),
                                           generator)
        if size > len(candidates):
            raise DataError(f"a coreset of {size} pairs needs {size} training images; the split has {len(candidates)}")
        picked = coresets.choose(method, size, len(candidates), None, generator,
                                 lambda: self.joint_embeddings()[candidates], lambda: self.counts()[candidates])
        return candidates[picked]

    def expert_model(self) -> nn.Module:
        """Expert 0 of the store at its last epoch."""
        store = TrajectoryStore.open(self.config.store_url, self.config.storage)
        model, names = self.data.build(self.config.experts.seed)
        params = store.load_epochs(store.experts()[0], [store.num_epochs])[store.num_epochs]
        set_flat(model, names, torch.cat([params[n].flatten() for n in names]).to(self.device))
        return model.eval()

    @torch.no_grad()
    def joint_embeddings(self) -> Tensor:
        """[image embedding; caption embedding] of every training pair, from the expert."""
        if self._joint is None:
            model = self.expert_model()
            image_emb = torch.cat([model.encode_image(x) for x in self.data.train_images.split(EMBED_BATCH)])
            text_emb = torch.cat([model.encode_text_features(t) for t in self.data.train_text.split(EMBED_BATCH)])
            self._joint = torch.cat([image_emb[self.data.train_caption_image], text_emb], dim=1).cpu()
        return self._joint

    def counts(self) -> Tensor:
        """Forgetting events per pair, cached in <run_dir>/evaluate/ (keyed by the data)."""
        if self._counts is not None:
            return self._counts
        url = storage.join(self.config.run_dir, "evaluate", f"pair-forgetting-{self.data.fingerprint}.safetensors")
        if storage.exists(url, self.config.storage):
            self._counts = load_safetensors(storage.read_bytes(url, self.config.storage))["counts"]
            return self._counts
        data = self.data
        seed = stream_seed("forgetting", self.config.evaluate.seed)
        model, names = data.build(seed)
        pairs = ExpertData(data.train_images[data.train_caption_image], data.train_text)

        @torch.no_grad()
        def caption_finds_its_image(m: nn.Module, _: ExpertData) -> Tensor:
            image_emb = torch.cat([m.encode_image(x) for x in data.train_images.split(EMBED_BATCH)])
            text_emb = torch.cat([m.encode_text_features(t) for t in data.train_text.split(EMBED_BATCH)])
            return (text_emb @ image_emb.T).argmax(1) == data.train_caption_image

        self._counts = forgetting_counts(model, pairs, self.config.experts.train, names,
                                         seed=seed, correct=caption_finds_its_image).cpu()
        storage.write_bytes(url, save_safetensors({"counts": self._counts.contiguous()}), self.config.storage)
        return self._counts
