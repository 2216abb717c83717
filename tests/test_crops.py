"""Crop records and predict share one preprocessing path and agree on the same pixels."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from kmel import constants as C
from kmel.config import to_plain
from kmel.data.records import build_records
from kmel.data.tfrecord import read_records
from tests.tiny import tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """Records plus exported (untrained, seeded) tiny models and pipeline.json: no training needed here."""
    import keras

    from kmel.data.synthetic import make_synthetic_dataset
    from kmel.models.classifier import build_classifier, classifier_last_conv
    from kmel.models.segmenter import build_segmenter
    from kmel.serving.export import (
        export_serving,
        saved_model_fingerprint,
        update_pipeline,
    )

    tmp = tmp_path_factory.mktemp("crops")
    config = tiny_config(**{"classifier.backbone": "efficientnet_lite0"})  # exports faster than B0; any classifier does
    make_synthetic_dataset(tmp / "data", n_images=24, seed=2, size=96)
    build_records(tmp / "data", tmp / "rec", config, progress=False)
    keras.utils.set_random_seed(0)
    models = tmp / "models"
    seg = build_segmenter(config.segmenter)
    export_serving(seg, models / C.SEGMENTER_DIR, config.segmenter.image_size)
    update_pipeline(models, "segmenter", {
        "image_size": config.segmenter.image_size, "fingerprint": saved_model_fingerprint(models / C.SEGMENTER_DIR),
        "config": to_plain(config.segmenter), "records": to_plain(config.records), "crops": to_plain(config.crops)})
    cls = build_classifier(config.classifier)
    export_serving(cls, models / C.CLASSIFIER_DIR, config.classifier.image_size,
                   classifier_last_conv(config.classifier.backbone))
    update_pipeline(models, "classifier", {"image_size": config.classifier.image_size, "threshold": 0.5,
                                           "class_names": ["benign", "malignant"], "config": to_plain(config.classifier)})
    return {"tmp": tmp, "records": tmp / "rec", "models": models, "config": config}


def test_crop_records_cover_every_image_and_are_reused(setup):
    from kmel.lesion.crops import build_crop_records, ensure_crop_records

    out = build_crop_records(setup["records"], setup["models"], setup["config"], progress=False)
    manifest = json.loads((out / C.MANIFEST).read_text())
    assert sum(manifest["n_records"]["crop"].values()) == 24
    assert sum(n for modes in manifest["crop_modes"].values() for n in modes.values()) == 24
    records = list(read_records(sorted(out.glob("crop-*.tfrecord"))))
    crop = cv2.imdecode(np.frombuffer(records[0][C.F_IMAGE], np.uint8), cv2.IMREAD_COLOR)
    assert crop.shape == (64, 64, 3)
    assert all(r[C.F_CROP_MODE] in (0, 1, 2) for r in records)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("crop-*.tfrecord")}
    assert ensure_crop_records(setup["records"], setup["models"], setup["config"], progress=False) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("crop-*.tfrecord")} == stamps
    # Other crop settings: another folder beside it; the crops a classifier was trained on are left as they were.
    from dataclasses import replace

    config = setup["config"]
    other = replace(config, crops=replace(config.crops, hair_kernel=config.crops.hair_kernel + 2))
    elsewhere = ensure_crop_records(setup["records"], setup["models"], other, progress=False)
    assert elsewhere != out and elsewhere.parent == out.parent and (elsewhere / C.MANIFEST).is_file()
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("crop-*.tfrecord")} == stamps


def test_predict_and_crop_records_use_the_same_function(setup, tmp_path, monkeypatch):
    """Same pixels in, same crop box, mode and skin tone out, through the same CropPipeline.pre and .finish
    (crop records call them through ``run``; predict calls them apart, to overlap decoding with the models)."""
    import kmel.lesion.crops as crops
    from kmel.serving.runner import predict_folder

    calls: list[str] = []
    original_pre, original_finish = crops.CropPipeline.pre, crops.CropPipeline.finish

    def spy_pre(self, image, *args, **kwargs):
        calls.append("pre")
        return original_pre(self, image, *args, **kwargs)

    def spy_finish(self, pres):
        calls.append("finish")
        return original_finish(self, pres)

    monkeypatch.setattr(crops.CropPipeline, "pre", spy_pre)
    monkeypatch.setattr(crops.CropPipeline, "finish", spy_finish)
    out = crops.build_crop_records(setup["records"], setup["models"], setup["config"], progress=False)
    # build_crop_records reuses the complete shards of the previous test; force one rebuild
    for plan in out.glob(".crop-*.plan"):
        plan.write_text("stale")
    out = crops.build_crop_records(setup["records"], setup["models"], setup["config"], progress=False)
    assert {"pre", "finish"} <= set(calls), "crop records went through CropPipeline.pre and .finish"
    calls.clear()
    # Save the img- record pixels losslessly and predict on them.
    folder = tmp_path / "same"
    folder.mkdir()
    from kmel.data.records import shard_paths

    img_records = {r[C.F_IMAGE_ID]: r for r in read_records(shard_paths(setup["records"], "img", "train"))}
    for image_id, record in list(img_records.items())[:6]:
        pixels = cv2.imdecode(np.frombuffer(record[C.F_IMAGE], np.uint8), cv2.IMREAD_COLOR)
        cv2.imwrite(str(folder / f"{image_id}.png"), pixels)
    predict_folder(folder, tmp_path / "p.csv", setup["models"], progress=False)
    assert {"pre", "finish"} <= set(calls), "predict went through CropPipeline.pre and .finish"
    rows = pd.read_csv(tmp_path / "p.csv").set_index("image")
    crop_records = {r[C.F_IMAGE_ID]: r for r in read_records(sorted(out.glob("crop-train-*.tfrecord")))}
    for image_id in rows.index:
        record, row = crop_records[image_id], rows.loc[image_id]
        assert C.CROP_MODES[record[C.F_CROP_MODE]] == row["crop_mode"]
        assert tuple(record[C.F_BOX]) == (row["box_x0"], row["box_y0"], row["box_x1"], row["box_y1"])
        assert C.SKIN_TONE_GROUPS[record[C.F_SKIN_TONE]] == row["skin_tone_group"]
        assert record[C.F_ITA] == pytest.approx(row["ita"], abs=0.01)


def test_crop_pipeline_matches_prepare_crop_directly(setup):
    """CropPipeline adds only resizing, padding and box rescaling around kmel.lesion.lesion.prepare_crop.

    A landscape 150×240 image (records at 96 px: 60×96, padded by 18 rows above and below to the
    segmenter's square) with a lesion at rows 45–105, cols 60–180: every step is a real transform.
    """
    from kmel.lesion.crops import CropPipeline
    from kmel.lesion.lesion import prepare_crop

    config = setup["config"]
    assert config.records.image_size == 96
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (150, 240, 3), dtype=np.uint8)
    prob = np.zeros((64, 64), np.float32)
    prob[24:40, 16:48] = 1.0  # the lesion in the padded 64 px square: (45-105, 60-180) × 0.4, +18 rows, × 2/3

    with CropPipeline(lambda batch: np.stack([prob] * len(batch)), 64, config, workers=1) as pipeline:
        got = pipeline.run([image])[0]
    # By hand: the records-size image, the probability un-padded onto it, prepare_crop, box × 2.5.
    small = cv2.resize(image, (96, 60), interpolation=cv2.INTER_AREA)
    prob_small = cv2.resize(prob, (96, 96), interpolation=cv2.INTER_LINEAR)[18:78]
    want = prepare_crop(small, prob_small, config.classifier.image_size, config.crops)
    np.testing.assert_array_equal(got.result.crop, want.crop)
    assert got.result.crop_mode == want.crop_mode == "lesion"
    assert got.box == tuple(int(round(v * 2.5)) for v in want.box)
    assert got.original_size == (150, 240)
    # And in the original's pixels the box frames the lesion, centred on it, with a margin.
    x0, y0, x1, y1 = got.box
    assert x0 <= 60 and y0 <= 45 and x1 >= 180 and y1 >= 105
    assert abs((x0 + x1) / 2 - 120) <= 4 and abs((y0 + y1) / 2 - 75) <= 4
    assert x1 - x0 <= 1.6 * 120  # a square box around the long side plus margin, clipped to the image
    assert 0 <= x0 and 0 <= y0 and x1 <= 240 and y1 <= 150


def test_segmenter_reads_the_raw_image_it_learned_on_and_old_models_keep_their_enhanced_input(tmp_path):
    """crops.enhance_segmenter_input: off by default (the segmenter learns on raw seg records; CLAHE + gamma on its
    input cost 0.02-0.03 thresholded Jaccard, bench/seg_input_check.py); a pipeline.json from before the setting
    gets it on (what its crops were made with), and that keeps its crops folder's name and the records' identity."""
    import hashlib
    import json
    from dataclasses import replace

    import cv2
    import numpy as np

    from kmel.config import load_config, to_plain
    from kmel.data.images import pad_to_square
    from kmel.data.records import _prepare_cache_dir
    from kmel.lesion.crops import CropPipeline, crops_dir_for
    from kmel.lesion.lesion import enhance_for_segmentation
    from kmel.serving.runtime import config_from_pipeline

    config = load_config("cpu-small")
    assert config.crops.enhance_segmenter_input is False
    rng = np.random.default_rng(0)
    image = rng.integers(60, 200, (96, 128, 3), dtype=np.uint8)
    size = config.records.image_size

    def expected(img):
        from kmel.data.images import resize_long_side

        square, _ = pad_to_square(img)
        return cv2.resize(square, (64, 64), interpolation=cv2.INTER_AREA), resize_long_side(image, size)

    with CropPipeline(None, 64, config, 1) as crops:
        raw = crops.pre(image).seg_input
    legacy = replace(config, crops=replace(config.crops, enhance_segmenter_input=True))
    with CropPipeline(None, 64, legacy, 1) as crops:
        enhanced = crops.pre(image).seg_input
    small = expected(image)[1]
    assert np.array_equal(raw, expected(small)[0])
    assert np.array_equal(enhanced, expected(enhance_for_segmentation(small, config.crops))[0])
    assert not np.array_equal(raw, enhanced)

    # crops from before the setting (and before segmenter_flips, added later still)
    old_crops = {k: v for k, v in to_plain(config.crops).items() if k not in ("enhance_segmenter_input", "segmenter_flips")}
    pipeline = {"segmenter": {"records": to_plain(config.records), "crops": old_crops, "config": to_plain(config.segmenter)},
                "classifier": {"crops": old_crops, "config": to_plain(config.classifier)}}
    assert config_from_pipeline(pipeline).crops.enhance_segmenter_input is True
    pipeline["classifier"]["crops"] = to_plain(config.crops)
    assert config_from_pipeline(pipeline).crops.enhance_segmenter_input is False
    # the folder name of crops made before the setting: sha256 of the settings without it
    old_settings = json.dumps({"crops": old_crops, "size": config.classifier.image_size,
                               "records": config.records.image_size, "segmenter": "abc"}, sort_keys=True)
    old_name = f"crops-abc-{hashlib.sha256(old_settings.encode()).hexdigest()[:8]}"
    assert crops_dir_for(tmp_path, "abc", legacy).name == old_name
    assert crops_dir_for(tmp_path, "abc", config).name != old_name
    assert _prepare_cache_dir(tmp_path, config) == _prepare_cache_dir(tmp_path, legacy)  # records do not depend on it


def test_segmenter_flips_average_the_flipped_back_masks_and_change_only_their_own_crops(tmp_path):
    """crops.segmenter_flips: the segmenter's map is the mean over the four flips of its input, each output flipped
    back to the image's orientation; the crop stage uses it only when asked, and only then gets another crops folder
    (crops made before the setting, and pipelines without it, keep theirs)."""
    from dataclasses import replace

    from kmel.config import load_config
    from kmel.data.images import flip_views
    from kmel.data.records import _prepare_cache_dir
    from kmel.lesion.crops import CropPipeline, crops_dir_for, flip_averaged_masks
    from kmel.serving.runtime import config_from_pipeline

    size = 64
    rows, cols = np.mgrid[0:size, 0:size]
    where = (rows * 3 + cols) / (4.0 * size)  # a segmenter that depends on where a pixel is, not only on its value
    calls: list[int] = []

    def segment(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return batch[..., 0] / 255.0 * where

    rng = np.random.default_rng(1)
    batch = rng.integers(0, 256, (2, size, size, 3)).astype(np.float32)
    # by hand: left-right view, its output flipped back left-right; up-down likewise; both
    by_hand = (segment(batch) + segment(batch[:, :, ::-1])[:, :, ::-1] + segment(batch[:, ::-1])[:, ::-1]
               + segment(batch[:, ::-1, ::-1])[:, ::-1, ::-1]) / 4
    calls.clear()
    averaged = flip_averaged_masks(segment, batch)
    assert calls == [2, 2, 2, 2]
    np.testing.assert_allclose(averaged, by_hand, atol=1e-6)
    assert not np.allclose(averaged, segment(batch), atol=1e-3)
    # flipping the input flips the averaged map (the plain one would not be)
    np.testing.assert_allclose(flip_averaged_masks(segment, batch[:, :, ::-1]), averaged[:, :, ::-1], atol=1e-6)
    assert not np.allclose(segment(batch[:, :, ::-1]), segment(batch)[:, :, ::-1], atol=1e-3)

    # The crop stage: plain by default (one call per batch), the averaged map with the setting (four calls).
    config = load_config("cpu-small")
    assert config.crops.segmenter_flips is False
    flips = replace(config, crops=replace(config.crops, segmenter_flips=True))
    image = rng.integers(60, 200, (96, 128, 3), dtype=np.uint8)
    image[30:70, 40:90] = 40
    seen: dict[str, list[np.ndarray]] = {"plain": [], "flips": []}

    def recording(name):
        def run(batch):
            seen[name].append(batch.copy())
            return segment(batch)
        return run

    for name, cfg, n_calls in (("plain", config, 1), ("flips", flips, 4)):
        calls.clear()
        with CropPipeline(recording(name), size, cfg, 1) as crops:
            crops.run([image])
        assert len(calls) == n_calls, name
    # what the crop stage hands to prepare_crop: the averaged map of the same segmenter input
    with CropPipeline(None, size, flips, 1) as crops:
        seg_input = crops.pre(image).seg_input[None].astype(np.float32)
    with CropPipeline(lambda b: flip_averaged_masks(segment, b), size, config, 1) as crops:
        want = crops.run([image])[0]
    with CropPipeline(segment, size, flips, 1) as crops:
        got = crops.run([image])[0]
    # the segmenter read the crop stage's input as is, and with flips its four views
    assert len(seen["plain"]) == 1 and np.array_equal(seen["plain"][0], seg_input)
    assert len(seen["flips"]) == 4
    for got_view, want_view in zip(seen["flips"], flip_views(seg_input)):
        assert np.array_equal(got_view, want_view)
    assert got.box == want.box and np.array_equal(got.result.crop, want.result.crop)

    # Crops folders and records: the setting off keeps the name crops had before it existed; on gets its own.
    assert crops_dir_for(tmp_path, "abc", flips).name != crops_dir_for(tmp_path, "abc", config).name
    old_crops = {k: v for k, v in to_plain(config.crops).items() if k != "segmenter_flips"}
    pipeline = {"segmenter": {"records": to_plain(config.records), "crops": old_crops, "config": to_plain(config.segmenter)},
                "classifier": {"crops": old_crops, "config": to_plain(config.classifier)}}
    assert config_from_pipeline(pipeline).crops.segmenter_flips is False
    pipeline["classifier"]["crops"] = to_plain(flips.crops)
    assert config_from_pipeline(pipeline).crops.segmenter_flips is True
    assert _prepare_cache_dir(tmp_path, config) == _prepare_cache_dir(tmp_path, flips)  # records do not depend on it
