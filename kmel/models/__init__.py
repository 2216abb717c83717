"""Model builders: the U-Net/ResNet segmenter and the EfficientNet classifier."""

from kmel.models.classifier import BACKBONES, CLASSIFIER_LAST_CONV, build_classifier, set_trainable_blocks
from kmel.models.resnet_unet import (
    ENCODER_SKIPS,
    apply_basic_block,
    apply_scse,
    build_segmenter,
    encoder_stage_layers,
    set_trainable_stages,
)
from kmel.models.weights import WeightsError, convert_torchvision_resnet, load_encoder_weights

__all__ = [
    "BACKBONES", "CLASSIFIER_LAST_CONV", "ENCODER_SKIPS", "WeightsError", "apply_basic_block", "apply_scse",
    "build_classifier", "build_segmenter", "convert_torchvision_resnet", "encoder_stage_layers",
    "load_encoder_weights", "set_trainable_blocks", "set_trainable_stages",
]
