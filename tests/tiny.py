"""Tiny settings shared by the tests: 64 px ResNet18 U-Net and 64 px EfficientNet-B0, a few steps."""

from __future__ import annotations

from pathlib import Path

import yaml

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


def write_tiny_profile(tmp: Path, epochs: int, steps: int = 6, **overrides) -> Path:
    """TINY as a user profile file ``tmp/tiny.yaml`` (the CLI takes profiles, not dotted overrides)."""
    data: dict = {}
    for key, value in {**TINY, "segmenter.epochs": epochs, "classifier.epochs": epochs,
                       "segmenter.steps_per_epoch": steps, "classifier.steps_per_epoch": steps, **overrides}.items():
        section, name = key.split(".")
        data.setdefault(section, {})[name] = value
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
