"""What is measured after training a fresh network: a task builds the network from a seed, says how it
learns from a batch, and scores it on the held-out split.

    ClassificationTask   accuracy; the label source (``engine.labels``) gives each view's targets
    ClipClassificationTask  clips of 10 or more classes: top-1 and top-5 accuracy
    RetrievalTask        image->text and text->image recall@1/5/10 and rsum of a dual encoder trained with
                         InfoNCE on (image, caption feature) pairs; only its recorded parameters train
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

from torch import Tensor, nn

from engine.evaluate.metrics import accuracy, retrieval_recalls, topk_accuracies
from engine.labels import LabelSource
from engine.losses import infonce_loss
from engine.optim import build_seeded
from engine.trajectories.train import select_trained

RETRIEVAL_METRICS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum")


class Task(Protocol):
    metrics: ClassVar[tuple[str, ...]]
    primary: ClassVar[str]  # the metric a best-of choice and sweeps look at

    def fresh(self, seed: int) -> nn.Module:
        """A new network initialised from ``seed``, its trainable parameters requiring grad."""
        ...

    def loss(self, model: nn.Module, views: Tensor, targets: Tensor) -> Tensor: ...

    def score(self, model: nn.Module) -> dict[str, float]: ...


@dataclass
class ClassificationTask:
    metrics: ClassVar[tuple[str, ...]] = ("accuracy",)
    primary: ClassVar[str] = "accuracy"

    build: Callable[[], nn.Module]
    images: Tensor  # the held-out split, model-input space
    labels: Tensor
    label_source: LabelSource

    def fresh(self, seed: int) -> nn.Module:
        return build_seeded(self.build, seed).to(self.images.device)

    def loss(self, model: nn.Module, views: Tensor, targets: Tensor) -> Tensor:
        return self.label_source.loss(model(views), self.label_source.targets(views, targets))

    def score(self, model: nn.Module) -> dict[str, float]:
        return {"accuracy": accuracy(model, self.images, self.labels)}


@dataclass
class ClipClassificationTask(ClassificationTask):
    """Video classification with 10 or more classes: top-1 and top-5 clip accuracy (as Kinetics reports)."""

    metrics: ClassVar[tuple[str, ...]] = ("accuracy", "top5")

    def score(self, model: nn.Module) -> dict[str, float]:
        top = topk_accuracies(model, self.images, self.labels, (1, 5))
        return {"accuracy": top[1], "top5": top[5]}


@dataclass
class RetrievalTask:
    metrics: ClassVar[tuple[str, ...]] = RETRIEVAL_METRICS
    primary: ClassVar[str] = "rsum"

    build: Callable[[int], tuple[nn.Module, list[str]]]  # seed -> dual encoder and the parameters it trains
    images: Tensor  # the held-out split's images, model-input space
    text: Tensor  # its caption features
    caption_image: Tensor  # the image of each caption
    temperature: float

    def fresh(self, seed: int) -> nn.Module:
        model, names = self.build(seed)
        select_trained(model, names)
        return model.to(self.images.device)

    def loss(self, model: nn.Module, views: Tensor, text: Tensor) -> Tensor:
        return infonce_loss(*model(views, text), self.temperature)

    def score(self, model: nn.Module) -> dict[str, float]:
        return retrieval_recalls(model, self.images, self.text, self.caption_image)
