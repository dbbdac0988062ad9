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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

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
