"""A small 3D ConvNet for clips (B, T, C, H, W), the engine's one clip layout (readers, DSA, synthetic
sets): ConvNet-D with 3x3x3 convolutions, run on (B, C, T, H, W) inside.

Each block halves height and width, and halves time while at least two frames are left, so 8 frames
become 4, 2, 1 over three blocks and a single frame stays one.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from engine.errors import ConfigError
from engine.models.convnet import norm_layer
from engine.models.params import CLASSIFIER_GROUPS


def _video_block(in_channels: int, width: int, norm: str, time_pool: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv=nn.Conv3d(in_channels, width, kernel_size=3, padding=1),
        norm=norm_layer(norm, width, dims=3),
        act=nn.ReLU(inplace=False),
        pool=nn.AvgPool3d((time_pool, 2, 2)),
    ))


class VideoConvNet(nn.Module):
    group_prefixes = CLASSIFIER_GROUPS

    def __init__(self, channels: int, num_classes: int, frames: int, image_size: int, width: int, depth: int,
                 norm: str):
        super().__init__()
        blocks, time, side = [], frames, image_size
        for i in range(depth):
            time_pool = 2 if time >= 2 else 1
            blocks.append(_video_block(channels if i == 0 else width, width, norm, time_pool))
            time, side = time // time_pool, side // 2
        if side < 1:
            raise ConfigError(f"video_convnet: {depth} poolings leave nothing of {image_size} px frames")
        self.blocks = nn.Sequential(*blocks)
        self.feature_dim = width * time * side * side
        self.classifier = nn.Linear(self.feature_dim, num_classes) if num_classes else nn.Identity()

    def features(self, x: Tensor) -> Tensor:
        """(B, T, C, H, W) -> (B, feature_dim): the flattened last feature volume."""
        return self.blocks(x.transpose(1, 2)).flatten(1)  # Conv3d wants (B, C, T, H, W)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))  # (B, num_classes)


def video_convnet(channels: int, num_classes: int, frames: int, image_size: int, width: int = 64,
                  depth: int = 3, norm: str = "instance") -> VideoConvNet:
    """3D ConvNet-D for clips of ``frames`` frames of ``image_size`` px."""
    return VideoConvNet(channels, num_classes, frames, image_size, width=width, depth=depth, norm=norm)
