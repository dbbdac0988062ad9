"""The trajectory-matching gradient, unrolled or exact in constant activation memory (DESIGN section 2).

A student starts at an expert's parameters θ̂_0 = θ*_t and takes N SGD steps on the synthetic data:

    θ̂_{i+1} = θ̂_i − α ⊙ g_i,     g_i = ∇_θ ℓ_i(θ̂_i)           (ℓ_i: step i's loss, see InnerProblem)

where α (P,) holds one learnable step size per parameter group (``alphas[groups]``). The loss is the
sum over groups of normalised distances to the expert's later parameters θ*_{t+M}:

    L = Σ_g ‖θ̂_N[g] − θ*_{t+M}[g]‖² / ‖θ*_t[g] − θ*_{t+M}[g]‖²

and we want ∂L/∂(synthetic tensors) and ∂L/∂alphas.

- ``unrolled``: autograd through the N steps (create_graph); memory grows with N.
- ``exact``: forward without a graph keeping only parameter vectors θ̂_i, then, with λ = ∂L/∂θ̂_N:

      for i = N−1 … 0:
          recompute g_i with a graph (same mini-batch, same augmentation draw)
          ∂L/∂α      += −g_i ⊙ λ                                 (then summed per group)
          ∂L/∂leaves += −(∂g_i/∂leaves)ᵀ (α ⊙ λ)                 } one backward of ⟨g_i, α ⊙ λ⟩
          λ          ←  λ − H_i (α ⊙ λ)                           } w.r.t. (θ̂_i, leaves)

  Same gradient to floating-point tolerance (tested), with one step's activations in memory. The
  N + 1 parameter vectors themselves (N·P floats: ResNet-18 at N = 80 is 3.5 GB) are cut to about
  2√N by keeping every ⌈√N⌉-th and recomputing a segment's steps when the backward loop reaches it.

``TrajectoryMatching`` is the step MTT and vision-language distillation share: for each expert
segment of an iteration (any worker can compute any segment from its seed), sample an expert and a
start epoch, fix the inner problem's mini-batches, DSA draws and dropout seeds, and match.
A method supplies only its synthetic set, its step-size groups and its inner loss.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor

from engine import storage
from engine.data.augment import DSA, DSADraw
from engine.distill.base import CommonDistillConfig, Gradients, MethodSetup, OuterSGD, TrainData
from engine.distill.synthetic import SyntheticSet
from engine.errors import EngineError
from engine.models.functional import FunctionalModel
from engine.models.params import flatten
from engine.optim import seeded_global_rng

GradientMode = Literal["unrolled", "exact"]
GRADIENT_MODES = ("unrolled", "exact")


class InnerProblem(Protocol):
    """The student's loss at inner step ``step``: deterministic given (theta, step), so it can be
    recomputed in the backward pass with the same mini-batch and augmentation draw."""

    def step_loss(self, theta: Tensor, step: int) -> Tensor: ...


@dataclass(frozen=True)
class MatchResult:
    loss: float  # L
    leaf_grads: list[Tensor]  # ∂L/∂leaf, one per leaf (zeros where a leaf does not influence L)
    alpha_grad: Tensor  # ∂L/∂alphas, (G,)


def group_distance(theta: Tensor, target: Tensor, start: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    """Σ_g ‖θ[g] − target[g]‖² / ‖start[g] − target[g]‖²."""
    num = torch.zeros(num_groups, dtype=theta.dtype, device=theta.device).index_add(0, groups, (theta - target) ** 2)
    den = torch.zeros(num_groups, dtype=theta.dtype, device=theta.device).index_add(0, groups, (start - target) ** 2)
    return (num / den.clamp_min(torch.finfo(den.dtype).tiny)).sum()


def match_trajectory(
    problem: InnerProblem,
    start: Tensor,
    target: Tensor,
    alphas: Tensor,
    groups: Tensor,
    num_steps: int,
    leaves: Sequence[Tensor],
    mode: GradientMode = "exact",
    stride: int | None = None,
) -> MatchResult:
    """L and its gradients w.r.t. ``leaves`` (synthetic tensors) and ``alphas``.

    ``start`` θ*_t and ``target`` θ*_{t+M} are flat (P,) vectors; ``alphas`` (G,) the step sizes;
    ``groups`` (P,) the group index of each parameter (for both the step size and the distance).
    ``stride`` (exact mode): keep every stride-th parameter vector of the forward pass and recompute
    the others segment by segment; 1 keeps all N + 1 (fastest), None takes ⌈√N⌉.
    """
    if mode == "unrolled":
        return _unrolled(problem, start, target, alphas, groups, num_steps, leaves)
    if mode == "exact":
        return _exact(problem, start, target, alphas, groups, num_steps, leaves, stride or default_stride(num_steps))
    raise ValueError(f"gradient mode must be one of {GRADIENT_MODES}, got {mode!r}")


def _unrolled(problem, start, target, alphas, groups, num_steps, leaves) -> MatchResult:
    alpha = alphas[groups]  # (P,), differentiable w.r.t. alphas
    theta = start.detach().clone().requires_grad_(True)
    for step in range(num_steps):
        (grad,) = torch.autograd.grad(problem.step_loss(theta, step), theta, create_graph=True)
        theta = theta - alpha * grad
    loss = group_distance(theta, target, start, groups, len(alphas))
    *leaf_grads, alpha_grad = torch.autograd.grad(loss, [*leaves, alphas], allow_unused=True)
    return MatchResult(loss.item(), _zeros_for_none(leaf_grads, leaves), _zero_if_none(alpha_grad, alphas))


def _exact(problem, start, target, alphas, groups, num_steps, leaves, stride) -> MatchResult:
    alpha = alphas.detach()[groups]  # (P,)

    def sgd_step(theta: Tensor, step: int) -> Tensor:  # θ̂_{i+1} from θ̂_i; no graph is kept
        t = theta.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(problem.step_loss(t, step), t)
        return (theta - alpha * grad).detach()

    # Forward: keep θ̂ every ``stride`` steps only; the rest is recomputed one segment at a time.
    checkpoints, theta = {0: start.detach()}, start.detach()
    for step in range(num_steps):
        theta = sgd_step(theta, step)
        if (step + 1) % stride == 0:
            checkpoints[step + 1] = theta

    final = theta.clone().requires_grad_(True)
    loss = group_distance(final, target, start, groups, len(alphas))
    (lam,) = torch.autograd.grad(loss, final)  # λ = ∂L/∂θ̂_N

    leaf_grads = [torch.zeros_like(leaf) for leaf in leaves]
    alpha_vector_grad = torch.zeros_like(alpha)
    for first in reversed(range(0, num_steps, stride)):  # segments [first, last), last to first
        last = min(first + stride, num_steps)
        thetas = [checkpoints[first]]
        for step in range(first, last - 1):
            thetas.append(sgd_step(thetas[-1], step))
        for step in reversed(range(first, last)):  # backward: recompute one step with a graph
            theta = thetas[step - first].clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(problem.step_loss(theta, step), theta, create_graph=True)
            alpha_vector_grad -= grad.detach() * lam
            products = torch.autograd.grad((grad * (alpha * lam)).sum(), [theta, *leaves], allow_unused=True)
            hessian_product, leaf_products = products[0], products[1:]
            for total, product in zip(leaf_grads, leaf_products, strict=True):
                if product is not None:
                    total -= product
            lam = lam - hessian_product
    alpha_grad = torch.zeros_like(alphas).index_add(0, groups, alpha_vector_grad)
    return MatchResult(loss.item(), leaf_grads, alpha_grad)


def default_stride(num_steps: int) -> int:
    """⌈√N⌉: about 2√N parameter vectors in memory instead of N + 1, for one extra forward step each."""
    return max(1, math.ceil(math.sqrt(num_steps)))


def _zeros_for_none(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
    return [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, like, strict=True)]


def _zero_if_none(grad: Tensor | None, like: Tensor) -> Tensor:
    return grad if grad is not None else torch.zeros_like(like)


# --- the step MTT and vision-language distillation share ------------------------------------------------


class TrajectoryMatchingConfig(CommonDistillConfig):
    """The keys of every trajectory-matching method. Defaults follow MTT (CIFAR-10, IPC 10); DESIGN §2."""

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
    lr_lr: float = Field(1e-5, ge=0, description="Outer SGD lr of the learnable step sizes.")
    lr_teacher: float | None = Field(None, gt=0, description="Initial student step size (default: the experts' lr).")

    @model_validator(mode="after")
    def _windows(self) -> TrajectoryMatchingConfig:
        if self.min_start_epoch >= self.max_start_epoch:
            raise ValueError(f"distill.min_start_epoch ({self.min_start_epoch}) must be below "
                             f"max_start_epoch ({self.max_start_epoch})")
        if self.start_window == "growing" and self.initial_max_start_epoch is None:
            raise ValueError("distill.start_window growing needs distill.initial_max_start_epoch")
        return self

    @property
    def expert_epochs_needed(self) -> int:
        """The epochs experts must have for the start window and M."""
        return self.max_start_epoch + self.expert_epochs - 1

    def start_epoch_bound(self, iteration: int) -> int:
        """The exclusive upper bound of the start epoch at ``iteration`` (0-based)."""
        if self.start_window == "uniform":
            return self.max_start_epoch
        first = min(self.initial_max_start_epoch or self.max_start_epoch, self.max_start_epoch)
        span = self.window_iterations or self.iterations
        grown = first + (self.max_start_epoch - first) * min(1.0, iteration / span)
        return max(self.min_start_epoch + 1, int(grown))


@dataclass(frozen=True)
class Segment:
    expert: int
    start_epoch: int


class ExpertSegments:
    """Flat parameter vectors θ*_e of the store's experts, on ``device``, with a small LRU cache."""

    def __init__(self, store: Any, device: torch.device, cache_size: int = 128):
        self.store = store
        self.device = device
        self.experts = store.experts()
        if not self.experts:
            raise EngineError(f"store {storage.redact(store.url)} has no complete experts; run `distill buffer` first")
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[int, int], Tensor] = OrderedDict()

    def flat(self, expert: int, epoch: int) -> Tensor:
        key = (expert, epoch)
        if key not in self._cache:
            params = self.store.load_epochs(expert, [epoch])[epoch]
            self._cache[key] = flatten([params[n] for n in self.store.param_names]).to(self.device)
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def finals(self) -> list[Tensor]:
        """Every expert's parameters at its last epoch."""
        return [self.flat(e, self.store.num_epochs) for e in self.experts]

    def sample(self, config: TrajectoryMatchingConfig, iteration: int, generator: torch.Generator) -> Segment:
        if config.expert_epochs_needed > self.store.num_epochs:
            raise EngineError(
                f"distill.max_start_epoch {config.max_start_epoch} + expert_epochs {config.expert_epochs} "
                f"needs experts of {config.expert_epochs_needed} epochs; "
                f"store {storage.redact(self.store.url)} has {self.store.num_epochs}"
            )
        expert = self.experts[int(torch.randint(len(self.experts), (1,), generator=generator))]
        bound = config.start_epoch_bound(iteration)
        start = int(torch.randint(config.min_start_epoch, bound, (1,), generator=generator))
        return Segment(expert, start)


