"""ResNet classifier backbones: ``keras.applications`` ResNet50/101/152 and kmel's own ResNet18/34.

Like the EfficientNets, both take float32 RGB images 0–255 and normalise inside the model, so the served
model's signature needs no preprocessing:

- ResNet50/101/152 (bottleneck blocks 3-4-{6,23,36}-3) were trained on caffe-style inputs: BGR, the
  ImageNet mean subtracted, not scaled (``keras.applications.resnet.preprocess_input``).
  :class:`CaffePreprocessing` does exactly that as the first layer. It has no weights, so Keras' own
  ``resnet*_notop.h5`` files, which load by the order of the layers that have weights, still fit. The
  layers keep Keras' names (``conv1_conv``, ``conv4_block23_out``, ``conv5_block3_out``).
- ResNet18/34 are the segmenter's encoder (:func:`kmel.models.resnet_unet.apply_resnet_encoder`:
  torchvision layout, layers ``encoder_stem_*``, ``encoder_stage{1..4}_*``) after torchvision's
  normalisation; their ImageNet weights are the segmenter's ``kmel_resnet{18,34}_imagenet.npz``.
"""

from __future__ import annotations

import functools

import keras
import numpy as np
from keras import layers, ops

from kmel.models.resnet_unet import (
    ENCODER_DEPTHS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    apply_resnet_encoder,
)
from kmel.models.weights.download import WeightsError
from kmel.models.weights.resolve import load_encoder_arrays

# === Config ===
KERAS_RESNETS = {"resnet50": keras.applications.ResNet50, "resnet101": keras.applications.ResNet101,
                 "resnet152": keras.applications.ResNet152}
ENCODER_RESNETS = tuple(ENCODER_DEPTHS)  # resnet18, resnet34
# keras/src/applications/imagenet_utils.py, mode "caffe": the ImageNet mean in BGR order, on 0–255.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


# === Layers ===
@keras.saving.register_keras_serializable(package="kmel")
class CaffePreprocessing(layers.Layer):
    """RGB 0–255 → BGR minus the ImageNet mean: ``keras.applications.resnet.preprocess_input`` as a layer."""

    def call(self, inputs):
        # A reversed slice, not ops.flip: StridedSlice is already in the exports' operations (integrity.py).
        return inputs[..., ::-1] - ops.convert_to_tensor(CAFFE_MEAN_BGR, dtype=inputs.dtype)


# === Functional Model ===
def KerasResNet(backbone: str, include_top: bool = False, weights: str | None = None,  # noqa: N802 (a model)
                input_tensor=None) -> keras.Model:
    """``keras.applications`` ResNet50/101/152 on float32 RGB 0–255 → ``conv5_block3_out``. ``weights``:
    None or the path of a Keras ``*_notop.h5`` / ``.weights.h5`` file (see ``resolve_classifier_weights``)."""
    if input_tensor is None:
        input_tensor = keras.Input((224, 224, 3), name="images")
    x = CaffePreprocessing(name="caffe_preprocess")(input_tensor)
    return KERAS_RESNETS[backbone](include_top=include_top, weights=weights, input_tensor=x)


def EncoderResNet(backbone: str, include_top: bool = False, weights: str | None = None,  # noqa: N802 (a model)
                  input_tensor=None) -> keras.Model:
    """kmel's ResNet18/34 (the segmenter's encoder) on float32 RGB 0–255 → ``encoder_stage4_out``.
    ``weights``: None, an encoder ``.npz`` (arrays keyed ``layer/weight``) or a ``.weights.h5`` file."""
    if include_top:
        raise ValueError(f"{backbone} is built without an ImageNet top")
    if input_tensor is None:
        input_tensor = keras.Input((224, 224, 3), name="images")
    x = layers.Rescaling(1.0 / 255.0, name="scale")(input_tensor)
    x = layers.Normalization(mean=IMAGENET_MEAN, variance=[s**2 for s in IMAGENET_STD], name="imagenet_norm")(x)
    x = apply_resnet_encoder(x, ENCODER_DEPTHS[backbone])
    model = keras.Model(input_tensor, x, name=backbone)
    if weights not in (None, "none"):
        if str(weights).endswith(".npz"):
            with np.load(weights) as data:
                load_encoder_arrays(model, {k: data[k] for k in data.files}, str(weights))
        else:
            try:
                model.load_weights(str(weights))
            except Exception as exc:  # shape or structure mismatch
                raise WeightsError(f"{weights}: cannot be loaded into a {backbone} ({exc})") from None
    return model


RESNET_BACKBONES = {
    **{name: functools.partial(KerasResNet, name) for name in KERAS_RESNETS},
    **{name: functools.partial(EncoderResNet, name) for name in ENCODER_RESNETS},
}
# Staged unfreezing's "top": the last stage (stride 32).
RESNET_TOP_PREFIXES = ("conv5_", "encoder_stage4")
# Grad-CAM's layer: the last stage's output (after its ReLU).
RESNET_LAST_CONV = {**{name: "conv5_block3_out" for name in KERAS_RESNETS},
                    **{name: "encoder_stage4_out" for name in ENCODER_RESNETS}}
