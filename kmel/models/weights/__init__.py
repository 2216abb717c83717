"""Pretrained weights: download with a hash check and a mirror, the PyTorch-free checkpoint reader, and
resolution of ``--weights imagenet | none | PATH`` to files (below the model builders that use them)."""

from kmel.models.weights.download import (
    DownloadError,
    WeightsError,
    fetch_verified,
    mirror_base,
)
from kmel.models.weights.resolve import (
    PRETRAINED,
    convert_torchvision_resnet,
    imagenet_resnet_npz,
    keras_cache_dir,
    lite_checkpoint_path,
    load_encoder_arrays,
    resolve_classifier_weights,
)
from kmel.models.weights.torch_checkpoint import CheckpointError, load_torch_state_dict

__all__ = [
    "PRETRAINED", "CheckpointError", "DownloadError", "WeightsError", "convert_torchvision_resnet", "fetch_verified",
    "imagenet_resnet_npz", "keras_cache_dir", "lite_checkpoint_path", "load_encoder_arrays", "load_torch_state_dict",
    "mirror_base", "resolve_classifier_weights",
]
