"""What evaluation measures: classification accuracy, and image-text retrieval recall@K.

TR (image -> text): an image is a hit at K if ANY of its captions is among its K most similar texts.
IR (text -> image): a caption is a hit at K if its own image is among its K most similar images.
Recalls are in percent; ``rsum`` is the sum of the six recalls at K = 1, 5, 10.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

DEFAULT_KS = (1, 5, 10)


def recall_at_k(similarity: Tensor, text_to_image: Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """``similarity`` (num_images, num_texts); ``text_to_image`` (num_texts,) the image index of each text."""
    num_images, num_texts = similarity.shape
    if text_to_image.shape != (num_texts,):
        raise ValueError(f"text_to_image has shape {tuple(text_to_image.shape)}, expected ({num_texts},)")
    images = torch.arange(num_images).unsqueeze(1)  # (Ni, 1)
    metrics: dict[str, float] = {}
    for k in ks:
        top_texts = similarity.topk(min(k, num_texts), dim=1).indices  # (Ni, k)
        tr_hits = (text_to_image[top_texts] == images).any(dim=1)
        top_images = similarity.t().topk(min(k, num_images), dim=1).indices  # (Nt, k)
        ir_hits = (top_images == text_to_image.unsqueeze(1)).any(dim=1)
        metrics[f"tr_r{k}"] = 100.0 * tr_hits.float().mean().item()
        metrics[f"ir_r{k}"] = 100.0 * ir_hits.float().mean().item()
    metrics["rsum"] = sum(metrics.values())
    return metrics


@torch.no_grad()
def embedding_recalls(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor,
                      ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Recalls from unit-norm embeddings (cosine similarity)."""
    return recall_at_k(image_emb @ text_emb.t(), text_to_image, ks)


EVAL_BATCH = 512


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent, in eval mode."""
    return topk_accuracies(model, images, labels, (1,))[1]


@torch.no_grad()
def topk_accuracies(model: nn.Module, images: Tensor, labels: Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Top-k accuracy in percent for each k (a hit: the label among the k highest logits), in eval mode."""
    model.eval()
    hits = dict.fromkeys(ks, 0)
    for x, y in zip(images.split(EVAL_BATCH), labels.split(EVAL_BATCH), strict=True):
        ranked = model(x).topk(max(ks), dim=1).indices  # (B, max k)
        for k in ks:
            hits[k] += (ranked[:, :k] == y.unsqueeze(1)).any(1).sum().item()
    return {k: 100.0 * hits[k] / len(labels) for k in ks}


@torch.no_grad()
def retrieval_recalls(model: nn.Module, images: Tensor, text: Tensor, caption_image: Tensor) -> dict[str, float]:
    """TR and IR recall@1/5/10 and rsum of a dual encoder on (images, caption features), in eval mode."""
    model.eval()
    image_emb = torch.cat([model.encode_image(x) for x in images.split(EVAL_BATCH)])
    text_emb = torch.cat([model.encode_text_features(t) for t in text.split(EVAL_BATCH)])
    return embedding_recalls(image_emb.cpu(), text_emb.cpu(), caption_image.cpu())
