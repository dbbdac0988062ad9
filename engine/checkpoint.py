"""safetensors as the engine's one tensor file format: metadata, header reads, dtypes."""

from __future__ import annotations

import json

import torch
from torch import Tensor

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes: 8-byte little-endian header length, then JSON."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]).get("__metadata__", {})


def decode_tensor(raw: bytes, dtype: str, shape: list[int]) -> Tensor:
    """One tensor from its raw bytes as a safetensors header describes it (``dtype`` e.g. "F32")."""
    torch_dtype = DTYPES[dtype]
    if not raw:
        return torch.empty(shape, dtype=torch_dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch_dtype).reshape(shape)
