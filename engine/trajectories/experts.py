"""One expert, start to finish: build the model from its seed, train (or resume) it into the store.

This is the Ray-free unit of work of the buffer job. ``ExpertPlan`` carries everything an expert
needs (it is sent once to every Ray trial): the training split as a stream (``TrainingData``: a source
of decoded shards, never the split itself), the input transform, the recipe. ``train_one`` claims an
expert in the store and records its trajectory; ``train_claimed`` is the same for one worker of a
data-parallel expert. Evaluation during training is on a validation split held in memory (it is
small): accuracy for classification, retrieval recall for contrastive experts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from engine.data.preprocess import Preprocess
from engine.data.stream import Batches, EpochOrder, EpochStream, ShardSource, StreamBatches, TensorBatches
from engine.data.text_features import CaptionTable
from engine.evaluate.metrics import embedding_recalls
from engine.models.params import get_flat, select_parameters, set_flat
from engine.models.registry import ModelSpec, build_model
from engine.optim import build_seeded
from engine.seeds import expert_seed
from engine.storage import StorageConfig
from engine.trajectories.store import ExpertStatus
from engine.trajectories.train import ExpertConfig, ExpertData, Reduce, TrainState, train_expert
from engine.trajectories.writer import StoreWriter, record_expert

EVAL_BATCH = 512


@dataclass(frozen=True)
class EvalData:
    """Validation tensors: images and labels, or images, caption features and each caption's image."""

    images: Tensor
    targets: Tensor
    text_to_image: Tensor | None = None


@dataclass(frozen=True)
class TrainingData:
    """The training split as experts read it, epoch after epoch: decoded shards from ``source`` (this
    process, a cache, or Ray Data), put in the model-input space by ``preprocess`` on the expert's device;
    image-text samples expand into one row per caption, its feature from ``captions``."""

    source: ShardSource
    preprocess: Preprocess
    shuffle_buffer: int = 10_000
    captions: CaptionTable | None = None

    def batches(self, seed: int, batch_size: int, device: torch.device, rank: int = 0,
                workers: int = 1) -> StreamBatches:
        expand = self.captions.expand if self.captions is not None else None
        stream = EpochStream(self.source, EpochOrder(seed, self.shuffle_buffer), batch_size, expand)
        return StreamBatches(stream, self.preprocess.to(device).apply, "text" if expand else "label", device,
                             rank, workers)


