"""Segmenter and classifier builders: shapes, dtypes, scSE by hand, staged freezing, weights paths."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kmel.config import ConfigError
from kmel.models.classifier import (
    build_classifier,
    classifier_last_conv,
    set_trainable_blocks,
)
from kmel.models.segmenter import (
    build_segmenter,
    load_encoder_weights,
    set_trainable_stages,
)
from kmel.models.unet_decoder import apply_scse
from kmel.models.weights.download import WeightsError
from kmel.models.weights.resolve import convert_torchvision_resnet
from tests.tiny import tiny_config


@pytest.fixture
def float32_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


def _seg(**overrides):
    return build_segmenter(tiny_config(**{f"segmenter.{k}": v for k, v in overrides.items()}).segmenter)


def _cls(**overrides):
    return build_classifier(tiny_config(**{f"classifier.{k}": v for k, v in overrides.items()}).classifier)


def test_segmenter_shapes_and_dtypes():
    model = _seg()
    images = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    out = model(images, training=False)
    assert tuple(out.shape) == (2, 64, 64, 1) and out.dtype == "float32"
    assert 0.0 <= float(np.min(out)) and float(np.max(out)) <= 1.0
    names = {layer.name for layer in model.layers}
    for i in range(1, 6):  # scSE and dropout in every decoder block
        assert f"decoder_block{i}_att_scse" in names and f"decoder_block{i}_dropout" in names


def test_resnet34_depth_and_parameter_count():
    model = _seg(backbone="resnet34", image_size=256, decoder_filters=[256, 128, 64, 32, 16])
    blocks = {layer.name.split("_")[1] + "_" + layer.name.split("_")[2] for layer in model.layers
              if layer.name.startswith("encoder_stage") and layer.name.endswith("_add")}
    per_stage = [sum(b.startswith(f"stage{s}_") for b in blocks) for s in range(1, 5)]
    assert per_stage == [3, 4, 6, 3]
    # 21.28M ResNet34 encoder (torchvision, without fc) + decoder; measured 24.47M.
    assert 24.3e6 < model.count_params() < 24.6e6
    with pytest.raises(ConfigError, match="multiple of 32"):
        _seg(image_size=100)
    with pytest.raises(ConfigError, match="backbone"):
        _seg(backbone="resnet50")


def test_scse_by_hand():
    x_in = keras.Input((2, 2, 4))
    model = keras.Model(x_in, apply_scse(x_in, reduction=4, name="t"))
    x = np.arange(16, dtype="float32").reshape(1, 2, 2, 4) / 16.0
    w_red, b_red = np.array([[[[0.5], [-0.25], [1.0], [0.0]]]], "float32"), np.array([0.1], "float32")
    w_exp, b_exp = np.array([[[[1.0, -1.0, 2.0, 0.5]]]], "float32"), np.array([0.0, 0.2, -0.3, 0.0], "float32")
    w_s, b_s = np.array([[[[1.0], [0.5], [-1.0], [2.0]]]], "float32"), np.array([-0.5], "float32")
    model.get_layer("t_cse_reduce").set_weights([w_red, b_red])
    model.get_layer("t_cse_expand").set_weights([w_exp, b_exp])
    model.get_layer("t_sse_conv").set_weights([w_s, b_s])

    def sigmoid(v):
        return 1 / (1 + np.exp(-v))

    pooled = x.mean(axis=(1, 2))  # [1, 4]
    hidden = np.maximum(pooled @ w_red[0, 0] + b_red, 0)
    channel = sigmoid(hidden @ w_exp[0, 0] + b_exp)  # [1, 4]
    spatial = sigmoid(x @ w_s[0, 0] + b_s)  # [1, 2, 2, 1]
    expected = x * channel[:, None, None, :] + x * spatial
    np.testing.assert_allclose(np.asarray(model(x)), expected, rtol=1e-5, atol=1e-6)


def test_staged_unfreezing_keeps_frozen_batchnorm_statistics():
    model = _seg()
    set_trainable_stages(model, "4")
    assert not model.get_layer("encoder_stage1_block1_1_conv").trainable
    assert model.get_layer("encoder_stage4_block1_1_conv").trainable
    assert model.get_layer("decoder_block1_a_conv").trainable
    frozen_bn = model.get_layer("encoder_stage1_block1_1_bn")
    live_bn = model.get_layer("encoder_stage4_block1_1_bn")
    before = [np.array(frozen_bn.moving_mean), np.array(live_bn.moving_mean),
              np.array(model.get_layer("encoder_stem_conv").kernel)]
    model.compile(optimizer=keras.optimizers.AdamW(1e-2), loss="binary_crossentropy")
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 255, (8, 64, 64, 3)).astype("float32")
    y = (rng.uniform(size=(8, 64, 64, 1)) > 0.5).astype("float32")
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    np.testing.assert_array_equal(np.array(frozen_bn.moving_mean), before[0])
    np.testing.assert_array_equal(np.array(model.get_layer("encoder_stem_conv").kernel), before[2])
    assert not np.allclose(np.array(live_bn.moving_mean), before[1])
    with pytest.raises(ConfigError):
        set_trainable_stages(model, "5")


def test_classifier_shapes_flat_graph_and_staged_blocks():
    model = _cls()
    out = model(np.zeros((2, 64, 64, 3), "float32"), training=False)
    assert tuple(out.shape) == (2, 1) and out.dtype == "float32"
    # One flat graph: the last conv is a layer of the model itself (Grad-CAM reaches it).
    assert model.get_layer(classifier_last_conv("efficientnet_b0")) is not None
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)
    set_trainable_blocks(model, "head")
    assert model.get_layer("head_dense").trainable and not model.get_layer("top_conv").trainable
    set_trainable_blocks(model, "top")
    assert model.get_layer("top_conv").trainable and model.get_layer("block7a_project_conv").trainable
    assert not model.get_layer("block1a_dwconv").trainable
    assert not any(layer.trainable for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization))
    set_trainable_blocks(model, "all")
    assert model.get_layer("block1a_dwconv").trainable
    with pytest.raises(ConfigError):
        set_trainable_blocks(model, "middle")


@pytest.mark.slow
def test_efficientnet_b4_forward_and_stochastic_depth():
    model = _cls(backbone="efficientnet_b4", image_size=128)
    out = model(np.random.default_rng(0).uniform(0, 255, (2, 128, 128, 3)).astype("float32"), training=False)
    assert tuple(out.shape) == (2, 1)
    # EfficientNet-B4 without top: 17.67M parameters, plus a 1,793-weight head.
    assert 17.6e6 < model.count_params() < 17.8e6
    drops = [layer.rate for layer in model.layers if layer.name.endswith("_drop")]
    # Keras' drop-connect rate rises linearly to 0.2 · (blocks − 1) / blocks in the last block.
    assert drops and 0.18 < max(drops) < 0.2 and min(drops) > 0


def test_mixed_precision_outputs_float32_and_trains(float32_policy):
    keras.mixed_precision.set_global_policy("mixed_float16")
    seg, cls = _seg(), _cls()
    assert seg.get_layer("decoder_block1_a_conv").compute_dtype == "float16"
    assert seg.output.dtype == "float32" and cls.output.dtype == "float32"
    from kmel.training.losses import TverskyLoss

    seg.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=TverskyLoss())
    assert isinstance(seg.optimizer, keras.optimizers.LossScaleOptimizer)
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    y = (rng.uniform(size=(2, 64, 64, 1)) > 0.5).astype("float32")
    history = seg.fit(x, y, epochs=1, batch_size=2, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert seg.get_layer("head_conv").kernel.dtype == "float32"  # variables stay float32


def _offline(monkeypatch) -> None:
    """Downloads go to a loopback port where nothing listens (see tests/test_weights_download.py)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        monkeypatch.setenv("KMEL_WEIGHTS_MIRROR", f"http://127.0.0.1:{sock.getsockname()[1]}")


