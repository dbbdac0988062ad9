"""The ``distill`` section of an experiment config: one trajectory-matching run (MTT or vision-language)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from engine.config import Section
from engine.data.augment import DEFAULT_STRATEGY
from engine.distill.matching import GradientMode


class DistillConfig(Section):
    """Defaults follow MTT (CIFAR-10, IPC 10) where the brief gives them; see DESIGN section 2."""

    ipc: int = Field(1, ge=1, description="Images per class (classification); pairs = ipc for image-text data.")
    iterations: int = Field(1000, ge=1, description="Outer iterations (updates of the synthetic set).")
    syn_steps: int = Field(20, ge=1, description="N: student SGD steps on the synthetic data per iteration.")
    expert_epochs: int = Field(2, ge=1, description="M: the target is the expert M epochs after the start.")
    max_start_epoch: int = Field(10, ge=1, description="T+: start epochs are drawn from 0 .. T+ - 1.")
    min_start_epoch: int = Field(0, ge=0, description="Lowest start epoch.")
    start_window: Literal["uniform", "growing"] = Field(
        "uniform", description="growing: the upper bound rises linearly from initial_max_start_epoch to "
        "max_start_epoch over window_iterations (DATM)."
    )
    initial_max_start_epoch: int | None = Field(None, ge=1, description="Growing window: the first upper bound.")
    window_iterations: int | None = Field(None, ge=1, description="Growing window: iterations to reach T+.")
    segments_per_iteration: int = Field(1, ge=1, description="Expert segments whose gradients are averaged.")
    batch_syn: int | None = Field(None, ge=1, description="Synthetic samples per student step (None: all).")
    gradient: GradientMode = Field("exact", description="exact (constant memory) or unrolled (autograd).")
    exact_stride: int | None = Field(
        None, ge=1, description="exact: keep every k-th parameter vector, recompute the rest (None: ceil(sqrt(N)); "
        "1: keep all, fastest)."
    )
    init: Literal["real", "noise"] = Field("real", description="Initialise from random real samples or noise.")
    labels: Literal["hard", "soft", "soft_first_expert"] = Field(
        "hard", description="soft: DATM's learnable soft labels (real images the experts classify correctly, "
        "labels = the mean final-epoch logits of the experts that do); soft_first_expert: logits of the first "
        "expert at the start window's end on random real images.")
    lr_img: float = Field(1000.0, gt=0, description="Outer SGD lr of the synthetic images (and text vectors).")
    lr_text: float | None = Field(None, gt=0, description="Image-text: lr of the text vectors (default lr_img).")
    lr_lr: float = Field(1e-5, ge=0, description="Outer SGD lr of the learnable step sizes.")
    lr_label: float = Field(2.0, gt=0, description="Outer SGD lr of soft labels.")
    lr_teacher: float | None = Field(None, gt=0, description="Initial student step size (default: the experts' lr).")
    momentum: float = Field(0.5, ge=0, lt=1, description="Outer SGD momentum.")
    label_momentum: float = Field(0.9, ge=0, lt=1, description="Outer SGD momentum of soft labels (DATM: 0.9).")
    skip_loss_above: float | None = Field(
        None, gt=0, description="An iteration whose matching loss is above this updates nothing (DATM's "
        "threshold, 1.0 in its configs); None: every iteration updates.")
    dsa: bool = Field(True, description="Differentiable augmentation in the inner loop.")
    dsa_strategy: str = Field(DEFAULT_STRATEGY)
    ema_decay: float | None = Field(None, gt=0, lt=1, description="Keep an EMA of the images; output the EMA.")
    checkpoint_every: int = Field(100, ge=1, description="Write the synthetic set to run_dir every K iterations.")
    snapshot_every: int | None = Field(
        None, ge=1, description="Keep the set every K iterations (snapshots/): evaluation then also reports the "
        "snapshot that scores best on the validation split, as MTT reports the best of its evaluations.")
    max_loss: float = Field(1e3, gt=0, description="A matching loss above this (or not finite) stops the run.")
    seed: int = 0

    @model_validator(mode="after")
    def _windows(self) -> DistillConfig:
        if self.min_start_epoch >= self.max_start_epoch:
            raise ValueError(f"distill.min_start_epoch ({self.min_start_epoch}) must be below "
                             f"max_start_epoch ({self.max_start_epoch})")
        if self.start_window == "growing" and self.initial_max_start_epoch is None:
            raise ValueError("distill.start_window growing needs distill.initial_max_start_epoch")
        return self

    def start_epoch_bound(self, iteration: int) -> int:
        """The exclusive upper bound of the start epoch at ``iteration`` (0-based)."""
        if self.start_window == "uniform":
            return self.max_start_epoch
        first = min(self.initial_max_start_epoch or self.max_start_epoch, self.max_start_epoch)
        span = self.window_iterations or self.iterations
        grown = first + (self.max_start_epoch - first) * min(1.0, iteration / span)
        return max(self.min_start_epoch + 1, int(grown))
