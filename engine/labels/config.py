"""The ``labels`` section: label-space lightening (HeLlO) against a soft-label store and hard labels."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from engine.config import Section
from engine.labels.hello import ProjectorConfig
from engine.labels.rded import RdedConfig
from engine.labels.student import StudentConfig

IMAGE_SOURCES = ("random", "rded", "distilled")
LABEL_KINDS = ("hard", "soft-stored", "hello")


class LabelsConfig(Section):
    """Students of ``ipc`` images per class, for each image source and each kind of label."""

    ipc: int = Field(10, ge=1, description="Synthetic images per class.")
    images: list[Literal["random", "rded", "distilled"]] = Field(
        default_factory=lambda: ["random", "rded"], description="random: real images; rded: stitched teacher-chosen "
        "patches; distilled: the distilled set of distill.method at this size.")
    kinds: list[Literal["hard", "soft-stored", "hello"]] = Field(
        default_factory=lambda: list(LABEL_KINDS), description="hard: the class labels; soft-stored: the teacher's "
        "logits of every view, stored and replayed; hello: the projector, online.")
    teacher_expert: int = Field(0, ge=0, description="The expert of the trajectory store that teaches.")
    teacher_epoch: int | None = Field(None, ge=1, description="Its epoch that labels the store (None: the last).")
    seed: int = Field(0, ge=0, description="Views, random images and RDED draws.")
    student: StudentConfig = Field(default_factory=StudentConfig)
    rded: RdedConfig = Field(default_factory=RdedConfig)
    projector: ProjectorConfig = Field(default_factory=ProjectorConfig)
    encoder: dict[str, Any] = Field(
        default_factory=dict, description="The dual encoder the projector starts from: dotted keys that turn this "
        "config into one whose experts train it contrastively (data, model, experts, ...), run in "
        "<run_dir>/labels/encoder; expert 0's last epoch is the encoder.")

    @field_validator("images", "kinds")
    @classmethod
    def _not_empty(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise ValueError("must list each choice once, at least one")
        return value
