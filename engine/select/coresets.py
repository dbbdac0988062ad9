"""Coreset baselines: pick ``ipc`` real samples per class (or ``size`` pairs, with ``groups`` = None).

    random      a seeded uniform choice per class
    herding     greedy: each pick brings the mean of the chosen features closest to the class mean
                (Welling 2009, as in the DC/MTT baselines)
    kcenter     greedy farthest-first traversal from the sample nearest the class mean (Sener & Savarese)
    forgetting  the samples forgotten most often (correct, then wrong) during a training run (Toneva et al.);
                ties broken at random

Features come from the caller: an expert's penultimate layer, a joint image-text embedding, pixels.
Every function returns indices into the given set, class after class.
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.errors import DataError


def _members(groups: Tensor | None, num: int) -> list[Tensor]:
    """Indices of each group (class), or one group of everything."""
    if groups is None:
        return [torch.arange(num)]
    return [(groups == g).nonzero().flatten() for g in groups.unique(sorted=True).tolist()]


def _check(members: Tensor, k: int, group: int) -> None:
    if len(members) < k:
        raise DataError(f"class {group} has {len(members)} samples, fewer than the {k} a coreset needs")


def random_coreset(num: int, k: int, groups: Tensor | None, generator: torch.Generator) -> Tensor:
    chosen = []
    for g, members in enumerate(_members(groups, num)):
        _check(members, k, g)
        chosen.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return torch.cat(chosen)


def herding(features: Tensor, k: int, groups: Tensor | None) -> Tensor:
    chosen = []
    for g, members in enumerate(_members(groups, len(features))):
        _check(members, k, g)
        x = features[members].double()
        mean, total, picked = x.mean(0), torch.zeros_like(x[0]), []
        available = torch.ones(len(x), dtype=torch.bool)
        for step in range(1, k + 1):
            # distance between the class mean and the mean of the picks with each candidate added
            distance = ((total + x) / step - mean).norm(dim=1)
            distance[~available] = float("inf")
            best = int(distance.argmin())
            picked.append(best)
            available[best] = False
            total += x[best]
        chosen.append(members[torch.tensor(picked)])
    return torch.cat(chosen)


def kcenter(features: Tensor, k: int, groups: Tensor | None) -> Tensor:
    chosen = []
    for g, members in enumerate(_members(groups, len(features))):
        _check(members, k, g)
        x = features[members].double()
        first = int((x - x.mean(0)).norm(dim=1).argmin())
        picked = [first]
        nearest = (x - x[first]).norm(dim=1)  # distance of each sample to its nearest pick
        for _ in range(k - 1):
            far = int(nearest.argmax())
            picked.append(far)
            nearest = torch.minimum(nearest, (x - x[far]).norm(dim=1))
        chosen.append(members[torch.tensor(picked)])
    return torch.cat(chosen)


def forgetting(counts: Tensor, k: int, groups: Tensor | None, generator: torch.Generator) -> Tensor:
    chosen = []
    for g, members in enumerate(_members(groups, len(counts))):
        _check(members, k, g)
        shuffled = members[torch.randperm(len(members), generator=generator)]  # random order breaks ties
        order = counts[shuffled].argsort(descending=True, stable=True)
        chosen.append(shuffled[order[:k]])
    return torch.cat(chosen)


def forgetting_events(correct_per_epoch: list[Tensor]) -> Tensor:
    """Per sample: how many times it went from correct at one epoch to wrong at the next."""
    history = torch.stack(correct_per_epoch)  # (epochs, N) bool
    return (history[:-1] & ~history[1:]).sum(0)
