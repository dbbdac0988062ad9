"""Plain SGD on lists of tensors, and seeded randomness for code that cannot take a generator."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn


@torch.no_grad()
def sgd_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    lr: float,
    momentum: float,
    weight_decay: float,
) -> None:
    """torch.optim.SGD (dampening 0, no Nesterov) with buffers starting at zero: buf ← m·buf + g."""
    for param, grad, buf in zip(params, grads, momentum_buffers, strict=True):
        if weight_decay:
            grad = grad.add(param, alpha=weight_decay)
        if momentum:
            grad = buf.mul_(momentum).add_(grad)
        param.add_(grad, alpha=-lr)


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run a block with the global RNG of the CPU (and of ``device`` if CUDA) seeded with ``seed``;
    the caller's RNG state is restored afterwards. For code that cannot take a generator
    (``nn.init`` in model builders, dropout layers)."""
    cuda = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device is not None and device.type == "cuda"
        else []
    )
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def build_seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a model (on the CPU) whose initialisation depends only on ``seed``."""
    with seeded_global_rng(seed):
        return factory()
