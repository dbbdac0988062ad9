"""Forgetting counts (Toneva et al. 2019) from one training run with the experts' recipe."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from engine.data.stream import Batches
from engine.select.coresets import forgetting_events
from engine.trajectories.train import ExpertConfig, ExpertData, train_expert

EVAL_BATCH = 1024


def forgetting_counts(model: nn.Module, data: ExpertData | Batches, config: ExpertConfig, recorded: Sequence[str],
                      seed: int, correct: Callable[[nn.Module], Tensor] | None = None) -> Tensor:
    """Train ``model`` like an expert on ``data`` (tensors, or a stream of the split), noting after every
    epoch which samples it gets right (``correct(model)``: (N,) bool; for tensors, classification by
    default); returns (N,) counts of correct -> wrong transitions."""
    judge = correct or (lambda m: classified_correctly(m, data))
    history: list[Tensor] = []

    def note(m: nn.Module) -> dict[str, float]:
        history.append(judge(m).cpu())
        return {}

    train_expert(model, data, config, recorded=recorded, seed=seed, eval_fn=note)
    return forgetting_events(history)


@torch.no_grad()
def classified_correctly(model: nn.Module, data: ExpertData) -> Tensor:
    predictions = torch.cat([model(x).argmax(1) for x in data.images.split(EVAL_BATCH)])
    return predictions == data.targets
