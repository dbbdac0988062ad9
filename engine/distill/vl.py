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
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from engine.data.augment import DSA, DSADraw
from engine.distill.config import DistillConfig
from engine.distill.loop import minibatch_schedule
from engine.distill.mtt import FunctionalModel, step_rng_seeds
from engine.distill.synthetic import SyntheticSet
from engine.errors import DataError
from engine.trajectories.train import infonce_loss, seeded_global_rng

IMAGE, TEXT = 0, 1  # parameter groups: one step size and one distance term each
TEXT_PREFIX = "text_head."


def side_of(name: str) -> int:
    return TEXT if name.startswith(TEXT_PREFIX) else IMAGE


def learned_lr(alphas: Tensor) -> Callable[[str], float]:
    """Parameter name -> its side's learned step size (α_image or α_text), to train fresh models."""
    values = alphas.tolist()
    return lambda name: values[side_of(name)]


@dataclass
class ContrastiveProblem:
    """ℓ_i(θ) = InfoNCE_τ(images A_i(x[b_i]), text vectors t[b_i]) with batches, draws and dropout seeds fixed
    up front."""

    student: FunctionalModel
    images: Tensor
    text: Tensor
    batches: list[Tensor]
    dsa: DSA | None
    draws: list[DSADraw] | None
    rng_seeds: list[int]
    temperature: float

    def step_loss(self, theta: Tensor, step: int) -> Tensor:
        index = self.batches[step]
        x = self.images[index]
        if self.dsa is not None:
            x = self.dsa.apply(x, self.draws[step])
        with seeded_global_rng(self.rng_seeds[step], theta.device):
            image_emb, text_emb = self.student(theta, x, self.text[index])
        return infonce_loss(image_emb, text_emb, self.temperature)


class VisionLanguage:
    """The method object the loop asks for each segment's inner problem."""

    def __init__(self, model: nn.Module, names: list[str], config: DistillConfig, temperature: float):
        self.student = FunctionalModel(model, names)
        self.config = config
        self.temperature = temperature
        self.dsa = DSA(config.dsa_strategy) if config.dsa else None
        device = next(model.parameters()).device
        sides = [side_of(name) for name in names]
        if TEXT not in sides or IMAGE not in sides:
            raise DataError(f"vision-language matching needs recorded image-side and text-head parameters, got {names[:4]}…")
        sizes = [shape.numel() for shape in self.student.shapes.values()]
        self.groups = torch.repeat_interleave(torch.tensor(sides), torch.tensor(sizes)).to(device)

    def problem(self, synthetic: SyntheticSet, generator: torch.Generator) -> ContrastiveProblem:
        batches = minibatch_schedule(len(synthetic), self.config.batch_syn, self.config.syn_steps, generator)
        shape = synthetic.images.shape[1:]
        draws = [self.dsa.sample((len(b), *shape), generator) for b in batches] if self.dsa else None
        return ContrastiveProblem(self.student, synthetic.images, synthetic.text, batches, self.dsa, draws,
                                  step_rng_seeds(len(batches), generator), self.temperature)


def init_pairs(images: Tensor, text_features: Tensor, caption_image: Tensor, count: int, config: DistillConfig,
               step_size: float, generator: torch.Generator) -> SyntheticSet:
    """``count`` random real pairs: distinct images, each with one of its captions chosen at random
    (or Gaussian noise with the real features' per-dimension mean and std)."""
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
        syn_images = torch.randn((count, *images.shape[1:]), generator=generator).to(images)
        noise = torch.randn((count, text_features.shape[1]), generator=generator).to(text_features)
        syn_text = text_features.mean(0) + noise * text_features.std(0)
    alphas = torch.full((2,), step_size, dtype=images.dtype, device=images.device)
    metadata = {"init_images": chosen.tolist(), "init_captions": captions}
    return SyntheticSet(syn_images, alphas, text=syn_text, metadata=metadata)


def nearest_captions(text: Tensor, features: Tensor, captions: list[str]) -> list[tuple[str, float]]:
    """Each synthetic text vector shown as its nearest real caption (cosine similarity) and that similarity."""
    a = torch.nn.functional.normalize(text.float(), dim=1)
    b = torch.nn.functional.normalize(features.float(), dim=1)
    similarity, index = (a @ b.T).max(dim=1)
    return [(captions[i], float(s)) for i, s in zip(index.tolist(), similarity.tolist(), strict=True)]
