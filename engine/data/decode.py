"""Pure decoding of shard members: image and video bytes -> uint8 arrays, labels, captions.

No Ray and no I/O here: the Ray Data reader (``map_batches``) and the in-memory reader call the same
functions, so both paths give identical arrays. Every error names the shard and the sample key.

Images become (C, H, W) uint8 pixels: what travels through Ray Data and sits in buffers, a quarter of
the bytes of float32 (``engine.data.preprocess.to_unit`` makes them float32 in [0, 1] on the device):

1. EXIF orientation is applied (so a phone photo is upright);
2. the mode is normalised: 1-bit, L, I;16*, I and F become L; LA, La, PA, RGBA, RGBa and palette
   images with transparency are composited on white; CMYK, YCbCr, LAB, HSV and P become RGB;
   16-bit (I;16*, I) values are scaled by 1/65535, F values are taken as already in [0, 1];
3. then converted to L (``channels=1``, ITU-R 601-2 luma) or RGB (``channels=3``);
4. and resized to ``size`` x ``size`` by the policy: ``crop`` (short side to ``size``, then
   centre crop), ``squash`` (both sides to ``size``, aspect ratio not kept) or ``pad`` (long side
   to ``size``, centred on black: letterbox).

Videos become (T, C, H, W): all frames are decoded with PyAV, T indices are spread uniformly over the
clip (first and last frame included), a clip shorter than T repeats its last frame, and every kept
frame goes through steps 3-4.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from engine.errors import DataError
from engine.extras import require

ResizePolicy = Literal["crop", "squash", "pad"]
RESAMPLE = Image.Resampling.BICUBIC
ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
PIL_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)  # what PIL raises for corrupt/truncated bytes


def where(shard: str, key: str) -> str:
    """``shard train-000003.tar, sample train-00001234``: the prefix of every decode error."""
    return f"shard {shard}, sample {key}"


# --- images ------------------------------------------------------------------------------------------


def decode_image(
    data: bytes, size: int, *, channels: int = 3, resize: ResizePolicy = "crop", shard: str = "?", key: str = "?"
) -> np.ndarray:
    """Encoded image bytes -> (channels, size, size) uint8."""
    image = open_image(data, size, shard=shard, key=key)
    image = normalise_mode(image, channels)
    return to_array(resize_image(image, size, resize))


def open_image(data: bytes, size: int | None = None, *, shard: str = "?", key: str = "?") -> Image.Image:
    """Decode fully (so truncated data fails here, not later) and apply the EXIF orientation.

    ``size``: lets JPEG decode at a reduced scale (DCT scaling) when the image is much larger; the
    result still has both sides >= ``size``, so every resize policy sees enough pixels.
    """
    try:
        image = Image.open(io.BytesIO(data))
        if size is not None:
            image.draft(None, (size, size))
        image.load()
        return ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as err:
        raise DataError(f"{where(shard, key)}: image too large to decode ({err})") from err
    except PIL_DECODE_ERRORS as err:
        raise DataError(f"{where(shard, key)}: corrupt or truncated image ({err})") from err


def normalise_mode(image: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode -> "L" (channels=1) or "RGB" (channels=3); see the module docstring."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ALPHA_MODES:
        image = _on_white(image)
    elif image.mode in SIXTEEN_BIT_MODES or image.mode == "F":
        image = _to_8bit(image)
    elif image.mode not in ("L", "RGB"):
        image = image.convert("RGB")  # 1, CMYK, YCbCr, LAB, HSV, P
    target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)


def _on_white(image: Image.Image) -> Image.Image:
    """Composite an image with alpha over a white background (what a viewer shows)."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer (scaled by 1/65535) or float ([0, 1]) grayscale -> 8-bit L.

    ``Image.convert("L")`` would clip these values at 255 instead of scaling them.
    """
    values = np.asarray(image, dtype=np.float32)
    scaled = values if image.mode == "F" else values / 65535.0
    return Image.fromarray(np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8), mode="L")


def resize_image(image: Image.Image, size: int, policy: ResizePolicy) -> Image.Image:
    """Resize to ``size`` x ``size`` by ``policy`` (crop | squash | pad)."""
    if image.size == (size, size):
        return image
    if policy == "crop":
        return ImageOps.fit(image, (size, size), method=RESAMPLE)
    if policy == "squash":
        return image.resize((size, size), RESAMPLE)
    if policy == "pad":
        return ImageOps.pad(image, (size, size), method=RESAMPLE, color=0)
    raise ValueError(f"unknown resize policy {policy!r}; expected crop, squash or pad")


def to_array(image: Image.Image) -> np.ndarray:
    """An L or RGB image -> (C, H, W) uint8."""
    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.ndim == 2:
        return pixels[None].copy()
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


# --- videos ------------------------------------------------------------------------------------------


def frame_indices(num_frames: int, frames: int) -> list[int]:
    """``frames`` indices spread uniformly over a clip of ``num_frames``; a short clip repeats its last frame."""
    if num_frames <= 0:
        raise ValueError("a clip needs at least one frame")
    if num_frames < frames:
        return list(range(num_frames)) + [num_frames - 1] * (frames - num_frames)
    return np.linspace(0, num_frames - 1, frames).round().astype(int).tolist()


def decode_video(
    data: bytes,
    size: int,
    frames: int,
    *,
    channels: int = 3,
    resize: ResizePolicy = "crop",
    shard: str = "?",
    key: str = "?",
) -> np.ndarray:
    """Encoded video bytes -> (frames, channels, size, size) uint8."""
    decoded = _decode_frames(data, shard=shard, key=key)
    picked = [decoded[i].to_image() for i in frame_indices(len(decoded), frames)]
    return np.stack([to_array(resize_image(normalise_mode(f, channels), size, resize)) for f in picked])


def _decode_frames(data: bytes, *, shard: str, key: str) -> list:
    """Every frame of the first video stream, as ``av.VideoFrame`` objects (converted only when picked)."""
    av = require("av", "video", "decoding video")

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise DataError(f"{where(shard, key)}: no video stream")
            decoded = list(container.decode(video=0))
    except (av.FFmpegError, OSError, ValueError) as err:
        raise DataError(f"{where(shard, key)}: corrupt or unreadable video ({err})") from err
    if not decoded:
        raise DataError(f"{where(shard, key)}: the video has no frames")
    return decoded


# --- labels and captions -----------------------------------------------------------------------------


def parse_label(data: bytes | None, *, shard: str = "?", key: str = "?") -> int:
    """A ``.cls`` member (ASCII digits) -> class index; no member -> -1."""
    if data is None:
        return -1
    try:
        label = int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{where(shard, key)}: bad class label {data[:20]!r}") from err
    if label < 0:
        raise DataError(f"{where(shard, key)}: negative class label {label}")
    return label


def parse_captions(data: bytes | None, *, shard: str = "?", key: str = "?") -> list[str]:
    """A ``.json`` member ``{"id": ..., "captions": [...]}`` -> its captions; no member -> []."""
    if data is None:
        return []
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{where(shard, key)}: the .json member is not valid JSON ({err})") from err
    captions = record.get("captions", []) if isinstance(record, dict) else None
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise DataError(f"{where(shard, key)}: .json 'captions' must be a list of strings")
    return captions


def fit_captions(captions: Sequence[str], count: int, *, shard: str = "?", key: str = "?") -> list[str]:
    """Exactly ``count`` captions: the first ``count`` when there are more; cycled when there are fewer.

    Cycling (a, b -> a, b, a, b, a) keeps every row a real caption, so a training loop may pick any
    index; the number of distinct captions is kept beside it (``num_captions``).
    """
    if not captions:
        raise DataError(f"{where(shard, key)}: an image-text sample without captions")
    return [captions[i % len(captions)] for i in range(count)]
