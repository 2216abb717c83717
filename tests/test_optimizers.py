"""Discriminative learning rates: pretrained layers move at ``scale`` × the head's rate."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kmel.training.optimizers import LayerScaledAdamW


def _model() -> keras.Model:
    inputs = keras.Input((4,))
    x = keras.layers.Dense(3, name="backbone_dense")(inputs)
    outputs = keras.layers.Dense(1, name="head_dense")(x)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("scale", [1.0, 0.05])
def test_first_adam_step_moves_each_weight_by_its_own_rate(scale):
    """Adam's first step moves every weight by lr·sign(grad) (bias-corrected m/√v = ±1): per layer, the
    largest move is the layer's learning rate."""
    keras.utils.set_random_seed(0)
    model = _model()
    optimizer = LayerScaledAdamW(1e-2, weight_decay=0.0, full_rate_layers=("head_dense",), scale=scale)
    model.compile(optimizer=optimizer, loss="mse")
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    model.train_on_batch(x, np.ones((8, 1), np.float32))
    moved = {v.path: np.abs(v.numpy() - before[v.path]).max() for v in model.trainable_variables}
    assert moved["head_dense/kernel"] == pytest.approx(1e-2, rel=1e-3)
    assert moved["backbone_dense/kernel"] == pytest.approx(1e-2 * scale, rel=1e-3)
    assert [optimizer.rate_factor(v) for v in model.trainable_variables] == [scale, scale, 1.0, 1.0]


def test_config_round_trip_and_bad_scale():
    optimizer = LayerScaledAdamW(1e-3, full_rate_layers=("head_dense",), scale=0.1)
    again = LayerScaledAdamW.from_config(optimizer.get_config())
    assert (again.full_rate_layers, again.scale) == (("head_dense",), 0.1)
    with pytest.raises(ValueError, match="scale"):
        LayerScaledAdamW(1e-3, scale=0.0)


def test_the_classifier_optimizer_gives_pretrained_layers_the_profiles_scale():
    """``make_classifier_optimizer`` (what ``fit_classifier`` trains with) on a model whose layers are named
    like the classifier's: the head at the full rate, every other layer at ``backbone_lr_scale``."""
    from kmel.config import load_config
    from kmel.models.classifier import HEAD_LAYERS
    from kmel.training.optimizers import make_classifier_optimizer

    cc = load_config("cpu-small", {"classifier.backbone_lr_scale": 0.1}).classifier
    inputs = keras.Input((4,))
    x = keras.layers.Dense(3, name="block7a_project_conv")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1, name="head_dense")(x))
    assert "head_dense" in HEAD_LAYERS
    optimizer = make_classifier_optimizer(cc, total_steps=100)
    optimizer.build(model.trainable_variables)
    assert [optimizer.rate_factor(v) for v in model.trainable_variables] == [0.1, 0.1, 1.0, 1.0]
