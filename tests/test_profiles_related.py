"""The related systems' profiles (smartphone-resnet50, isic2017-resnet, ham7-resnet152, joint-resnet50;
docs/training.md, "Related systems as profiles") and the conv4 head: each profile loads, its classifier builds at 32 px
from scratch, its first unfreezing stage trains the head (the conv4 head's BatchNorm too) and one step with kmel's loss
and optimizer moves the head; a conv4 classifier round-trips through .keras in safe mode."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kmel.config import ConfigError, load_config
from kmel.models.classifier import (
    CONV4_LAYERS,
    HEAD_LAYERS,
    build_classifier,
    set_trainable_blocks,
)
from kmel.models.heads import head_from_manifest
from kmel.training.callbacks import stage_for_epoch
from kmel.training.losses import make_classifier_loss
from kmel.training.optimizers import make_classifier_optimizer

SIZE = 32
PROFILES = {  # profile -> (backbone, head, first stage, outputs)
    "smartphone-resnet50": ("resnet50", "conv4", "top", 1),
    "isic2017-resnet": ("resnet50", "pool", "head", 3),
    "ham7-resnet152": ("resnet152", "pool", "head", 7),
}


@pytest.fixture(scope="module")
def built():
    """``built(profile)``: (config, classifier head, model) of ``profile`` at 32 px from scratch, built once per
    module (a module-scoped fixture: under xdist its tests share a worker, tests/conftest.py)."""
    cache: dict[str, tuple] = {}

    def get(profile: str):
        if profile not in cache:
            config = load_config(profile, {"classifier.image_size": SIZE, "classifier.weights": "none"})
            rc = config.records
            head = head_from_manifest({"task": rc.task, "classes": rc.classes,
                                       "malignant_classes": rc.malignant_classes})
            cache[profile] = (config, head, build_classifier(config.classifier, head.n_outputs))
        return cache[profile]

    return get


def _images(n: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32")


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_profile_builds_unfreezes_its_head_and_trains_a_step(profile, built):
    backbone, head_kind, first_stage, n_outputs = PROFILES[profile]
    shipped = load_config(profile).classifier
    assert (shipped.weights, shipped.backbone, shipped.head, shipped.image_size) == ("imagenet", backbone, head_kind, 224)
    config, head, model = built(profile)
    cc = config.classifier
    assert head.n_outputs == n_outputs and model.output.shape[-1] == n_outputs
    stage = stage_for_epoch(cc.unfreeze, 0)
    assert stage == first_stage
    # The profile trains from ImageNet weights, so pretrained BatchNorm is frozen; the head's own must still learn.
    set_trainable_blocks(model, stage, freeze_batchnorm=True)
    head_layers = [layer for layer in model.layers if layer.name in HEAD_LAYERS]
    assert all(layer.trainable for layer in head_layers)
    assert {layer.name for layer in head_layers} >= set(CONV4_LAYERS if head_kind == "conv4" else ()) | {"head_dense"}
    backbone_bn = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)
                   and layer.name not in HEAD_LAYERS]
    assert backbone_bn and not any(layer.trainable for layer in backbone_bn)
    if profile == "smartphone-resnet50":  # stages 1-3 frozen: conv2-conv4 (and the stem) frozen, conv5 trains
        convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
        assert all(layer.trainable == layer.name.startswith(("conv5_", "head_")) for layer in convs)
        assert model.get_layer("conv5_block3_3_conv").trainable and not model.get_layer("conv4_block6_3_conv").trainable
        assert model.get_layer("head_conv1_bn").trainable and model.get_layer("head_hidden").activation.__name__ == "tanh"

    # Eagerly: tracing the step of a ResNet152 costs 20 s on a CPU core, the eager step 4 s (graph-mode ResNet steps:
    # tests/test_resnet_classifier.py).
    model.compile(optimizer=make_classifier_optimizer(cc, total_steps=10), loss=make_classifier_loss(cc, n_outputs),
                  run_eagerly=True)
    y = np.array([[0.0], [1.0], [0.0], [1.0]], "float32") if n_outputs == 1 else np.arange(4) % n_outputs
    # A random 152-layer backbone's features reach ~70 at 32 px: through a random Dense they saturate the softmax,
    # whose clipped probabilities (the losses clip at 1e-7) have no gradient at all. Start from small logits.
    dense = model.get_layer("head_dense").kernel
    dense.assign(dense * 1e-3)
    watched = ["head_dense"] + (["head_conv1_conv", "head_conv4_bn", "head_hidden"] if head_kind == "conv4" else [])
    before = {name: [np.array(w) for w in model.get_layer(name).weights] for name in watched}
    frozen = "conv4_block6_3_conv" if profile != "ham7-resnet152" else "conv4_block36_3_conv"
    frozen_before = np.array(model.get_layer(frozen).kernel)
    model.train_on_batch(_images(), y)
    for name in watched:  # every weight of the head moved, the BatchNorm's moving statistics included
        for old, new in zip(before[name], model.get_layer(name).weights):
            assert not np.array_equal(old, np.array(new)), new.path
    np.testing.assert_array_equal(np.array(model.get_layer(frozen).kernel), frozen_before)

    out = np.asarray(model(_images(seed=1), training=False))
    assert out.shape == (4, n_outputs) and out.dtype == np.float32 and np.isfinite(out).all()
    if n_outputs > 1:
        np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)
        assert list(head.classes) == (["MEL", "NV", "BKL"] if n_outputs == 3 else
                                      ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC"])
        # The melanoma score is p_MEL; isic2017's keratosis score p_BKL is a class of its own.
        mel = np.asarray(head.malignant_probability(out))
        expected = out[:, 0] if n_outputs == 3 else out[:, [0, 2, 3]].sum(axis=1)
        np.testing.assert_allclose(mel, expected, atol=1e-6)


def test_smartphone_loss_is_cross_entropy_weighting_malignant_ten_to_one():
    """focal_gamma 0, focal_alpha 10/11: binary cross-entropy with positives weighted 10 : 1 (the class weight)."""
    cc = load_config("smartphone-resnet50").classifier
    assert (cc.target_malignant_fraction, cc.skin_tone_balance, cc.weight_decay, cc.max_learning_rate) == (0, 0, 0, 1e-5)
    loss = make_classifier_loss(cc, 1)
    p = np.array([[0.3]], "float32")
    positive, negative = float(loss(np.ones((1, 1)), p)), float(loss(np.zeros((1, 1)), p))
    np.testing.assert_allclose(positive, -np.log(0.3) * 10 / 11, rtol=1e-5)
    np.testing.assert_allclose(negative, -np.log(0.7) / 11, rtol=1e-5)


def test_conv4_head_round_trips_through_keras_in_safe_mode(tmp_path, built):
    _, _, model = built("smartphone-resnet50")
    path = tmp_path / "conv4.keras"
    model.save(path)
    again = keras.saving.load_model(path, safe_mode=True)
    x = _images(seed=2)
    np.testing.assert_array_equal(np.asarray(again(x, training=False)), np.asarray(model(x, training=False)))
    assert again.get_layer("head_conv4_conv").filters == 128 and again.get_layer("head_hidden").units == 512


def test_invalid_head_is_refused_naming_the_choices():
    with pytest.raises(ConfigError, match=r"head must be one of \['pool', 'conv4'\], got 'conv3'"):
        load_config("smartphone-resnet50", {"classifier.head": "conv3"})
    import dataclasses

    cc = dataclasses.replace(load_config("cpu-small").classifier, head="dense")
    with pytest.raises(ConfigError, match="pool.*conv4"):
        build_classifier(cc)


def test_joint_resnet50_profile_builds_its_joint_model_and_trains_a_step():
    """joint-resnet50 (train seg + train joint): ResNet50 at 224 px from ImageNet on the masked image (alpha 0, no
    segmentation term), runnable as shipped (its seg records at least its input size); at 32 px from scratch its joint
    model trains one step with the segmenter frozen in the warm-up: the head moves, the segmenter does not."""
    from kmel import constants as C
    from kmel.models.joint import build_joint, joint_parts
    from kmel.models.segmenter import build_segmenter
    from kmel.training.joint import joint_schedule, set_joint_stage
    from kmel.training.losses import MaskedTverskyLoss

    shipped = load_config("joint-resnet50")
    assert (shipped.classifier.backbone, shipped.classifier.weights, shipped.classifier.image_size) == \
        ("resnet50", "imagenet", 224)
    assert (shipped.joint.alpha, shipped.joint.mask_loss_weight, shipped.joint.segmenter_warmup_epochs) == (0.0, 0.0, 1)
    assert shipped.records.seg_size >= shipped.classifier.image_size
    config = load_config("joint-resnet50", {"classifier.image_size": SIZE, "classifier.weights": "none",
                                            "segmenter.image_size": 64, "segmenter.weights": "none"})
    cc = config.classifier
    keras.utils.set_random_seed(0)
    model = build_joint(build_segmenter(config.segmenter), build_classifier(cc, 1), config.joint.alpha)
    stage = joint_schedule(cc.unfreeze, config.joint.segmenter_warmup_epochs)[0][1]
    assert stage == "head/segmenter frozen"
    set_joint_stage(model, stage, freeze_batchnorm=True)
    segmenter, classifier = joint_parts(model)
    model.compile(optimizer=make_classifier_optimizer(cc, total_steps=10),
                  loss={C.JOINT_PROBABILITY: make_classifier_loss(cc, 1), C.JOINT_MASK: MaskedTverskyLoss()},
                  loss_weights={C.JOINT_PROBABILITY: 1.0, C.JOINT_MASK: config.joint.mask_loss_weight}, run_eagerly=True)
    dense = classifier.get_layer("head_dense").kernel
    dense.assign(dense * 1e-3)
    before, seg_before = np.array(dense), [np.array(w) for w in segmenter.weights]
    model.train_on_batch(_images(), {C.JOINT_PROBABILITY: np.array([[0.0], [1.0], [0.0], [1.0]], "float32"),
                                     C.JOINT_MASK: -np.ones((4, SIZE, SIZE, 1), "float32")})
    assert not np.array_equal(before, np.array(dense))
    assert all(np.array_equal(a, np.array(b)) for a, b in zip(seg_before, segmenter.weights))
