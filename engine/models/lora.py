"""Low-rank adapters (peft LoRA) on the Linear and Conv2d layers of any module.

LoRA matching trains and matches only adapters (and projection heads): ``add_lora`` freezes every
other parameter of the module it is given. The B matrices start at zero, so an adapted model computes
exactly what the base model computes until the adapters are trained.

``nn.MultiheadAttention`` (open_clip's ViT attention) is refused: its forward reads ``in_proj_weight``
and ``out_proj.weight`` directly, so an adapter on ``out_proj`` would be silently ignored, and peft's
attention adapter merges weights in place around each call, which ``functional_call`` cannot follow.
Target ``mlp.c_fc`` / ``mlp.c_proj`` in a ViT, ``conv`` in a ConvNet.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn

from engine.errors import ConfigError
from engine.extras import require
from engine.models.params import count_parameters

log = logging.getLogger(__name__)

ADAPTABLE = (nn.Linear, nn.Conv2d)


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list of targets: the module name is the target or ends in ``.<target>``."""
    return name == target or name.endswith("." + target)


def lora_targets(module: nn.Module, target_modules: Sequence[str]) -> list[str]:
    """Names of the modules ``target_modules`` selects; each must be a Linear or Conv2d outside attention."""
    attention_outputs = {f"{name}.out_proj" for name, m in module.named_modules()
                         if isinstance(m, nn.MultiheadAttention)}
    found = []
    for name, sub in module.named_modules():
        if not name or not any(_matches(name, t) for t in target_modules):
            continue
        if isinstance(sub, nn.MultiheadAttention) or name in attention_outputs:
            raise ConfigError(f"LoRA target {name}: nn.MultiheadAttention cannot be adapted here "
                              "(target the MLP Linear layers, e.g. mlp.c_fc and mlp.c_proj)")
        if not isinstance(sub, ADAPTABLE):
            raise ConfigError(f"LoRA target {name} is a {type(sub).__name__}; only Linear and Conv2d are adapted")
        found.append(name)
    if not found:
        raise ConfigError(f"LoRA targets {list(target_modules)} match no module of {type(module).__name__}")
    return found


def add_lora(module: nn.Module, target_modules: Sequence[str], rank: int, alpha: float,
             dropout: float = 0.0) -> nn.Module:
    """Inject LoRA adapters (in place) into the modules named by ``target_modules``; returns ``module``.

    Afterwards only adapter weights require grad. Adapted layers keep their weights under
    ``<name>.base_layer.*`` and gain ``<name>.lora_A.default.weight`` and ``<name>.lora_B.default.weight``.
    """
    peft = require("peft", "vl", "LoRA")  # slow import (pulls in transformers)
    LoraConfig, inject_adapter_in_model = peft.LoraConfig, peft.inject_adapter_in_model

    if rank < 1 or alpha <= 0:
        raise ConfigError(f"LoRA needs rank >= 1 and alpha > 0; got rank {rank}, alpha {alpha}")
    targets = lora_targets(module, target_modules)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=sorted(set(target_modules)),
                        bias="none", init_lora_weights=True)
    module = inject_adapter_in_model(config, module)
    trainable, total = count_parameters(module)
    log.info("LoRA rank %d on %d modules of %s: %d of %d parameters trainable (%.2f%%)",
             rank, len(targets), type(module).__name__, trainable, total, 100 * trainable / total)
    return module