def test_classifier_imagenet_offline_error_names_file_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    _offline(monkeypatch)
    with pytest.raises(WeightsError) as info:
        _cls(weights="imagenet")
    message = str(info.value)
    assert "efficientnetb0_notop.h5" in message and str(tmp_path / "keras" / "models") in message
    with pytest.raises(WeightsError, match="does not exist"):
        _cls(weights=str(tmp_path / "nope.h5"))


def test_classifier_local_weights_file(tmp_path):
    source = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(64, 64, 3))
    rng = np.random.default_rng(3)
    source.get_layer("top_conv").set_weights([rng.normal(size=w.shape).astype("float32")
                                              for w in source.get_layer("top_conv").get_weights()])
    path = tmp_path / "b0.weights.h5"
    source.save_weights(str(path))
    model = _cls(weights=str(path))
    np.testing.assert_array_equal(model.get_layer("top_conv").get_weights()[0],
                                  source.get_layer("top_conv").get_weights()[0])


def _torchvision_state_dict(depths, rng) -> dict[str, np.ndarray]:
    """Random arrays named and shaped as torchvision's resnet18/34 state dict."""
    sd: dict[str, np.ndarray] = {}

    def bn(prefix, c):
        sd[f"{prefix}.weight"] = rng.uniform(0.5, 1.5, c).astype("float32")
        sd[f"{prefix}.bias"] = rng.normal(size=c).astype("float32")
        sd[f"{prefix}.running_mean"] = rng.normal(size=c).astype("float32")
        sd[f"{prefix}.running_var"] = rng.uniform(0.5, 2, c).astype("float32")
        sd[f"{prefix}.num_batches_tracked"] = np.array(100)

    sd["conv1.weight"] = rng.normal(size=(64, 3, 7, 7)).astype("float32")
    bn("bn1", 64)
    c_in = 64
    for stage, (depth, c) in enumerate(zip(depths, (64, 128, 256, 512)), start=1):
        for b in range(depth):
            p = f"layer{stage}.{b}"
            sd[f"{p}.conv1.weight"] = rng.normal(size=(c, c_in if b == 0 else c, 3, 3)).astype("float32")
            bn(f"{p}.bn1", c)
            sd[f"{p}.conv2.weight"] = rng.normal(size=(c, c, 3, 3)).astype("float32")
            bn(f"{p}.bn2", c)
            if b == 0 and stage > 1:
                sd[f"{p}.downsample.0.weight"] = rng.normal(size=(c, c_in, 1, 1)).astype("float32")
                bn(f"{p}.downsample.1", c)
        c_in = c
    sd["fc.weight"] = rng.normal(size=(1000, 512)).astype("float32")
    sd["fc.bias"] = np.zeros(1000, "float32")
    return sd


