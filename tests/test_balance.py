"""Balancing weights by (target, skin tone), checked by hand and by drawing from the dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmel.data.datasets import balance_weights


@pytest.fixture(scope="module")
def unequal_records(tmp_path_factory) -> Path:
    """96 synthetic images in two sources (2019- and 2020-style CSVs) of unequal size: a third of the 2020
    images are missing. Records built once for the drawing tests below."""
    from kmel.data.records import build_records
    from kmel.data.synthetic import make_synthetic_dataset
    from tests.tiny import tiny_config

    tmp = tmp_path_factory.mktemp("balance")
    make_synthetic_dataset(tmp / "data", n_images=96, seed=7, size=96)
    for image in sorted((tmp / "data" / "images" / "2020").iterdir())[::3]:
        image.unlink()
    build_records(tmp / "data", tmp / "rec", tiny_config(), progress=False)
    return tmp / "rec"


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
def test_balanced_training_dataset_draws_the_configured_shares(unequal_records):
    """3,200 examples drawn from make_dataset: malignant fraction and skin-tone shares as balance_weights says."""
    from collections import Counter

    import numpy as np

    from kmel.data.datasets import group_counts, make_dataset
    from kmel.data.records import load_manifest
    from tests.tiny import tiny_config

    config = tiny_config(**{"classifier.image_size": 32, "classifier.augment": False,
                            "classifier.target_malignant_fraction": 0.5, "classifier.skin_tone_balance": 1.0})
    counts = group_counts(load_manifest(unequal_records), "train")
    expected = balance_weights(counts, 0.5, 1.0)
    total = sum(counts.values())
    natural = {k: n / total for k, n in counts.items()}
    tolerance = 0.035  # about 4 standard errors of a share near 0.5 over 3,200 draws
    # The data are far from the target, so the draw must have come from the balancing.
    assert abs(sum(v for (t, _), v in natural.items() if t == 1) - 0.5) > 2 * tolerance
    assert max(abs(natural[k] - expected[k]) for k in counts) > 2 * tolerance

    ds = make_dataset(unequal_records, "train", "img", True, config, batch_size=64, balance=True, with_groups=True)
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


def test_split_by_source_by_hand():
    from kmel.data.datasets import split_by_source

    weights = {(0, 0): 0.6, (1, 0): 0.4}
    counts = {("ham", 0, 0): 900, ("isic", 0, 0): 100, ("ham", 1, 0): 300, ("isic", 1, 0): 100, ("isic", 1, 3): 0}
    natural = split_by_source(weights, counts, 0.0)
    assert natural == pytest.approx({("ham", 0, 0): 0.54, ("isic", 0, 0): 0.06, ("ham", 1, 0): 0.3,
                                     ("isic", 1, 0): 0.1})
    equal = split_by_source(weights, counts, 1.0)
    assert equal == pytest.approx({("ham", 0, 0): 0.3, ("isic", 0, 0): 0.3, ("ham", 1, 0): 0.2, ("isic", 1, 0): 0.2})
    with pytest.raises(ValueError):
        split_by_source(weights, counts, 1.5)


@pytest.mark.slow
def test_source_balance_draws_every_source_equally(unequal_records):
    """The synthetic folder has two sources (2019- and 2020-style CSVs) of unequal size: with source_balance 1
    each gets the same share of every (class, skin tone) group, counted on the records make_dataset's sampler
    draws."""
    from collections import Counter

    from kmel.data.datasets import (
        group_counts,
        make_balanced_records,
        make_record_dataset,
        source_counts,
        split_by_source,
    )
    from kmel.data.records import load_manifest, shard_paths
    from tests.tiny import tiny_config

    config = tiny_config(**{"classifier.target_malignant_fraction": 0.5, "classifier.skin_tone_balance": 0.0})
    manifest = load_manifest(unequal_records)
    counts = source_counts(manifest, "train")
    totals = Counter()
    for (source, _, _), n in counts.items():
        totals[source] += n
    assert len(totals) == 2 and max(totals.values()) > 1.3 * min(totals.values()), totals  # unequal to begin with

    def drawn_shares(source_balance: float) -> dict[tuple, float]:
        from dataclasses import replace

        cfg = replace(config, classifier=replace(config.classifier, source_balance=source_balance))
        records = make_record_dataset(shard_paths(unequal_records, "img", "train", manifest), True, 0)
        drawn = Counter()
        for r in make_balanced_records(records, manifest, "train", cfg, 0).take(2500).as_numpy_iterator():
            drawn[(r["source"].decode(), int(r["target"]))] += 1
        return {k: v / 2500 for k, v in drawn.items()}

    def expected_shares(source_balance: float) -> dict[tuple, float]:
        weights = split_by_source(balance_weights(group_counts(manifest, "train"), 0.5, 0.0), counts, source_balance)
        out = Counter()
        for (source, t, _), w in weights.items():
            out[(source, t)] += w
        return out

    want_natural, want_balanced = expected_shares(0.0), expected_shares(1.0)
    assert max(abs(want_natural[k] - want_balanced[k]) for k in want_natural) > 0.05  # balancing changes the mix
    for source_balance, want in ((0.0, want_natural), (1.0, want_balanced)):
        got = drawn_shares(source_balance)
        for key, share in want.items():  # about 4 standard errors of a share near 0.25 over 2,500 draws
            assert got.get(key, 0.0) == pytest.approx(share, abs=0.035), (source_balance, key, got, want)


def test_balanced_sampler_reads_the_split_once_per_group(unequal_records):
    """Each group's stream is cached after its first pass: drawing 600 records reads each train record at most once
    per group (plus one pass), however small a group is. Before the cache, a group of n records read about N / n
    records per draw and its 256-element shuffle buffer 256 / n passes: the diagnosis task's 80 small groups made an
    epoch take hours."""
    import tensorflow as tf

    from kmel.data.datasets import (
        classifier_balance_weights,
        make_balanced_records,
        make_record_dataset,
    )
    from kmel.data.records import load_manifest, shard_paths
    from tests.tiny import tiny_config

    config = tiny_config()
    manifest = load_manifest(unequal_records)
    n_train = manifest["n_records"]["img"]["train"]
    groups = len(classifier_balance_weights(manifest, "train", config))
    reads = []

    def count(record):
        tf.py_function(lambda: reads.append(1), [], [])
        return record

    records = make_record_dataset(shard_paths(unequal_records, "img", "train", manifest), True, 0).map(count)
    drawn = list(make_balanced_records(records, manifest, "train", config, 0).take(600).as_numpy_iterator())
    assert len(drawn) == 600 and groups >= 6
    assert len(reads) <= (groups + 1) * n_train, (len(reads), groups, n_train)


def test_segmenter_source_balance_draws_every_source_equally(unequal_records, monkeypatch):
    """segmenter.source_balance: the mask stream shares each epoch between the sources ∝ n_s^(1 − b), counted on
    the seg records themselves; make_dataset uses it for seg training data only when b > 0."""
    from collections import Counter
    from dataclasses import replace

    from kmel.data import datasets
    from kmel.data.records import load_manifest, shard_paths
    from tests.tiny import tiny_config

    manifest = load_manifest(unequal_records)
    records = datasets.make_record_dataset(shard_paths(unequal_records, "seg", "train", manifest), True, 0)
    counts = datasets.record_source_counts(records)
    assert len(counts) == 2 and max(counts.values()) > 1.3 * min(counts.values()), counts

    for b in (0.0, 1.0):
        raw = {s: n ** (1.0 - b) for s, n in counts.items()}
        drawn = Counter(r["source"].decode() for r in
                        datasets.make_source_balanced_records(records, b, 0).take(2000).as_numpy_iterator())
        for source, r in raw.items():  # about 4.5 standard errors of a share near 0.5 over 2,000 draws
            assert drawn[source] / 2000 == pytest.approx(r / sum(raw.values()), abs=0.05), (b, drawn, counts)
    with pytest.raises(ValueError):
        datasets.make_source_balanced_records(records, 1.5, 0)

    calls = []
    real = datasets.make_source_balanced_records
    monkeypatch.setattr(datasets, "make_source_balanced_records", lambda *a: calls.append(a[1:]) or real(*a))
    config = tiny_config(**{"segmenter.image_size": 32, "segmenter.augment": False})
    images, masks = next(iter(datasets.make_dataset(unequal_records, "train", "seg", True, config, batch_size=8)))
    assert calls == [] and images.shape[0] == 8
    config = replace(config, segmenter=replace(config.segmenter, source_balance=0.5))
    images, masks = next(iter(datasets.make_dataset(unequal_records, "train", "seg", True, config, batch_size=8)))
    assert calls == [(0.5, config.segmenter.seed)] and tuple(masks.shape) == (8, 32, 32, 1)
