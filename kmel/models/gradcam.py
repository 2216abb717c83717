"""Grad-CAM as a graph function of a Keras classifier, for the exported ``gradcam`` endpoint: for each
image, the ReLU of the gradient-weighted channel sum of the last convolution's activations, scaled to
[0, 1] and resized to the input size."""

from __future__ import annotations

from typing import Callable

import keras
import tensorflow as tf


def make_gradcam_graph_fn(model: keras.Model, last_conv: str) -> Callable[[tf.Tensor], tf.Tensor]:
    """``fn(images [N,S,S,3] float32) -> heat maps [N,S,S] float32 in [0, 1]`` (graph-safe)."""
    grad_model = keras.Model(model.inputs[0], [model.get_layer(last_conv).output, model.outputs[0]])

    def gradcam(images: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            conv, prob = grad_model(images, training=False)
            score = tf.reduce_sum(tf.cast(prob, tf.float32))
        grads = tf.cast(tape.gradient(score, conv), tf.float32)
        conv = tf.cast(conv, tf.float32)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(conv * weights, axis=-1, keepdims=True))
        cam = cam / (tf.reduce_max(cam, axis=(1, 2, 3), keepdims=True) + 1e-8)
        cam = tf.image.resize(cam, tf.shape(images)[1:3], method="bilinear")
        return cam[..., 0]

    return gradcam
