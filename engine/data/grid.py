"""A PNG contact sheet of samples, to look at what a reader actually produces."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from engine import storage
from engine.storage import StorageConfig

MIN_TILE = 64  # small images (8x8 digits, 32x32 CIFAR) are enlarged to this, nearest-neighbour
PADDING = 2
LABEL_HEIGHT = 12


def grid_image(images, nrow: int = 8, labels: Sequence[str] | None = None) -> Image.Image:
    """(N, C, H, W) uint8 or float in [0, 1] (numpy or torch; C = 1 or 3) -> one RGB image, ``nrow`` tiles a row.

    ``labels``: one short text per image, written under its tile.
    """
    pixels = _as_uint8_nhwc(images)
    if labels is not None and len(labels) != len(pixels):
        raise ValueError(f"{len(labels)} labels for {len(pixels)} images")
    n, h, w, _ = pixels.shape
    scale = max(1, math.ceil(MIN_TILE / max(h, w)))
    tile_w, tile_h = w * scale, h * scale + (LABEL_HEIGHT if labels is not None else 0)
    ncol = max(1, min(nrow, n))
    rows = max(1, math.ceil(n / ncol))
    sheet = Image.new("RGB", (ncol * (tile_w + PADDING) + PADDING, rows * (tile_h + PADDING) + PADDING), "white")
    draw = ImageDraw.Draw(sheet)
    for i, tile in enumerate(pixels):
        x = PADDING + (i % ncol) * (tile_w + PADDING)
        y = PADDING + (i // ncol) * (tile_h + PADDING)
        sheet.paste(Image.fromarray(tile).resize((w * scale, h * scale), Image.Resampling.NEAREST), (x, y))
        if labels is not None:
            draw.text((x + 1, y + h * scale), str(labels[i])[: max(1, tile_w // 6)], fill="black")
    return sheet


def save_grid(
    images,
    path_or_url: str,
    nrow: int = 8,
    labels: Sequence[str] | None = None,
    storage_config: StorageConfig | None = None,
) -> str:
    """Write the grid of ``images`` as a PNG, atomically, to a local path or URL; returns the path."""
    buffer = io.BytesIO()
    grid_image(images, nrow, labels).save(buffer, format="PNG")
    storage.write_bytes(path_or_url, buffer.getvalue(), storage_config)
    return path_or_url


def _as_uint8_nhwc(images) -> np.ndarray:
    array = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if array.ndim != 4 or array.shape[1] not in (1, 3) or len(array) == 0:
        raise ValueError(f"expected images of shape (N, 1 or 3, H, W) with N > 0, got {array.shape}")
    array = np.repeat(array, 3, axis=1) if array.shape[1] == 1 else array
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return array.transpose(0, 2, 3, 1)
