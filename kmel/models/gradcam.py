"""Grad-CAM as a graph function of a Keras classifier, for the exported ``gradcam`` endpoint: for each
image, the ReLU of the gradient-weighted channel sum of the last convolution's activations, scaled to
[0, 1] and resized to the input size. The gradient is of the sigmoid output of a yes/no head, and of the
most probable class of a diagnosis head (or of the class ``class_index`` names, ``gradcam_class``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import keras
import tensorflow as tf


def make_gradcam_graph_fn(model: keras.Model, last_conv: str | Sequence[str],
                          by_class: bool = False) -> Callable[..., tf.Tensor]:
    """``fn(images [N,S,S,3] float32) -> heat maps [N,S,S] float32 in [0, 1]`` (graph-safe); with ``by_class``,
    ``fn(images, class_index int32 scalar)``: the maps of that output (−1: each image's most probable one).

    ``last_conv`` may name several layers (an ensemble's members, :func:`kmel.models.classifier.build_ensemble`):
    each layer's map is scaled to [0, 1] on its own, then they are averaged and scaled again, so every member
    counts the same whatever the size of its activations."""
    names = [last_conv] if isinstance(last_conv, str) else list(last_conv)
    grad_model = keras.Model(model.inputs[0], [*(model.get_layer(n).output for n in names), model.outputs[0]])
    several = model.outputs[0].shape[-1] != 1

    def gradcam(images: tf.Tensor, class_index: tf.Tensor | int = -1) -> tf.Tensor:
        with tf.GradientTape() as tape:
            *convs, prob = grad_model(images, training=False)
            prob = tf.cast(prob, tf.float32)
            n = tf.shape(prob)[-1]
            chosen = tf.where(class_index >= 0, tf.fill(tf.shape(prob)[:1], tf.cast(class_index, tf.int32)),
                              tf.argmax(prob, axis=-1, output_type=tf.int32))
            # one output: the sigmoid itself; several: the chosen class's probability
            score = tf.reduce_sum(prob * tf.one_hot(chosen, n)) if several else tf.reduce_sum(prob)
        cams = []
        for conv, grads in zip(convs, tape.gradient(score, convs)):
            grads, conv = tf.cast(grads, tf.float32), tf.cast(conv, tf.float32)
            weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
            cam = tf.nn.relu(tf.reduce_sum(conv * weights, axis=-1, keepdims=True))
            cam = cam / (tf.reduce_max(cam, axis=(1, 2, 3), keepdims=True) + 1e-8)
            cams.append(tf.image.resize(cam, tf.shape(images)[1:3], method="bilinear"))
        cam = cams[0] if len(cams) == 1 else tf.add_n(cams) / len(cams)
        if len(cams) > 1:
            cam = cam / (tf.reduce_max(cam, axis=(1, 2, 3), keepdims=True) + 1e-8)
        return cam[..., 0]

    if by_class:
        return gradcam
    return lambda images: gradcam(images)
