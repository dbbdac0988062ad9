"""Distribution Matching (Zhao & Bilen, WACV 2023), with BiLP's causal-effect pruning of real samples.

    synthetic images S (ipc per class, from real samples or noise), hard labels; no inner loop
    iteration k:
        φ = a freshly initialised network of the experts' architecture without its head (``features``),
            its parameters frozen; the same φ for every class (seeded by (seed, k))
        for each class c (of this worker's share):
            R_c = a batch of real samples of class c (``real.ClassBatches``: from the stream)
            A   = one DSA draw, applied to R_c and to S_c alike (Siamese: S_c takes its leading values)
            L_c = ‖ mean φ(A(R_c)) − mean φ(A(S_c)) ‖²
        L = Σ_c L_c;  S ← SGD with momentum on ∂L/∂S (``loop``; lr 1, momentum 0.5 in DM)

Classes are independent: with W data-parallel workers, worker r takes classes r, r + W, … and the loop
sums the (disjoint) gradients — the same as one process doing every class.

**Causal effect of a real sample (BiLP level 2).** With φ and the draws fixed, write m_r = (1/n) Σ_i φ_i
for the real mean of class c (φ_i = φ(A(x_i))) and m_s(S) = mean φ(A(S_c)). The meta-gradient is

    G = ∂L_c/∂S = 2 J_sᵀ (m_s − m_r),        J_s = ∂m_s/∂S

Removing sample i from the batch turns m_r into m_r⁽⁻ⁱ⁾ = (n m_r − φ_i)/(n − 1), so

    m_r − m_r⁽⁻ⁱ⁾ = (φ_i − m_r)/(n − 1)
    ITE_i = G⁽⁻ⁱ⁾ − G = 2 J_sᵀ (m_r − m_r⁽⁻ⁱ⁾) = (2/(n − 1)) J_sᵀ (φ_i − m_r)

L_c is quadratic in m_r and m_r is linear in the samples, so this first-order effect is exact: it equals
explicit leave-one-out (tested). All n effects are n vector-Jacobian products of the synthetic branch
with the vectors u_i = 2(φ_i − m_r)/(n − 1): one forward and backward of n copies of S_c (n × ipc
images), paid only every ``causal.refresh`` iterations and only for samples not judged before.
``engine.select.bilp.CausalPruner`` keeps the samples whose ‖ITE_i‖ falls in the middle band and drops
both tails for the rest of the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from engine.config import Section
from engine.data.augment import DSA, DSADraw
from engine.data.stream import StreamedImages
from engine.distill.base import (
    CommonDistillConfig,
    Gradients,
    MethodSetup,
    OuterSGD,
    TrainData,
    init_synthetic,
)
from engine.distill.matching import segment_seed
from engine.distill.real import ClassBatches, StreamClassBatches, TensorClassBatches
from engine.distill.synthetic import SyntheticSet
from engine.errors import ConfigError
from engine.select.bilp import CausalPruner

Embed = Callable[[Tensor], Tensor]  # (B, ...) -> (B, D)


class CausalConfig(Section):
    """BiLP's causal-effect selection of the real samples DM compares with (module docstring)."""

    beta: float = Field(0.9, gt=0, le=1, description="Fraction of samples kept: the middle band of the effect "
                        "norms (a Gaussian quantile of their running mean and variance); both tails are dropped.")
    refresh: int = Field(10, ge=1, description="Compute the effects (and drop samples) every R iterations.")


class Config(CommonDistillConfig):
    method: Literal["dm"] = "dm"
    lr_img: float = Field(1.0, gt=0, description="Outer SGD lr of the synthetic images (DM: 1).")
    batch_real: int = Field(256, ge=2, description="Real samples per class per iteration (fewer: the whole class).")
    causal: CausalConfig | None = Field(None, description="BiLP level 2: prune real samples by causal effect.")


