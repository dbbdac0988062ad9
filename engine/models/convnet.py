"""ConvNet-D, the network of DC, DSA and MTT: depth x [conv 3x3 -> norm -> ReLU -> 2x2 pool] -> linear.

Nothing here modifies a tensor in place, so the student can be run with ``torch.func.functional_call``
and differentiated twice (trajectory matching differentiates through its SGD steps).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from engine.errors import ConfigError
from engine.models.params import CLASSIFIER_GROUPS

NORMS = ("instance", "batch", "none")
POOLS = ("avg", "max", "none")


def norm_layer(kind: str, channels: int, dims: int = 2) -> nn.Module:
    """A normalisation layer for ``channels`` feature maps (``dims`` 2 for images, 3 for clips).

    "instance" is GroupNorm with one group per channel, as in the MTT/DC code: affine, statistics per
    sample (an output does not depend on the rest of the batch) and no running buffers.
    """
    if kind == "instance":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm3d(channels)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"norm must be one of {', '.join(NORMS)}; got {kind!r}")


def _pool_layer(kind: str) -> nn.Module:
    if kind == "avg":
        return nn.AvgPool2d(2, 2)
    if kind == "max":
        return nn.MaxPool2d(2, 2)
    if kind == "none":
        return nn.Identity()
    raise ConfigError(f"pool must be one of {', '.join(POOLS)}; got {kind!r}")


def _conv_block(in_channels: int, width: int, norm: str, pool: str) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
        norm=norm_layer(norm, width),
        act=nn.ReLU(inplace=False),
        pool=_pool_layer(pool),
    ))


class ConvNet(nn.Module):
    """ConvNet-D. ``num_classes=0`` leaves out the head: ``forward`` then returns the features (an image tower)."""

    group_prefixes = CLASSIFIER_GROUPS

    def __init__(self, channels: int, num_classes: int, image_size: int, width: int, depth: int,
                 norm: str, pool: str):
        super().__init__()
        side = image_size
        for _ in range(depth):
            side = side // 2 if pool != "none" else side  # 2x2 pooling floors odd sizes (28 -> 14 -> 7 -> 3)
        if side < 1:
            raise ConfigError(f"convnet: {depth} poolings leave nothing of {image_size} px images")
        self.blocks = nn.Sequential(*[_conv_block(channels if i == 0 else width, width, norm, pool)
                                      for i in range(depth)])
        self.feature_dim = width * side * side
        self.classifier = nn.Linear(self.feature_dim, num_classes) if num_classes else nn.Identity()

    def features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, feature_dim): the flattened last feature map, input of the head."""
        return self.blocks(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))  # (B, num_classes)


def convnet(channels: int, num_classes: int, image_size: int, width: int = 128, depth: int = 3,
            norm: str = "instance", pool: str = "avg") -> ConvNet:
    """ConvNet-D for ``image_size`` px square images with ``channels`` channels."""
    return ConvNet(channels, num_classes, image_size, width=width, depth=depth, norm=norm, pool=pool)


def convnet_d3(channels: int = 3, num_classes: int = 10, image_size: int = 32) -> ConvNet:
    """ConvNet-D3: 32 px (CIFAR, also 28 px MNIST)."""
    return convnet(channels, num_classes, image_size, width=128, depth=3)


def convnet_d4(channels: int = 3, num_classes: int = 200, image_size: int = 64) -> ConvNet:
    """ConvNet-D4: 64 px (Tiny-ImageNet)."""
    return convnet(channels, num_classes, image_size, width=128, depth=4)


def convnet_d5(channels: int = 3, num_classes: int = 10, image_size: int = 128) -> ConvNet:
    """ConvNet-D5: 128 px (ImageNet subsets such as ImageNette)."""
    return convnet(channels, num_classes, image_size, width=128, depth=5)
