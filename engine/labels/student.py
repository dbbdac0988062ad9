"""One training loop for students of a small synthetic set, whatever labels their views: the set's hard
labels, a soft-label store replayed view by view, or a label projector run online (HeLlO).

    for epoch e:  views = the epoch's views (drawn from (seed, e), or read from the store)
        for batch b:  x = render(images, views, b)
                      soft = labels.soft(e, b, x)     None for hard labels
                      loss = KL(soft ‖ student(x)) at temperature τ (or MSE of the softmaxes)
                             + w · CE mixed by CutMix's λ (w = 1 and no soft term for hard labels)
        SGD with momentum, lr / 10 half-way (the evaluation protocol of engine.evaluate.train)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from engine.config import Section
from engine.data.stream import epoch_generator
from engine.labels.views import EpochViews, ViewsConfig, draw_epoch, hard_targets, mix_weight, render
from engine.models.params import train_mode
from engine.optim import seeded_global_rng, sgd_step


class StudentConfig(Section):
    """How a student network is trained on a synthetic set."""

    epochs: int = Field(300, ge=1)
    batch_size: int = Field(100, ge=1)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    soft_loss: Literal["kl", "mse"] = Field("kl", description="Loss to soft labels: KL at the temperature, or MSE "
                                            "of the softmaxes (HeLlO's).")
    temperature: float = Field(4.0, gt=0)
    hard_weight: float = Field(0.0, ge=0, description="Weight of the cross-entropy to the hard labels beside a soft "
                            "loss (β); hard-label students use the cross-entropy alone.")
    views: ViewsConfig = Field(default_factory=ViewsConfig)


class ViewLabels(Protocol):
    """Where a student's views and their soft labels come from."""

    def views(self, epoch: int) -> EpochViews: ...

    def soft(self, epoch: int, views: EpochViews, b: int, x: Tensor) -> Tensor | None:
        """Soft-label logits of batch ``b``'s views ``x``, or None (hard labels)."""
        ...


class DrawnViews:
    """Views drawn from (seed, epoch); ``label`` (if given) labels each batch of views online."""

    def __init__(self, n: int, side: int, config: StudentConfig, seed: int,
                 label: Callable[[Tensor], Tensor] | None = None):
        self.n, self.side, self.config, self.seed, self.label = n, side, config, seed, label

    def views(self, epoch: int) -> EpochViews:
        return draw_epoch(self.n, self.config.batch_size, self.side, self.config.views,
                          epoch_generator(self.seed, epoch))

    def soft(self, epoch: int, views: EpochViews, b: int, x: Tensor) -> Tensor | None:
        if self.label is None:
            return None
        with torch.no_grad():
            return self.label(x)


def soft_loss(logits: Tensor, label_logits: Tensor, config: StudentConfig) -> Tensor:
    t = config.temperature
    if config.soft_loss == "mse":
        return F.mse_loss(F.softmax(logits / t, 1), F.softmax(label_logits / t, 1), reduction="sum") / len(logits)
    return F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(label_logits / t, 1), reduction="batchmean",
                    log_target=True) * t * t


def train_student(model: nn.Module, images: Tensor, labels: Tensor, source: ViewLabels, config: StudentConfig,
                  seed: int) -> nn.Module:
    """Train ``model`` (in place) on ``images`` (N, C, H, W, model-input space) with hard ``labels`` (N,),
    its views and soft labels from ``source``."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    momentum = [torch.zeros_like(p) for p in params]
    device = params[0].device
    images, labels = images.to(device), labels.to(device)
    train_mode(model, [name for name, _ in named])
    with seeded_global_rng(seed, device):
        for epoch in range(config.epochs):
            lr = config.lr * (0.1 if epoch >= config.epochs // 2 else 1.0)
            views = source.views(epoch)
            for b, _ in views.batches():
                x = render(images, views, b)
                logits = model(x)
                own, partner = hard_targets(labels, views, b)
                lam = mix_weight(views, b, images.shape[-1])
                hard = lam * F.cross_entropy(logits, own) + (1 - lam) * F.cross_entropy(logits, partner)
                label_logits = source.soft(epoch, views, b, x)
                if label_logits is None:
                    loss = hard
                else:
                    loss = soft_loss(logits, label_logits.to(logits), config) + config.hard_weight * hard
                grads = torch.autograd.grad(loss, params)
                sgd_step(params, list(grads), momentum, lr, config.momentum, config.weight_decay)
    return model
