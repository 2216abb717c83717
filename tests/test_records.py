"""build-records on synthetic data: round trip, split hygiene, bad images, reruns, tf.data reader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from kmel import constants as C
from kmel.config import load_config
from kmel.data.records import DataError, build_records, load_manifest, shard_paths
from kmel.data.tfrecord import read_records

SMALL = {
    "records.image_size": 96, "records.seg_size": 64, "records.shard_size": 16, "records.workers": 1,
    "segmenter.image_size": 64, "classifier.image_size": 64,
}


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory) -> Path:
    from kmel.data.synthetic import make_synthetic_dataset

    out = tmp_path_factory.mktemp("data")
    make_synthetic_dataset(out, n_images=60, seed=7, size=96)
    return out


@pytest.fixture(scope="module")
def built(synthetic_data, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("records")
    manifest = build_records(synthetic_data, out, load_config("cpu-small", SMALL), progress=False)
    return out, manifest


def test_manifest_counts_and_files(built):
    out, manifest = built
    n_img = sum(manifest["n_records"]["img"].values())
    assert n_img == 60  # every synthetic image is labelled, readable and unique
    table = pd.read_csv(out / C.METADATA_CSV, dtype={C.COL_PATIENT: str})
    assert len(table) == n_img and table[C.COL_IMAGE_ID].is_unique
    for kind in ("img", "seg"):
        for split, entries in manifest["shards"][kind].items():
            for entry in entries:
                assert (out / entry["file"]).exists()
                assert entry["records"] <= 16
    counted = sum(n for split in manifest["counts"].values() for src in split.values()
                  for tgt in src.values() for n in tgt.values())
    assert counted == n_img
    assert (out / C.CONFIG_YAML).exists() and not list(out.glob("*.tmp"))
    assert not list(out.glob(".prepare-*")), "the prepare cache is removed after a complete run"


def test_no_patient_in_two_splits(built):
    out, _ = built
    table = pd.read_csv(out / C.METADATA_CSV, dtype={C.COL_PATIENT: str})
    with_patient = table[table[C.COL_PATIENT].notna() & (table[C.COL_PATIENT] != "")]
    assert len(with_patient) > 0
    assert (with_patient.groupby(C.COL_PATIENT)[C.COL_SPLIT].nunique() == 1).all()
    assert set(table[C.COL_SPLIT]) == set(C.SPLITS)


def test_records_round_trip_pixels_masks_labels(built, synthetic_data):
    out, manifest = built
    table = pd.read_csv(out / C.METADATA_CSV, dtype={C.COL_PATIENT: str}).set_index(C.COL_IMAGE_ID)
    truth = pd.read_csv(synthetic_data / "synthetic_truth.csv").set_index("image_id")
    seen = 0
    for split in C.SPLITS:
        for record in read_records(shard_paths(out, "img", split, manifest)):
            image_id = record[C.F_IMAGE_ID]
            row = table.loc[image_id]
            assert row[C.COL_SPLIT] == split
            assert record[C.F_TARGET] == int(truth.loc[image_id, "malignant"]) == int(row[C.COL_TARGET])
            decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(record[C.F_IMAGE], np.uint8), cv2.IMREAD_COLOR),
                                   cv2.COLOR_BGR2RGB)
            source = cv2.cvtColor(cv2.imread(row[C.COL_IMAGE_PATH]), cv2.COLOR_BGR2RGB)
            assert max(decoded.shape[:2]) == 96
            assert decoded.shape[:2] == source.shape[:2] or max(source.shape[:2]) != 96
            if decoded.shape == source.shape:
                assert np.abs(decoded.astype(int) - source.astype(int)).mean() < 3.0  # JPEG loss only
            assert (record[C.F_HEIGHT], record[C.F_WIDTH]) == source.shape[:2]
            seen += 1
    assert seen == len(table)
    for record in read_records(shard_paths(out, "seg", "train", manifest)):
        mask = cv2.imdecode(np.frombuffer(record[C.F_MASK], np.uint8), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255} and mask.max() == 255


def test_rerun_reuses_shards_and_gives_the_same_manifest(built, synthetic_data):
    out, manifest = built
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tfrecord")}
    again = build_records(synthetic_data, out, load_config("cpu-small", SMALL), progress=False)
    assert again == manifest
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tfrecord")}
    assert after == before, "unchanged shards are not rewritten"


def test_bad_images_are_reported_and_skipped(synthetic_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    images = sorted((data / "images").rglob("*.jpg"))
    images[0].write_bytes(images[0].read_bytes()[:200])  # truncated JPEG
    images[1].write_bytes(b"")  # zero-byte
    images[2].write_text("not an image")  # text named .jpg
    manifest = build_records(data, tmp_path / "out", load_config("cpu-small", {**SMALL, "records.workers": 2}),
                             progress=False)
    skipped = {s[C.COL_IMAGE_ID]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {images[0].stem, images[1].stem, images[2].stem}
    assert all(images[i].name in skipped[images[i].stem] for i in range(3)), skipped
    assert sum(manifest["n_records"]["img"].values()) == 57
    listed = pd.read_csv(tmp_path / "out" / C.SKIPPED_CSV)
    assert len(listed) == 3


def test_missing_data_dir_and_empty_data_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_records(tmp_path / "nope", tmp_path / "out", load_config("cpu-small", SMALL), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no labelled rows"):
        build_records(tmp_path / "empty", tmp_path / "out", load_config("cpu-small", SMALL), progress=False)
    with pytest.raises(DataError, match="build-records"):
        load_manifest(tmp_path / "empty")


def test_make_dataset_batches(built):
    from kmel.data.datasets import make_dataset

    out, _ = built
    config = load_config("cpu-small", SMALL)
    images, masks = next(iter(make_dataset(out, "train", "seg", True, config, batch_size=4)))
    assert images.shape == (4, 64, 64, 3) and masks.shape == (4, 64, 64, 1)
    assert set(np.unique(masks.numpy())) <= {0.0, 1.0}
    assert 0.0 <= float(images.numpy().min()) and float(images.numpy().max()) <= 255.0
    eval_ds = make_dataset(out, "val", "img", False, config, batch_size=5)
    n = sum(int(x.shape[0]) for x, _ in eval_ds)
    assert n == load_manifest(out)["n_records"]["img"]["val"]
    x, y, g = next(iter(make_dataset(out, "val", "img", False, config, batch_size=3, with_groups=True)))
    assert y.shape == (3, 1) and g.shape == (3,)


def test_manifest_is_json_with_config(built):
    out, manifest = built
    on_disk = json.loads((out / C.MANIFEST).read_text())
    assert on_disk["config"]["records"]["image_size"] == 96
    assert on_disk["fingerprint"] == manifest["fingerprint"]


def test_prepare_decodes_large_jpeg_reduced_with_full_size_mask(tmp_path):
    """A 2048x1536 photograph is decoded at 1/4 scale; its full-size mask still lines up."""
    from kmel.data.images import encode_jpeg, pad_to_square
    from kmel.data.prepare import PrepareTask, prepare_image, read_prepared

    h, w = 1536, 2048
    y, x = np.mgrid[0:h, 0:w]
    image = np.stack([180 + 40 * np.sin(x / 300), 140 + 30 * np.cos(y / 250), 120 + 0 * x], axis=2)
    lesion = ((x - 1100) / 420.0) ** 2 + ((y - 700) / 300.0) ** 2 < 1.0
    image[lesion] = (90, 60, 50)
    (tmp_path / "ISIC_big.jpg").write_bytes(encode_jpeg(image.astype(np.uint8), 95))
    cv2.imwrite(str(tmp_path / "ISIC_big_segmentation.png"), lesion.astype(np.uint8) * 255)
    config = load_config("cpu-small", {"records.image_size": 256, "records.seg_size": 128})
    task = PrepareTask("ISIC_big", str(tmp_path / "ISIC_big.jpg"), str(tmp_path / "ISIC_big_segmentation.png"),
                       str(tmp_path), config.records, config.crops)
    result = prepare_image(task)
    assert (result["height"], result["width"], result["has_mask"], result["mask_note"]) == (h, w, True, "")
    cached, payloads = read_prepared(tmp_path, "ISIC_big")
    assert cached == result and prepare_image(task) == result  # a rerun reads the cache

    def decode(name, flags=cv2.IMREAD_COLOR):
        return cv2.imdecode(np.frombuffer(payloads[name], np.uint8), flags)

    assert decode("img").shape == (192, 256, 3)
    seg_mask = decode("seg_mask", cv2.IMREAD_GRAYSCALE) > 127
    square, _ = pad_to_square(lesion.astype(np.uint8) * 255)
    expected = cv2.resize(square, (128, 128), interpolation=cv2.INTER_AREA) >= 128
    iou = (seg_mask & expected).sum() / (seg_mask | expected).sum()
    assert iou > 0.97, iou
    seg_image = cv2.cvtColor(decode("seg_image"), cv2.COLOR_BGR2RGB).astype(float)
    assert seg_image[expected].mean() < seg_image[~expected & (seg_image.sum(axis=2) > 0)].mean() - 40


def test_byte_identical_images_under_two_ids_are_kept_once(tmp_path):
    """Same bytes, another id (a re-upload): one record, the earliest id kept, the manifest names both."""
    from kmel.data.synthetic import make_synthetic_dataset

    data = tmp_path / "data"
    make_synthetic_dataset(data, n_images=12, seed=3, size=96)
    original, copy = "ISIC_9000001", "ISIC_9000100"
    shutil.copyfile(data / "images" / "2019" / f"{original}.jpg", data / "images" / "2019" / f"{copy}.jpg")
    for name, id_column in (("ISIC_2019_Training_GroundTruth.csv", "image"),
                            ("ISIC_2019_Training_Metadata.csv", "image")):
        table = pd.read_csv(data / name)
        row = table[table[id_column] == original].assign(**{id_column: copy})
        pd.concat([table, row]).to_csv(data / name, index=False)

    manifest = build_records(data, tmp_path / "rec", load_config("cpu-small", SMALL), progress=False)
    assert manifest["cleaning"]["content_duplicates"] == [{"dropped": copy, "kept": original}]
    ids = [r[C.F_IMAGE_ID] for split in C.SPLITS for r in read_records(shard_paths(tmp_path / "rec", "img", split))]
    ids = [i.decode() if isinstance(i, bytes) else i for i in ids]
    assert len(ids) == len(set(ids)) == 12 == sum(manifest["n_records"]["img"].values())
    assert original in ids and copy not in ids
    metadata = pd.read_csv(tmp_path / "rec" / C.METADATA_CSV)
    assert metadata[C.COL_SHA256].is_unique and copy not in set(metadata[C.COL_IMAGE_ID])
