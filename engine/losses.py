"""The losses every stage shares: classification with hard or soft labels, and symmetric InfoNCE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_cross_entropy(logits: Tensor, label_logits: Tensor) -> Tensor:
    """Cross-entropy to the distribution softmax(label_logits), averaged over the batch."""
    return -(F.softmax(label_logits, dim=1) * F.log_softmax(logits, dim=1)).sum(1).mean()


def classification_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Hard labels (int64) or soft label logits (float)."""
    return soft_cross_entropy(logits, targets) if targets.is_floating_point() else F.cross_entropy(logits, targets)


def infonce_loss(image_emb: Tensor, text_emb: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE: pair i is the positive for row i and column i of the similarity matrix.

    Both embeddings (B, D) must already be L2-normalised; logits = image_emb @ text_emb.T / τ.
    """
    logits = image_emb @ text_emb.T / temperature  # (B, B)
    positives = torch.arange(len(logits), device=logits.device)
    image_to_text = F.cross_entropy(logits, positives)
    text_to_image = F.cross_entropy(logits.T, positives)
    return (image_to_text + text_to_image) / 2
