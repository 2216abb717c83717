"""The data users bring today (issue 27): ISIC 2024 (SLICE-3D) metadata and images read straight out of its HDF5
file, PAD-UFES-20's smartphone photographs, and the ISIC 2024 metric (partial AUC above 80 % TPR)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from kmel import constants as C
from kmel.evaluation.fairness import fairness_report, partial_auc, summary_metrics
from tests.tiny import tiny_config


def _jpeg(seed: int, size: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), 190, np.uint8)
    cv2.circle(image, (size // 2, size // 2), size // 4, tuple(int(v) for v in rng.integers(20, 90, 3)), -1)
    return cv2.imencode(".jpg", image)[1].tobytes()


# === The ISIC 2024 metric ===


def test_partial_auc_extremes_and_hand_computed_values():
    y = np.array([0, 0, 1, 1])
    assert partial_auc(y, [0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.2)  # perfect ranking: the maximum
    assert partial_auc(y, [0.4, 0.3, 0.2, 0.1]) == pytest.approx(0.0)  # reversed
    rng = np.random.default_rng(0)
    assert partial_auc(rng.integers(0, 2, 100_000), rng.random(100_000)) == pytest.approx(0.02, abs=0.002)
    # 6 positives, 4 negatives, ranked P P P P P N P N N N: TPR 5/6 from FPR 0 to 1/4, then 1.
    y = [1, 1, 1, 1, 1, 0, 1, 0, 0, 0]
    assert partial_auc(y, np.arange(10)[::-1]) == pytest.approx((5 / 6 - 0.8) * 0.25 + 0.2 * 0.75)
    # A tie between one positive and one negative (2 positives, 2 negatives): the ROC curve goes diagonally from
    # (0, 0.5) to (0.5, 1), crossing TPR 0.8 at FPR 0.3: the triangle above it is 0.2 * 0.2 / 2, then 0.2 * 0.5.
    assert partial_auc([1, 1, 0, 0], [0.9, 0.5, 0.5, 0.1]) == pytest.approx(0.02 + 0.1)
    assert np.isnan(partial_auc([1, 1], [0.2, 0.3]))


def test_partial_auc_matches_a_fine_numerical_integral():
    """Against an independent computation: TPR at 100,001 FPR values read off the empirical curve, integrated."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 400)
    s = y * 0.7 + rng.normal(size=400)
    pos, neg = np.sort(s[y == 1]), np.sort(s[y == 0])
    fpr = np.linspace(0, 1, 100_001)
    thresholds = np.quantile(neg, 1 - fpr, method="higher")  # continuous scores: no ties
    tpr = 1 - np.searchsorted(pos, thresholds, side="left") / len(pos)
    numeric = np.trapezoid(np.maximum(tpr - 0.8, 0), fpr)
    assert partial_auc(y, s) == pytest.approx(numeric, abs=2e-3)


def test_every_report_has_the_partial_auc_with_intervals(tmp_path):
    from kmel.evaluation.report import write_report

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = np.clip(y * 0.3 + rng.random(300) * 0.7, 0, 1)
    tone = np.where(rng.random(300) < 0.5, "light", "dark")
    summary = summary_metrics(y, s, 0.5)
    assert summary["pauc80"] == pytest.approx(partial_auc(y, s))
    fair = fairness_report(y, s, 0.5, {"skin_tone": tone}, n_bootstrap=50)
    low, high = fair["overall"]["ci95"]["pauc80"]
    assert low < partial_auc(y, s) < high
    for name, row in fair["skin_tone"]["groups"].items():
        assert row["pauc80"] == pytest.approx(partial_auc(y[tone == name], s[tone == name]))
        assert len(row["ci95"]["pauc80"]) == 2
    assert "pauc80" in fair["skin_tone"]["gaps"]
    report = write_report(tmp_path, y, s, 0.5, {"skin_tone": tone}, meta={"split": "test"}, n_bootstrap=20)
    md = (tmp_path / "report.md").read_text()
    assert "pAUC above 80 % TPR" in md and f"{summary['pauc80']:.3f}" in md
    assert "pAUC>80%TPR [95% CI]" in md
    assert report["summary"]["pauc80"] == pytest.approx(summary["pauc80"])


