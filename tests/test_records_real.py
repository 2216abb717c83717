"""build-records on real data: the 2,594 ISIC 2018 Task 1 images as a 2019 image folder with the real
2019 CSVs (most of whose 25,331 images are then absent), read back through make_dataset."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest

from kmel import constants as C
from kmel.config import load_config
from kmel.data.records import build_records

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


@pytest.fixture(scope="module")
def real_records(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    data = root / "data"
    (data / "ISIC_2019_Training_Input").mkdir(parents=True)
    (data / "masks").mkdir()
    for name in ("ISIC_2019_Training_GroundTruth.csv", "ISIC_2019_Training_Metadata.csv"):
        (data / name).symlink_to(shared_data / "metadata" / name)
    src = shared_data / "isic2018-task1-256"
    for image in sorted((src / "images").glob("*.jpg")):
        (data / "ISIC_2019_Training_Input" / image.name).symlink_to(image)
    for mask in sorted((src / "masks").glob("*.png")):
        (data / "masks" / mask.name).symlink_to(mask)
    config = load_config("cpu-small", {"records.image_size": 128, "records.seg_size": 64, "records.workers": 2})
    manifest = build_records(data, root / "rec", config, progress=False)
    return root / "rec", manifest, config


def test_real_folder_counts(real_records, shared_data):
    rec, manifest, _ = real_records
    labels = pd.read_csv(shared_data / "isic2018-task1-256" / "labels.csv")
    labelled = labels[labels["melanoma"].notna()]
    # 2,593 of the 2,594 images have a 2019 label (ISIC_0015982 has none); the other 22,738 rows are absent.
    assert sum(manifest["n_records"]["img"].values()) == 2593
    assert sum(manifest["n_records"]["seg"].values()) == 2593
    assert manifest["cleaning"]["missing_images"] == {"isic2019": 25331 - 2593}
    assert manifest["skipped"] == [] and manifest["mask_issues"] == []
    table = pd.read_csv(rec / C.METADATA_CSV)
    # Ids ending in _downsampled are matched to their files by the base id.
    assert table["image_id"].str.endswith("_downsampled").sum() > 0
    assert int(table["target"].sum()) == int(labelled["melanoma"].sum())  # MEL only among MEL/NV/BKL
    assert set(table["skin_tone_name"]) <= set(C.SKIN_TONE_GROUPS) and table["skin_tone_name"].nunique() >= 3
    shares = table["split"].value_counts(normalize=True)
    assert abs(shares["test"] - 0.15) < 0.02 and abs(shares["val"] - 0.15) < 0.02
    assert json.loads((rec / C.MANIFEST).read_text())["fingerprint"] == manifest["fingerprint"]


def test_real_records_read_back_match_the_files(real_records, shared_data):
    from kmel.data.datasets import make_dataset

    rec, _, config = real_records
    table = pd.read_csv(rec / C.METADATA_CSV).set_index("image_id")
    ds = make_dataset(rec, "val", "seg", False, config, batch_size=8, with_groups=False)
    images, masks = next(iter(ds))
    assert images.shape[1:] == (config.segmenter.image_size, config.segmenter.image_size, 3)
    assert set(np.unique(masks.numpy())) <= {0.0, 1.0} and masks.numpy().mean() > 0.05
    # Pixels of one img- record against the file on disk (within JPEG loss).
    from kmel.data.records import shard_paths
    from kmel.data.tfrecord import read_records

    record = next(iter(read_records(shard_paths(rec, "img", "train"))))
    image_id = record[C.F_IMAGE_ID]
    image_id = image_id.decode() if isinstance(image_id, bytes) else image_id
    base = table.loc[image_id, "base_id"] if "base_id" in table.columns else image_id
    original = cv2.cvtColor(cv2.imread(str(shared_data / "isic2018-task1-256" / "images" / f"{base}.jpg")),
                            cv2.COLOR_BGR2RGB)
    stored = cv2.cvtColor(cv2.imdecode(np.frombuffer(record[C.F_IMAGE], np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    expected = cv2.resize(original, stored.shape[1::-1], interpolation=cv2.INTER_AREA)
    assert np.abs(stored.astype(int) - expected).mean() < 4
    assert record[C.F_TARGET] == int(table.loc[image_id, "target"])
