"""ResNet classifier backbones (18/34/50/101/152) at 32 px: shapes, preprocessing, staged unfreezing, Grad-CAM,
training steps, export, and Keras' ImageNet files through kmel's verified download (a loopback mirror)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import keras
import numpy as np
import pytest

from kmel.models.classifier import (
    build_classifier,
    classifier_last_conv,
    set_trainable_blocks,
)
from kmel.models.weights import resolve as kw
from kmel.models.weights.download import WeightsError
from tests.loopback import legacy_h5, listing, offline_keras_cache
from tests.tiny import tiny_config

SIZE = 32
# Keras' notop ResNets (with BatchNorm moving statistics, as count_params counts them); ResNet18/34: torchvision's
# trainable parameters without the fc layer (11,689,512 − 513,000 and 21,797,672 − 513,000).
KERAS_NOTOP_PARAMS = {"resnet50": 23_587_712, "resnet101": 42_658_176, "resnet152": 58_370_944}
TORCHVISION_TRAINABLE = {"resnet18": 11_176_512, "resnet34": 21_284_672}


def _cc(backbone: str, **overrides):
    return dataclasses.replace(tiny_config().classifier, **{"backbone": backbone, "image_size": SIZE,
                                                            "weights": "none", **overrides})


def _images(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32")


@pytest.fixture(scope="module")
def resnet50() -> keras.Model:
    return build_classifier(_cc("resnet50"))


@pytest.fixture(scope="module")
def resnet18() -> keras.Model:
    return build_classifier(_cc("resnet18"))


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_builds_flat_with_float32_output_under_mixed_bfloat16(backbone):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build_classifier(_cc(backbone))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    out = model(_images(), training=False)
    assert tuple(out.shape) == (2, 1) and out.dtype == "float32"
    assert model.get_layer("head_dense").compute_dtype == "bfloat16"
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)  # one flat graph
    last = model.get_layer(classifier_last_conv(backbone)).output
    assert tuple(last.shape) == (None, 1, 1, 2048 if backbone in KERAS_NOTOP_PARAMS else 512)  # stride 32
    head = 2048 + 1 if backbone in KERAS_NOTOP_PARAMS else 512 + 1
    if backbone in KERAS_NOTOP_PARAMS:
        assert model.count_params() == KERAS_NOTOP_PARAMS[backbone] + head
    else:
        trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
        assert trainable == TORCHVISION_TRAINABLE[backbone] + head


def test_caffe_preprocessing_is_keras_resnet_preprocess_input(resnet50, tmp_path):
    """0–255 RGB in, keras.applications.resnet.preprocess_input out: the served model needs no preprocessing."""
    x = _images(seed=1)
    inside = keras.Model(resnet50.inputs[0], resnet50.get_layer("caffe_preprocess").output)(x)
    expected = keras.applications.resnet.preprocess_input(x.copy())
    np.testing.assert_allclose(np.asarray(inside), expected, rtol=0, atol=1e-4)
    # The layer is registered: a saved model with it loads in safe mode.
    from kmel.models.resnet_backbones import CaffePreprocessing

    inputs = keras.Input((SIZE, SIZE, 3))
    small = keras.Model(inputs, CaffePreprocessing(name="caffe_preprocess")(inputs))
    small.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_allclose(np.asarray(again(x)), expected, atol=1e-4)


@pytest.mark.parametrize("which, top_layer, top_bn, lower_layer", [
    ("resnet50", "conv5_block3_3_conv", "conv5_block1_0_bn", "conv4_block6_3_conv"),
    ("resnet18", "encoder_stage4_block2_2_conv", "encoder_stage4_block1_down_bn", "encoder_stage3_block2_2_conv"),
])
def test_staged_unfreezing_maps_top_to_the_last_stage(which, top_layer, top_bn, lower_layer, request):
    model = request.getfixturevalue(which)
    bn = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    # backbone_lr_scale tells the backbone from the head by the first part of a variable's path: its layer's name.
    assert {v.path.split("/")[0] for v in model.trainable_variables} == {
        layer.name for layer in model.layers if layer.trainable_weights}
    try:
        set_trainable_blocks(model, "head")
        assert {layer.name for layer in model.layers if layer.trainable and layer.weights} == {"head_dense"}
        set_trainable_blocks(model, "top")
        trainable = {layer.name for layer in model.layers if layer.trainable and layer.weights}
        stage = "conv5_" if which == "resnet50" else "encoder_stage4"
        expected = {layer.name for layer in model.layers if layer.name.startswith(stage) and layer.weights
                    and not isinstance(layer, keras.layers.BatchNormalization)}
        assert top_layer in trainable and trainable == expected | {"head_dense"}
        assert not any(layer.trainable for layer in bn)  # pretrained: BatchNorm frozen in every stage
        set_trainable_blocks(model, "all")
        assert model.get_layer(lower_layer).trainable and not any(layer.trainable for layer in bn)
        # From scratch BatchNorm follows its block.
        set_trainable_blocks(model, "top", freeze_batchnorm=False)
        assert model.get_layer(top_bn).trainable
        assert not model.get_layer(lower_layer.replace("_conv", "_bn")).trainable
    finally:
        set_trainable_blocks(model, "all", freeze_batchnorm=False)


def test_frozen_batchnorm_runs_in_inference_mode_in_a_training_step():
    """Fine-tuning ``top`` with pretrained BatchNorm: one train_on_batch with fit_classifier's optimizer and loss
    moves the last stage and the head only; no BatchNorm statistic moves (frozen = inference mode); the
    backbone learns at backbone_lr_scale × the head's rate."""
    from kmel.training.losses import make_classifier_loss
    from kmel.training.optimizers import make_classifier_optimizer

    model = build_classifier(_cc("resnet18", backbone_lr_scale=0.1))
    optimizer = make_classifier_optimizer(_cc("resnet18", backbone_lr_scale=0.1), total_steps=10)
    optimizer.build(model.trainable_variables)
    factors = {v.path: optimizer.rate_factor(v) for v in model.trainable_variables}
    assert factors["head_dense/kernel"] == 1.0 and factors["encoder_stage4_block2_2_conv/kernel"] == 0.1
    assert factors["encoder_stem_conv/kernel"] == 0.1
    set_trainable_blocks(model, "top", freeze_batchnorm=True)
    model.compile(optimizer=optimizer, loss=make_classifier_loss(_cc("resnet18"), 1), jit_compile=False)
    before = {w.path: np.array(w) for w in model.weights}
    model.train_on_batch(_images(4), np.array([[0.0], [1.0], [0.0], [1.0]], "float32"))
    moved = {w.path for w in model.weights if not np.array_equal(before[w.path], np.array(w))}
    assert "head_dense/kernel" in moved and "encoder_stage4_block2_2_conv/kernel" in moved
    assert all(p.split("/")[0].startswith(("encoder_stage4", "head_")) for p in moved), moved
    assert not any(p.split("/")[0].endswith("_bn") for p in moved), "frozen BatchNorm moved"


