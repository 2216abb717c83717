"""Balancing weights by (target, skin tone), checked by hand and by drawing from the dataset."""

from __future__ import annotations

import pytest

from kmel.data.datasets import balance_weights


def test_balance_weights_by_hand():
    counts = {(0, 0): 600, (0, 2): 150, (1, 0): 200, (1, 2): 50}
    natural = balance_weights(counts, 0.0, 0.0)
    assert natural[(0, 0)] == pytest.approx(0.6) and natural[(1, 2)] == pytest.approx(0.05)
    w = balance_weights(counts, 0.4, 1.0)  # equal tones within a class, 40% malignant
    assert w == pytest.approx({(0, 0): 0.3, (0, 2): 0.3, (1, 0): 0.2, (1, 2): 0.2})
    half = balance_weights(counts, 0.5, 0.5)  # n^0.5: 600 -> 24.49, 150 -> 12.25
    assert half[(0, 0)] == pytest.approx(0.5 * 600**0.5 / (600**0.5 + 150**0.5))
    assert sum(half.values()) == pytest.approx(1.0)


def test_balance_rejects_out_of_range_and_keeps_one_class_data():
    with pytest.raises(ValueError):
        balance_weights({(0, 0): 1}, 1.0, 0.0)
    only_benign = balance_weights({(0, 0): 5, (0, 1): 5}, 0.4, 0.0)
    assert sum(only_benign.values()) == pytest.approx(1.0)


@pytest.mark.slow
def test_balanced_training_dataset_draws_the_configured_shares(tmp_path):
    """3,200 examples drawn from make_dataset: malignant fraction and skin-tone shares as balance_weights says."""
    from collections import Counter

    import numpy as np

    from kmel.data.datasets import group_counts, make_dataset
    from kmel.data.records import build_records, load_manifest
    from kmel.data.synthetic import make_synthetic_dataset
    from tests.tiny import tiny_config

    make_synthetic_dataset(tmp_path / "data", n_images=64, seed=7, size=96)
    config = tiny_config(**{"classifier.image_size": 32, "classifier.augment": False,
                            "classifier.target_malignant_fraction": 0.5, "classifier.skin_tone_balance": 1.0})
    build_records(tmp_path / "data", tmp_path / "rec", config, progress=False)
    counts = group_counts(load_manifest(tmp_path / "rec"), "train")
    expected = balance_weights(counts, 0.5, 1.0)
    total = sum(counts.values())
    natural = {k: n / total for k, n in counts.items()}
    tolerance = 0.035  # about 4 standard errors of a share near 0.5 over 3,200 draws
    # The data are far from the target, so the draw must have come from the balancing.
    assert abs(sum(v for (t, _), v in natural.items() if t == 1) - 0.5) > 2 * tolerance
    assert max(abs(natural[k] - expected[k]) for k in counts) > 2 * tolerance

    ds = make_dataset(tmp_path / "rec", "train", "img", True, config, batch_size=64, balance=True, with_groups=True)
    drawn: Counter = Counter()
    for _, targets, groups in ds.take(50).as_numpy_iterator():
        drawn.update(zip(targets.reshape(-1).astype(int).tolist(), groups.reshape(-1).astype(int).tolist()))
    n = sum(drawn.values())
    assert n == 3200 and set(drawn) == set(expected)
    assert sum(v for (t, _), v in drawn.items() if t == 1) / n == pytest.approx(0.5, abs=tolerance)
    for key, share in expected.items():
        assert drawn[key] / n == pytest.approx(share, abs=tolerance), key
    # Up-sampled: every skin tone present in a class gets the same share of that class.
    for t in (0, 1):
        shares = [drawn[k] / n for k in expected if k[0] == t]
        assert np.ptp(shares) < 2 * tolerance
