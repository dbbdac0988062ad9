"""File extensions of the media the engine reads and writes: one list for the shard writer and the readers."""

from __future__ import annotations

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm"})
VIDEO_EXTENSIONS = frozenset({"mp4", "avi", "webm", "mkv", "mov", "m4v"})
