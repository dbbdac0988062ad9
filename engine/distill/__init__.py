"""Distillation methods, by name. A new method is one file with a ``Config`` (``method: <name>``) and a
class implementing ``engine.distill.base.DistillMethod``, plus one line in ``METHODS`` and one in
``DistillConfig``."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, TypeAdapter

from engine.distill import dm, mtt, vl
from engine.distill.base import DistillMethod

METHODS: dict[str, type[DistillMethod]] = {
    "mtt": mtt.MTT,
    "vl": vl.VisionLanguage,
    "dm": dm.DistributionMatching,
}

# The `distill` section: `method` picks the method and with it the keys that are allowed.
DistillConfig = Annotated[mtt.Config | vl.Config | dm.Config, Field(discriminator="method")]
DISTILL_CONFIG = TypeAdapter(DistillConfig)

__all__ = ["DISTILL_CONFIG", "METHODS", "DistillConfig"]
