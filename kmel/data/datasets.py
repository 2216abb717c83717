"""tf.data readers for kmel records (graph side: TensorFlow ops only).

Pipeline order, as in TF Model Garden: interleave shards → parse (Decoder) → filter/balance on the
still-encoded record → decode + resize (``_parse_train_data`` / ``_parse_eval_data``) → shuffle
→ batch → augment (train only) → prefetch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import tensorflow as tf

from kmel import constants as C
from kmel.config import Config
from kmel.data.augment import make_cls_augmenter, make_seg_augmenter, resolve_cls_policy
from kmel.data.records import DataError, load_manifest, shard_paths
from kmel.data.tfrecord import parse_example

KINDS = ("seg", "img", "crop")


def _is_size(image: tf.Tensor, size: int) -> tf.Tensor:
    shape = tf.shape(image)
    return tf.logical_and(tf.equal(shape[0], size), tf.equal(shape[1], size))


def decode_image(record: Mapping[str, tf.Tensor], size: int) -> tf.Tensor:
    """JPEG → float32 0–255 at size × size; records already at that size (seg records, crops at the
    classifier size) skip the resize, which otherwise costs as much as the decoding."""
    image = tf.io.decode_jpeg(record[C.F_IMAGE], channels=3)
    image = tf.cond(
        _is_size(image, size),
        lambda: tf.cast(image, tf.float32),
        lambda: tf.clip_by_value(tf.image.resize(image, [size, size], method="bilinear", antialias=True), 0.0, 255.0),
    )
    return tf.ensure_shape(image, [size, size, 3])


def decode_mask(record: Mapping[str, tf.Tensor], size: int) -> tf.Tensor:
    """PNG mask → float32 0/1 at size × size × 1 (resized bilinearly and cut at 0.5 when not at that size)."""
    mask = tf.io.decode_png(record[C.F_MASK], channels=1)
    mask = tf.cond(
        _is_size(mask, size),
        lambda: tf.cast(mask > 127, tf.float32),
        lambda: tf.cast(tf.image.resize(tf.cast(mask, tf.float32) / 255.0, [size, size], method="bilinear") > 0.5,
                        tf.float32),
    )
    return tf.ensure_shape(mask, [size, size, 1])


def _parse_eval_data(
    record: Mapping[str, tf.Tensor], kind: str, size: int, with_groups: bool = False
) -> tuple[Any, ...]:
    """Resize only; the same decoding as training, without randomness."""
    image = decode_image(record, size)
    if kind == "seg":
        return image, decode_mask(record, size)
    target = tf.cast(record[C.F_TARGET], tf.float32)[None]
    if with_groups:
        return image, target, record[C.F_SKIN_TONE]
    return image, target


def _parse_train_data(
    record: Mapping[str, tf.Tensor], kind: str, size: int, with_groups: bool = False
) -> tuple[Any, ...]:
    # Augmentation runs per batch after batching (see make_dataset); nothing random per record here.
    return _parse_eval_data(record, kind, size, with_groups)


def make_record_dataset(files: list[Path], training: bool, seed: int) -> tf.data.Dataset:
    """Serialised → parsed records (images still encoded), shards interleaved."""
    if not files:
        raise DataError("no record shards to read")
    names = tf.data.Dataset.from_tensor_slices([str(f) for f in files])
    if training:
        names = names.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = names.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(len(files), 4),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=not training or None,
    )
    return ds.map(parse_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=not training or None)


def source_counts(manifest: Mapping[str, Any], split: str) -> dict[tuple[str, int, int], int]:
    """(source, target, skin-tone index) → number of records of ``split`` (from the manifest's counts)."""
    counts: dict[tuple[str, int, int], int] = {}
    for source, targets in manifest["counts"].get(split, {}).items():
        for target, tones in targets.items():
            for tone, n in tones.items():
                counts[(source, int(target), C.SKIN_TONE_GROUPS.index(tone))] = int(n)
    return counts


def group_counts(manifest: Mapping[str, Any], split: str) -> dict[tuple[int, int], int]:
    """(target, skin-tone index) → number of records of ``split``, over all sources (from the manifest's counts)."""
    counts: dict[tuple[int, int], int] = {}
    for (_, target, tone), n in source_counts(manifest, split).items():
        counts[(target, tone)] = counts.get((target, tone), 0) + n
    return counts


def balance_weights(
    counts: Mapping[tuple[int, int], int], target_malignant_fraction: float, skin_tone_balance: float,
    class_balance: float | None = None,
) -> dict[tuple[int, int], float]:
    """Sampling probability of each (target, skin tone) group.

    Within a class, group g gets weight ∝ n_g^(1 − b): b = 0 keeps the natural mix, b = 1 gives every
    present skin tone the same share. Yes/no targets: the classes then get ``target_malignant_fraction`` and
    its complement (0 keeps the natural class rate). With ``class_balance`` (the diagnosis task; targets are
    class indices) class c gets ∝ n_c^(1 − class_balance) instead.
    """
    if not 0.0 <= skin_tone_balance <= 1.0:
        raise ValueError("skin_tone_balance must be in [0, 1]")
    if not 0.0 <= target_malignant_fraction < 1.0:
        raise ValueError("target_malignant_fraction must be in [0, 1)")
    present = {k: n for k, n in counts.items() if n > 0}
    total = sum(present.values())
    targets = sorted({t for t, _ in present}) if class_balance is not None else [0, 1]
    class_n = {t: sum(n for (tt, _), n in present.items() if tt == t) for t in targets}
    if class_balance is not None:
        if not 0.0 <= class_balance <= 1.0:
            raise ValueError("class_balance must be in [0, 1]")
        raw_share = {t: n ** (1.0 - class_balance) for t, n in class_n.items()}
        class_share = {t: r / sum(raw_share.values()) for t, r in raw_share.items()}
    elif target_malignant_fraction > 0 and class_n[0] and class_n[1]:
        class_share = {1: target_malignant_fraction, 0: 1.0 - target_malignant_fraction}
    else:
        class_share = {t: class_n[t] / total for t in targets}
    weights = {}
    for t in targets:
        raw = {k: n ** (1.0 - skin_tone_balance) for k, n in present.items() if k[0] == t}
        norm = sum(raw.values())
        for k, r in raw.items():
            weights[k] = class_share[t] * r / norm
    return weights


def classifier_balance_weights(manifest: Mapping[str, Any], split: str, config: Config) -> dict[tuple[int, int], float]:
    """:func:`balance_weights` with the profile's settings for the task the records were built for."""
    cc = config.classifier
    diagnosis = manifest.get("task") == "diagnosis"
    return balance_weights(group_counts(manifest, split), cc.target_malignant_fraction, cc.skin_tone_balance,
                           cc.class_balance if diagnosis else None)


def class_draw_shares(manifest: Mapping[str, Any], split: str, config: Config) -> dict[int, float]:
    """Each target's share of the classifier's training draws: :func:`classifier_balance_weights` summed over skin
    tones (the source split, :func:`split_by_source`, keeps each group's total). For the diagnosis task these are
    the class prior q the softmax learns under (:meth:`kmel.models.heads.ClassifierHead.decide`)."""
    shares: dict[int, float] = {}
    for (target, _), weight in classifier_balance_weights(manifest, split, config).items():
        shares[target] = shares.get(target, 0.0) + weight
    return shares


def split_by_source(
    weights: Mapping[tuple[int, int], float], counts: Mapping[tuple[str, int, int], int], source_balance: float
) -> dict[tuple[str, int, int], float]:
    """Each (target, skin tone) group's weight shared among its sources, source s getting ∝ n_s^(1 − b): b = 0
    keeps each source's natural share of the group, b = 1 gives every source present in it the same share."""
    if not 0.0 <= source_balance <= 1.0:
        raise ValueError("source_balance must be in [0, 1]")
    out: dict[tuple[str, int, int], float] = {}
    for (t, g), weight in weights.items():
        raw = {s: n ** (1.0 - source_balance) for (s, tt, gg), n in counts.items() if (tt, gg) == (t, g) and n > 0}
        norm = sum(raw.values())
        for s, r in raw.items():
            out[(s, t, g)] = weight * r / norm
    return out


def _steps(n: int, batch_size: int, configured: int) -> int:
    return configured if configured > 0 else max(1, n // batch_size)


def make_balanced_records(
    records: tf.data.Dataset, manifest: Mapping[str, Any], split: str, config: Config, seed: int
) -> tf.data.Dataset:
    """Parsed records drawn (forever) with the classifier's balancing: class share, skin tone and, with
    ``source_balance``, source (:func:`balance_weights`, :func:`split_by_source`).

    One stream per group, each the records filtered to that group and then cached in memory: the filter reads the
    split once per group, never again. Without the cache every draw from a group of n records would read about
    N / n records of the split, and its shuffle buffer (at most the group's size) a pass per element: with the
    diagnosis task's 80 (class, tone, source) groups, some of 1 image, an epoch took hours instead of minutes.
    Memory: the encoded train records once (about 20 KB each at 224 px)."""
    cc = config.classifier
    weights: Mapping[Any, float] = classifier_balance_weights(manifest, split, config)
    sizes: Mapping[Any, int] = group_counts(manifest, split)
    if cc.source_balance > 0:
        weights = split_by_source(weights, source_counts(manifest, split), cc.source_balance)
        sizes = source_counts(manifest, split)
    keys = sorted(weights)

    def matches(key: tuple) -> Any:
        fields = (C.F_SOURCE, C.F_TARGET, C.F_SKIN_TONE)[-len(key):]
        return lambda r: tf.reduce_all(tf.stack([tf.equal(r[f], v) for f, v in zip(fields, key)]))

    parts = [records.filter(matches(key)).cache().repeat().shuffle(max(1, min(256, sizes.get(key, 256))),
                                                                   seed=seed + i)
             for i, key in enumerate(keys)]
    return tf.data.Dataset.sample_from_datasets(parts, weights=[weights[k] for k in keys], seed=seed,
                                                stop_on_empty_dataset=False)


def record_source_counts(records: tf.data.Dataset) -> dict[str, int]:
    """Source name → number of parsed records (one pass over the strings; no image is decoded)."""
    counts: dict[str, int] = {}
    for source in records.map(lambda r: r[C.F_SOURCE], num_parallel_calls=tf.data.AUTOTUNE).as_numpy_iterator():
        name = source.decode()
        counts[name] = counts.get(name, 0) + 1
    return counts


def make_source_balanced_records(records: tf.data.Dataset, source_balance: float, seed: int) -> tf.data.Dataset:
    """Parsed records drawn (forever) with source s at a share ∝ n_s^(1 − source_balance) (0: natural, 1: equal),
    n_s counted from the records themselves (segmentation records exist only for images with a mask, so the
    manifest's per-image counts do not give them). One stream per source, filtered once and cached in memory
    (the encoded training records once), as :func:`make_balanced_records` does."""
    if not 0.0 <= source_balance <= 1.0:
        raise ValueError("source_balance must be in [0, 1]")
    counts = record_source_counts(records)
    if len(counts) < 2:
        return records.cache().shuffle(2048, seed=seed, reshuffle_each_iteration=True).repeat()
    names = sorted(counts)
    raw = [counts[s] ** (1.0 - source_balance) for s in names]
    parts = [records.filter(lambda r, s=s: tf.equal(r[C.F_SOURCE], s)).cache().repeat()
             .shuffle(max(1, min(2048, counts[s])), seed=seed + i) for i, s in enumerate(names)]
    return tf.data.Dataset.sample_from_datasets(parts, weights=[r / sum(raw) for r in raw], seed=seed,
                                                stop_on_empty_dataset=False)


def make_dataset(
    records_dir: str | Path,
    split: str,
    kind: str,
    training: bool,
    config: Config,
    batch_size: int | None = None,
    balance: bool | None = None,
    drop_remainder: bool | None = None,
    with_groups: bool = False,
) -> tf.data.Dataset:
    """Batches of ``(images float32 0–255, masks | targets)`` from one split of a record set.

    ``kind``: ``seg`` (image, mask [H,W,1]) at the segmenter size, ``img`` or ``crop`` (image,
    target [1]) at the classifier size. Training datasets repeat forever (use ``steps_per_epoch``),
    are shuffled and augmented; crop training data are balanced by (target, skin tone) when
    ``balance`` (default: on for crop training). ``with_groups`` adds the skin-tone index as a
    third element (evaluation and callbacks; not for ``fit``).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    records_dir = Path(records_dir)
    manifest = load_manifest(records_dir)
    files = shard_paths(records_dir, kind, split, manifest)
    if not files:
        raise DataError(f"{records_dir} has no {kind}-{split} records (see {C.MANIFEST})")
    stage = config.segmenter if kind == "seg" else config.classifier
    size, seed = stage.image_size, stage.seed
    batch_size = batch_size or stage.batch_size
    balance = (training and kind == "crop") if balance is None else balance
    drop_remainder = training if drop_remainder is None else drop_remainder

    records = make_record_dataset(files, training, seed)
    if balance:
        records = make_balanced_records(records, manifest, split, config, seed)
    elif training and kind == "seg" and config.segmenter.source_balance > 0:
        records = make_source_balanced_records(records, config.segmenter.source_balance, seed)
    elif training:
        records = records.shuffle(2048, seed=seed, reshuffle_each_iteration=True).repeat()

    parse = _parse_train_data if training else _parse_eval_data
    ds = records.map(lambda r: parse(r, kind, size, with_groups), num_parallel_calls=tf.data.AUTOTUNE,
                     deterministic=not training or None)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=tf.data.AUTOTUNE)
    if training and stage.augment:
        ds = ds.enumerate()
        if kind == "seg":
            augment = make_seg_augmenter(seed)
            ds = ds.map(lambda i, b: augment(b[0], b[1], i), num_parallel_calls=tf.data.AUTOTUNE)
        else:
            augment_cls = make_cls_augmenter(
                seed, resolve_cls_policy(config.classifier.augment_policy, config.classifier.weights))
            ds = ds.map(lambda i, b: (augment_cls(b[0], i), b[1]), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _masked_ids(seg_records: tf.data.Dataset) -> list[str]:
    return [b.decode() for b in seg_records.map(lambda r: r[C.F_IMAGE_ID]).as_numpy_iterator()]


def _pad_to_square(image: tf.Tensor) -> tf.Tensor:
    """Zero padding of the short side, centred as :func:`kmel.data.images.pad_to_square` pads (what the seg records
    and predict's joint inputs are)."""
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    side = tf.maximum(h, w)
    return tf.image.pad_to_bounding_box(image, (side - h) // 2, (side - w) // 2, side, side)


def make_joint_records(records_dir: str | Path, split: str, config: Config, training: bool) -> tf.data.Dataset:
    """Parsed records of every labelled image of ``split`` for ``train joint``: the seg records (the images with an
    expert mask, square at ``records.seg_size``) and the img records of the images without one. The joint model's
    input is the whole image padded to a square, as the segmenter sees it, so its size (``classifier.image_size``)
    must not exceed the seg records' (an upsampled input would not be the image predict gives it)."""
    from kmel.config import ConfigError

    records_dir = Path(records_dir)
    manifest = load_manifest(records_dir)
    seg_size = int(manifest["config"]["records"]["seg_size"])
    image_size = int(manifest["config"]["records"]["image_size"])
    if config.classifier.image_size > image_size:
        raise ConfigError(f"train joint at {config.classifier.image_size} px needs image records of at least that size; "
                          f"{records_dir} has {image_size} px ones (their long side): build-records again with "
                          f"records.image_size >= {config.classifier.image_size}, or a smaller --image-size")
    if config.classifier.image_size > seg_size:
        raise ConfigError(f"train joint at {config.classifier.image_size} px needs seg records of at least that size; "
                          f"{records_dir} has {seg_size} px ones: build-records again with records.seg_size >= "
                          f"{config.classifier.image_size} (a profile's records section), or a smaller --image-size")
    seed = config.classifier.seed
    seg_files = shard_paths(records_dir, "seg", split, manifest)
    img_files = shard_paths(records_dir, "img", split, manifest)
    parts = []
    if seg_files:
        parts.append(make_record_dataset(seg_files, training, seed))
    if img_files:
        img = make_record_dataset(img_files, training, seed)
        masked = _masked_ids(parts[0]) if parts else []
        if masked:
            table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
                tf.constant(masked), tf.ones(len(masked), tf.int64)), default_value=0)
            img = img.filter(lambda r: tf.equal(table.lookup(r[C.F_IMAGE_ID]), 0))
        parts.append(img)
    if not parts:
        raise DataError(f"{records_dir} has no seg- or img-{split} records (see {C.MANIFEST})")
    records = parts[0] if len(parts) == 1 else parts[0].concatenate(parts[1])
    return records.filter(lambda r: r[C.F_TARGET] >= 0)


def parse_joint_record(record: Mapping[str, tf.Tensor], size: int) -> tuple[tf.Tensor, ...]:
    """(image padded square at ``size``, mask [size, size, 1] (zeros when absent), has_mask, target [1], skin tone)."""
    has_mask = tf.greater(tf.strings.length(record[C.F_MASK]), 0)
    image = tf.io.decode_jpeg(record[C.F_IMAGE], channels=3)
    image = tf.clip_by_value(tf.image.resize(_pad_to_square(image), [size, size], method="bilinear",
                                             antialias=True), 0.0, 255.0)
    image = tf.ensure_shape(image, [size, size, 3])
    mask = tf.cond(has_mask, lambda: decode_mask(record, size), lambda: tf.zeros([size, size, 1], tf.float32))
    target = tf.cast(record[C.F_TARGET], tf.float32)[None]
    return image, mask, has_mask, target, record[C.F_SKIN_TONE]


def make_joint_dataset(
    records_dir: str | Path, split: str, training: bool, config: Config, batch_size: int | None = None,
    with_groups: bool = False,
) -> tf.data.Dataset:
    """Batches of ``(images, {"probability": targets [N, 1], "mask": masks [N, S, S, 1]})`` for ``train joint``
    (:func:`make_joint_records`; S = ``classifier.image_size``): a mask of −1 everywhere marks an image without an
    expert mask (:class:`kmel.training.losses.MaskedTverskyLoss` leaves it out). Training data repeat, are drawn
    with the classifier's balancing (class, skin tone, source) and augmented as segmentation batches (image and
    mask moved together). ``with_groups``: ``(images, targets, skin-tone indices)`` instead (scoring)."""
    cc = config.classifier
    size, batch_size = cc.image_size, batch_size or cc.batch_size
    records = make_joint_records(records_dir, split, config, training)
    if training:
        records = make_balanced_records(records, load_manifest(records_dir), split, config, cc.seed)
    ds = records.map(lambda r: parse_joint_record(r, size), num_parallel_calls=tf.data.AUTOTUNE,
                     deterministic=not training or None)
    ds = ds.batch(batch_size, drop_remainder=training, num_parallel_calls=tf.data.AUTOTUNE)
    if with_groups:
        return ds.map(lambda i, m, h, t, g: (i, t, g)).prefetch(tf.data.AUTOTUNE)
    if training and cc.augment:
        augment = make_seg_augmenter(cc.seed)
        ds = ds.enumerate().map(lambda k, b: (*augment(b[0], b[1], k), *b[2:]), num_parallel_calls=tf.data.AUTOTUNE)

    def to_outputs(images, masks, has_mask, targets, groups):
        masks = tf.where(has_mask[:, None, None, None], masks, -tf.ones_like(masks))
        return images, {C.JOINT_PROBABILITY: targets, C.JOINT_MASK: masks}

    return ds.map(to_outputs, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def count_joint_records(records_dir: str | Path, split: str, config: Config) -> int:
    """Labelled images of ``split`` that :func:`make_joint_records` yields (one pass over the ids)."""
    return int(make_joint_records(records_dir, split, config, False).reduce(0, lambda n, _: n + 1))


def count_records(records_dir: str | Path, kind: str, split: str) -> int:
    manifest = load_manifest(records_dir)
    return sum(e["records"] for e in manifest["shards"].get(kind, {}).get(split, []))


def steps_per_epoch(records_dir: str | Path, kind: str, split: str, batch_size: int, configured: int = 0) -> int:
    return _steps(count_records(records_dir, kind, split), batch_size, configured)