@dataclass(frozen=True)
class ExpertPlan:
    store_url: str
    spec: ModelSpec
    record: str  # parameter selection: all | heads | lora+heads | group names joined by '+'
    train: ExpertConfig
    fingerprint: str  # of the training data (shards + decoding), recorded in the store
    data: TrainingData | ExpertData  # a stream of the split, or (small data, tests) tensors
    eval_data: EvalData | None = None
    seed: int = 0
    lease_timeout_s: float = 600.0
    storage_config: StorageConfig | None = None
    device: str = "auto"

    def expert_seed(self, expert_id: int) -> int:
        return expert_seed(self.seed, expert_id)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def batches(self, seed: int, device: torch.device, rank: int = 0, workers: int = 1) -> Batches:
        """The expert's epochs: its own order (seeded by its seed), on ``device``; with ``workers`` > 1 this
        worker's share, at ``batch_size / workers`` rows a step (the recipe's batch over all workers)."""
        batch_size = max(1, self.train.batch_size // workers)
        if isinstance(self.data, ExpertData):
            data = ExpertData(self.data.images.to(device), self.data.targets.to(device))
            return TensorBatches(data.images, data.targets, batch_size, seed)
        return self.data.batches(seed, batch_size, device, rank, workers)


def build_expert_model(plan: ExpertPlan, seed: int) -> tuple[nn.Module, list[str]]:
    """The model of one expert: recorded parameters initialised from ``seed``, every other (frozen)
    parameter from ``plan.seed``, so that all experts — and the student that is matched against
    them — share the frozen part (a randomly initialised tower under LoRA adapters, for example)."""
    return build_shared_frozen(plan.spec, plan.record, frozen_seed=plan.seed, seed=seed)


def build_shared_frozen(spec: ModelSpec, record: str, *, frozen_seed: int, seed: int) -> tuple[nn.Module, list[str]]:
    model = build_seeded(lambda: build_model(spec), frozen_seed)
    names = select_parameters(model, record)
    if seed != frozen_seed:
        own = build_seeded(lambda: build_model(spec), seed)
        set_flat(model, names, get_flat(own, names))
    return model, names


def open_store(plan: ExpertPlan, owner: str | None = None) -> StoreWriter:
    """Create or open the plan's store; refuses a store recorded for another model, data or recipe.
    ``owner``: the lease holder's name, when this process works for another one (a Ray Train worker)."""
    model, recorded = build_expert_model(plan, seed=0)
    named = dict(model.named_parameters())
    return StoreWriter.create_or_open(
        plan.store_url, plan.spec, {n: named[n] for n in recorded}, plan.fingerprint,
        plan.train.model_dump(mode="json"), plan.storage_config, owner=owner, lease_timeout_s=plan.lease_timeout_s,
    )


def train_one(
    plan: ExpertPlan, expert_id: int, on_epoch: Callable[[int, TrainState], None] | None = None
) -> ExpertStatus | None:
    """Train expert ``expert_id`` into the store, resuming a partial one; None if another job holds it."""
    store = open_store(plan)
    if expert_id in store.experts():
        return store.status(expert_id)
    if not store.claim(expert_id):
        return None
    return train_claimed(plan, expert_id, store, on_epoch)


def train_claimed(plan: ExpertPlan, expert_id: int, store: StoreWriter,
                  on_epoch: Callable[[int, TrainState], None] | None = None, *, rank: int = 0, workers: int = 1,
                  reduce: Reduce | None = None) -> ExpertStatus | None:
    """Train an expert whose lease ``store`` holds. Data-parallel: every worker trains on its share with
    gradients averaged by ``reduce``; rank 0 writes the epochs (and reports), the others only train."""
    seed = plan.expert_seed(expert_id)
    model, recorded = build_expert_model(plan, seed)
    device = plan.torch_device()
    model.to(device)
    batches = plan.batches(seed, device, rank, workers)
    if rank != 0:
        state, _ = store.resume_state(expert_id)
        train_expert(model, batches, plan.train, recorded=recorded, seed=seed, resume=state, reduce=reduce)
        return None
    eval_data = _to_device(plan.eval_data, device)

    def evaluate(m: nn.Module) -> dict[str, float]:
        return validation_metrics(m, eval_data, plan.train) if eval_data is not None else {}

    return record_expert(
        store, expert_id, model, batches, plan.train, recorded=recorded, seed=seed, eval_fn=evaluate,
        on_epoch=(lambda epoch, params, state: on_epoch(epoch, state)) if on_epoch else None, reduce=reduce,
    )


def _to_device(data: EvalData | None, device: torch.device) -> EvalData | None:
    if data is None:
        return None
    to_image = data.text_to_image.to(device) if data.text_to_image is not None else None
    return replace(data, images=data.images.to(device), targets=data.targets.to(device), text_to_image=to_image)


@torch.no_grad()
def validation_metrics(model: nn.Module, data: EvalData, config: ExpertConfig) -> dict[str, float]:
    """``val_accuracy`` (percent) for classification; ``val_tr_r1`` ... ``val_rsum`` for contrastive."""
    was_training = model.training
    model.eval()
    try:
        if config.objective == "classification":
            logits = torch.cat([model(x) for x in data.images.split(EVAL_BATCH)])
            return {"val_accuracy": 100.0 * (logits.argmax(1) == data.targets).float().mean().item()}
        image_emb = torch.cat([model.encode_image(x) for x in data.images.split(EVAL_BATCH)])
        text_emb = torch.cat([model.encode_text_features(t) for t in data.targets.split(EVAL_BATCH)])
        recalls = embedding_recalls(image_emb.cpu(), text_emb.cpu(), data.text_to_image.cpu())
        return {f"val_{k}": v for k, v in recalls.items()}
    finally:
        model.train(was_training)
