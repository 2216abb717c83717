"""``train cls --ensemble K``: K members averaged in one flat model and its Grad-CAM. The whole walk (training two
members, resuming at the member a failed run reached, calibration, report, predict with Grad-CAM, TFLite) runs in
tests/test_diagnosis.py's end-to-end test, as a two-member diagnosis ensemble."""

from __future__ import annotations

from dataclasses import replace

import keras
import numpy as np
import pytest
import tensorflow as tf

from kmel.config import ConfigError
from tests.tiny import tiny_config


def _members(n: int, size: int = 32, outputs: int = 1) -> list[keras.Model]:
    from kmel.models.classifier import build_classifier

    cc = replace(tiny_config().classifier, backbone="resnet18", image_size=size, weights="none")
    members = []
    for k in range(n):
        keras.utils.set_random_seed(k)
        members.append(build_classifier(cc, outputs))
    return members


def test_ensemble_averages_its_members_and_round_trips_in_safe_mode(tmp_path):
    from kmel.models.classifier import build_ensemble, ensemble_last_convs
    from kmel.models.gradcam import make_gradcam_graph_fn

    members = _members(2, outputs=3)
    ensemble = build_ensemble(members)
    names = [layer.name for layer in ensemble.layers]
    assert len(names) == len(set(names)) and names.count("images") == 1  # one flat graph, one input
    assert {type(layer).__name__ for layer in ensemble.layers} - {"Functional"} == \
        {type(layer).__name__ for m in members for layer in m.layers} | {"Average"}
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    each = [m.predict(x, verbose=0) for m in members]
    assert not np.allclose(each[0], each[1], atol=1e-4)  # the members differ
    got = ensemble.predict(x, verbose=0)
    np.testing.assert_allclose(got, np.mean(each, axis=0), atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    ensemble.save(tmp_path / "e.keras")
    loaded = keras.saving.load_model(tmp_path / "e.keras", safe_mode=True, compile=False)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), got, atol=1e-6)

    # Grad-CAM of the ensemble: each member's map of the class the ensemble picks, scaled to [0, 1], averaged,
    # scaled again.
    layers = ensemble_last_convs("resnet18", 2)
    cam = make_gradcam_graph_fn(ensemble, layers, by_class=True)(tf.constant(x), tf.constant(1)).numpy()
    own = [make_gradcam_graph_fn(m, layers[0][3:], by_class=True)(tf.constant(x), tf.constant(1)).numpy()
           for m in members]
    mean = np.mean(own, axis=0)
    expected = mean / (mean.max(axis=(1, 2), keepdims=True) + 1e-8)
    assert cam.shape == (4, 32, 32) and np.isfinite(cam).all()
    np.testing.assert_allclose(cam, expected, atol=1e-4)


def test_ensemble_needs_two_members_of_one_shape():
    from kmel.models.classifier import build_ensemble

    with pytest.raises(ConfigError, match="at least two"):
        build_ensemble(_members(1))
    with pytest.raises(ConfigError, match="differ"):
        build_ensemble([*_members(1, 32), *_members(1, 48)])
    with pytest.raises(ConfigError, match="ensemble must be at least 1"):
        tiny_config(**{"classifier.ensemble": 0})


def test_ensemble_flag_is_a_classifier_option(tmp_path):
    from click.testing import CliRunner

    from cli import cli

    result = CliRunner().invoke(cli, ["train", "seg", "--records", str(tmp_path), "--ensemble", "2"])
    assert result.exit_code == 2 and "--ensemble is a classifier option" in result.output
