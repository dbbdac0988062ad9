"""HeLlO (Yu et al., "Heavy Labels Out!"): a small image -> label projector that labels a student's views
online, instead of gigabytes of stored teacher logits.

    projector(x) = s · normalize(image_head(tower(x))) @ (T + U V)ᵀ
        T (classes, E)  the normalised text embeddings of "a photo of a {class}": recomputed from the class
                        names, never stored; with U V = 0 this is exactly CLIP zero-shot classification
        U V             a low-rank update of the head (U starts at zero)
        tower           the dual encoder's image tower with peft LoRA adapters on its convolutions
        s               1 / the dual encoder's temperature

    fitting, on the real training stream (the tower and heads frozen; only adapters, U and V train):
        loss = MSE(softmax(projector(x) / τ), mean_k softmax(teacher_k(x) / τ)) + λ · CE(projector(x), y)
        teacher_k: weak teachers, snapshots of one expert at several epochs

Only the adapters and U, V are stored (``adapter_state``): their parameter count and bytes are what a
student needs besides the dual encoder everyone already has.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from engine.config import Section
from engine.models.lora import add_lora
from engine.models.params import is_lora_parameter, train_mode
from engine.optim import seeded_global_rng

HEAD_PARAMETERS = ("head_down", "head_up")


class ProjectorConfig(Section):
    """The HeLlO label projector and how it is fitted."""

    template: str = Field("a photo of a {}", description="Class prompt; {} is the class name (underscores as spaces).")
    tower_rank: int = Field(8, ge=1, description="LoRA rank of the tower's adapters.")
    tower_alpha: float = Field(16.0, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["conv"], description="Tower modules adapted.")
    head_rank: int = Field(8, ge=1, description="Rank of the head's update U V.")
    teacher_epochs: list[int] | None = Field(None, description="Weak teachers: epochs of the teacher expert "
                                             "whose mean soft label the projector imitates (None: the teacher).")
    temperature: float = Field(4.0, gt=0, description="Softmax temperature of the soft labels it imitates.")
    ce_weight: float = Field(0.1, ge=0, description="λ: weight of the cross-entropy to the hard labels.")
    epochs: int = Field(1, ge=1, description="Epochs over the real training split.")
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of the adapters and the head update.")
    max_batches: int | None = Field(None, ge=1, description="Stop each epoch after this many batches (None: all).")
    store_dtype: Literal["float16", "float32"] = Field(
        "float16", description="How the adapters are stored; students are labelled by the stored values.")


def class_prompts(names: Sequence[str], template: str) -> list[str]:
    return [template.format(name.replace("_", " ")) for name in names]


class Projector(nn.Module):
    """Image -> class logits through a dual encoder's image side and the class prompts' text embeddings."""

    def __init__(self, tower: nn.Module, image_head: nn.Module, class_text: Tensor, temperature: float,
                 head_rank: int):
        super().__init__()
        self.tower, self.image_head = tower, image_head
        self.register_buffer("class_text", F.normalize(class_text, dim=-1))  # (classes, E)
        self.head_down = nn.Parameter(torch.zeros(len(class_text), head_rank))
        generator = torch.Generator().manual_seed(0)  # U = 0 makes the start zero-shot whatever V is; V seeded
        self.head_up = nn.Parameter(torch.randn(head_rank, class_text.shape[1], generator=generator)
                                    / class_text.shape[1] ** 0.5)
        self.scale = 1.0 / temperature

    def embed(self, x: Tensor) -> Tensor:
        return F.normalize(self.image_head(self.tower(x)), dim=-1)

    def head(self) -> Tensor:
        return self.class_text + self.head_down @ self.head_up

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * self.embed(x) @ self.head().T  # (B, classes)


def build_projector(encoder: nn.Module, class_text: Tensor, temperature: float, config: ProjectorConfig) -> Projector:
    """A projector on ``encoder``'s image tower and head (a ``DualEncoder``, its weights frozen), adapters
    added to the tower; afterwards only the adapters and the head update require grad."""
    encoder.requires_grad_(False)
    with seeded_global_rng(0):  # peft draws the A matrices from the global generator
        tower = add_lora(encoder.image_encoder, config.target_modules, config.tower_rank, config.tower_alpha)
    projector = Projector(tower, encoder.image_head, class_text, temperature, config.head_rank)
    for name, param in projector.named_parameters():
        param.requires_grad_(is_stored(name))
    return projector


def is_stored(name: str) -> bool:
    return name in HEAD_PARAMETERS or is_lora_parameter(name)


def adapter_state(projector: Projector, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """What HeLlO stores: the tower's adapters and the head update, nothing else."""
    return {name: p.detach().cpu().to(dtype).contiguous() for name, p in projector.named_parameters()
            if is_stored(name)}


def load_adapter_state(projector: Projector, state: dict[str, Tensor], source: str) -> None:
    expected = {name for name, _ in projector.named_parameters() if is_stored(name)}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"{source}: adapters of another projector (missing {missing[:3]}, unexpected {extra[:3]})")
    params = dict(projector.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise ValueError(f"{source}: {name} is {tuple(value.shape)}, the projector's {tuple(params[name].shape)}")
            params[name].copy_(value.to(params[name].dtype))


def soft_targets(teachers: Sequence[nn.Module], x: Tensor, temperature: float) -> Tensor:
    """The weak teachers' mean soft label of each image."""
    with torch.no_grad():
        return torch.stack([F.softmax(t(x) / temperature, dim=1) for t in teachers]).mean(0)


def fit_projector(projector: nn.Module, batches: Callable[[int], Iterable[tuple[Tensor, Tensor]]], teachers: Sequence[nn.Module],
                  config: ProjectorConfig, augment: Callable[[Tensor], Tensor],
                  log: Callable[[str], None] = print) -> list[float]:
    """Train the adapters and the head update on the real training batches (``batches(epoch)`` yields
    (images, labels) in the projector's input space); returns the mean loss of each epoch."""
    trained = [name for name, p in projector.named_parameters() if p.requires_grad]
    params = [p for p in projector.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    for teacher in teachers:
        teacher.eval()
    train_mode(projector, trained)  # the frozen tower stays in eval mode
    history = []
    for epoch in range(config.epochs):
        total, count = 0.0, 0
        for step, (x, y) in enumerate(batches(epoch)):
            if config.max_batches is not None and step >= config.max_batches:
                break
            x = augment(x)
            target = soft_targets(teachers, x, config.temperature)
            logits = projector(x)
            loss = F.mse_loss(F.softmax(logits / config.temperature, dim=1), target, reduction="sum") / len(x)
            loss = loss + config.ce_weight * F.cross_entropy(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * len(x), count + len(x)
        history.append(total / max(count, 1))
        log(f"  projector epoch {epoch + 1}/{config.epochs}: loss {history[-1]:.4f} ({count:,} images)")
    projector.eval()
    return history
