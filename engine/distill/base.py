"""What every distillation method shares: its config's common keys, the data it starts from, and the
interface the outer loop (``engine.distill.loop``) drives.

A method is one file (``mtt.py``, ``vl.py``, ...) with a ``Config`` (its own ``distill`` section,
``method: <name>``) and a class implementing ``DistillMethod``; ``engine.distill.METHODS`` registers
it. The loop owns everything else: outer SGD with momentum per learnable tensor, EMA, divergence
checks, checkpoint/resume, snapshots, the all-reduce across data-parallel workers and progress.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import torch
from pydantic import Field
from torch import Tensor, nn

from engine.config import Section
from engine.data.augment import DEFAULT_STRATEGY, DSAStrategy
from engine.data.stream import StreamedImages
from engine.distill.synthetic import SyntheticSet
from engine.errors import DataError


class CommonDistillConfig(Section):
    """The keys of every method's ``distill`` section."""

    method: str = Field(description="The method: a name in engine.distill.METHODS.")
    ipc: int = Field(1, ge=1, description="Images per class (classification); pairs = ipc for image-text data.")
    iterations: int = Field(1000, ge=1, description="Outer iterations (updates of the synthetic set).")
    init: Literal["real", "noise"] = Field("real", description="Initialise from random real samples or noise.")
    lr_img: float = Field(1000.0, gt=0, description="Outer SGD lr of the synthetic images.")
    momentum: float = Field(0.5, ge=0, lt=1, description="Outer SGD momentum.")
    dsa: bool = Field(True, description="Differentiable augmentation (one draw per batch; per clip for video).")
    dsa_strategy: DSAStrategy = Field(DEFAULT_STRATEGY)
    ema_decay: float | None = Field(None, gt=0, lt=1, description="Keep an EMA of the images; output the EMA.")
    checkpoint_every: int = Field(100, ge=1, description="Write the synthetic set to run_dir every K iterations.")
    snapshot_every: int | None = Field(
        None, ge=1, description="Keep the set every K iterations (snapshots/): evaluation then also reports the "
        "snapshot that scores best on the validation split, as MTT reports the best of its evaluations.")
    max_loss: float = Field(1e3, gt=0, description="A loss above this (or not finite) stops the run.")
    skip_loss_above: float | None = Field(
        None, gt=0, description="An iteration whose loss is above this updates nothing (DATM's threshold, 1.0 in "
        "its configs); None: every iteration updates.")
    seed: int = 0


@dataclass(frozen=True)
class OuterSGD:
    """How the outer loop updates one learnable tensor of the synthetic set."""

    lr: float
    momentum: float


@dataclass
class Gradients:
    """What one worker computed in one iteration: sums over its ``count`` units (segments, classes...),
    all-reduced across workers and divided by the total count by the loop."""

    loss_sum: Tensor  # () float64
    grad_sums: dict[str, Tensor]  # learnable tensor name -> summed gradient
    count: int


@dataclass
class TrainData:
    """What a method initialises its synthetic set from: the training split in model-input space, as
    tensors (small data, tests) or streamed (``StreamedImages``: only what a method indexes is fetched)."""

    images: Tensor | StreamedImages  # (N, C, H, W) or clips (N, T, C, H, W)
    labels: Tensor  # (N,) class indices in the same order; -1 for image-text data
    class_names: list[str]
    caption_features: Tensor | None = None  # (Ncap, D) image-text data: every training caption's feature
    caption_image: Tensor | None = None  # (Ncap,) the image of each caption
    captions: list[str] = field(default_factory=list)  # the training captions, flat (display only)
    keys: list[str] | None = None  # sample keys in the same order (None: positions)
    shuffle_buffer: int = 10_000  # methods that read the stream again (DM's real batches): its shuffle window

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class MethodSetup:
    """Everything a method is built from, resolved by the distill stage."""

    model: nn.Module  # the experts' architecture, with their frozen parameters
    names: list[str]  # the parameters trained and recorded by the experts
    device: torch.device
    store: Any = None  # the trajectory store (methods with needs_trajectories)
    step_size: float = 0.01  # the initial student step size (lr_teacher or the experts' lr)
    temperature: float = 0.07  # the experts' InfoNCE temperature (contrastive models)
    fresh_model: Callable[[int], nn.Module] | None = None  # seed -> a freshly initialised network (DM)


class DistillMethod(Protocol):
    """All a new distillation method implements (plus its ``Config`` and a line in ``METHODS``)."""

    Config: ClassVar[type[CommonDistillConfig]]
    objective: ClassVar[str]  # the experts' training objective the method works with
    needs_trajectories: ClassVar[bool]  # False: the pipeline runs no buffer stage for it

    def init(self, data: TrainData, generator: torch.Generator) -> SyntheticSet:
        """The synthetic set before the first iteration."""
        ...

    def optimizer(self) -> dict[str, OuterSGD]:
        """Outer SGD settings per learnable tensor name (``SyntheticSet.learnable``)."""
        ...

    def gradients(self, synthetic: SyntheticSet, iteration: int, rank: int, world_size: int) -> Gradients:
        """Loss and gradient sums of this worker's share of ``iteration``."""
        ...

    def after_update(self, synthetic: SyntheticSet) -> None:
        """Keep the set valid after an update (e.g. step sizes ≥ 0)."""
        ...

    def describe(self, synthetic: SyntheticSet, data: TrainData) -> tuple[dict[str, Any], list[str] | None]:
        """Extra manifest entries and, for image-text sets, the caption shown beside each image."""
        ...


def class_indices(labels: Tensor, ipc: int, generator: torch.Generator, num_classes: int) -> Tensor:
    """``ipc`` random indices of each class, class after class (the synthetic set's layout)."""
    chosen = []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        if len(members) < ipc:
            raise DataError(f"class {c} has {len(members)} training samples, fewer than ipc {ipc}")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:ipc]])
    return torch.cat(chosen)


def init_synthetic(images: Tensor | StreamedImages, labels: Tensor, num_classes: int, ipc: int,
                   init: Literal["real", "noise"], generator: torch.Generator,
                   step_size: float | None = None) -> SyntheticSet:
    """Images from ``ipc`` random real samples per class (or unit noise), hard labels, one learnable step
    size α = ``step_size`` (None: a method without one). ``images`` may be the split streamed: only the
    chosen samples are fetched, the same ones."""
    index = class_indices(labels, ipc, generator, num_classes)
    if init == "real":
        syn_images = images[index].clone()
    else:
        syn_images = torch.randn((len(index), *images.shape[1:]), generator=generator).to(labels.device)
    syn_labels = torch.arange(num_classes, device=labels.device).repeat_interleave(ipc)
    alphas = torch.tensor([] if step_size is None else [step_size], dtype=syn_images.dtype, device=syn_images.device)
    return SyntheticSet(syn_images, alphas, syn_labels)