def causal_effects(embed: Embed, real_features: Tensor, syn: Tensor, dsa: DSA | None, draw: DSADraw | None,
                   which: list[int] | None = None, max_images: int = 512) -> Tensor:
    """(k, *syn.shape) ITE_i = ∂L_c/∂syn without sample i minus with it, for the real samples ``which`` of the
    batch (default: all), in closed form (module docstring). ``real_features``: (n, D) φ(A(real)) of the batch.

    The k vector-Jacobian products J_sᵀ u_i are one backward pass through k copies of the synthetic images
    (a batch of k × ipc, in chunks of at most ``max_images``): twice as fast as ``vmap`` over the products."""
    n, m = len(real_features), len(syn)
    chosen = real_features if which is None else real_features[which]
    u = 2 * (chosen - real_features.mean(0)) / (n - 1)  # (k, D)
    per_chunk = max(1, max_images // m)
    effects = []
    for u_chunk in u.split(per_chunk):
        copies = syn.detach().repeat(len(u_chunk), *[1] * (syn.ndim - 1)).requires_grad_(True)  # (k·m, ...)
        views = dsa.apply(copies, draw.first(m).repeated(len(u_chunk))) if dsa is not None else copies
        means = embed(views).view(len(u_chunk), m, -1).mean(1)  # (k, D): m_s of each copy
        (grad,) = torch.autograd.grad((means * u_chunk).sum(), copies)
        effects.append(grad.view(len(u_chunk), *syn.shape))
    return torch.cat(effects)


class DistributionMatching:
    Config = Config
    objective: ClassVar[str] = "classification"
    needs_trajectories: ClassVar[bool] = False
    config: Config

    def __init__(self, config: Config, setup: MethodSetup):
        if setup.fresh_model is None:
            raise ConfigError("distribution matching needs a builder of fresh networks (MethodSetup.fresh_model)")
        self.config, self.setup = config, setup
        self.dsa = DSA(config.dsa_strategy) if config.dsa else None
        self.pruner = CausalPruner(config.causal.beta, config.causal.refresh) if config.causal else None
        if self.pruner is not None and any(isinstance(m, _BatchNorm) for m in setup.model.modules()):
            raise ConfigError("distill.causal needs per-sample embeddings (instance or no norm): batch norm mixes "
                              "the samples of a batch, so removing one changes the others' features")
        self.real: dict[tuple[int, int], ClassBatches] = {}  # (rank, world size) -> this worker's sampler
        self.data: TrainData | None = None

    # --- the synthetic set ---

    def init(self, data: TrainData, generator: torch.Generator) -> SyntheticSet:
        self.data = data
        return init_synthetic(data.images, data.labels, data.num_classes, self.config.ipc, self.config.init,
                              generator)

    def optimizer(self) -> dict[str, OuterSGD]:
        return {"images": OuterSGD(self.config.lr_img, self.config.momentum)}

    def after_update(self, synthetic: SyntheticSet) -> None:
        pass

    # --- one iteration ---

    def embedding(self, iteration: int) -> nn.Module:
        """φ of ``iteration``: a fresh network (the same on every worker), frozen, in training mode as in DM."""
        net = self.setup.fresh_model(segment_seed(self.config.seed, iteration, 0)).to(self.setup.device)
        net.train()
        for p in net.parameters():
            p.requires_grad_(False)
        return net

    def classes(self, rank: int, world_size: int) -> range:
        return range(rank, self.data.num_classes, world_size)

    def sampler(self, rank: int, world_size: int) -> ClassBatches:
        if (rank, world_size) not in self.real:
            data, config = self.data, self.config
            skip = self.pruner.dropped if self.pruner else set()
            seed = segment_seed(config.seed, 0, 0)  # every worker reads the same stream: a class's draws do
            # not depend on how classes are split (exactly so unless a queue overflows: see engine.distill.real)
            if isinstance(data.images, StreamedImages):
                counts = torch.bincount(data.labels.cpu(), minlength=data.num_classes).tolist()
                self.real[rank, world_size] = StreamClassBatches(
                    data.images, counts, self.classes(rank, world_size), config.batch_real, seed,
                    data.shuffle_buffer, skip)
            else:
                self.real[rank, world_size] = TensorClassBatches(data.images, data.labels, config.batch_real, seed,
                                                                 data.keys, skip)
        return self.real[rank, world_size]

    def gradients(self, synthetic: SyntheticSet, iteration: int, rank: int = 0, world_size: int = 1) -> Gradients:
        ipc, images = self.config.ipc, synthetic.images
        net, real_batches = self.embedding(iteration), self.sampler(rank, world_size)
        refresh = self.pruner is not None and self.pruner.due(iteration)
        loss_sum = torch.zeros((), dtype=torch.float64)
        grad = torch.zeros_like(images)
        for c in self.classes(rank, world_size):
            real, keys = real_batches.batch(c)
            syn = images[c * ipc:(c + 1) * ipc]
            draw = None
            if self.dsa is not None:
                generator = torch.Generator().manual_seed(segment_seed(self.config.seed, iteration, c + 1))
                draw = self.dsa.sample((max(len(real), ipc), *images.shape[1:]), generator)
            with torch.no_grad():
                real_features = net.features(self.dsa.apply(real, draw.first(len(real))) if draw else real)
            if refresh and len(real) > 2 and (fresh := self.pruner.unjudged(keys)):
                started = time.perf_counter()
                effects = causal_effects(net.features, real_features, syn, self.dsa, draw, fresh)
                kept = self.pruner.judge(c, effects.flatten(1).norm(dim=1).cpu(), [keys[i] for i in fresh],
                                         time.perf_counter() - started)
                keep = torch.ones(len(real), dtype=torch.bool)
                keep[torch.tensor(fresh)[~kept]] = False
                real_features = real_features[keep.to(real_features.device)]
            syn_aug = self.dsa.apply(syn, draw.first(ipc)) if draw else syn
            loss = ((real_features.mean(0) - net.features(syn_aug).mean(0)) ** 2).sum()
            (g,) = torch.autograd.grad(loss, images)
            grad += g
            loss_sum += float(loss.detach())
        # L is a sum over classes: the loop divides the workers' sums by their total count, which is one.
        return Gradients(loss_sum, {"images": grad}, 1 if rank == 0 else 0)

    # --- outputs and resumption ---

    def describe(self, synthetic: SyntheticSet, data: TrainData) -> tuple[dict[str, Any], list[str] | None]:
        extra: dict[str, Any] = {"embedding": "fresh network per iteration (experts' architecture, no head)"}
        if self.pruner is not None:
            extra["causal"] = self.pruner.summary(len(data.labels))
        return extra, None

    def state(self) -> dict[str, Any]:
        return {"causal": self.pruner.state()} if self.pruner else {}

    def load_state(self, state: dict[str, Any]) -> None:
        if self.pruner is not None and "causal" in state:
            self.pruner.load_state(state["causal"])

