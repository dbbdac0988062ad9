"""What herding, k-center and forgetting look at: an expert's embedding of every candidate, and whether a
network gets each candidate right (for forgetting counts)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

BATCH = 512


@torch.no_grad()
def penultimate_features(model: nn.Module, images: Iterable[Tensor]) -> Tensor:
    """(N, D) features a classifier feeds its head (``model.features``), on the CPU, of every batch of
    ``images`` (a tensor is split into batches; a stream gives its own)."""
    model.eval()
    return torch.cat([model.features(x).cpu() for x in _batches(images)])


@torch.no_grad()
def image_embeddings(model: nn.Module, images: Iterable[Tensor]) -> Tensor:
    """(N, E) unit image embeddings of a dual encoder."""
    model.eval()
    return torch.cat([model.encode_image(x) for x in _batches(images)])


@torch.no_grad()
def text_embeddings(model: nn.Module, text: Tensor) -> Tensor:
    """(Ncap, E) unit embeddings of caption features."""
    model.eval()
    return torch.cat([model.encode_text_features(t) for t in text.split(BATCH)])


def joint_embeddings(model: nn.Module, images: Iterable[Tensor], text: Tensor, caption_image: Tensor) -> Tensor:
    """(Ncap, 2E) [image embedding; caption embedding] of every (image, caption) pair of a dual encoder."""
    return torch.cat([image_embeddings(model, images)[caption_image], text_embeddings(model, text)], dim=1).cpu()


def caption_finds_its_image(images: Callable[[], Iterable[Tensor]], text: Tensor,
                            caption_image: Tensor) -> Callable[[nn.Module], Tensor]:
    """A forgetting judge for pairs: is each caption's nearest image its own? (``images()``: a fresh pass.)"""

    @torch.no_grad()
    def correct(model: nn.Module) -> Tensor:
        return (text_embeddings(model, text) @ image_embeddings(model, images()).T).argmax(1) == caption_image

    return correct


def _batches(images: Iterable[Tensor]) -> Iterable[Tensor]:
    return images.split(BATCH) if isinstance(images, Tensor) else images