# === Images inside HDF5 files ===


def test_hdf5_members_read_in_every_layout_and_fail_naming_file_and_key(tmp_path):
    from kmel.data.hdf5 import close_containers, list_members, read_source, split_member
    from kmel.data.images import ImageReadError

    path = tmp_path / "crops.hdf5"
    jpeg = _jpeg(0)
    padded = jpeg + b"\x00\x00"  # numpy's bytes_ would drop these: the reader must not
    with h5py.File(path, "w") as f:
        f.create_dataset("ISIC_1", data=np.bytes_(jpeg))
        f.create_dataset("ISIC_2", data=np.frombuffer(jpeg, np.uint8))
        f.create_dataset("ISIC_3", data=np.void(padded))  # opaque
        f.create_dataset("ISIC_4", data=np.array(padded, dtype=f"S{len(padded)}"))  # S<n> ending in NULs
        f.create_dataset("pixels", data=np.zeros((4, 4, 3), np.uint8))
        f.create_group("folder")
    assert list_members(path) == ["ISIC_1", "ISIC_2", "ISIC_3", "ISIC_4", "pixels"]
    assert split_member(f"{path}/ISIC_1") == (str(path), "ISIC_1")
    assert split_member(tmp_path / "x.jpg") is None
    for key in ("ISIC_1", "ISIC_2"):
        assert read_source(f"{path}/{key}", 1 << 20) == jpeg, key
    assert read_source(f"{path}/ISIC_3", 1 << 20) == read_source(f"{path}/ISIC_4", 1 << 20) == padded
    for key, why in (("pixels", "not the encoded bytes of one image"), ("folder", "group"),
                     ("ISIC_9", "no dataset of that name")):
        with pytest.raises(ImageReadError, match=why) as err:
            read_source(f"{path}/{key}", 1 << 20)
        assert f"crops.hdf5/{key}" in str(err.value)
    with pytest.raises(ImageReadError, match="over the"):
        read_source(f"{path}/ISIC_1", 100)
    with h5py.File(tmp_path / "new.hdf5", "w") as f:  # replaced while this process has it open: read afresh
        f.create_dataset("ISIC_1", data=np.bytes_(_jpeg(5)))
    (tmp_path / "new.hdf5").replace(path)
    assert read_source(f"{path}/ISIC_1", 1 << 20) == _jpeg(5) and list_members(path) == ["ISIC_1"]
    with h5py.File(tmp_path / "weights.h5", "w") as f:  # a Keras weights file: groups only
        f.create_group("dense").create_dataset("kernel", data=np.zeros(3))
    with pytest.raises(ImageReadError, match="holds no datasets"):
        list_members(tmp_path / "weights.h5")
    fake = tmp_path / "fake.hdf5"
    fake.write_bytes(b"not hdf5 at all")
    with pytest.raises(ImageReadError, match="not a readable HDF5 file"):
        list_members(fake)
    close_containers()


def test_hdf5_reads_from_many_threads_over_more_files_than_stay_open(tmp_path):
    """predict decodes in a thread pool: reads of 8 containers (more than OPEN_CONTAINERS) from 4 threads, where
    closing the least recently used file must never pull it from under another thread's read."""
    from concurrent.futures import ThreadPoolExecutor

    from kmel.data.hdf5 import OPEN_CONTAINERS, close_containers, read_source

    expected = {}
    for c in range(OPEN_CONTAINERS * 2):
        with h5py.File(tmp_path / f"part{c}.hdf5", "w") as f:
            for k in range(5):
                data = _jpeg(c * 10 + k)
                f.create_dataset(f"ISIC_{c}_{k}", data=np.bytes_(data))
                expected[f"{tmp_path}/part{c}.hdf5/ISIC_{c}_{k}"] = data
    names = list(expected) * 20
    np.random.default_rng(0).shuffle(names)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda name: read_source(name, 1 << 20), names))
    assert all(g == expected[n] for g, n in zip(got, names))
    close_containers()


