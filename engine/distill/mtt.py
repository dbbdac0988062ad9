"""Matching Training Trajectories (Cazenavette et al. 2022) for classification, with DATM's soft labels.

    synthetic images x (ipc per class, from real samples or noise), labels y (hard, or soft logits),
    one learnable step size α (initialised to the experts' lr)
    inner step i:  θ̂_{i+1} = θ̂_i − α ∇_θ CE(f_θ̂_i(A_i(x[b_i])), y[b_i])
    loss and its gradient: ``engine.distill.matching`` (unrolled or exact), outer loop: ``loop``

The student is the expert's architecture run functionally on a flat parameter vector, so any
parameters the experts did not record keep the values of the model passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from engine.data.augment import DSA, DSADraw
from engine.distill.config import DistillConfig
from engine.distill.loop import minibatch_schedule
from engine.distill.synthetic import SyntheticSet
from engine.errors import DataError
from engine.models.params import parameter_shapes, unflatten


def soft_cross_entropy(logits: Tensor, label_logits: Tensor) -> Tensor:
    """Cross-entropy to the distribution softmax(label_logits), averaged over the batch."""
    return -(F.softmax(label_logits, dim=1) * F.log_softmax(logits, dim=1)).sum(1).mean()


def classification_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Hard labels (int64) or soft label logits (float)."""
    return soft_cross_entropy(logits, targets) if targets.is_floating_point() else F.cross_entropy(logits, targets)


class FunctionalModel:
    """A module run on a flat vector of (some of) its parameters: ``model(theta, x)``."""

    def __init__(self, module: nn.Module, names: list[str]):
        self.module = module
        self.shapes = parameter_shapes(module, names)
        self.buffers = dict(module.named_buffers())

    @property
    def num_parameters(self) -> int:
        return sum(shape.numel() for shape in self.shapes.values())

    def __call__(self, theta: Tensor, *inputs: Tensor):
        return functional_call(self.module, {**self.buffers, **unflatten(theta, self.shapes)}, inputs)


@dataclass
class ClassificationProblem:
    """ℓ_i(θ) = CE(f_θ(A_i(x[b_i])), y[b_i]) with the mini-batches and DSA draws fixed up front."""

    student: FunctionalModel
    images: Tensor
    labels: Tensor
    batches: list[Tensor]
    dsa: DSA | None
    draws: list[DSADraw] | None

    def step_loss(self, theta: Tensor, step: int) -> Tensor:
        index = self.batches[step]
        x = self.images[index]
        if self.dsa is not None:
            x = self.dsa.apply(x, self.draws[step])
        return classification_loss(self.student(theta, x), self.labels[index])


class MTT:
    """The method object the loop asks for each segment's inner problem."""

    def __init__(self, model: nn.Module, names: list[str], config: DistillConfig):
        self.student = FunctionalModel(model, names)
        self.config = config
        self.dsa = DSA(config.dsa_strategy) if config.dsa else None
        device = next(model.parameters()).device
        self.groups = torch.zeros(self.student.num_parameters, dtype=torch.long, device=device)  # one α

    def problem(self, synthetic: SyntheticSet, generator: torch.Generator) -> ClassificationProblem:
        batches = minibatch_schedule(len(synthetic), self.config.batch_syn, self.config.syn_steps, generator)
        shape = synthetic.images.shape[1:]
        draws = [self.dsa.sample((len(b), *shape), generator) for b in batches] if self.dsa else None
        return ClassificationProblem(self.student, synthetic.images, synthetic.labels, batches, self.dsa, draws)


def class_indices(labels: Tensor, ipc: int, generator: torch.Generator, num_classes: int) -> Tensor:
    """``ipc`` random indices of each class, class after class (the synthetic set's layout)."""
    chosen = []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        if len(members) < ipc:
            raise DataError(f"class {c} has {len(members)} training samples, fewer than ipc {ipc}")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:ipc]])
    return torch.cat(chosen)


def init_synthetic(images: Tensor, labels: Tensor, num_classes: int, config: DistillConfig, step_size: float,
                   generator: torch.Generator) -> SyntheticSet:
    """Images from ``ipc`` random real samples per class (or unit noise), hard labels, α = ``step_size``."""
    index = class_indices(labels, config.ipc, generator, num_classes)
    if config.init == "real":
        syn_images = images[index].clone()
    else:
        syn_images = torch.randn((len(index), *images.shape[1:]), generator=generator).to(images)
    syn_labels = torch.arange(num_classes, device=labels.device).repeat_interleave(config.ipc)
    alphas = torch.tensor([step_size], dtype=images.dtype, device=images.device)
    return SyntheticSet(syn_images, alphas, syn_labels)


@torch.no_grad()
def soft_labels_from_expert(synthetic: SyntheticSet, student: FunctionalModel, theta: Tensor) -> Tensor:
    """DATM: learnable label logits initialised to an expert's logits on the initial images."""
    return student(theta, synthetic.images).detach().clone()
