"""Tiny settings shared by the tests: 64 px ResNet18 U-Net and 64 px EfficientNet-B0, a few steps."""

from __future__ import annotations

from kmel.config import Config, load_config

TINY = {
    "records.image_size": 96, "records.seg_size": 64, "records.shard_size": 32, "records.workers": 1,
    "segmenter.backbone": "resnet18", "segmenter.weights": "none", "segmenter.image_size": 64, "segmenter.batch_size": 8,
    "segmenter.steps_per_epoch": 3, "segmenter.decoder_filters": [64, 32, 16, 8, 8],
    "segmenter.unfreeze": [[0, "all"]], "segmenter.early_stopping_patience": 50,
    "classifier.backbone": "efficientnet_b0", "classifier.image_size": 64, "classifier.batch_size": 8,
    "classifier.steps_per_epoch": 3, "classifier.bootstrap": 50, "classifier.unfreeze": [[0, "all"]],
    "classifier.early_stopping_patience": 50,
    "crops.workers": 1,
}


def tiny_config(epochs: int = 1, **overrides) -> Config:
    return load_config("cpu-small", {**TINY, "segmenter.epochs": epochs, "classifier.epochs": epochs, **overrides})
