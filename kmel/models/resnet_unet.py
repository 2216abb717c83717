"""U-Net with a ResNet (18/34) encoder and scSE attention in every decoder block (Keras 3).

The encoder follows torchvision's layout (7×7/2 stem, 3×3/2 max-pool, basic blocks 2-2-2-2 or
3-4-6-3 with 64/128/256/512 filters, explicit symmetric zero padding before strided layers) so
ImageNet weights convert 1:1 (see :mod:`kmel.models.weights.resolve`). Inputs are float32 images 0–255;
ImageNet normalisation happens inside the model, so the exported signature needs no preprocessing.
The sigmoid output stays float32 under mixed precision.
"""

from __future__ import annotations

import keras
from keras import layers

from kmel.config import ConfigError, SegmenterConfig
from kmel.models.unet_decoder import apply_conv_bn, apply_unet_decoder

# === Config ===
ENCODER_DEPTHS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
ENCODER_FILTERS = (64, 128, 256, 512)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Skip connections, deepest first: layer names at strides 16, 8, 4, 2 (the bottleneck is stride 32).
ENCODER_SKIPS = ("encoder_stage3_out", "encoder_stage2_out", "encoder_stage1_out", "encoder_stem_relu")
ENCODER_BOTTLENECK = "encoder_stage4_out"
STAGE_ORDER = ("0", "1", "2", "3", "4")


# === Layers ===
def apply_basic_block(x, filters: int, stride: int, name: str, sync: bool = False):
    """ResNet basic block: two 3×3 conv-BN, identity or 1×1 projection shortcut, ReLU after the sum."""
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_down_conv")(x)
        shortcut = layers.BatchNormalization(epsilon=1e-5, momentum=0.9, synchronized=sync,
                                             name=f"{name}_down_bn")(shortcut)
    y = apply_conv_bn(x, filters, 3, stride, name=f"{name}_1", sync=sync)
    y = apply_conv_bn(y, filters, 3, 1, relu=False, name=f"{name}_2", sync=sync)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.Activation("relu", name=f"{name}_out")(y)


def apply_resnet_encoder(x, depths: tuple[int, ...], name: str = "encoder", sync: bool = False):
    x = apply_conv_bn(x, 64, 7, 2, name=f"{name}_stem", sync=sync)  # stride 2 -> encoder_stem_relu
    x = layers.ZeroPadding2D(1, name=f"{name}_pool_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name=f"{name}_pool")(x)
    for stage, (depth, filters) in enumerate(zip(depths, ENCODER_FILTERS), start=1):
        for block in range(depth):
            stride = 2 if (block == 0 and stage > 1) else 1
            x = apply_basic_block(x, filters, stride, name=f"{name}_stage{stage}_block{block + 1}", sync=sync)
        x = layers.Identity(name=f"{name}_stage{stage}_out")(x)
    return x


# === Functional Model ===
def build_resnet_unet(config: SegmenterConfig, sync_batchnorm: bool = False) -> keras.Model:
    """U-Net / ResNet18 or 34 encoder + scSE decoder: float32 images 0–255 [N,S,S,3] → [N,S,S,1]."""
    if config.backbone not in ENCODER_DEPTHS:
        raise ConfigError(f"ResNet segmenter backbone must be one of {sorted(ENCODER_DEPTHS)}, got {config.backbone!r}")
    inputs = keras.Input((config.image_size, config.image_size, 3), name="images")
    x = layers.Rescaling(1.0 / 255.0, name="scale")(inputs)
    x = layers.Normalization(mean=IMAGENET_MEAN, variance=[s**2 for s in IMAGENET_STD], name="imagenet_norm")(x)
    bottleneck = apply_resnet_encoder(x, ENCODER_DEPTHS[config.backbone], sync=sync_batchnorm)
    encoder = keras.Model(inputs, bottleneck)
    skips = [encoder.get_layer(n).output for n in ENCODER_SKIPS]
    outputs = apply_unet_decoder(bottleneck, skips, config, sync=sync_batchnorm)
    return keras.Model(inputs, outputs, name="segmenter")


def resnet_layer_stage(layer_name: str) -> str | None:
    """Stage of a ResNet encoder layer ("0" stem and pool, "1"…"4"), or None for any other layer."""
    if layer_name.startswith("encoder_stem") or layer_name.startswith("encoder_pool"):
        return "0"
    if layer_name.startswith("encoder_stage"):
        return layer_name[len("encoder_stage")]
    return None
