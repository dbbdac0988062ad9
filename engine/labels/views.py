"""The augmented views a student is trained on, as parameters that can be stored and replayed (FKD).

One epoch over a set of N images is drawn up front from a seeded generator:

    order (N,)          the shuffled positions; batch b is order[b·B : (b+1)·B]
    boxes (N, 4)        random resized crop of each position in the epoch: centre (x, y) and size (w, h)
                        as fractions of the image, in grid_sample's [-1, 1] coordinates
    flips (N,)          1 = mirrored
    partners (N,)       CutMix: the position whose view is pasted into this one (itself: no mix)
    cuts (batches, 4)   the pasted rectangle of each batch in pixels of the view: y0, y1, x0, x1

``render`` turns a batch of it into views with ``affine_grid``/``grid_sample``, so the same parameters
give the same views on any device, and ``mix_weight`` is the fraction of each view that is its own image
(hard labels mix by it; soft labels are computed on the mixed view itself, as FKD and RDED do).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from engine.config import Section


class ViewsConfig(Section):
    """How the views of a student's training epochs are drawn."""

    scale_min: float = Field(0.5, gt=0, le=1, description="Smallest crop area, as a fraction of the image.")
    ratio: float = Field(4 / 3, ge=1, description="Crop aspect ratios are drawn in [1/ratio, ratio] (log-uniform).")
    flip: bool = True
    cutmix: float = Field(0.5, ge=0, le=1, description="Probability that a batch is mixed by CutMix (0: never).")


@dataclass
class EpochViews:
    order: Tensor  # (N,) int64
    boxes: Tensor  # (N, 4) float32: centre x, centre y, width, height in [-1, 1] units
    flips: Tensor  # (N,) uint8
    partners: Tensor  # (N,) int64
    cuts: Tensor  # (batches, 4) int16: y0, y1, x0, x1
    batch_size: int

    FIELDS = ("order", "boxes", "flips", "partners", "cuts")

    def tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name).contiguous() for name in self.FIELDS}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], batch_size: int) -> EpochViews:
        return cls(*(tensors[name] for name in cls.FIELDS), batch_size=batch_size)

    def batches(self) -> Iterator[tuple[int, Tensor]]:
        """(batch number, positions of the set in that batch)."""
        yield from enumerate(self.order.split(self.batch_size))

    def slots(self, b: int) -> slice:
        """Where batch ``b``'s rows are in the per-epoch tensors (boxes, flips, partners, stored logits)."""
        return slice(b * self.batch_size, min((b + 1) * self.batch_size, len(self.order)))


def draw_epoch(n: int, batch_size: int, side: int, config: ViewsConfig, generator: torch.Generator) -> EpochViews:
    """Every view of one epoch over ``n`` images of ``side`` pixels."""
    order = torch.randperm(n, generator=generator)
    area = config.scale_min + (1 - config.scale_min) * torch.rand(n, generator=generator)
    log_ratio = (2 * torch.rand(n, generator=generator) - 1) * math.log(config.ratio)
    width = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    height = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    centre = (2 * torch.rand(n, 2, generator=generator) - 1) * (1 - torch.stack([width, height], 1))
    boxes = torch.cat([centre, width[:, None], height[:, None]], 1).float()
    flips = (torch.rand(n, generator=generator) < 0.5).to(torch.uint8) if config.flip else torch.zeros(n, dtype=torch.uint8)
    slots = torch.arange(n)
    partners, cuts = slots.clone(), []
    for start in range(0, n, batch_size):
        rows = slots[start:start + batch_size]
        if torch.rand(1, generator=generator).item() >= config.cutmix or len(rows) < 2:
            cuts.append([0, 0, 0, 0])
            continue
        partners[rows] = rows[torch.randperm(len(rows), generator=generator)]
        cut = math.sqrt(1 - torch.rand(1, generator=generator).item())  # side fraction: area 1 - λ, λ ~ U(0, 1)
        h = w = max(1, round(cut * side))
        y0 = int(torch.randint(0, side - h + 1, (1,), generator=generator))
        x0 = int(torch.randint(0, side - w + 1, (1,), generator=generator))
        cuts.append([y0, y0 + h, x0, x0 + w])
    return EpochViews(order, boxes, flips, partners, torch.tensor(cuts, dtype=torch.int16).view(-1, 4), batch_size)


def crop_and_flip(images: Tensor, boxes: Tensor, flips: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C, H, W): each image's box resized to the full side (bilinear), mirrored where
    ``flips``."""
    sign = 1 - 2 * flips.to(images.dtype)
    theta = torch.zeros(len(images), 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = boxes[:, 2].to(images) * sign.to(images.device)
    theta[:, 0, 2] = boxes[:, 0].to(images)
    theta[:, 1, 1] = boxes[:, 3].to(images)
    theta[:, 1, 2] = boxes[:, 1].to(images)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def render(images: Tensor, views: EpochViews, b: int) -> Tensor:
    """The views of batch ``b`` of an epoch over ``images`` (N, C, H, W), mixed where the batch is cut."""
    rows = views.slots(b)
    own = crop_and_flip(images[views.order[rows].to(images.device)], views.boxes[rows], views.flips[rows])
    y0, y1, x0, x1 = views.cuts[b].tolist()
    if y1 <= y0:
        return own
    partner = (views.partners[rows] - rows.start).to(images.device)  # partners are slots of the same batch
    mixed = own.clone()
    mixed[:, :, y0:y1, x0:x1] = own[partner][:, :, y0:y1, x0:x1]
    return mixed


def mix_weight(views: EpochViews, b: int, side: int) -> float:
    """The fraction of each view of batch ``b`` that shows its own image."""
    y0, y1, x0, x1 = views.cuts[b].tolist()
    return 1.0 - (y1 - y0) * (x1 - x0) / (side * side)


def hard_targets(labels: Tensor, views: EpochViews, b: int) -> tuple[Tensor, Tensor]:
    """The labels of batch ``b``'s views and of their CutMix partners."""
    rows = views.slots(b)
    own = views.order[rows]
    return labels[own.to(labels.device)], labels[views.order[views.partners[rows]].to(labels.device)]
