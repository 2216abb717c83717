"""The U-Net decoder every kmel segmenter shares: upsampling blocks with two conv-BN-ReLU layers and scSE
attention, then a 1×1 head and a float32 sigmoid ``mask`` (below both encoders: ResNet and EfficientNet-Lite)."""

from __future__ import annotations

from keras import layers

from kmel.config import SegmenterConfig


# === Layers ===
def apply_conv_bn(x, filters: int, kernel: int, stride: int = 1, relu: bool = True, name: str = "", sync: bool = False):
    if stride > 1:
        x = layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x)
        x = layers.Conv2D(filters, kernel, strides=stride, padding="valid", use_bias=False, name=f"{name}_conv")(x)
    else:
        x = layers.Conv2D(filters, kernel, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(epsilon=1e-5, momentum=0.9, synchronized=sync, name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x) if relu else x


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


