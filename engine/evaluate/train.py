"""How a fresh network is trained on an evaluated set (distilled, coreset or full).

The protocol of MTT's evaluation: SGD with momentum 0.9 and weight decay 5e-4, the learning rate
divided by 10 half-way, DSA on every batch, a new network per repeat (seeded by
``engine.seeds.evaluation_seeds``: never an expert's starting point).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from engine.config import Section
from engine.data.augment import DEFAULT_STRATEGY, DSA, DSAStrategy
from engine.data.stream import Batches, TensorBatches
from engine.losses import classification_loss
from engine.models.params import train_mode
from engine.optim import seeded_global_rng, sgd_step


class TrainConfig(Section):
    """How a fresh network is trained on an evaluated set."""

    epochs: int = Field(300, ge=1, description="Epochs over the evaluated set.")
    batch_size: int = Field(256, ge=1)
    lr: float = Field(0.01, gt=0, description="lr for coresets and the full set; distilled sets may use their learned one.")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    dsa: bool = True
    dsa_strategy: DSAStrategy = DEFAULT_STRATEGY


@dataclass(frozen=True)
class Scores:
    values: list[float]
    seeds: list[int] = field(default_factory=list)  # of the fresh network behind each value

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> float:
        return float(np.std(self.values))


LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]  # (model, inputs, targets) -> scalar loss


def classify(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
    return classification_loss(model(images), targets)


def train_network(model: nn.Module, data: Batches | tuple[Tensor, Tensor], config: TrainConfig,
                  lr: float | Callable[[str], float], seed: int, loss: LossFn = classify) -> nn.Module:
    """Train the parameters of ``model`` that require grad, in place, for ``config.epochs`` epochs of
    ``data``: (images, targets) tensors of a small set (shuffled per epoch by (seed, epoch)), or any
    ``Batches``, e.g. the whole training split as a stream. ``targets``: labels (int64), soft label logits
    (float) or, with a contrastive ``loss``, text features. ``lr``: one learning rate, or one per parameter
    name (a step size per modality)."""
    batches = TensorBatches(*data, config.batch_size, seed) if isinstance(data, tuple) else data
    gen = torch.Generator().manual_seed(seed)
    dsa = DSA(config.dsa_strategy) if config.dsa else None
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    base_lrs = [lr(name) if callable(lr) else lr for name, _ in named]
    momentum = [torch.zeros_like(p) for p in params]
    device = params[0].device
    train_mode(model, [name for name, _ in named])
    with seeded_global_rng(seed, device):
        for epoch in range(config.epochs):
            decay = 0.1 if epoch >= config.epochs // 2 else 1.0
            for x, targets in batches.epoch(epoch):
                x, targets = x.to(device), targets.to(device)
                if dsa is not None:
                    x = dsa(x, gen)
                grads = torch.autograd.grad(loss(model, x, targets), params)
                for param, grad, buf, base in zip(params, grads, momentum, base_lrs, strict=True):
                    sgd_step([param], [grad], [buf], base * decay, config.momentum, config.weight_decay)
    return model
