"""U-Net with a ResNet (18/34) encoder and scSE attention in every decoder block (Keras 3).

The encoder follows torchvision's layout (7×7/2 stem, 3×3/2 max-pool, basic blocks 2-2-2-2 or
3-4-6-3 with 64/128/256/512 filters, explicit symmetric zero padding before strided layers) so
ImageNet weights convert 1:1 (see :mod:`kmel.models.weights`). Inputs are float32 images 0–255;
ImageNet normalisation happens inside the model, so the exported signature needs no preprocessing.
The sigmoid output stays float32 under mixed precision.
"""

from __future__ import annotations

import keras
from keras import layers

from kmel.config import SegmenterConfig

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
def apply_conv_bn(x, filters: int, kernel: int, stride: int = 1, relu: bool = True, name: str = "", sync: bool = False):
    if stride > 1:
        x = layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x)
        x = layers.Conv2D(filters, kernel, strides=stride, padding="valid", use_bias=False, name=f"{name}_conv")(x)
    else:
        x = layers.Conv2D(filters, kernel, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(epsilon=1e-5, momentum=0.9, synchronized=sync, name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x) if relu else x


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


def apply_scse(x, reduction: int = 16, name: str = ""):
    """Concurrent spatial and channel squeeze-excitation (Roy et al., 2018), branches added.

    cSE re-weights channels from a global average; sSE re-weights positions from a 1×1 conv.
    Addition (the paper's default) keeps both recalibrations; max would keep only the stronger.
    """
    channels = x.shape[-1]
    c = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_cse_pool")(x)
    c = layers.Conv2D(max(1, channels // reduction), 1, activation="relu", name=f"{name}_cse_reduce")(c)
    c = layers.Conv2D(channels, 1, activation="sigmoid", name=f"{name}_cse_expand")(c)
    cse = layers.Multiply(name=f"{name}_cse")([x, c])
    s = layers.Conv2D(1, 1, activation="sigmoid", name=f"{name}_sse_conv")(x)
    sse = layers.Multiply(name=f"{name}_sse")([x, s])
    return layers.Add(name=f"{name}_scse")([cse, sse])


def apply_decoder_block(x, skip, filters: int, dropout: float, name: str, sync: bool = False):
    x = layers.UpSampling2D(2, interpolation="bilinear", name=f"{name}_up")(x)
    if skip is not None:
        x = layers.Concatenate(name=f"{name}_concat")([x, skip])
    x = apply_conv_bn(x, filters, 3, name=f"{name}_a", sync=sync)
    x = apply_conv_bn(x, filters, 3, name=f"{name}_b", sync=sync)
    x = apply_scse(x, name=f"{name}_att")
    if dropout > 0:
        x = layers.SpatialDropout2D(dropout, name=f"{name}_dropout")(x)
    return x


def apply_unet_decoder(x, skips, config: SegmenterConfig, sync: bool = False):
    """Decoder blocks from the bottleneck ``x`` over ``skips`` (deepest first; the last block has none)
    → 1×1 ``head_conv`` → float32 sigmoid ``mask``. Shared by every encoder."""
    for i, (skip, filters) in enumerate(zip([*skips, None], config.decoder_filters)):
        x = apply_decoder_block(x, skip, filters, config.dropout, name=f"decoder_block{i + 1}", sync=sync)
    x = layers.Conv2D(1, 1, name="head_conv")(x)
    return layers.Activation("sigmoid", dtype="float32", name="mask")(x)


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
def build_segmenter(config: SegmenterConfig, sync_batchnorm: bool = False) -> keras.Model:
    """U-Net / ResNet encoder + scSE decoder: float32 images 0–255 [N,S,S,3] → lesion probability [N,S,S,1].

    ``sync_batchnorm``: batch statistics over the global batch of all replicas (training with several
    GPUs or workers), so every replica, and every worker, keeps the same moving statistics.
    """
    from kmel.models.lite_unet import LITE_SKIPS

    if config.backbone not in ENCODER_DEPTHS and config.backbone not in LITE_SKIPS:
        from kmel.config import ConfigError

        raise ConfigError(f"segmenter backbone must be one of {sorted(ENCODER_DEPTHS) + sorted(LITE_SKIPS)}, "
                          f"got {config.backbone!r}")
    if config.image_size % 32:
        from kmel.config import ConfigError

        raise ConfigError(f"segmenter image_size must be a multiple of 32, got {config.image_size}")
    if len(config.decoder_filters) != 5:
        from kmel.config import ConfigError

        raise ConfigError("segmenter decoder_filters needs 5 values (strides 16, 8, 4, 2, 1)")
    if config.backbone in LITE_SKIPS:
        from kmel.models.lite_unet import build_lite_unet

        return build_lite_unet(config, sync_batchnorm)
    inputs = keras.Input((config.image_size, config.image_size, 3), name="images")
    x = layers.Rescaling(1.0 / 255.0, name="scale")(inputs)
    x = layers.Normalization(mean=IMAGENET_MEAN, variance=[s**2 for s in IMAGENET_STD], name="imagenet_norm")(x)
    bottleneck = apply_resnet_encoder(x, ENCODER_DEPTHS[config.backbone], sync=sync_batchnorm)
    encoder = keras.Model(inputs, bottleneck)
    skips = [encoder.get_layer(n).output for n in ENCODER_SKIPS]
    outputs = apply_unet_decoder(bottleneck, skips, config, sync=sync_batchnorm)
    return keras.Model(inputs, outputs, name="segmenter")


def layer_stage(layer_name: str) -> str | None:
    """Encoder stage of a layer ("0" stem, "1"…"4"), or None for normalisation/decoder layers.

    ResNet encoder: ``encoder_stem``/``encoder_pool`` and ``encoder_stageN``; EfficientNet-Lite
    encoder: see :func:`kmel.models.lite_unet.lite_layer_stage` (stem+block1 … block6-7).
    """
    if layer_name.startswith("encoder_stem") or layer_name.startswith("encoder_pool"):
        return "0"
    if layer_name.startswith("encoder_stage"):
        return layer_name[len("encoder_stage")]
    from kmel.models.lite_unet import lite_layer_stage

    return lite_layer_stage(layer_name)


def encoder_stage_layers(model: keras.Model, stage: str) -> list[keras.layers.Layer]:
    return [layer for layer in model.layers if layer_stage(layer.name) == stage]


def set_trainable_stages(model: keras.Model, stages: str) -> None:
    """Train the decoder plus encoder stages from ``stages`` ("4", "3", "2", "1", "0") up, or "all".

    Frozen BatchNormalization layers run in inference mode (Keras 3 semantics of trainable=False).
    """
    if stages != "all" and stages not in STAGE_ORDER:
        from kmel.config import ConfigError

        raise ConfigError(f"segmenter unfreeze stage must be one of {STAGE_ORDER} or 'all', got {stages!r}")
    lowest = 0 if stages == "all" else int(stages)
    for layer in model.layers:
        stage = layer_stage(layer.name)
        layer.trainable = stage is None or int(stage) >= lowest
