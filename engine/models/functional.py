"""A module run on a flat vector of (some of) its parameters, as trajectory matching's student."""

from __future__ import annotations

from torch import Tensor, nn
from torch.func import functional_call

from engine.models.params import parameter_shapes, train_mode, unflatten


class FunctionalModel:
    """``model(theta, *inputs)``: the module with the parameters ``names`` taken from the flat vector
    ``theta`` (P,), every other parameter as it is, in the mode the experts trained it in
    (``train_mode``: frozen parts in eval mode)."""

    def __init__(self, module: nn.Module, names: list[str]):
        self.module = train_mode(module, names)
        self.shapes = parameter_shapes(module, names)
        self.buffers = dict(module.named_buffers())

    @property
    def num_parameters(self) -> int:
        return sum(shape.numel() for shape in self.shapes.values())

    def __call__(self, theta: Tensor, *inputs: Tensor):
        return functional_call(self.module, {**self.buffers, **unflatten(theta, self.shapes)}, inputs)