def test_segmenter_imagenet_path_from_converted_torchvision_weights(tmp_path, monkeypatch):
    model = _seg()
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    _offline(monkeypatch)
    with pytest.raises(WeightsError, match="kmel_resnet18_imagenet.npz"):
        load_encoder_weights(model, "imagenet")
    sd = _torchvision_state_dict((2, 2, 2, 2), np.random.default_rng(4))
    arrays = convert_torchvision_resnet(sd)
    cache = tmp_path / "keras" / "models"
    cache.mkdir(parents=True, exist_ok=True)  # a failed download may have made it
    np.savez(cache / "kmel_resnet18_imagenet.npz", **arrays)
    load_encoder_weights(model, "imagenet")
    # torch conv weights are [out, in, kh, kw]; Keras kernels [kh, kw, in, out].
    np.testing.assert_array_equal(np.array(model.get_layer("encoder_stem_conv").kernel),
                                  sd["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(np.array(model.get_layer("encoder_stage3_block1_down_conv").kernel),
                                  sd["layer3.0.downsample.0.weight"].transpose(2, 3, 1, 0))
    bn = model.get_layer("encoder_stage4_block2_2_bn")
    np.testing.assert_array_equal(np.array(bn.moving_variance), sd["layer4.1.bn2.running_var"])
    np.testing.assert_array_equal(np.array(bn.gamma), sd["layer4.1.bn2.weight"])
    # A ResNet34 file does not fit a ResNet18 model: named, not silently partial.
    deep = convert_torchvision_resnet(_torchvision_state_dict((3, 4, 6, 3), np.random.default_rng(5)))
    np.savez(tmp_path / "r34.npz", **{k: v for k, v in deep.items() if "stage4" not in k})
    with pytest.raises(WeightsError, match="stage4"):
        load_encoder_weights(model, str(tmp_path / "r34.npz"))


def test_segmenter_whole_model_weights_file(tmp_path):
    a, b = _seg(), _seg()
    a.save_weights(str(tmp_path / "seg.weights.h5"))
    load_encoder_weights(b, str(tmp_path / "seg.weights.h5"))
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    other = _seg(decoder_filters=[32, 32, 16, 8, 8])
    with pytest.raises(WeightsError, match="cannot be loaded"):
        load_encoder_weights(other, str(tmp_path / "seg.weights.h5"))


def test_from_scratch_classifier_learns_its_batchnorm():
    model = _cls()
    set_trainable_blocks(model, "all", freeze_batchnorm=False)
    bn = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bn and all(layer.trainable for layer in bn)
    set_trainable_blocks(model, "top", freeze_batchnorm=False)
    assert model.get_layer("top_bn").trainable and not model.get_layer("block1a_bn").trainable


def test_classifier_batchnorm_momentum_by_weights_and_saved(tmp_path):
    def momenta(model):
        return {layer.momentum for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)}

    scratch = _cls()  # weights none
    assert momenta(scratch) == {0.9}
    source = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(64, 64, 3))
    path = tmp_path / "b0.weights.h5"
    source.save_weights(str(path))
    assert momenta(_cls(weights=str(path))) == {0.99}  # pretrained: Keras' own value
    assert momenta(_cls(batchnorm_momentum=0.95)) == {0.95}
    scratch.save(tmp_path / "m.keras")
    assert momenta(keras.saving.load_model(tmp_path / "m.keras", compile=False)) == {0.9}
    with pytest.raises(ConfigError, match="batchnorm_momentum"):
        _cls(batchnorm_momentum=1.5)