def test_gradcam_of_the_last_stage_runs(resnet50, resnet18):
    from kmel.models.gradcam import make_gradcam_graph_fn

    for model, backbone in ((resnet50, "resnet50"), (resnet18, "resnet18")):
        heat = np.asarray(make_gradcam_graph_fn(model, classifier_last_conv(backbone))(_images(seed=2)))
        assert heat.shape == (2, SIZE, SIZE) and np.isfinite(heat).all()
        assert heat.min() >= 0.0 and heat.max() <= 1.0 + 1e-6


def test_export_with_gradcam_uses_only_allowed_ops(resnet18, tmp_path):
    """Exports pass the integrity allow-list and predict what the Keras model does: a ResNet18 classifier with its
    Grad-CAM endpoint, and the caffe preprocessing of ResNet50/101/152 (their other layers are the same
    operations as ResNet18's; a whole ResNet50 export, 17 s at 32 px, gave no operation outside the list either)."""
    import tensorflow as tf

    from kmel.models.integrity import ALLOWED_OPS, check_graph, graph_ops
    from kmel.models.resnet_backbones import CaffePreprocessing
    from kmel.serving.export import export_serving

    inputs = keras.Input((SIZE, SIZE, 3), name="images")
    x = keras.layers.GlobalAveragePooling2D()(CaffePreprocessing(name="caffe_preprocess")(inputs))
    caffe = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", dtype="float32")(x))
    x = _images(seed=3)
    for model, path, layer in ((resnet18, tmp_path / "resnet18", classifier_last_conv("resnet18")),
                               (caffe, tmp_path / "caffe", None)):
        export_serving(model, path, SIZE, layer)
        general, _ = graph_ops(path)
        assert general - ALLOWED_OPS == set(), path
        check_graph(path)
        served = next(iter(tf.saved_model.load(str(path)).signatures["serve"](tf.constant(x)).values()))
        np.testing.assert_allclose(served.numpy(), np.asarray(model(x, training=False)), atol=1e-5)