def test_the_isic_hierarchy_is_read_one_way_for_the_archive_and_isic2024():
    """The first non-empty level a name fragment matches decides; a match naming no class is final (UNK)."""
    from kmel.data.diagnosis import most_specific_code

    levels = [pd.Series(["Kaposi sarcoma", "", "Atypical melanocytic neoplasm", None]),
              pd.Series(["Malignant soft tissue proliferations - Vascular", "Nevus", "Benign melanocytic "
                         "proliferations", "Basal cell carcinoma"])]
    assert most_specific_code(levels).tolist() == ["UNK", "NV", "UNK", "BCC"]


# === Metadata formats ===


def _train_metadata(shared: Path) -> pd.DataFrame:
    """The 3 real ISIC 2024 test rows, given the training file's extra columns and labels."""
    rows = pd.read_csv(shared / "isic2024-sample" / "test-metadata.csv")
    rows.insert(1, "target", [1, 0, 0])
    return rows.assign(
        lesion_id=["IL_1", "", ""], iddx_full=["Malignant::Malignant melanocytic proliferations (Melanoma)::Melanoma "
                                                "Invasive", "Benign", "Benign::Benign melanocytic proliferations::Nevus"],
        iddx_1=["Malignant", "Benign", "Benign"], iddx_2=["Malignant melanocytic proliferations (Melanoma)", "",
                                                         "Benign melanocytic proliferations"],
        iddx_3=["Melanoma Invasive", "", "Nevus"], iddx_4="", iddx_5="", mel_mitotic_index=["<1/mm^2", "", ""],
        mel_thick_mm=[0.4, None, None], tbp_lv_dnn_lesion_confidence=[99.1, 80.0, 95.5])


@pytest.mark.realdata
def test_isic2024_train_and_test_metadata_are_recognised(shared_data, tmp_path):
    from kmel.data.formats import read_metadata_file
    from kmel.data.formats.isic2024 import UNLABELLED

    train = tmp_path / "train-metadata.csv"
    _train_metadata(shared_data).to_csv(train, index=False)
    parsed = read_metadata_file(train)
    assert parsed.kind == "isic2024"
    frame = parsed.frame.set_index("image_id")
    assert frame["malignant"].tolist() == [1.0, 0.0, 0.0]
    assert frame["diagnosis"].tolist() == ["MEL", "UNK", "NV"]  # "Benign" alone names no class
    assert frame["melanoma"].tolist() == [1.0, 0.0, 0.0]
    assert frame["patient_id"].tolist() == ["IP_6074337", "IP_1664139", "IP_7142616"]
    assert frame.loc["ISIC_0015657", "tbp_lv_A"] == pytest.approx(22.80433)
    assert frame.loc["ISIC_0015729", "attribution"].startswith("Frazer Institute")
    kept = {c for c in frame.columns if c.startswith("tbp_lv_")}
    assert len(kept) == 34 and "tbp_lv_dnn_lesion_confidence" not in kept  # train-only: not a feature
    assert not {"iddx_full", "mel_thick_mm", "mel_mitotic_index"} & set(frame.columns)
    test = read_metadata_file(shared_data / "isic2024-sample" / "test-metadata.csv")
    assert test.kind == "isic2024_test" and (test.frame["drop_reason"] == UNLABELLED).all()


