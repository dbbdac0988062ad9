"""Parameters as data: named groups, flat vectors for ``torch.func.functional_call``, checkpoints.

Trajectory matching runs the student functionally::

    names = select_parameters(model, "all")
    shapes = parameter_shapes(model, names)
    buffers = dict(model.named_buffers())
    logits = functional_call(model, {**buffers, **unflatten(theta, shapes)}, (x,))

so a trajectory is a sequence of flat vectors ``theta`` (P,) over a fixed, ordered list of names.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from engine.errors import ConfigError

log = logging.getLogger(__name__)

# (name prefix, group) pairs, first match wins; classifiers name their linear head ``classifier``.
CLASSIFIER_GROUPS = (("classifier.", "head"), ("", "encoder"))
LORA_GROUP = "lora"


def is_lora_parameter(name: str) -> bool:
    """peft names adapter weights ``<module>.lora_A.<adapter>.weight`` (and ``lora_B``)."""
    return ".lora_" in name


def parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """Group name -> parameter names, in ``named_parameters`` order.

    A model declares its groups with ``group_prefixes``; adapter weights form the ``lora`` group
    wherever they sit. Parameters under no prefix (a frozen text tower) belong to no group.
    """
    prefixes = getattr(model, "group_prefixes", None)
    if prefixes is None:
        raise ConfigError(f"{type(model).__name__} declares no parameter groups (group_prefixes)")
    groups: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        group = next((g for prefix, g in prefixes if name.startswith(prefix)), None)
        if group is not None:
            groups.setdefault(LORA_GROUP if is_lora_parameter(name) else group, []).append(name)
    return groups


def select_parameters(model: nn.Module, selection: str) -> list[str]:
    """Names of the parameters in ``selection`` (in ``named_parameters`` order): "all", "heads", a group,
    or groups joined by "+".

    "heads" means every group whose name ends in "head" (``head``; ``image_head`` and ``text_head``),
    so "lora+heads" is the adapter-and-projection set of LoRA matching.
    """
    groups = parameter_groups(model)
    chosen: set[str] = set()
    for part in selection.split("+"):
        if part == "all":
            chosen.update(groups)
        elif part == "heads":
            chosen.update(g for g in groups if g.endswith("head"))
        elif part in groups:
            chosen.add(part)
        else:
            raise ConfigError(f"parameter selection {selection!r}: no group {part!r} in {type(model).__name__} "
                              f"(groups: {', '.join(groups)}; or all, heads)")
    names = {name for group in chosen for name in groups[group]}
    return [name for name, _ in model.named_parameters() if name in names]


def train_mode(model: nn.Module, trained: Collection[str]) -> nn.Module:
    """Put ``model`` in the mode it is trained in, the same for experts, the distillation student and
    evaluation networks: training mode, except every submodule none of whose parameters is in
    ``trained``, which runs in eval mode. A frozen tower therefore keeps its batch-norm statistics and
    runs without dropout, and the function the student follows is the function the experts followed.
    Parameter-free layers (dropout) follow their parent."""
    model.train()

    def visit(module: nn.Module, prefix: str) -> None:
        names = [prefix + name for name, _ in module.named_parameters()]
        if names and not any(name in trained for name in names):
            module.eval()
            return
        for child_name, child in module.named_children():
            visit(child, f"{prefix}{child_name}.")

    trained = set(trained)
    visit(model, "")
    return model


def full_matching_size(model: nn.Module) -> int:
    """Parameters that full matching records: every group but the LoRA adapters (which re-parameterise
    the tower they sit in), the baseline a LoRA-matching run is compared with."""
    params = dict(model.named_parameters())
    return sum(params[n].numel() for group, names in parameter_groups(model).items() if group != LORA_GROUP
               for n in names)


def _named(model: nn.Module, names: Sequence[str]) -> list[tuple[str, Tensor]]:
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ConfigError(f"{type(model).__name__} has no parameters {missing[:5]} ({len(missing)} missing)")
    return [(n, params[n]) for n in names]


def parameter_shapes(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Size]:
    return {name: p.shape for name, p in _named(model, names)}


def describe_parameters(model: nn.Module, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """``[{name, shape, dtype}]`` (JSON values) for ``names``, default every parameter."""
    names = [n for n, _ in model.named_parameters()] if names is None else names
    return [{"name": n, "shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch.")}
            for n, p in _named(model, names)]


def flatten(params: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one vector (P,), keeping autograd."""
    tensors = list(params.values()) if isinstance(params, Mapping) else list(params)
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, shapes: Mapping[str, Sequence[int]]) -> dict[str, Tensor]:
    """Split a vector (P,) into named views of ``shapes`` (no copy, autograd flows back to ``vector``)."""
    sizes = [math.prod(shape) for shape in shapes.values()]
    if vector.ndim != 1 or vector.numel() != sum(sizes):
        raise ValueError(f"vector of shape {tuple(vector.shape)} does not hold {sum(sizes)} parameters")
    chunks = vector.split(sizes)
    return {name: chunk.view(tuple(shape)) for (name, shape), chunk in zip(shapes.items(), chunks, strict=True)}


def get_flat(model: nn.Module, names: Sequence[str]) -> Tensor:
    """The current values of ``names`` as one detached vector (P,)."""
    return flatten([p.detach() for _, p in _named(model, names)]).clone()


@torch.no_grad()
def set_flat(model: nn.Module, names: Sequence[str], vector: Tensor) -> None:
    """Copy a vector (P,) into the parameters ``names`` of ``model``."""
    named = _named(model, names)
    for (_, param), value in zip(named, unflatten(vector, {n: p.shape for n, p in named}).values(), strict=True):
        param.copy_(value)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A local checkpoint: ``.safetensors``, or a ``torch.save`` file read with ``weights_only=True``.

    A torch file may hold the state dict itself or a self-describing checkpoint with a ``state_dict`` key.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"checkpoint {path}: no such file")
    if path.suffix == ".safetensors":
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"checkpoint {path}: expected a mapping of parameter names to tensors")
    return dict(state)


def load_weights(module: nn.Module, path: str | Path) -> None:
    """Load a local checkpoint into ``module``; every tensor of ``module`` must be present with its shape.

    Foreign state dicts are normalised first: a ``module.`` (DDP) or ``_orig_mod.`` (torch.compile)
    prefix is stripped, a saved ``DualEncoder`` contributes its ``image_encoder.*`` tensors, and keys
    under top-level modules that ``module`` lacks are ignored (the ``classifier`` of a pre-trained
    ConvNet loaded as a tower, the text tower of an open_clip checkpoint).
    """
    state = read_state_dict(path)
    for prefix in ("module.", "_orig_mod."):
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    if any(k.startswith("image_encoder.") for k in state):
        state = {k.removeprefix("image_encoder."): v for k, v in state.items() if k.startswith("image_encoder.")}
    expected = module.state_dict()
    tops = {k.split(".", 1)[0] for k in expected}
    ignored = sorted({k.split(".", 1)[0] for k in state if k.split(".", 1)[0] not in tops})
    if ignored:
        log.info("checkpoint %s: ignoring %s", path, ", ".join(ignored))
    state = {k: v for k, v in state.items() if k.split(".", 1)[0] in tops}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ConfigError(f"checkpoint {path} does not fit {type(module).__name__}: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]}")
    module.load_state_dict(state)
