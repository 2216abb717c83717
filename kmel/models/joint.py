"""The segment-then-classify network trained end to end (``kmel train joint``): one Keras model in which the
segmenter's soft lesion mask gates the image the classifier sees,

    mask = segmenter(image)                      lesion probability per pixel, [0, 1]
    gated = image × (α + (1 − α) · mask)         the background dimmed to α of its brightness, the lesion kept
    probability = classifier(gated)

so the segmenter, left trainable after a warm-up, can learn to act as an attention map for the classifier rather
than a frozen mask. α (``joint.alpha``) keeps some context: at α = 0 a pixel the mask misses is black and the
classifier cannot see a lesion the segmenter lost; at α = 1 the mask does nothing. Both parts are nested models
named ``segmenter`` and ``classifier``, so staged unfreezing and the optimizer address them as before. Outputs:
``probability`` [N, K] (float32) and ``mask`` [N, S, S, 1] at the input size (float32).
"""

from __future__ import annotations

import keras
from keras import layers, ops

from kmel import constants as C
from kmel.config import ConfigError

SEGMENTER_PART = "segmenter"
CLASSIFIER_PART = "classifier"


@keras.saving.register_keras_serializable(package="kmel")
class MaskGate(layers.Layer):
    """``image × (alpha + (1 − alpha) · mask)``: images [N, S, S, C], masks [N, S, S, 1] in [0, 1]."""

    def __init__(self, alpha: float = 0.25, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = float(alpha)

    def call(self, images, masks):
        masks = ops.cast(masks, images.dtype)
        return images * (self.alpha + (1.0 - self.alpha) * masks)

    def compute_output_shape(self, images_shape, masks_shape):
        return images_shape

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha}


def build_joint(segmenter: keras.Model, classifier: keras.Model, alpha: float) -> keras.Model:
    """The joint model at the classifier's input size: the image resized to the segmenter's size (when they differ),
    its mask resized back, the gate, the classifier. ``segmenter`` and ``classifier`` become the nested parts
    :data:`SEGMENTER_PART` and :data:`CLASSIFIER_PART` (their weights are the start of the joint training)."""
    size = int(classifier.inputs[0].shape[1])
    seg_size = int(segmenter.inputs[0].shape[1])
    if segmenter.outputs[0].shape[-1] != 1:
        raise ConfigError(f"the joint model needs a one-channel lesion segmenter, got outputs {segmenter.outputs[0].shape}")
    segmenter.name, classifier.name = SEGMENTER_PART, CLASSIFIER_PART
    # Every layer trainable to begin with, whatever the saved segmenter's last stage froze: the optimizer is built
    # over all weights, and the training's stages then freeze what they must (a weight left out of the optimizer
    # cannot be unfrozen later).
    for part in (segmenter, classifier):
        part.trainable = True
        for layer in part.layers:
            layer.trainable = True
    images = keras.Input((size, size, 3), name="images")
    # antialiased, as the records' images were resized for the segmenter's training
    seg_in = images if seg_size == size else layers.Resizing(seg_size, seg_size, antialias=True,
                                                             name="to_segmenter")(images)
    mask = layers.Activation("linear", dtype="float32", name="mask_raw")(segmenter(seg_in))
    if seg_size != size:
        mask = layers.Resizing(size, size, name="from_segmenter")(mask)
    mask = layers.Activation("linear", dtype="float32", name=C.JOINT_MASK)(mask)
    gated = MaskGate(alpha, name="gate")(images, mask)
    probability = layers.Activation("linear", dtype="float32", name=C.JOINT_PROBABILITY)(classifier(gated))
    return keras.Model(images, {C.JOINT_PROBABILITY: probability, C.JOINT_MASK: mask}, name="joint")


def joint_parts(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """(segmenter, classifier) of a model :func:`build_joint` made."""
    return model.get_layer(SEGMENTER_PART), model.get_layer(CLASSIFIER_PART)


def probability_model(model: keras.Model) -> keras.Model:
    """The joint model's ``probability`` output alone (the same layers and weights): what scoring and reports use."""
    return keras.Model(model.inputs, model.get_layer(C.JOINT_PROBABILITY).output, name="joint_probability")