@pytest.mark.realdata
def test_pad_ufes20_metadata_labels_fitzpatrick_and_subgroups(shared_data):
    from kmel.data.formats import read_metadata_file

    published = pd.read_csv(shared_data / "pad-ufes-20-sample" / "metadata.csv")
    parsed = read_metadata_file(shared_data / "pad-ufes-20-sample" / "metadata.csv")
    assert parsed.kind == "pad_ufes20" and len(parsed.frame) == len(published) == 2298
    frame = parsed.frame
    expected = published["diagnostic"].isin(["BCC", "SCC", "MEL"]).astype(float)
    assert (frame["malignant"].to_numpy() == expected.to_numpy()).all()
    assert dict(zip(published["diagnostic"], frame["diagnosis"])) == {
        "BCC": "BCC", "SCC": "SCC", "MEL": "MEL", "ACK": "AK", "SEK": "SK", "NEV": "NV"}
    fitz = published["fitspatrick"].fillna(-1).astype(int).to_numpy()
    assert (frame["fitzpatrick"].astype(int).to_numpy() == fitz).all()
    assert set(frame["sex"].dropna()) == {"female", "male"} and "neck" in set(frame["site"])
    assert (frame["image_id"] == published["img_id"].str.replace(".png", "", regex=False)).all()
    assert frame["lesion_id"].str.startswith("PAD_").all()
    assert {"diameter_1", "biopsed", "smoke"} <= set(frame.columns)


# === build-records and predict on a folder holding both ===


@pytest.fixture(scope="module")
def data_folder(shared_data, tmp_path_factory) -> Path:
    """The real ISIC 2024 hdf5 and test metadata, a training metadata file for its 3 crops, the PAD-UFES-20
    sample, and a second hdf5 with one good and one corrupt crop (and its metadata)."""
    root = tmp_path_factory.mktemp("isic2024") / "data"
    (root / "isic2024").mkdir(parents=True)
    for name in ("test-image.hdf5", "test-metadata.csv"):
        (root / "isic2024" / name).symlink_to(shared_data / "isic2024-sample" / name)
    _train_metadata(shared_data).to_csv(root / "isic2024" / "train-metadata.csv", index=False)
    (root / "pad").symlink_to(shared_data / "pad-ufes-20-sample")
    (root / "more").mkdir()
    with h5py.File(root / "more" / "extra-image.hdf5", "w") as f:
        f.create_dataset("ISIC_9500001", data=np.bytes_(_jpeg(1)))
        f.create_dataset("ISIC_9500002", data=np.bytes_(_jpeg(2)[:200]))  # truncated JPEG
    extra = _train_metadata(shared_data).iloc[[1, 2]].assign(isic_id=["ISIC_9500001", "ISIC_9500002"],
                                                              patient_id="IP_9")
    extra.to_csv(root / "more" / "extra-metadata.csv", index=False)
    return root


@pytest.fixture(scope="module")
def built(data_folder, tmp_path_factory):
    from kmel.data.records import build_records

    out = tmp_path_factory.mktemp("isic2024-records")
    config = tiny_config(**{"records.workers": 1})
    return build_records(data_folder, out, config, progress=False), out


@pytest.mark.realdata
def test_build_records_reads_the_hdf5_crops_and_pad_photographs(built, data_folder, shared_data):
    from kmel.data.formats.isic2024 import UNLABELLED
    from kmel.data.records import shard_paths
    from kmel.data.tfrecord import read_records

    manifest, out = built
    table = pd.read_csv(out / C.METADATA_CSV).set_index("image_id")
    crops = table[table["source"] == "isic2024"]
    assert sorted(crops.index) == ["ISIC_0015657", "ISIC_0015729", "ISIC_0015740", "ISIC_9500001"]
    assert crops.loc["ISIC_0015657", "image_path"].endswith("isic2024/test-image.hdf5/ISIC_0015657")
    assert crops.loc["ISIC_0015657", "height"] == 141  # decoded from the hdf5 bytes
    assert crops.loc["ISIC_0015657", "target"] == 1 and crops.loc["ISIC_0015740", "target"] == 0
    assert crops.loc["ISIC_0015729", "tbp_lv_areaMM2"] == pytest.approx(2.120472884)  # kept for fusion
    skipped = {row["image_id"]: row["reason"] for row in manifest["skipped"]}
    assert list(skipped) == ["ISIC_9500002"] and "extra-image.hdf5/ISIC_9500002" in skipped["ISIC_9500002"]
    assert manifest["cleaning"]["dropped"][UNLABELLED] == 3  # the test metadata's rows: counted, not records

    pad = table[table["source"] == "pad_ufes20"]
    published = pd.read_csv(shared_data / "pad-ufes-20-sample" / "metadata.csv").set_index("img_id")
    assert len(pad) == 24 and (pad["split"] == "test").all()  # clinical photographs: evaluation only by default
    truth = published.loc[[f"{i}.png" for i in pad.index]]
    assert (pad["target"].to_numpy() == truth["diagnostic"].isin(["BCC", "SCC", "MEL"]).to_numpy()).all()
    assert (pad["fitzpatrick"].to_numpy() == truth["fitspatrick"].fillna(-1).astype(int).to_numpy()).all()
    assert manifest["cleaning"]["missing_images"]["pad_ufes20"] == 2298 - 24
    ids = [rec[C.F_IMAGE_ID] for split in C.SPLITS for rec in read_records(shard_paths(out, "img", split))]
    assert sorted(i.decode() if isinstance(i, bytes) else i for i in ids) == sorted(table.index)


