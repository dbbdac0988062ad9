"""Matching Training Trajectories (Cazenavette et al. 2022) for classification, with DATM's soft labels.

    synthetic images x (ipc per class, from real samples or noise), labels y (hard, or soft logits),
    one learnable step size α (initialised to the experts' lr)
    inner step i:  θ̂_{i+1} = θ̂_i − α ∇_θ CE(f_θ̂_i(A_i(x[b_i])), y[b_i])
    loss and its gradient: ``engine.distill.matching`` (unrolled or exact), outer loop: ``loop``

The student is the expert's architecture run functionally on a flat vector of the recorded
parameters, so any parameters the experts did not record keep the values of the model passed in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from engine.data.stream import StreamedImages
from engine.distill.base import OuterSGD, TrainData, init_synthetic
from engine.distill.matching import TrajectoryMatching, TrajectoryMatchingConfig
from engine.distill.synthetic import SyntheticSet
from engine.errors import DataError
from engine.losses import classification_loss
from engine.models.functional import FunctionalModel
from engine.optim import seeded_global_rng

logger = logging.getLogger(__name__)


class Config(TrajectoryMatchingConfig):
    method: Literal["mtt"] = "mtt"
    labels: Literal["hard", "soft", "soft_first_expert"] = Field(
        "hard", description="soft: DATM's learnable soft labels (real images the experts classify correctly, "
        "labels = the mean final-epoch logits of the experts that do); soft_first_expert: logits of the first "
        "expert at the start window's end on random real images.")
    lr_label: float = Field(2.0, gt=0, description="Outer SGD lr of soft labels.")
    label_momentum: float = Field(0.9, ge=0, lt=1, description="Outer SGD momentum of soft labels (DATM: 0.9).")


class MTT(TrajectoryMatching):
    Config = Config
    objective: ClassVar[str] = "classification"
    config: Config

    def __init__(self, config: Config, setup):
        super().__init__(config, setup)
        self.groups = torch.zeros(self.student.num_parameters, dtype=torch.long, device=setup.device)  # one α

    def loss(self, student: FunctionalModel, theta: Tensor, x: Tensor, labels: Tensor) -> Tensor:
        return classification_loss(student(theta, x), labels)

    def targets(self, synthetic: SyntheticSet) -> Tensor:
        return synthetic.labels

    def optimizer(self) -> dict[str, OuterSGD]:
        return super().optimizer() | {"labels": OuterSGD(self.config.lr_label, self.config.label_momentum)}

    def init(self, data: TrainData, generator: torch.Generator) -> SyntheticSet:
        config, step_size = self.config, self.setup.step_size
        if config.labels == "soft":
            return datm_init(data.images, data.labels, data.num_classes, config, step_size, generator, self.student,
                             self.segments.finals())
        synthetic = init_synthetic(data.images, data.labels, data.num_classes, config.ipc, config.init, generator,
                                   step_size)
        if config.labels == "soft_first_expert":
            expert = self.segments.flat(self.segments.experts[0],
                                        min(config.max_start_epoch, self.segments.store.num_epochs))
            synthetic.labels = soft_labels_from_expert(synthetic, self.student, expert)
        return synthetic


@torch.no_grad()
def soft_labels_from_expert(synthetic: SyntheticSet, student: FunctionalModel, theta: Tensor) -> Tensor:
    """``labels: soft_first_expert``: learnable label logits initialised to one expert's logits on the
    initial images."""
    return logits_of(student, theta, synthetic.images)


@torch.no_grad()
def logits_of(student: FunctionalModel, theta: Tensor, images: Tensor, batch: int = 256) -> Tensor:
    """(N, K) logits of the student at ``theta``, in batches, with a fixed dropout draw."""
    with seeded_global_rng(0, images.device):
        return torch.cat([student(theta, x) for x in images.split(batch)]).detach()


def datm_init(images: Tensor | StreamedImages, labels: Tensor, num_classes: int, config: Config, step_size: float,
              generator: torch.Generator, student: FunctionalModel, finals: list[Tensor]) -> SyntheticSet:
    """DATM (Guo et al. 2024), ``labels: soft``: with ``init: real``, ``ipc`` real images per class that the
    first expert at its final epoch classifies correctly (then the next expert, and so on, if a class runs
    short); learnable label logits = per image, the mean final-epoch logits of the experts that classify
    it correctly (of all experts if none does). ``finals``: every expert's final parameters. ``images``:
    the training split in model-input space, as tensors or streamed (one pass per expert consulted)."""
    if config.init == "real":
        predictions: dict[int, Tensor] = {}

        def predicted(expert: int) -> Tensor:  # (N,) classes the expert gives every training image
            if expert not in predictions:
                predictions[expert] = predict_all(student, finals[expert], images).to(labels.device)
            return predictions[expert]

        index = torch.cat([_correct_members(labels, c, config.ipc, generator, predicted, len(finals))
                           for c in range(num_classes)])
        syn_images = images[index].clone()
    else:
        syn_images = torch.randn((num_classes * config.ipc, *images.shape[1:]), generator=generator).to(labels.device)
    syn_labels = torch.arange(num_classes, device=labels.device).repeat_interleave(config.ipc)
    logits = torch.stack([logits_of(student, theta, syn_images) for theta in finals])  # (E, M, K)
    correct = (logits.argmax(2) == syn_labels).to(logits.dtype).unsqueeze(2)  # (E, M, 1)
    counts = correct.sum(0)
    averaged = torch.where(counts > 0, (logits * correct).sum(0) / counts.clamp(min=1), logits.mean(0))
    alphas = torch.tensor([step_size], dtype=syn_images.dtype, device=syn_images.device)
    return SyntheticSet(syn_images, alphas, averaged.clone())


@torch.no_grad()
def predict_all(student: FunctionalModel, theta: Tensor, images: Tensor | StreamedImages) -> Tensor:
    """(N,) the class the student at ``theta`` gives every image, batch after batch."""
    batches = images.batches() if isinstance(images, StreamedImages) else images.split(256)
    return torch.cat([logits_of(student, theta, x).argmax(1) for x in batches])


def _correct_members(labels: Tensor, c: int, ipc: int, generator: torch.Generator,
                     predicted: Callable[[int], Tensor], num_experts: int) -> Tensor:
    members = (labels == c).nonzero().flatten()
    if len(members) < ipc:
        raise DataError(f"class {c} has {len(members)} training samples, fewer than ipc {ipc}")
    members = members[torch.randperm(len(members), generator=generator).to(members.device)]
    chosen: list[int] = []
    for expert in range(num_experts):
        remaining = members[~torch.isin(members, torch.tensor(chosen, dtype=members.dtype, device=members.device))]
        right = predicted(expert)[remaining] == c
        chosen += remaining[right][: ipc - len(chosen)].tolist()
        if len(chosen) == ipc:
            return torch.tensor(chosen, device=members.device)
    logger.warning("class %d: only %d of its samples are classified correctly by an expert; %d more are taken "
                   "as they come", c, len(chosen), ipc - len(chosen))
    rest = [i for i in members.tolist() if i not in set(chosen)]
    return torch.tensor(chosen + rest[: ipc - len(chosen)], device=members.device)
