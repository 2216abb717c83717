"""Balancing weights by (target, skin tone), checked by hand and by drawing from the dataset."""

from __future__ import annotations

import pytest

from kmel.data import balance_weights


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
