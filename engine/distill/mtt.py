"""Matching Training Trajectories (Cazenavette et al. 2022) for classification, with DATM's soft labels.

    synthetic images x (ipc per class, from real samples or noise), labels y (hard, or soft logits),
    one learnable step size α (initialised to the experts' lr)
    inner step i:  θ̂_{i+1} = θ̂_i − α ∇_θ CE(f_θ̂_i(A_i(x[b_i])), y[b_i])
    loss and its gradient: ``engine.distill.matching`` (unrolled or exact), outer loop: ``loop``

The student is the expert's architecture run functionally on a flat parameter vector, so any
parameters the experts did not record keep the values of the model passed in.
"""

from __future__ import annotations

import logging
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
from engine.models.params import parameter_shapes, train_mode, unflatten
from engine.trajectories.train import seeded_global_rng

logger = logging.getLogger(__name__)


def soft_cross_entropy(logits: Tensor, label_logits: Tensor) -> Tensor:
    """Cross-entropy to the distribution softmax(label_logits), averaged over the batch."""
    return -(F.softmax(label_logits, dim=1) * F.log_softmax(logits, dim=1)).sum(1).mean()


def classification_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Hard labels (int64) or soft label logits (float)."""
    return soft_cross_entropy(logits, targets) if targets.is_floating_point() else F.cross_entropy(logits, targets)


class FunctionalModel:
    """A module run on a flat vector of (some of) its parameters: ``model(theta, x)``, in the mode the
    experts trained it in (``train_mode``: frozen parts in eval mode)."""

    def __init__(self, module: nn.Module, names: list[str]):
        self.module = train_mode(module, names)
        self.shapes = parameter_shapes(module, names)
        self.buffers = dict(module.named_buffers())

    @property
    def num_parameters(self) -> int:
        return sum(shape.numel() for shape in self.shapes.values())

    def __call__(self, theta: Tensor, *inputs: Tensor):
        return functional_call(self.module, {**self.buffers, **unflatten(theta, self.shapes)}, inputs)


def step_rng_seeds(steps: int, generator: torch.Generator) -> list[int]:
    """One seed per inner step for the random layers of the student (dropout, LoRA dropout): the
    backward pass of the exact gradient replays each step's forward with the same masks."""
    return torch.randint(2**62, (steps,), generator=generator).tolist()


@dataclass
class ClassificationProblem:
    """ℓ_i(θ) = CE(f_θ(A_i(x[b_i])), y[b_i]) with the mini-batches, DSA draws and dropout seeds fixed up front."""

    student: FunctionalModel
    images: Tensor
    labels: Tensor
    batches: list[Tensor]
    dsa: DSA | None
    draws: list[DSADraw] | None
    rng_seeds: list[int]

    def step_loss(self, theta: Tensor, step: int) -> Tensor:
        index = self.batches[step]
        x = self.images[index]
        if self.dsa is not None:
            x = self.dsa.apply(x, self.draws[step])
        with seeded_global_rng(self.rng_seeds[step], theta.device):
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
        return ClassificationProblem(self.student, synthetic.images, synthetic.labels, batches, self.dsa, draws,
                                     step_rng_seeds(len(batches), generator))


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
    """``labels: soft_first_expert``: learnable label logits initialised to one expert's logits on the
    initial images."""
    return logits_of(student, theta, synthetic.images)


@torch.no_grad()
def logits_of(student: FunctionalModel, theta: Tensor, images: Tensor, batch: int = 256) -> Tensor:
    """(N, K) logits of the student at ``theta``, in batches, with a fixed dropout draw."""
    with seeded_global_rng(0, images.device):
        return torch.cat([student(theta, x) for x in images.split(batch)]).detach()


def datm_init(images: Tensor, labels: Tensor, num_classes: int, config: DistillConfig, step_size: float,
              generator: torch.Generator, student: FunctionalModel, finals: list[Tensor]) -> SyntheticSet:
    """DATM (Guo et al. 2024), ``labels: soft``: with ``init: real``, ``ipc`` real images per class that the
    first expert at its final epoch classifies correctly (then the next expert, and so on, if a class runs
    short); learnable label logits = per image, the mean final-epoch logits of the experts that classify
    it correctly (of all experts if none does). ``finals``: every expert's final parameters."""
    if config.init == "real":
        index = torch.cat([_correct_members(images, labels, c, config.ipc, generator, student, finals)
                           for c in range(num_classes)])
        syn_images = images[index].clone()
    else:
        syn_images = torch.randn((num_classes * config.ipc, *images.shape[1:]), generator=generator).to(images)
    syn_labels = torch.arange(num_classes, device=labels.device).repeat_interleave(config.ipc)
    logits = torch.stack([logits_of(student, theta, syn_images) for theta in finals])  # (E, M, K)
    correct = (logits.argmax(2) == syn_labels).to(logits.dtype).unsqueeze(2)  # (E, M, 1)
    counts = correct.sum(0)
    averaged = torch.where(counts > 0, (logits * correct).sum(0) / counts.clamp(min=1), logits.mean(0))
    alphas = torch.tensor([step_size], dtype=images.dtype, device=images.device)
    return SyntheticSet(syn_images, alphas, averaged.clone())


def _correct_members(images: Tensor, labels: Tensor, c: int, ipc: int, generator: torch.Generator,
                     student: FunctionalModel, finals: list[Tensor]) -> Tensor:
    members = (labels == c).nonzero().flatten()
    if len(members) < ipc:
        raise DataError(f"class {c} has {len(members)} training samples, fewer than ipc {ipc}")
    members = members[torch.randperm(len(members), generator=generator).to(members.device)]
    chosen: list[int] = []
    for theta in finals:
        remaining = members[~torch.isin(members, torch.tensor(chosen, dtype=members.dtype, device=members.device))]
        right = logits_of(student, theta, images[remaining]).argmax(1) == c
        chosen += remaining[right][: ipc - len(chosen)].tolist()
        if len(chosen) == ipc:
            return torch.tensor(chosen, device=members.device)
    logger.warning("class %d: only %d of its samples are classified correctly by an expert; %d more are taken "
                   "as they come", c, len(chosen), ipc - len(chosen))
    rest = [i for i in members.tolist() if i not in set(chosen)]
    return torch.tensor(chosen + rest[: ipc - len(chosen)], device=members.device)
