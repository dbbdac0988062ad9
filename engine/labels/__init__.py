"""Label sources: what a network trained on an evaluated set learns each augmented view's label from.

``stored``: the labels stored with the set (class indices; a distilled set's learned soft-label logits).
The label-space experiment (``distill labels``) trains its students on stored views instead: its kinds
of labels (hard, a soft-label store replayed, HeLlO's projector online) are the ``VIEW_LABELS`` table of
``engine.stages.labels``, over one student loop (``engine.labels.student``).
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from engine.losses import classification_loss


class LabelSource(Protocol):
    def targets(self, views: Tensor, stored: Tensor) -> Tensor:
        """The training targets of a batch of augmented ``views`` whose stored labels are ``stored``."""
        ...

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor: ...


class StoredLabels:
    """The labels stored with the set, whatever the augmentation did to the view."""

    def targets(self, views: Tensor, stored: Tensor) -> Tensor:
        return stored

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return classification_loss(logits, targets)


LABEL_SOURCES: dict[str, type[LabelSource]] = {"stored": StoredLabels}

__all__ = ["LABEL_SOURCES", "LabelSource", "StoredLabels"]
