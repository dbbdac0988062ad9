"""Vision-language dataset distillation (Wu, Zhang, Deng, Russakovsky; TMLR 2024): image-text pairs.

    synthetic pairs: M images (pixels, model-input space) and M text vectors in the frozen text
    tower's output space, fed straight to the text head; initialised from random real pairs
    step sizes: α_image for the image side (tower or its LoRA adapters, image head), α_text for the
    text head
    inner step i: θ̂_{i+1} = θ̂_i − α ⊙ ∇_θ InfoNCE_τ(f_θ̂_i(A_i(x[b_i])), g_θ̂_i(t[b_i]))
    loss: Σ over the two sides of the normalised parameter distance; its gradient:
    ``engine.distill.matching`` (unrolled or exact, as for MTT); outer loop: ``loop``

The temperature is the experts' (τ = 0.07 by default), the same in every loss: the public code's
inner-loop scaling by log(1/0.07) is not copied.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from engine.data.stream import StreamedImages
from engine.distill.base import MethodSetup, OuterSGD, TrainData
from engine.distill.matching import TrajectoryMatching, TrajectoryMatchingConfig
from engine.distill.synthetic import SyntheticSet
from engine.errors import DataError
from engine.losses import infonce_loss
from engine.models.functional import FunctionalModel

IMAGE, TEXT = 0, 1  # parameter groups: one step size and one distance term each
TEXT_PREFIX = "text_head."


def side_of(name: str) -> int:
    return TEXT if name.startswith(TEXT_PREFIX) else IMAGE


def learned_lr(alphas: Tensor) -> Callable[[str], float]:
    """Parameter name -> its side's learned step size (α_image or α_text), to train fresh models."""
    values = alphas.tolist()
    return lambda name: values[side_of(name)]


class Config(TrajectoryMatchingConfig):
    method: Literal["vl"] = "vl"
    lr_text: float | None = Field(None, gt=0, description="Outer SGD lr of the text vectors (default lr_img).")


class VisionLanguage(TrajectoryMatching):
    Config = Config
    objective: ClassVar[str] = "contrastive"
    config: Config

    def __init__(self, config: Config, setup: MethodSetup):
        super().__init__(config, setup)
        sides = [side_of(name) for name in setup.names]
        if TEXT not in sides or IMAGE not in sides:
            raise DataError(f"vision-language matching needs recorded image-side and text-head parameters, "
                            f"got {setup.names[:4]}…")
        sizes = [shape.numel() for shape in self.student.shapes.values()]
        self.groups = torch.repeat_interleave(torch.tensor(sides), torch.tensor(sizes)).to(setup.device)
        self.temperature = setup.temperature

    def loss(self, student: FunctionalModel, theta: Tensor, x: Tensor, text: Tensor) -> Tensor:
        return infonce_loss(*student(theta, x, text), self.temperature)

    def targets(self, synthetic: SyntheticSet) -> Tensor:
        return synthetic.text

    def optimizer(self) -> dict[str, OuterSGD]:
        return super().optimizer() | {"text": OuterSGD(self.config.lr_text or self.config.lr_img,
                                                       self.config.momentum)}

    def init(self, data: TrainData, generator: torch.Generator) -> SyntheticSet:
        if data.caption_features is None or data.caption_image is None:
            raise DataError("vision-language distillation needs image-text data (caption features)")
        return init_pairs(data.images, data.caption_features, data.caption_image, self.config.ipc, self.config,
                          self.setup.step_size, generator)

    def describe(self, synthetic: SyntheticSet, data: TrainData) -> tuple[dict[str, Any], list[str] | None]:
        """Each synthetic text vector shown as its nearest real caption."""
        metadata, _ = super().describe(synthetic, data)
        nearest = nearest_captions(synthetic.text, data.caption_features, data.captions)
        metadata["nearest_captions"] = [{"caption": c, "similarity": round(v, 4)} for c, v in nearest]
        return metadata, [c for c, _ in nearest]


def init_pairs(images: Tensor | StreamedImages, text_features: Tensor, caption_image: Tensor, count: int,
               config: Config, step_size: float, generator: torch.Generator) -> SyntheticSet:
    """``count`` random real pairs: distinct images, each with one of its captions chosen at random
    (or Gaussian noise with the real features' per-dimension mean and std). ``images`` may be the split
    streamed: only the chosen images are fetched."""
    if count < 2:
        raise DataError(f"distill.ipc={count}: image-text distillation needs at least 2 pairs "
                        "(InfoNCE over one pair is constant)")
    if count > len(images):
        raise DataError(f"{count} synthetic pairs asked for, but the training split has {len(images)} images")
    chosen = torch.randperm(len(images), generator=generator)[:count]
    captions = []
    for image in chosen.tolist():
        own = (caption_image == image).nonzero().flatten()
        captions.append(int(own[torch.randint(len(own), (1,), generator=generator)]))
    if config.init == "real":
        syn_images, syn_text = images[chosen].clone(), text_features[torch.tensor(captions)].clone()
    else:
        syn_images = torch.randn((count, *images.shape[1:]), generator=generator).to(text_features.device)
        noise = torch.randn((count, text_features.shape[1]), generator=generator).to(text_features)
        syn_text = text_features.mean(0) + noise * text_features.std(0)
    alphas = torch.full((2,), step_size, dtype=syn_images.dtype, device=syn_images.device)
    metadata = {"init_images": chosen.tolist(), "init_captions": captions}
    return SyntheticSet(syn_images, alphas, text=syn_text, metadata=metadata)


def nearest_captions(text: Tensor, features: Tensor, captions: list[str]) -> list[tuple[str, float]]:
    """Each synthetic text vector shown as its nearest real caption (cosine similarity) and that similarity."""
    a = torch.nn.functional.normalize(text.float(), dim=1)
    b = torch.nn.functional.normalize(features.float(), dim=1)
    similarity, index = (a @ b.T).max(dim=1)
    return [(captions[i], float(s)) for i, s in zip(index.tolist(), similarity.tolist(), strict=True)]