def segment_seed(seed: int, iteration: int, segment: int) -> int:
    return int(np.random.SeedSequence([seed, iteration, segment]).generate_state(1, np.uint64)[0] >> 1)


def minibatch_schedule(num: int, batch: int | None, steps: int, generator: torch.Generator) -> list[Tensor]:
    """Index mini-batches for ``steps`` student steps: consecutive chunks of seeded permutations."""
    if batch is None or batch >= num:
        return [torch.arange(num)] * steps
    out: list[Tensor] = []
    order = torch.empty(0, dtype=torch.long)
    while len(out) < steps:
        if len(order) < batch:
            order = torch.cat([order, torch.randperm(num, generator=generator)])
        out.append(order[:batch])
        order = order[batch:]
    return out


def step_rng_seeds(steps: int, generator: torch.Generator) -> list[int]:
    """One seed per inner step for the random layers of the student (dropout, LoRA dropout): the
    backward pass of the exact gradient replays each step's forward with the same masks."""
    return torch.randint(2**62, (steps,), generator=generator).tolist()


StudentLoss = Callable[[FunctionalModel, Tensor, Tensor, Tensor], Tensor]  # (student, θ, x, targets) -> loss


@dataclass
class StepLoss:
    """ℓ_i(θ) = loss(f_θ(A_i(x[b_i])), targets[b_i]) with the mini-batches, DSA draws and dropout seeds fixed
    up front, so the backward pass recomputes exactly the forward's step."""

    student: FunctionalModel
    images: Tensor
    targets: Tensor
    batches: list[Tensor]
    dsa: DSA | None
    draws: list[DSADraw] | None
    rng_seeds: list[int]
    loss: StudentLoss

    def step_loss(self, theta: Tensor, step: int) -> Tensor:
        index = self.batches[step]
        x = self.images[index]
        if self.dsa is not None:
            x = self.dsa.apply(x, self.draws[step])
        with seeded_global_rng(self.rng_seeds[step], theta.device):
            return self.loss(self.student, theta, x, self.targets[index])


