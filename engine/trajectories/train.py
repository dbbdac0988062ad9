"""Expert training (MTT): plain SGD at a constant learning rate, recording parameters every epoch.

    θ*_0 = the model as given (the caller initialises it from a seed)
    for epoch e = 1 … E:
        for each mini-batch (x, y) of a seeded permutation of the real data:
            x ← A(x)                      (DSA, one random family per batch, optional)
            θ ← θ − lr · (∇ℓ(θ; x, y) + wd·θ)   with optional momentum
        record θ*_e                       (``on_epoch``)

Only the parameters named in ``recorded`` are trained (and recorded); every other parameter is
frozen. Objectives: ``classification`` (cross-entropy on labels) and ``contrastive`` (symmetric
InfoNCE on image/text embeddings that the model L2-normalises; a batch is (images, precomputed text
features)). ZCA whitening, when used, is applied upstream to the image tensor before it is passed in.

Randomness: the data order of epoch e comes from (seed, e) (``engine.data.stream``: the same order
from tensors in memory, a stream of shards in this process or Ray Data); DSA draws and a per-epoch
seed for any dropout inside the model come from one ``torch.Generator`` seeded with ``seed`` (dropout
runs under ``torch.random.fork_rng``, so the caller's global RNG is neither used nor changed). ``TrainState`` holds everything needed to
continue after an epoch — epoch, trained parameters, momentum buffers, module buffers (e.g. batch
norm statistics) and the generator state — as tensors, so a resumed run is bit-identical to an
uninterrupted one on the same device.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from engine.checkpoint import safetensors_metadata
from engine.config import Section
from engine.data.augment import DEFAULT_STRATEGY, DSA, DSAStrategy
from engine.data.stream import Batches, TensorBatches
from engine.errors import DataError, EngineError
from engine.losses import infonce_loss
from engine.models.params import train_mode
from engine.optim import seeded_global_rng, sgd_step

Objective = Literal["classification", "contrastive"]
EpochCallback = Callable[[int, dict[str, Tensor], "TrainState"], None]
EvalFn = Callable[[nn.Module], dict[str, float]]


class ExpertConfig(Section):
    """Hyper-parameters of one expert run. Defaults are MTT's classification recipe; the
    vision-language experts of Wu et al. use ``objective=contrastive, lr=0.1, batch_size=128``."""

    objective: Objective = Field(
        "classification", description="classification (cross-entropy) or contrastive (InfoNCE)."
    )
    epochs: int = Field(50, ge=1, description="Epochs E; snapshots 0..E are recorded.")
    batch_size: int = Field(256, ge=1)
    lr: float = Field(0.01, gt=0, description="Constant SGD learning rate.")
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    dsa: bool = Field(True, description="Apply DSA to every training batch.")
    dsa_strategy: DSAStrategy = Field(DEFAULT_STRATEGY, description="DSA families joined by '_'.")
    temperature: float = Field(0.07, gt=0, description="InfoNCE temperature (contrastive only).")


@dataclass(frozen=True)
class ExpertData:
    """Training tensors: images (N, C, H, W) and targets, either labels (N,) or text features (N, D)."""

    images: Tensor
    targets: Tensor

    def __post_init__(self) -> None:
        if len(self.images) != len(self.targets) or len(self.images) == 0:
            raise DataError(f"expert data: {len(self.images)} images and {len(self.targets)} targets")


@dataclass
class TrainState:
    """Everything needed to continue an expert after ``epoch``; plain tensors and ints (no pickle)."""

    epoch: int
    seed: int
    params: dict[str, Tensor]  # the trained (= recorded) parameters
    momentum: dict[str, Tensor]  # SGD momentum buffers, one per trained parameter
    buffers: dict[str, Tensor]  # module buffers (batch-norm running statistics...)
    rng_state: Tensor  # uint8 state of the expert's torch.Generator
    metrics: dict[str, float] = field(default_factory=dict)  # of this epoch: train loss, eval metrics

    def to_bytes(self) -> bytes:
        """safetensors bytes; the ints and metrics go into one JSON metadata entry (deterministic)."""
        tensors = {"rng_state": self.rng_state}
        for prefix, group in (("param", self.params), ("momentum", self.momentum), ("buffer", self.buffers)):
            tensors.update({f"{prefix}/{name}": t.detach().cpu().contiguous() for name, t in group.items()})
        info = {"epoch": self.epoch, "seed": self.seed, "metrics": self.metrics}
        return save_safetensors(tensors, metadata={"train_state": json.dumps(info, sort_keys=True)})

    @classmethod
    def from_bytes(cls, data: bytes) -> TrainState:
        info = json.loads(safetensors_metadata(data)["train_state"])
        tensors = load_safetensors(data)

        def group(prefix: str) -> dict[str, Tensor]:
            return {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(prefix + "/")}

        return cls(
            epoch=info["epoch"],
            seed=info["seed"],
            params=group("param"),
            momentum=group("momentum"),
            buffers=group("buffer"),
            rng_state=tensors["rng_state"],
            metrics=info["metrics"],
        )


def objective_loss(model: nn.Module, images: Tensor, targets: Tensor, config: ExpertConfig) -> Tensor:
    if config.objective == "classification":
        return F.cross_entropy(model(images), targets)
    image_emb, text_emb = model(images, targets)
    return infonce_loss(image_emb, text_emb, config.temperature)


def select_trained(model: nn.Module, recorded: Sequence[str]) -> dict[str, nn.Parameter]:
    """Unfreeze exactly the parameters named in ``recorded`` (in that order); freeze the rest."""
    named = dict(model.named_parameters())
    unknown = [n for n in recorded if n not in named]
    if unknown or not recorded:
        raise EngineError(
            f"recorded parameters {unknown or '[]'} are not parameters of {type(model).__name__}"
        )
    for name, param in named.items():
        param.requires_grad_(name in recorded)
    return {name: named[name] for name in recorded}


def snapshot(params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    return {name: p.detach().cpu().clone() for name, p in params.items()}


Reduce = Callable[[list[Tensor]], list[Tensor]]  # averages tensors over data-parallel workers


def train_epoch(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    momentum: dict[str, Tensor],
    batches: Iterable[tuple[Tensor, Tensor]],
    config: ExpertConfig,
    dsa: DSA | None,
    gen: torch.Generator,
    reduce: Reduce | None = None,
) -> float:
    """One pass over the epoch's batches; returns the mean training loss (of this worker's share)."""
    weights, buffers = list(params.values()), list(momentum.values())
    device = weights[0].device
    train_mode(model, params)
    total, count = torch.zeros((), device=device), 0  # summed on the device: no sync per batch
    for images, targets in batches:
        images, targets = images.to(device), targets.to(device)
        if dsa is not None:
            images = dsa(images, gen)
        loss = objective_loss(model, images, targets, config)
        grads = list(torch.autograd.grad(loss, weights, materialize_grads=True))
        if reduce is not None:  # data-parallel: every worker applies the mean gradient
            grads = reduce(grads)
        sgd_step(weights, grads, buffers, config.lr, config.momentum, config.weight_decay)
        total, count = total + loss.detach() * len(images), count + len(images)
    if count == 0:
        raise DataError("an epoch without a single batch: the training data is empty")
    return float(total) / count


def evaluate(model: nn.Module, eval_fn: EvalFn | None) -> dict[str, float]:
    if eval_fn is None:
        return {}
    model.eval()
    with torch.no_grad():
        return {k: float(v) for k, v in eval_fn(model).items()}


def capture_state(
    epoch: int,
    seed: int,
    model: nn.Module,
    params: dict[str, nn.Parameter],
    momentum: dict[str, Tensor],
    gen: torch.Generator,
    metrics: dict[str, float],
) -> TrainState:
    return TrainState(
        epoch=epoch,
        seed=seed,
        params=snapshot(params),
        momentum={n: b.detach().cpu().clone() for n, b in momentum.items()},
        buffers={n: b.detach().cpu().clone() for n, b in model.named_buffers()},
        rng_state=gen.get_state(),
        metrics=metrics,
    )


@torch.no_grad()
def restore_state(
    state: TrainState,
    model: nn.Module,
    params: dict[str, nn.Parameter],
    momentum: dict[str, Tensor],
    gen: torch.Generator,
) -> None:
    if set(state.params) != set(params):
        raise EngineError(f"resume state has parameters {sorted(state.params)}, expected {sorted(params)}")
    for name, param in params.items():
        param.copy_(state.params[name])
        momentum[name].copy_(state.momentum[name])
    module_buffers = dict(model.named_buffers())
    for name, value in state.buffers.items():
        module_buffers[name].copy_(value)
    gen.set_state(state.rng_state)


def train_expert(
    model: nn.Module,
    data: ExpertData | Batches,
    config: ExpertConfig,
    *,
    recorded: Sequence[str],
    seed: int,
    on_epoch: EpochCallback | None = None,
    resume: TrainState | None = None,
    eval_fn: EvalFn | None = None,
    reduce: Reduce | None = None,
) -> TrainState:
    """Train ``model`` in place for ``config.epochs`` epochs; returns the state after the last one.

    ``data``: tensors (``ExpertData``, shuffled per epoch by a generator seeded by (seed, epoch)) or any
    ``Batches``, e.g. a stream of the split (``engine.data.stream``); ``reduce`` averages gradients over
    data-parallel workers.

    ``on_epoch(epoch, {name: cpu tensor}, state)`` is called after every epoch, and for epoch 0 (the
    initialisation) before training; ``state.metrics`` holds ``train_loss`` (epochs ≥ 1) and what
    ``eval_fn(model)`` returns (run in eval mode without gradients). With ``resume`` (the state of
    epoch k, the model built from the same seed), training continues at epoch k + 1 and the
    callback is not called for epochs ≤ k.
    """
    batches = TensorBatches(data.images, data.targets, config.batch_size, seed) if isinstance(data, ExpertData) \
        else data
    params = select_trained(model, recorded)
    momentum = {name: torch.zeros_like(p) for name, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    dsa = DSA(config.dsa_strategy) if config.dsa else None
    notify = on_epoch or (lambda epoch, snap, state: None)

    if resume is None:
        state = capture_state(0, seed, model, params, momentum, gen, evaluate(model, eval_fn))
        notify(0, state.params, state)
    else:
        restore_state(resume, model, params, momentum, gen)
        state = resume

    device = next(iter(params.values())).device
    for epoch in range(state.epoch + 1, config.epochs + 1):
        epoch_seed = int(torch.randint(2**62, (1,), generator=gen))
        with seeded_global_rng(epoch_seed, device):  # only dropout-like layers draw from it
            train_loss = train_epoch(model, params, momentum, batches.epoch(epoch), config, dsa, gen, reduce)
        metrics = {"train_loss": train_loss, **evaluate(model, eval_fn)}
        state = capture_state(epoch, seed, model, params, momentum, gen, metrics)
        notify(epoch, state.params, state)
    return state