@pytest.mark.realdata
def test_predict_reads_an_hdf5_file_and_a_folder_holding_one(data_folder, tmp_path):
    from kmel.cli import cli
    from kmel.serving.runner import predict_files
    from tests.handmade import write_handmade_models

    models = write_handmade_models(tmp_path / "models")
    out = tmp_path / "pred.csv"
    result = CliRunner().invoke(cli, ["predict", str(data_folder / "isic2024" / "test-image.hdf5"), str(out),
                                      "--models", str(models), "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert rows["relpath"].tolist() == [f"test-image.hdf5/ISIC_00{k}" for k in ("15657", "15729", "15740")]
    assert rows["image"].tolist() == ["ISIC_0015657", "ISIC_0015729", "ISIC_0015740"]
    assert (rows["status"] == "ok").all()
    again = predict_files([data_folder / "isic2024" / "test-image.hdf5"], out, models, progress=False)
    assert again.n_resumed == 3 and again.n_ok == 0  # resumed by key: nothing scored twice
    (tmp_path / "notes.hdf5").write_bytes(b"not hdf5")
    folder = predict_files([data_folder / "more", tmp_path / "notes.hdf5"], tmp_path / "more.csv", models,
                           progress=False)
    rows = pd.read_csv(tmp_path / "more.csv", dtype=str, keep_default_na=False).set_index("image")
    assert (folder.n_ok, folder.n_error) == (1, 2)
    assert rows.loc["ISIC_9500001", "status"] == "ok"
    assert rows.loc["ISIC_9500001", "relpath"].endswith("more/extra-image.hdf5/ISIC_9500001")
    assert rows.loc["ISIC_9500002", "status"] == "error"
    assert "not a readable HDF5 file" in rows.loc["notes", "error"]
    assert json.loads(json.dumps(folder.errors))  # reasons are plain text


def test_build_records_on_a_synthetic_isic2024_folder(tmp_path):
    """make-synthetic --style isic2024's folder builds records without the real data: every crop read out of the
    hdf5, patients kept within one split, the tabular columns in the records' table, both classes present."""
    from kmel.data.records import build_records
    from kmel.data.synthetic_isic2024 import make_isic2024_dataset

    published = make_isic2024_dataset(tmp_path / "data", n_images=80, seed=2, size=64)
    # Two worker processes (spawn): each opens the hdf5 itself.
    manifest = build_records(tmp_path / "data", tmp_path / "rec", tiny_config(**{"records.workers": 2}), progress=False)
    table = pd.read_csv(tmp_path / "rec" / C.METADATA_CSV)
    assert sorted(table["image_id"]) == sorted(published["isic_id"]) and manifest["skipped"] == []
    assert table["image_path"].str.contains("train-image.hdf5/ISIC_").all()
    assert (table.groupby("patient_id")["split"].nunique() == 1).all()
    truth = published.set_index("isic_id").loc[table["image_id"]]
    assert (table["target"].to_numpy() == truth["target"].to_numpy()).all() and table["target"].sum() >= 2
    np.testing.assert_allclose(table["tbp_lv_areaMM2"], truth["tbp_lv_areaMM2"])
