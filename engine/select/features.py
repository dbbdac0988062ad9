"""What herding, k-center and forgetting look at: an expert's embedding of every candidate, and whether a
network gets each candidate right (for forgetting counts)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from engine.trajectories.train import ExpertData

BATCH = 512


@torch.no_grad()
def penultimate_features(model: nn.Module, images: Tensor) -> Tensor:
    """(N, D) features a classifier feeds its head (``model.features``), on the CPU."""
    model.eval()
    return torch.cat([model.features(x).cpu() for x in images.split(BATCH)])


@torch.no_grad()
def joint_embeddings(model: nn.Module, images: Tensor, text: Tensor, caption_image: Tensor) -> Tensor:
    """(Ncap, 2E) [image embedding; caption embedding] of every (image, caption) pair of a dual encoder."""
    model.eval()
    image_emb = torch.cat([model.encode_image(x) for x in images.split(BATCH)])
    text_emb = torch.cat([model.encode_text_features(t) for t in text.split(BATCH)])
    return torch.cat([image_emb[caption_image], text_emb], dim=1).cpu()


def caption_finds_its_image(images: Tensor, text: Tensor, caption_image: Tensor) -> Callable[[nn.Module, ExpertData],
                                                                                            Tensor]:
    """A forgetting judge for pairs: is each caption's nearest image its own?"""

    @torch.no_grad()
    def correct(model: nn.Module, _: ExpertData) -> Tensor:
        image_emb = torch.cat([model.encode_image(x) for x in images.split(BATCH)])
        text_emb = torch.cat([model.encode_text_features(t) for t in text.split(BATCH)])
        return (text_emb @ image_emb.T).argmax(1) == caption_image

    return correct
