"""BiLP (Xu et al., ECCV 2024, "Distill Gold from Massive Ores"): which real samples distillation uses.

Level 1, static (before distillation; ``engine.stages.select``): K short scoring runs on the training
split record every sample's loss; a sample's score is its mean loss over the runs at one epoch (early
training or converged); within each class the ``keep_ratio`` lowest-loss samples are kept
(``keep_lowest``); image-text pairs are scored by their InfoNCE loss and grouped by k-means clusters of
image embeddings (``kmeans``). The result is a subset of sample keys that every later stage reads.

Level 2, dynamic (during distribution matching; ``engine.distill.dm``): the causal effect of a real
sample is the change of the synthetic set's meta-gradient when the sample is removed from its class
batch. Samples with the smallest effects contribute nothing and those with the largest are outliers, so
``CausalPruner`` keeps the middle band: every ``refresh`` iterations it scores the samples of the class
batch it has not judged yet, adds their effect norms to a running mean and variance of that class
(Welford), and drops for the rest of the run those outside mean ± z·std, z being the Gaussian quantile
that keeps a fraction ``beta``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from engine.config import Section
from engine.storage import PathOrURL

SELECTORS = ("none", "loss", "random")


class SelectionConfig(Section):
    """BiLP level 1: which training samples every later stage (experts, distillation, coresets) uses."""

    method: Literal["none", "loss", "random"] = Field(
        "none", description="loss: keep the lowest-loss samples of each class (scored by short training runs); "
        "random: a seeded random subset of each class of the same size; none: the whole split.")
    keep_ratio: float = Field(1.0, gt=0, le=1, description="Fraction of each class kept.")
    scoring_runs: int = Field(3, ge=1, le=64, description="loss: runs trained (side by side on Ray) to score.")
    scoring_epochs: int = Field(5, ge=1, description="loss: epochs of each scoring run (the experts' recipe).")
    score_at: Literal["init", "converged"] | int = Field(
        "converged", description="loss: the epoch whose per-sample loss is the score: init = after the first "
        "epoch (early training), converged = after the last, or an epoch number (0: the untrained network).")
    clusters: int = Field(10, ge=1, description="loss on image-text pairs: k-means clusters of the scoring runs' "
                          "image embeddings stand in for classes (the keep ratio applies within each).")
    dir: PathOrURL | None = Field(None, description="Scores and subsets; default <run_dir>/select (pipeline "
                                  "variants share their base's).")
    seed: int = Field(0, ge=0, description="Scoring runs' seeds and the random selector's draw.")

    @model_validator(mode="after")
    def _epoch(self) -> SelectionConfig:
        if isinstance(self.score_at, int) and not 0 <= self.score_at <= self.scoring_epochs:
            raise ValueError(f"selection.score_at {self.score_at} is not an epoch of the scoring runs "
                             f"(0 .. scoring_epochs {self.scoring_epochs})")
        return self

    @property
    def active(self) -> bool:
        return self.method != "none"

    @property
    def score_epoch(self) -> int:
        if self.score_at == "init":
            return 1
        return self.scoring_epochs if self.score_at == "converged" else int(self.score_at)


def keep_lowest(scores: Tensor, groups: Tensor, keep_ratio: float, minimum: int = 1) -> Tensor:
    """(kept,) indices: within each group, the ``keep_ratio`` lowest-scoring members (at least ``minimum``,
    rounded up), in index order. Ties go to the lower index, so the choice is deterministic."""
    kept = []
    for g in groups.unique().tolist():
        members = (groups == g).nonzero().flatten()
        k = min(len(members), max(minimum, math.ceil(keep_ratio * len(members))))
        order = torch.sort(scores[members], stable=True).indices
        kept.append(members[order[:k]])
    return torch.sort(torch.cat(kept)).values if kept else torch.empty(0, dtype=torch.long)


def kmeans(features: Tensor, k: int, generator: torch.Generator, iterations: int = 50) -> Tensor:
    """(N,) cluster of each row of ``features`` (N, D): Lloyd's iterations from a k-means++ start, seeded;
    stops when no assignment changes."""
    x = features.double()
    centres = x[torch.randint(len(x), (1,), generator=generator)]
    while len(centres) < k:  # k-means++: the next centre drawn in proportion to the squared distance
        d2 = torch.cdist(x, centres).min(1).values ** 2
        pick = torch.multinomial(d2 / d2.sum() if d2.sum() > 0 else torch.ones_like(d2), 1, generator=generator)
        centres = torch.cat([centres, x[pick]])
    assignment = torch.cdist(x, centres).argmin(1)
    for _ in range(iterations):
        for c in range(k):
            if (members := assignment == c).any():
                centres[c] = x[members].mean(0)
        updated = torch.cdist(x, centres).argmin(1)
        if torch.equal(updated, assignment):
            break
        assignment = updated
    return assignment


@dataclass
class RunningMoments:
    """Welford's running mean and variance."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, values: Tensor) -> None:
        for value in values.double().tolist():
            self.count += 1
            delta = value - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (value - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 0.0


@dataclass
class CausalPruner:
    """Keeps the middle band of causal-effect norms, class by class (module docstring). Each sample is judged
    once, the first time it is scored; a dropped sample is never drawn again, a kept one stays kept, so about
    a fraction ``beta`` of the samples scored is kept however many refreshes the run has."""

    beta: float
    refresh: int
    moments: dict[int, RunningMoments] = field(default_factory=dict)
    judged: set[str] = field(default_factory=set)
    dropped: set[str] = field(default_factory=set)  # the samplers skip these keys
    seconds: float = 0.0  # time spent computing effects and deciding

    def due(self, iteration: int) -> bool:
        return iteration % self.refresh == 0

    def unjudged(self, keys: list[str]) -> list[int]:
        """Positions in a batch of the samples not judged yet (the only ones worth scoring)."""
        return [i for i, key in enumerate(keys) if key not in self.judged]

    def band(self, c: int) -> tuple[float, float]:
        moments = self.moments[c]
        z = NormalDist().inv_cdf(0.5 + self.beta / 2) if self.beta < 1 else math.inf
        return moments.mean - z * moments.std, moments.mean + z * moments.std

    def judge(self, c: int, norms: Tensor, keys: list[str], seconds: float = 0.0) -> Tensor:
        """(n,) bool: which of these samples of class ``c`` (not judged before) stay, given their effect norms;
        the others are dropped from now on. The norms enter the class's running moments first."""
        self.moments.setdefault(c, RunningMoments()).add(norms)
        low, high = self.band(c)
        keep = (norms >= low) & (norms <= high)
        if self.moments[c].count < 3:  # no spread to judge by yet
            keep = torch.ones_like(keep)
        self.judged.update(keys)
        self.dropped.update(k for k, kept in zip(keys, keep.tolist(), strict=True) if not kept)
        self.seconds += seconds
        return keep

    def summary(self, num_samples: int) -> dict[str, Any]:
        return {"beta": self.beta, "refresh": self.refresh, "samples": num_samples, "judged": len(self.judged),
                "dropped": len(self.dropped), "kept": num_samples - len(self.dropped),
                "seconds": round(self.seconds, 2)}

    def state(self) -> dict[str, Any]:
        return {"moments": {str(c): [m.count, m.mean, m.m2] for c, m in self.moments.items()},
                "judged": sorted(self.judged), "dropped": sorted(self.dropped), "seconds": self.seconds}

    def load_state(self, state: dict[str, Any]) -> None:
        self.moments = {int(c): RunningMoments(*values) for c, values in state["moments"].items()}
        self.judged, self.seconds = set(state["judged"]), float(state["seconds"])
        self.dropped.clear()
        self.dropped.update(state["dropped"])  # the same set object the samplers hold
