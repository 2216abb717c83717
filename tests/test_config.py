"""Profiles, overrides and the resolved config written next to outputs."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from kmel.config import (
    Config,
    ConfigError,
    config_from_dict,
    list_profiles,
    load_config,
    save_config,
)


def test_shipped_profiles_hold_the_reference_settings():
    assert {"reference", "cpu-small"} <= set(list_profiles())
    ref = load_config("reference")
    assert (ref.segmenter.image_size, ref.classifier.image_size) == (512, 512)
    assert ref.classifier.backbone == "efficientnet_b4"
    assert (ref.segmenter.batch_size, ref.classifier.batch_size) == (32, 16)
    assert (ref.segmenter.epochs, ref.classifier.epochs) == (30, 18)


def test_overrides_win_and_none_is_ignored():
    config = load_config("cpu-small", {"segmenter.epochs": "3", "classifier.batch_size": None})
    assert config.segmenter.epochs == 3
    assert config.classifier.batch_size == load_config("cpu-small").classifier.batch_size


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"segmenter.epoch": 3}, "unknown key"),
        ({"epochs": 3}, "section.key"),
        ({"segmenter.epochs": "many"}, "integer"),
        ({"classifier.augment": "maybe"}, "true/false"),
    ],
)
def test_bad_overrides_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("cpu-small", overrides)


def test_user_profile_path_and_unknown_profile(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"classifier": {"backbone": "efficientnet_b2", "unfreeze": [[0, "head"], [1, "all"]]}}))
    config = load_config(str(path))
    assert config.classifier.backbone == "efficientnet_b2"
    assert config.classifier.unfreeze == ((0, "head"), (1, "all"))
    with pytest.raises(ConfigError, match="shipped profiles"):
        load_config("no-such-profile")
    (tmp_path / "bad.yaml").write_text("records: [1, 2]")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(tmp_path / "bad.yaml"))


def test_config_is_frozen_and_round_trips(tmp_path):
    config = load_config("cpu-small", {"records.task": "melanoma"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.records.task = "keratosis"  # type: ignore[misc]
    assert config.records.task == "melanoma"
    save_config(config, tmp_path / "c.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "c.yaml").read_text()))
    assert again == config and again.records.task == "melanoma"
    assert again.classifier.unfreeze == config.classifier.unfreeze  # tuples of tuples survive YAML lists
    assert again != Config()  # equality compares values: a default config is not this one
