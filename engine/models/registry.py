"""Models as data: a ``ModelSpec`` names a builder of ``ARCHITECTURES`` and all of its arguments.

A spec is canonical: on validation the arguments are checked against the builder's signature (names
and annotated types, so ``4`` for a float becomes ``4.0``), every default is filled in, keys are
sorted and values made plain JSON (tuples become lists; a nested spec such as ``clip``'s
``image_tower`` is canonicalised too). Two specs are equal exactly when they build the same model,
which is what a trajectory store checks before it lets a model be matched against its experts.
``convnet_d3`` and ``convnet`` with ``depth=3`` are different specs: configs should name one.
"""

from __future__ import annotations

import inspect
import json
import typing
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from torch import nn

from engine.errors import ConfigError
from engine.models.clip import DualEncoder, clip, clip_convnet, clip_tiny, open_clip_vision
from engine.models.convnet import convnet, convnet_d3, convnet_d4, convnet_d5
from engine.models.lora import add_lora
from engine.models.resnet import resnet18, resnet18_bn, resnet18_in
from engine.models.video import video_convnet

ARCHITECTURES: Mapping[str, Callable[..., nn.Module]] = MappingProxyType({
    "convnet": convnet,
    "convnet_d3": convnet_d3,
    "convnet_d4": convnet_d4,
    "convnet_d5": convnet_d5,
    "resnet18": resnet18,
    "resnet18_bn": resnet18_bn,
    "resnet18_in": resnet18_in,
    "video_convnet": video_convnet,
    "open_clip_vision": open_clip_vision,
    "clip": clip,
    "clip_tiny": clip_tiny,
    "clip_convnet": clip_convnet,
})


class LoraSpec(BaseModel):
    """LoRA adapters on the Linear/Conv2d modules named by ``target_modules`` (of the image tower for clip)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_modules: list[str] = Field(min_length=1, description="Module names or name suffixes, e.g. mlp.c_fc.")
    rank: int = Field(gt=0, description="Rank r of each update B @ A.")
    alpha: float = Field(gt=0, description="Scale: the update is multiplied by alpha / rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")

    @field_validator("target_modules")
    @classmethod
    def _sorted(cls, value: list[str]) -> list[str]:
        return sorted(set(value))


class ModelSpec(BaseModel):
    """A complete, canonical, JSON-serialisable description of a model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str = Field(description="A name in ARCHITECTURES.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Builder arguments, defaults filled in.")
    lora: LoraSpec | None = Field(None, description="Adapters added after building.")

    @model_validator(mode="before")
    @classmethod
    def _canonical(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        arch = data.get("arch")
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHITECTURES)}")
        return {**data, "kwargs": canonical_kwargs(arch, data.get("kwargs") or {})}

    @classmethod
    def create(cls, arch: str, lora: LoraSpec | Mapping[str, Any] | None = None, **kwargs: Any) -> ModelSpec:
        """``ModelSpec.create("convnet_d3", num_classes=100)``; bad names or arguments raise ConfigError."""
        try:
            return cls.model_validate({"arch": arch, "kwargs": kwargs, "lora": lora})
        except ValidationError as err:
            raise ConfigError(f"model spec {arch!r}: {_message(err)}") from err

    def to_json(self) -> str:
        """Compact JSON with sorted keys: equal specs give equal strings."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        return cls.model_validate_json(text)


def _message(err: ValidationError) -> str:
    return err.errors()[0]["msg"].removeprefix("Value error, ")


def _arguments_model(arch: str) -> type[BaseModel]:
    """A pydantic model of the builder's signature: its annotations, its defaults, nothing else."""
    builder = ARCHITECTURES[arch]
    hints = typing.get_type_hints(builder)
    fields: dict[str, Any] = {
        name: (hints.get(name, Any), ... if param.default is inspect.Parameter.empty else param.default)
        for name, param in inspect.signature(builder).parameters.items()}
    return create_model(f"{arch}_arguments", __config__=ConfigDict(extra="forbid"), **fields)


def canonical_kwargs(arch: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``kwargs`` against the builder's signature (names and types), fill defaults, sort, reduce to JSON."""
    try:
        values = _arguments_model(arch).model_validate(dict(kwargs)).model_dump(mode="json")
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ValueError(f"{arch}: {problems}") from None
    for name, value in values.items():
        if isinstance(value, Mapping) and "arch" in value:  # a nested model spec, e.g. clip's image_tower
            values[name] = ModelSpec.model_validate(value).model_dump(mode="json")
    return dict(sorted(values.items()))


# Arguments the engine fills from the data (and the pre-trained tower) when a builder takes them.
FROM_DATA = {"channels": 3, "num_classes": 2, "image_size": 32, "frames": 8}


def check_arguments(arch: str, kwargs: Mapping[str, Any]) -> None:
    """Names and types of a config's ``model.kwargs`` against the builder, before any data is read: the
    arguments that come from the data may be missing (they are checked when they are filled in)."""
    takes = inspect.signature(ARCHITECTURES[arch]).parameters
    canonical_kwargs(arch, {**{k: v for k, v in FROM_DATA.items() if k in takes}, **kwargs})


def declared_groups(arch: str) -> list[str] | None:
    """The parameter groups the architecture's model class declares (``group_prefixes``), if it does."""
    model_class = typing.get_type_hints(ARCHITECTURES[arch]).get("return")
    prefixes = getattr(model_class, "group_prefixes", None)
    return None if prefixes is None else list(dict.fromkeys(group for _, group in prefixes))


def check_selection(selection: str, groups: list[str], lora: bool) -> None:
    """``experts.record``'s grammar: ``all``, ``heads`` or group names, joined by '+'."""
    known = ["all", "heads", *groups, *(["lora"] if lora else [])]
    unknown = [part for part in selection.split("+") if part not in known]
    if unknown:
        raise ValueError(f"{selection!r}: unknown part {unknown[0]!r}; choose from {', '.join(known)} "
                         "(joined by '+')")


def build_model(spec: ModelSpec | Mapping[str, Any]) -> nn.Module:
    """Build the model a spec describes; LoRA, if any, goes on the image tower of a dual encoder."""
    if not isinstance(spec, ModelSpec):
        try:
            spec = ModelSpec.model_validate(spec)
        except ValidationError as err:
            raise ConfigError(f"model spec: {_message(err)}") from err
    model = ARCHITECTURES[spec.arch](**spec.kwargs)
    if spec.lora is not None:
        target = model.image_encoder if isinstance(model, DualEncoder) else model
        add_lora(target, spec.lora.target_modules, spec.lora.rank, spec.lora.alpha, spec.lora.dropout)
    return model
