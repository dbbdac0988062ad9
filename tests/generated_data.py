"""Raw data generated on the fly in the layouts the shard writer reads: class folders of images, a
Flickr-style captions CSV, class folders of video clips. Pixels are seeded noise with a per-class
tint, so every class is learnable a little and every file decodes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def _pixels(rng: np.random.Generator, height: int, width: int, tint: int) -> np.ndarray:
    noise = rng.integers(0, 160, (height, width, 3))
    noise[..., tint % 3] += 90
    return noise.astype(np.uint8)


def image_folder(root: Path, classes: list[str], per_class: int, size: tuple[int, int] = (32, 32),
                 seed: int = 0) -> Path:
    """``root/<class>/<i>.png`` for every class; ``size`` is (width, height)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_pixels(rng, size[1], size[0], c)).save(root / name / f"{i}.png")
    return root


def captions_csv(root: Path, num_images: int, captions_per_image: int = 5, size: tuple[int, int] = (48, 40),
                 seed: int = 0) -> Path:
    """Flickr8k's release layout: ``root/images/<id>.jpg`` and ``root/captions.txt`` (image,caption)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    words = ["a dog", "two children", "a red car", "a man", "the beach", "a bird", "snow", "a ball"]
    lines = ["image,caption"]
    for i in range(num_images):
        Image.fromarray(_pixels(rng, size[1], size[0], i)).save(root / "images" / f"{i:05d}.jpg")
        for j in range(captions_per_image):
            subject, place = words[(i + j) % len(words)], words[(3 * i + j) % len(words)]
            lines.append(f"{i:05d}.jpg,{subject} near {place} number {i} take {j} .")
    (root / "captions.txt").write_text("\n".join(lines) + "\n")
    return root / "captions.txt"


def video_folder(root: Path, classes: list[str], per_class: int, frames: int = 10, size: tuple[int, int] = (40, 32),
                 seed: int = 0) -> Path:
    """``root/<class>/<i>.mp4``: MPEG-4 clips of ``frames`` frames, a bright square moving per class."""
    import av

    rng = np.random.default_rng(seed)
    width, height = size
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            with av.open(str(root / name / f"{i}.mp4"), mode="w") as container:
                stream = container.add_stream("mpeg4", rate=8)
                stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
                for t in range(frames):
                    image = _pixels(rng, height, width, c) // 2
                    x = (t * (c + 1) * 3) % (width - 8)
                    image[8:16, x:x + 8] = 255
                    for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)
    return root
