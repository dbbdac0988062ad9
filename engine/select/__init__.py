"""Choosing real samples: coreset baselines by name (``CORESETS``); data selection for distillation
(BiLP) joins as ``SELECTORS``.

A coreset picks ``k`` samples per group (class; one group of everything for image-text pairs) from a
``CoresetInputs``, whose features (an expert's embeddings) and forgetting counts are computed only by
the methods that use them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.select import coresets


@dataclass
class CoresetInputs:
    num: int  # samples to choose from
    groups: Tensor | None  # (num,) class of each sample, or None: one group
    features: Callable[[], Tensor]  # (num, D), computed on first use
    counts: Callable[[], Tensor]  # (num,) forgetting events, computed on first use


def random(k: int, inputs: CoresetInputs, generator: torch.Generator) -> Tensor:
    return coresets.random_coreset(inputs.num, k, inputs.groups, generator)


def herding(k: int, inputs: CoresetInputs, generator: torch.Generator) -> Tensor:
    return coresets.herding(inputs.features(), k, inputs.groups)


def kcenter(k: int, inputs: CoresetInputs, generator: torch.Generator) -> Tensor:
    return coresets.kcenter(inputs.features(), k, inputs.groups)


def forgetting(k: int, inputs: CoresetInputs, generator: torch.Generator) -> Tensor:
    return coresets.forgetting(inputs.counts(), k, inputs.groups, generator)


CORESETS: dict[str, Callable[[int, CoresetInputs, torch.Generator], Tensor]] = {
    "random": random,
    "herding": herding,
    "kcenter": kcenter,
    "forgetting": forgetting,
}

# Coresets that look at an expert's embeddings: evaluating them needs a trajectory store.
NEEDS_EXPERT = frozenset({"herding", "kcenter"})

__all__ = ["CORESETS", "NEEDS_EXPERT", "CoresetInputs"]
