"""RDED initialisation (Sun et al., CVPR 2024): synthetic images stitched from the real patches a teacher
finds most typical of their class.

    for each class c:
        m real images of c; from each, `crops` random resized crops (candidate patches)
        score every patch by the teacher's cross-entropy to c; keep each image's best patch
        keep the ipc·f² images whose best patch scores lowest
        shrink each kept patch to 1/f of the side and stitch f×f of them into one image
    -> ipc images per class, in model-input space; usable as the synthetic images of any method

Only the m chosen images per class are read from the training split.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from engine.config import Section
from engine.errors import DataError
from engine.labels.views import ViewsConfig, crop_and_flip, draw_epoch


class RdedConfig(Section):
    factor: int = Field(2, ge=1, le=4, description="Patches stitched per side: f×f patches per synthetic image.")
    images_per_class: int = Field(100, ge=1, description="Real images per class the patches are cut from.")
    crops: int = Field(5, ge=1, description="Candidate patches per real image.")
    scale_min: float = Field(0.25, gt=0, le=1, description="Smallest patch area, as a fraction of the image.")


def lowest_loss_patches(losses: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """``losses`` (images, crops): the best crop of each image, and the ``keep`` images whose best crop
    has the lowest loss (ascending). Returns (image indices, their crop indices)."""
    best, crop = losses.min(1)
    images = torch.sort(best, stable=True).indices[:keep]
    return images, crop[images]


def stitch(patches: Tensor, factor: int) -> Tensor:
    """(k·f², C, H, W) -> (k, C, H, W): every f² patches shrunk to 1/f of the side and tiled row by row."""
    if factor == 1:
        return patches
    k, (c, h, w) = len(patches) // factor**2, patches.shape[1:]
    small = F.interpolate(patches, size=(h // factor, w // factor), mode="bilinear", antialias=True,
                          align_corners=False)
    tiles = small.view(k, factor, factor, c, h // factor, w // factor)  # (k, rows, cols, C, h', w')
    return tiles.permute(0, 3, 1, 4, 2, 5).reshape(k, c, h // factor * factor, w // factor * factor)


@torch.no_grad()
def rded_class(images: Tensor, label: int, teacher: nn.Module, ipc: int, config: RdedConfig,
               generator: torch.Generator) -> Tensor:
    """``ipc`` stitched images of class ``label`` from its real ``images`` (m, C, H, W)."""
    need = ipc * config.factor**2
    if len(images) < need:
        raise DataError(f"RDED: class {label} has {len(images)} real images; {ipc} images of {config.factor}x"
                        f"{config.factor} patches need {need} (lower labels.rded.factor or the size)")
    views = ViewsConfig(scale_min=config.scale_min, flip=True, cutmix=0.0)
    candidates, losses = [], []
    for _ in range(config.crops):
        drawn = draw_epoch(len(images), len(images), images.shape[-1], views, generator)
        patches = crop_and_flip(images, drawn.boxes, drawn.flips)  # slot i is image i (order unused here)
        targets = torch.full((len(images),), label, dtype=torch.long, device=images.device)
        losses.append(F.cross_entropy(teacher(patches), targets, reduction="none"))
        candidates.append(patches)
    chosen, crop = lowest_loss_patches(torch.stack(losses, 1), need)
    patches = torch.stack(candidates, 1)[chosen.to(images.device), crop.to(images.device)]  # (need, C, H, W)
    return stitch(patches, config.factor)


def rded_images(class_images: Callable[[int], Tensor], num_classes: int, teacher: nn.Module, ipc: int,
                config: RdedConfig, seed: int) -> tuple[Tensor, Tensor]:
    """(images (classes·ipc, C, H, W), labels) for every class; ``class_images(c)`` its real images."""
    teacher.eval()
    generator = torch.Generator().manual_seed(seed)
    images = [rded_class(class_images(c), c, teacher, ipc, config, generator) for c in range(num_classes)]
    return torch.cat(images), torch.arange(num_classes).repeat_interleave(ipc)
