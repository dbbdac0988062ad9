"""Model builders: ConvNet-D, ResNet-18, a 3D ConvNet, a CLIP-style dual encoder, LoRA; specs and parameters.

Build from data with ``build_model(ModelSpec.create("convnet_d3", num_classes=10))``, or call a builder.
"""

from engine.models.clip import (
    DualEncoder,
    OpenClipVision,
    ProjectionHead,
    TextSettings,
    TextTower,
    clip,
    clip_convnet,
    clip_tiny,
    open_clip_vision,
    text_settings,
)
from engine.models.convnet import ConvNet, convnet, convnet_d3, convnet_d4, convnet_d5
from engine.models.lora import add_lora, lora_targets
from engine.models.params import (
    count_parameters,
    describe_parameters,
    flatten,
    full_matching_size,
    get_flat,
    load_weights,
    parameter_groups,
    parameter_shapes,
    read_state_dict,
    select_parameters,
    set_flat,
    train_mode,
    unflatten,
)
from engine.models.registry import ARCHITECTURES, LoraSpec, ModelSpec, build_model
from engine.models.resnet import ResNet, resnet18, resnet18_bn, resnet18_in
from engine.models.video import VideoConvNet, video_convnet

__all__ = [
    "ARCHITECTURES",
    "ConvNet",
    "DualEncoder",
    "LoraSpec",
    "ModelSpec",
    "OpenClipVision",
    "ProjectionHead",
    "ResNet",
    "TextSettings",
    "TextTower",
    "VideoConvNet",
    "add_lora",
    "build_model",
    "clip",
    "clip_convnet",
    "clip_tiny",
    "convnet",
    "convnet_d3",
    "convnet_d4",
    "convnet_d5",
    "count_parameters",
    "describe_parameters",
    "flatten",
    "full_matching_size",
    "get_flat",
    "load_weights",
    "lora_targets",
    "open_clip_vision",
    "parameter_groups",
    "parameter_shapes",
    "read_state_dict",
    "resnet18",
    "resnet18_bn",
    "resnet18_in",
    "select_parameters",
    "set_flat",
    "text_settings",
    "train_mode",
    "unflatten",
    "video_convnet",
]