class TrajectoryMatching:
    """The shared gradient step of MTT and vision-language distillation. A subclass sets ``groups``
    (P,) (the step-size group of each matched parameter), ``loss`` and ``targets``, and ``init``."""

    needs_trajectories: ClassVar[bool] = True
    config: TrajectoryMatchingConfig
    groups: Tensor

    def __init__(self, config: TrajectoryMatchingConfig, setup: MethodSetup):
        self.config = config
        self.setup = setup
        self.student = FunctionalModel(setup.model, setup.names)
        self.segments = ExpertSegments(setup.store, setup.device) if setup.store is not None else None
        self.dsa = DSA(config.dsa_strategy) if config.dsa else None

    # --- what a method supplies ---
    def loss(self, student: FunctionalModel, theta: Tensor, x: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError

    def targets(self, synthetic: SyntheticSet) -> Tensor:
        raise NotImplementedError

    def init(self, data: TrainData, generator: torch.Generator) -> SyntheticSet:
        raise NotImplementedError

    # --- shared ---
    def optimizer(self) -> dict[str, OuterSGD]:
        return {"images": OuterSGD(self.config.lr_img, self.config.momentum),
                "alphas": OuterSGD(self.config.lr_lr, self.config.momentum)}

    def problem(self, synthetic: SyntheticSet, generator: torch.Generator) -> StepLoss:
        config = self.config
        batches = minibatch_schedule(len(synthetic), config.batch_syn, config.syn_steps, generator)
        shape = synthetic.images.shape[1:]
        draws = [self.dsa.sample((len(b), *shape), generator) for b in batches] if self.dsa else None
        return StepLoss(self.student, synthetic.images, self.targets(synthetic), batches, self.dsa, draws,
                        step_rng_seeds(len(batches), generator), self.loss)

    def segment_ids(self, rank: int, world_size: int) -> range:
        """The segments of an iteration worker ``rank`` computes: r, r + W, …"""
        return range(rank, self.config.segments_per_iteration * world_size, world_size)

    def gradients(self, synthetic: SyntheticSet, iteration: int, rank: int = 0, world_size: int = 1) -> Gradients:
        learnable = synthetic.learnable()
        leaves = [t for name, t in learnable.items() if name != "alphas"]
        loss_sum = torch.zeros((), dtype=torch.float64)
        sums = [torch.zeros_like(t) for t in learnable.values()]
        segments = self.segment_ids(rank, world_size)
        for j in segments:
            generator = torch.Generator().manual_seed(segment_seed(self.config.seed, iteration, j))
            segment = self.segments.sample(self.config, iteration, generator)
            start = self.segments.flat(segment.expert, segment.start_epoch)
            target = self.segments.flat(segment.expert, segment.start_epoch + self.config.expert_epochs)
            result = match_trajectory(self.problem(synthetic, generator), start, target, synthetic.alphas,
                                      self.groups, self.config.syn_steps, leaves, self.config.gradient,
                                      self.config.exact_stride)
            loss_sum += result.loss
            for total, grad in zip(sums, [*result.leaf_grads, result.alpha_grad], strict=True):
                total += grad
        return Gradients(loss_sum, dict(zip(learnable, sums, strict=True)), len(segments))

    @torch.no_grad()
    def after_update(self, synthetic: SyntheticSet) -> None:
        synthetic.alphas.clamp_(min=0.0)  # a negative step size would make the student ascend

    def describe(self, synthetic: SyntheticSet, data: TrainData) -> tuple[dict[str, Any], list[str] | None]:
        return ({"matched_parameters": self.student.num_parameters, "num_experts": len(self.segments.experts),
                 "step_sizes": synthetic.alphas.tolist()}, None)
