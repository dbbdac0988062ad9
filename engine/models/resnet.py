"""ResNet-18 with batch or instance norm (the students of MTT/DATM cross-architecture tables and of HeLlO).

Images of 64 px or less get the CIFAR stem (3x3 conv, stride 1, no max-pool); larger ones the ImageNet
stem (7x7 conv, stride 2, 3x3 max-pool). Written with plain layers and no in-place ops, so it runs under
``functional_call`` and double backward.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from engine.models.convnet import norm_layer
from engine.models.params import CLASSIFIER_GROUPS

STAGE_WIDTHS = (64, 128, 256, 512)
SMALL_IMAGE_MAX = 64


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = norm_layer(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = norm_layer(norm, out_channels)
        self.act = nn.ReLU(inplace=False)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                norm=norm_layer(norm, out_channels),
            ))

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))


def _stem(channels: int, norm: str, small: bool) -> nn.Sequential:
    if small:
        return nn.Sequential(OrderedDict(
            conv=nn.Conv2d(channels, 64, 3, padding=1, bias=False), norm=norm_layer(norm, 64), act=nn.ReLU()))
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False), norm=norm_layer(norm, 64),
        act=nn.ReLU(), pool=nn.MaxPool2d(3, stride=2, padding=1)))


class ResNet(nn.Module):
    """A ResNet of BasicBlocks; ``blocks`` per stage, e.g. (2, 2, 2, 2) for ResNet-18."""

    group_prefixes = CLASSIFIER_GROUPS

    def __init__(self, channels: int, num_classes: int, blocks: tuple[int, ...], norm: str, small_stem: bool):
        super().__init__()
        self.stem = _stem(channels, norm, small_stem)
        stages, width = [], 64
        for i, (out_width, count) in enumerate(zip(STAGE_WIDTHS, blocks, strict=True)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(*[
                BasicBlock(width if j == 0 else out_width, out_width, stride if j == 0 else 1, norm)
                for j in range(count)]))
            width = out_width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = width
        self.classifier = nn.Linear(width, num_classes) if num_classes else nn.Identity()

    def features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, 512): globally average-pooled last stage."""
        return self.pool(self.stages(self.stem(x))).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))  # (B, num_classes)


def resnet18(channels: int, num_classes: int, norm: str = "batch", image_size: int = 32) -> ResNet:
    """ResNet-18; ``image_size`` only chooses the stem (any input size works)."""
    return ResNet(channels, num_classes, (2, 2, 2, 2), norm, small_stem=image_size <= SMALL_IMAGE_MAX)


def resnet18_bn(channels: int = 3, num_classes: int = 10, image_size: int = 32) -> ResNet:
    """ResNet-18 with batch norm (HeLlO/RDED students)."""
    return resnet18(channels, num_classes, norm="batch", image_size=image_size)


def resnet18_in(channels: int = 3, num_classes: int = 10, image_size: int = 32) -> ResNet:
    """ResNet-18 with instance norm (GroupNorm per channel), as in MTT's cross-architecture tables."""
    return resnet18(channels, num_classes, norm="instance", image_size=image_size)