def test_unknown_backbone_is_refused():
    from kmel.config import ConfigError

    with pytest.raises(ConfigError, match="resnet50"):
        classifier_last_conv("resnet9")
    with pytest.raises(ConfigError, match="resnet152"):
        build_classifier(_cc("resnet9"))


# --- ImageNet weights: Keras' resnet50 notop file through the verified download ---------------------------------
@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    return offline_keras_cache(tmp_path, monkeypatch, KERAS_RESNET_BASE_URL="resnet/", TORCHVISION_BASE_URL="models/")


def test_resnet50_imagenet_downloads_verifies_caches_and_builds(weights_server, cache, tmp_path, monkeypatch):
    name = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert kw.KERAS_RESNET_NOTOP_MD5["resnet50"] == "4d473c1dd8becc155b73f8504c6f6626"  # Keras' published md5
    # No mirror, no network: the public URL and every way out are named.
    with pytest.raises(WeightsError) as info:
        build_classifier(_cc("resnet50", weights="imagenet"))
    for part in (name, kw.KERAS_RESNET_BASE_URL + name, str(cache), "KMEL_WEIGHTS_MIRROR", "--weights none"):
        assert part in str(info.value), part

    # A file laid out as Keras publishes it (legacy HDF5, Keras' layer names), with a recognisable conv5 kernel.
    source = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    conv = source.get_layer("conv5_block3_3_conv")
    conv.set_weights([np.random.default_rng(1).normal(size=w.shape).astype("float32") for w in conv.get_weights()])
    body = legacy_h5(source, tmp_path / "r50.h5")
    weights_server.serve(name, body)
    with pytest.raises(WeightsError, match="md5 is"):  # not the file Keras published: refused, nothing kept
        build_classifier(_cc("resnet50", weights="imagenet", weights_mirror=weights_server.url))
    assert listing(cache) == []

    monkeypatch.setitem(kw.KERAS_RESNET_NOTOP_MD5, "resnet50", hashlib.md5(body).hexdigest())
    model = build_classifier(_cc("resnet50", weights="imagenet", weights_mirror=weights_server.url))
    assert weights_server.count(name) == 2 and listing(cache) == [name]
    np.testing.assert_array_equal(model.get_layer("conv5_block3_3_conv").get_weights()[0], conv.get_weights()[0])
    # Keras' own model on preprocess_input gives what kmel's gives on raw 0–255 RGB.
    x = _images(seed=4)
    features = keras.Model(model.inputs[0], model.get_layer("conv5_block3_out").output)
    np.testing.assert_allclose(np.asarray(features(x)), np.asarray(source(keras.applications.resnet.preprocess_input(
        x.copy()))), rtol=1e-4, atol=1e-4)


def test_resnet18_imagenet_is_the_segmenters_converted_npz(cache):
    """ResNet18/34 take the same ``kmel_resnet{18,34}_imagenet.npz`` as the segmenter's encoder."""
    source = build_classifier(_cc("resnet18"))
    arrays = {f"{layer.name}/{v.name.split('/')[-1]}": np.array(v) + 0.5 for layer in source.layers
              if layer.name.startswith("encoder_") for v in layer.weights}
    cache.mkdir(parents=True)
    np.savez(cache / "kmel_resnet18_imagenet.npz", **arrays)
    model = build_classifier(_cc("resnet18", weights="imagenet"))
    np.testing.assert_array_equal(np.array(model.get_layer("encoder_stage4_block2_2_conv").kernel),
                                  arrays["encoder_stage4_block2_2_conv/kernel"])
    with pytest.raises(WeightsError, match="resnet34-b627a593.pth"):  # not cached, no network: names the file
        build_classifier(_cc("resnet34", weights="imagenet"))
