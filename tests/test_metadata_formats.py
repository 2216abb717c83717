"""Every metadata format kmel reads, from small fixtures written after the published headers.

Headers: the challenge files as listed in ../shared/data/README.md; the ISIC Archive export as
``isic-cli metadata download`` writes it (``isic_id``, ``attribution``, ``copyright_license``, then
whichever fields the images carry: ``age_approx``, ``anatom_site_general``, ``benign_malignant``,
``diagnosis`` in older exports, ``diagnosis_1``..``diagnosis_5`` in current ones, ``diagnosis_confirm_type``,
``fitzpatrick_skin_type``, ``image_type``, ``lesion_id``, ``patient_id``, ``sex``); DDI's
``ddi_metadata.csv`` (``DDI_ID,DDI_file,skin_tone,malignant,disease``).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from kmel import constants as C
from kmel.data.formats.csvread import read_csv_table
from kmel.data.formats.registry import (
    FORMATS,
    identify_format,
    read_metadata_csv,
    register_format,
)
from kmel.data.metadata import load_metadata, split_table

ARCHIVE_HEADER = (
    "isic_id,attribution,copyright_license,age_approx,anatom_site_general,diagnosis_1,diagnosis_2,diagnosis_3,"
    "diagnosis_confirm_type,fitzpatrick_skin_type,image_type,lesion_id,patient_id,sex"
)
ARCHIVE_CSV = ARCHIVE_HEADER + "\n" + "\n".join([
    'ISIC_0000001,"Dept. of Dermatology, Somewhere",CC-BY,55,posterior torso,Benign,'
    "Benign melanocytic proliferations,Nevus,histopathology,II,dermoscopic,IL_0000001,IP_0000001,male",
    "ISIC_0000002,Anon,CC-BY-NC,70,head/neck,Malignant,Malignant melanocytic proliferations (Melanoma),"
    "Melanoma Invasive,histopathology,V,dermoscopic,IL_0000002,IP_0000002,female",
    "ISIC_0000003,Anon,CC-BY-NC,40,,Indeterminate,,,,,dermoscopic,IL_0000003,IP_0000003,female",
    "ISIC_0000004,Anon,CC-BY,35,lower extremity,Malignant,Malignant adnexal epithelial proliferations - Follicular,"
    "Basal cell carcinoma,histopathology,,clinical: close-up,IL_0000004,IP_0000004,male",
    "ISIC_0000005,Anon,CC-BY,,,Benign,Benign epidermal proliferations,Seborrheic keratosis,"
    "single image expert consensus,,dermoscopic,,,",
]) + "\n"
ARCHIVE_OLD_CSV = (
    "isic_id,attribution,copyright_license,age_approx,anatom_site_general,benign_malignant,diagnosis,"
    "diagnosis_confirm_type,image_type,lesion_id,sex\n"
    "ISIC_0000010,Anon,CC-0,45,upper extremity,benign,nevus,serial imaging showing no change,dermoscopic,IL_1,male\n"
    "ISIC_0000011,Anon,CC-0,60,anterior torso,malignant,melanoma,histopathology,dermoscopic,IL_2,female\n"
    "ISIC_0000012,Anon,CC-0,60,anterior torso,indeterminate/benign,,,dermoscopic,IL_3,female\n"
)
DDI_CSV = (
    "DDI_ID,DDI_file,skin_tone,malignant,disease\n"
    "1,000001.png,56,True,melanoma-in-situ\n"
    "2,000002.png,12,False,melanocytic-nevi\n"
    "3,000003.png,34,False,seborrheic-keratosis\n"
)

# One fixture per registered format: adding a format is one reader, one fixture here, one test.
FIXTURES = {
    "isic2016": "ISIC_0000000,benign\nISIC_0000001,malignant\n",
    "isic2017": "image_id,melanoma,seborrheic_keratosis\nISIC_0000000,0.0,1.0\nISIC_0000001,1.0,0.0\n",
    "isic2017_meta": "image_id,age_approximate,sex\nISIC_0000000,55,female\n",
    "isic2018": "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\nISIC_0024306,0.0,1.0,0.0,0.0,0.0,0.0,0.0\n",
    "ham10000": "lesion_id,image_id,dx,dx_type,age,sex,localization\n"
                "HAM_0000118,ISIC_0027419,bkl,histo,80.0,male,scalp\n",
    "isic2019": "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\nISIC_0000000,0.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n",
    "isic2019_meta": "image,age_approx,anatom_site_general,lesion_id,sex\nISIC_0000000,55.0,anterior torso,,female\n",
    "isic2019_test_meta": "image,age_approx,anatom_site_general,sex\nISIC_0034321,60.0,,female\n",
    "isic2020_v2": "image_name,patient_id,lesion_id,sex,age_approx,anatom_site_general_challenge,diagnosis,"
                   "benign_malignant,target\nISIC_2637011,IP_7279968,IL_7972535,male,45.0,head/neck,unknown,benign,0\n",
    "isic2020_v1": "image_name,patient_id,sex,age_approx,anatom_site_general_challenge,diagnosis,benign_malignant,"
                   "target\nISIC_2637011,IP_7279968,male,45.0,head/neck,unknown,benign,0\n",
    "duplicates2020": "image_name_1,image_name_2\nISIC_0000001,ISIC_0000002\n",
    "fitzpatrick17k": "md5hash,fitzpatrick_scale,fitzpatrick_centaur,label,nine_partition_label,three_partition_label,"
                      "qc,url,url_alphanum\n5e82a45bc5d78bd24ae9202d194423f8,3,3,drug induced pigmentary changes,"
                      "inflammatory,non-neoplastic,,https://example.org/a.jpg,httpsexampleorgajpg\n",
    "isic_archive": ARCHIVE_CSV,
    "ddi": DDI_CSV,
    "custom": "image_id,label\nmole_1,benign\nmole_2,malignant\n",
    "isic2024": "isic_id,target,patient_id,age_approx,sex,anatom_site_general,tbp_tile_type,tbp_lv_A,iddx_1\n"
                "ISIC_0015670,0,IP_1235828,60,male,lower extremity,3D: white,20.2,Benign\n",
    "isic2024_test": "isic_id,patient_id,age_approx,sex,anatom_site_general,tbp_tile_type,tbp_lv_A\n"
                     "ISIC_0015657,IP_6074337,45,male,posterior torso,3D: XP,22.8\n",
    "pad_ufes20": "patient_id,lesion_id,age,gender,fitspatrick,region,diameter_1,diameter_2,diagnostic,img_id,biopsed\n"
                  "PAT_46,881,55,FEMALE,3.0,NECK,6.0,5.0,BCC,PAT_46_881_939.png,True\n",
    "kmel_records_metadata": "image_id,source,year,diagnosis,target,split,image_path\n"
                             "A,custom,2100,BENIGN,0,train,/x/A.jpg\n",
    "kmel_skipped": "image_id,path,reason\nA,/x/A.jpg,cannot decode\n",
    "kmel_predict": "image,relpath,path,probability,prediction,label,threshold,status,error\n"
                    "a,a.jpg,/x/a.jpg,0.2,0,benign,0.5,ok,\n",
    "kmel_report_predictions": "image_id,source,target,probability,skin_tone_name,prediction\nA,custom,0,0.2,light,0\n",
    "kmel_synthetic_truth": "image_id,skin_tone,malignant,hair\nISIC_0000000,2,0,1\n",
}


def test_every_registered_format_has_a_fixture_that_reads_as_it():
    assert sorted(FIXTURES) == sorted(FORMATS)


@pytest.mark.parametrize("kind", sorted(FIXTURES))
def test_fixture_recognised_as_its_format(tmp_path, kind):
    path = tmp_path / "renamed.csv"
    path.write_text(FIXTURES[kind])
    parsed = read_metadata_csv(path)
    assert parsed is not None and parsed[0] == kind


def test_formats_are_tried_in_registration_order():
    # v2 (with lesion_id) is registered before v1, whose columns are a subset of it.
    header = FIXTURES["isic2020_v2"].splitlines()[0].split(",")
    assert identify_format(header).kind == "isic2020_v2"
    with pytest.raises(ValueError, match="registered twice"):
        register_format("custom", ("image_id", "label"))(lambda t: pd.DataFrame())


def test_near_miss_header_says_which_format_it_resembles(tmp_path):
    # The 2019 metadata with one column renamed, and a 2017 file with upper-case names.
    (tmp_path / "a.csv").write_text("image,age_approx,anatom_site,lesion_id,sex\nISIC_1,50,torso,,male\n")
    (tmp_path / "b.csv").write_text("IMAGE_ID,MELANOMA,SEBORRHEIC_KERATOSIS\nISIC_1,0,0\n")
    (tmp_path / "c.csv").write_text("foo,bar\n1,2\n")
    (tmp_path / "d.csv").write_text("image,MEL,NV\nISIC_1,1,0\n")  # an official one-hot file cut short
    (tmp_path / "e.csv").write_text("image_id,comment\nISIC_1,looks fine\n")  # one shared column is no resemblance
    _, report = load_metadata(tmp_path)
    notes = {Path(n.split(":")[0]).name: n for n in report["unrecognised_files"]}
    assert "resembles isic2019_meta" in notes["a.csv"] and "missing ['anatom_site_general']" in notes["a.csv"]
    assert "unexpected ['anatom_site']" in notes["a.csv"]
    assert "resembles isic2017 " in notes["b.csv"] and "another letter case" in notes["b.csv"]
    assert notes["c.csv"] == str(tmp_path / "c.csv") and notes["e.csv"] == str(tmp_path / "e.csv")
    assert "resembles isic2018 " in notes["d.csv"] and "'BCC'" in notes["d.csv"]


# === ISIC Archive exports ===


def test_archive_export_current_schema(tmp_path):
    (tmp_path / "metadata.csv").write_text(ARCHIVE_CSV)  # the name isic-cli gives it
    table, report = load_metadata(tmp_path)
    assert report["files"]["metadata.csv"]["kind"] == "isic_archive"
    rows = table.set_index(C.COL_IMAGE_ID)
    assert sorted(rows.index) == ["ISIC_0000001", "ISIC_0000002", "ISIC_0000005"]
    assert rows.loc["ISIC_0000001", [C.COL_DIAGNOSIS, C.COL_MALIGNANT, C.COL_MELANOMA]].tolist() == ["NV", 0, 0]
    assert rows.loc["ISIC_0000002", [C.COL_DIAGNOSIS, C.COL_MALIGNANT, C.COL_MELANOMA]].tolist() == ["MEL", 1, 1]
    assert rows.loc["ISIC_0000005", C.COL_DIAGNOSIS] == "SK" and rows.loc["ISIC_0000005", C.COL_KERATOSIS] == 1
    assert rows[C.COL_FITZPATRICK].tolist() == [2, 5, -1]
    assert rows["fitzpatrick_group"].tolist()[:2] == ["I-II", "V-VI"]
    assert rows.loc["ISIC_0000002", [C.COL_PATIENT, C.COL_LESION, C.COL_SEX, C.COL_SITE]].tolist() == [
        "IP_0000002", "IL_0000002", "female", "head/neck"]
    assert rows.loc["ISIC_0000002", C.COL_AGE] == 70
    assert set(rows[C.COL_SOURCE]) == {"isic_archive"}
    # Indeterminate and the clinical close-up: dropped and counted, in the totals and for the file.
    assert report["dropped"] == {"indeterminate diagnosis (ISIC archive)": 1,
                                 "not dermoscopic (ISIC archive image_type)": 1}
    assert report["files"]["metadata.csv"]["rows_lost"] == report["dropped"]


def test_archive_export_older_schema(tmp_path):
    (tmp_path / "metadata.csv").write_text(ARCHIVE_OLD_CSV)
    table, report = load_metadata(tmp_path)
    assert dict(zip(table[C.COL_IMAGE_ID], table[C.COL_MALIGNANT])) == {"ISIC_0000010": 0, "ISIC_0000011": 1}
    assert list(table[C.COL_DIAGNOSIS]) == ["NV", "MEL"]
    assert report["dropped"] == {"indeterminate diagnosis (ISIC archive)": 1}


def test_archive_image_also_in_a_challenge_csv_is_one_image(tmp_path):
    (tmp_path / "metadata.csv").write_text(ARCHIVE_CSV)
    (tmp_path / "ISIC_2019_Training_GroundTruth.csv").write_text(
        FIXTURES["isic2019"].splitlines()[0] + "\nISIC_0000001,0.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n"
        "ISIC_0000099,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n")
    table, report = load_metadata(tmp_path)
    assert table["base_id"].is_unique
    assert sorted(table[C.COL_IMAGE_ID]) == ["ISIC_0000001", "ISIC_0000002", "ISIC_0000005", "ISIC_0000099"]
    # The archive's row (newer, with patient and Fitzpatrick type) is the one kept.
    assert table.set_index(C.COL_IMAGE_ID).loc["ISIC_0000001", C.COL_SOURCE] == "isic_archive"
    assert report["dropped"]["same image in several sources (newest kept)"] == 1


def test_kmel_outputs_recognised_by_content_or_folder_not_by_name(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "metadata.csv").write_text(ARCHIVE_CSV)  # isic-cli's name: read
    # kmel's outputs copied anywhere under another name: known by their columns.
    (data / "scores.csv").write_text(FIXTURES["kmel_predict"])
    (data / "old_metadata.csv").write_text(FIXTURES["kmel_records_metadata"])
    (data / "gone.csv").write_text(FIXTURES["kmel_skipped"])
    # A records folder inside the data folder: everything in it is kmel's, whatever the columns.
    records = data / "tfrecords"
    records.mkdir()
    (records / C.MANIFEST).write_text('{"kmel_version": "0.1"}')
    (records / "metadata.csv").write_text("image_id,label\nX,malignant\n")
    # A user's truth.csv is labels (image,target), read as such.
    (data / "truth.csv").write_text("image,target\nmine_1,1\n")
    table, report = load_metadata(data)
    assert sorted(report["files"]) == ["metadata.csv", "truth.csv"]
    assert sorted(Path(p).name for p in report["kmel_outputs"]) == ["gone.csv", "metadata.csv", "old_metadata.csv",
                                                                   "scores.csv"]
    assert report["unrecognised_files"] == []
    assert "X" not in set(table[C.COL_IMAGE_ID]) and "mine_1" in set(table[C.COL_IMAGE_ID])


# === A table with a few bad lines keeps its good rows ===

LABELS_13 = ["image_id,label"] + [f"mole_{i:02d},{'malignant' if i % 4 == 0 else 'benign'}" for i in range(13)]


def _write_lines(path: Path, lines: list[str], encoding: str = "utf-8", newline: str = "\n") -> None:
    path.write_bytes(newline.join(lines).encode(encoding) + newline.encode())


def test_latin1_byte_is_decoded_and_said(tmp_path):
    lines = list(LABELS_13)
    lines[3] = "mole_02,bénin"  # a French spreadsheet's label: not a usable label, but not a reason to lose the file
    _write_lines(tmp_path / "labels.csv", lines, encoding="latin-1")
    table, report = load_metadata(tmp_path)
    entry = report["files"]["labels.csv"]
    assert entry["encoding"].startswith("cp1252")
    assert len(table) == 12
    assert entry["rows_lost"] == {"no usable label (empty, NaN or unknown value)": 1}


def test_ragged_and_unterminated_lines_are_skipped_with_their_line_numbers(tmp_path):
    lines = list(LABELS_13)
    lines[5] = "mole_04,malignant,extra,columns"  # line 6
    lines[9] = 'mole_08,"malignant'  # line 10: quote never closed
    _write_lines(tmp_path / "labels.csv", lines, newline="\r\n")
    table, report = load_metadata(tmp_path)
    entry = report["files"]["labels.csv"]
    assert entry["bad_lines"] == [{"line": 6, "reason": "4 fields, header has 2"},
                                  {"line": 10, "reason": "quote not closed"}]
    assert entry["rows_lost"] == {"unreadable line": 2}
    assert len(table) == 11 and not {"mole_04", "mole_08"} & set(table[C.COL_IMAGE_ID])
    assert "mole_09" in set(table[C.COL_IMAGE_ID])  # the line after the open quote is read on its own


def test_quoted_field_with_a_line_break_is_one_record(tmp_path):
    (tmp_path / "labels.csv").write_text('image_id,label\n"mole\n_1",benign\nmole_2,malignant\n')
    parsed = read_csv_table(tmp_path / "labels.csv")
    assert parsed.bad_lines == [] and list(parsed.rows["image_id"]) == ["mole\n_1", "mole_2"]


@pytest.mark.parametrize("delimiter, name", [(";", ";"), ("\t", "tab")])
def test_semicolon_and_tab_separated_exports(tmp_path, delimiter, name):
    _write_lines(tmp_path / "labels.csv", [line.replace(",", delimiter) for line in LABELS_13], encoding="cp1252")
    table, report = load_metadata(tmp_path)
    assert len(table) == 13 and int(table[C.COL_MALIGNANT].sum()) == 4
    assert report["files"]["labels.csv"]["delimiter"] == name
    assert "rows_lost" not in report["files"]["labels.csv"]


# === DDI: evaluation only ===


def test_ddi_read_with_fitzpatrick_bands_and_kept_out_of_training(tmp_path):
    (tmp_path / "ddi_metadata.csv").write_text(DDI_CSV)
    (tmp_path / "labels.csv").write_text("\n".join(LABELS_13) + "\n")
    table, report = load_metadata(tmp_path)
    assert report["files"]["ddi_metadata.csv"]["kind"] == "ddi"
    ddi = table[table[C.COL_SOURCE] == "ddi"].set_index(C.COL_IMAGE_ID)
    assert list(ddi.index) == ["000001", "000002", "000003"]  # the file stem, as images are found
    assert ddi[C.COL_MALIGNANT].tolist() == [1, 0, 0] and ddi[C.COL_MELANOMA].tolist() == [1, 0, 0]
    assert ddi["fitzpatrick_group"].tolist() == ["V-VI", "I-II", "III-IV"]
    labelled = table.assign(**{C.COL_TARGET: table[C.COL_MALIGNANT].astype(int), C.COL_SKIN_TONE: 0})
    split = split_table(labelled, 0.3, 0.3, seed=0)
    assert set(split.loc[split[C.COL_SOURCE] == "ddi", C.COL_SPLIT]) == {"test"}
    assert set(split.loc[split[C.COL_SOURCE] == "custom", C.COL_SPLIT]) == {"train", "val", "test"}
    asked = split_table(labelled, 0.3, 0.3, seed=0, eval_only_sources=())
    assert len(asked) == len(labelled) and list(asked.index) == list(labelled.index)


def test_held_out_prediction_folder_inside_the_data_folder_is_not_training_data(tmp_path):
    from kmel.data.synthetic import make_prediction_folder

    (tmp_path / "labels.csv").write_text("\n".join(LABELS_13) + "\n")
    make_prediction_folder(tmp_path / "predict", n_images=2, seed=1, size=32)  # as make-synthetic --predict-images
    table, report = load_metadata(tmp_path)
    assert report["kmel_outputs"] == [str(tmp_path / "predict" / "truth.csv")]
    assert len(table) == 13 and set(table[C.COL_SOURCE]) == {"custom"}


def test_build_records_keeps_ddi_in_test_and_writes_annotations(tmp_path):
    import cv2
    import numpy as np

    from kmel.config import load_config
    from kmel.data.records import build_records
    from kmel.data.synthetic import make_synthetic_dataset

    data = tmp_path / "data"
    make_synthetic_dataset(data, n_images=16, seed=3, size=64)
    (data / "ddi").mkdir()
    (data / "ddi" / "ddi_metadata.csv").write_text(DDI_CSV)
    rng = np.random.default_rng(0)
    for i in (1, 2, 3):
        cv2.imwrite(str(data / "ddi" / f"{i:06d}.png"), rng.integers(60, 200, (64, 80, 3), dtype=np.uint8))
    small = {"records.image_size": 64, "records.seg_size": 32, "records.shard_size": 64, "records.workers": 1}
    build_records(data, tmp_path / "rec", load_config("cpu-small", small), progress=False)
    table = pd.read_csv(tmp_path / "rec" / C.METADATA_CSV, dtype={C.COL_IMAGE_ID: str})
    ddi = table[table[C.COL_SOURCE] == "ddi"]
    assert len(ddi) == 3 and set(ddi[C.COL_SPLIT]) == {"test"}
    assert sorted(ddi["fitzpatrick_group"]) == ["I-II", "III-IV", "V-VI"]
    asked = {**small, "records.eval_only_sources": []}
    build_records(data, tmp_path / "rec2", load_config("cpu-small", asked), progress=False)
    again = pd.read_csv(tmp_path / "rec2" / C.METADATA_CSV, dtype={C.COL_IMAGE_ID: str})
    assert len(again[again[C.COL_SOURCE] == "ddi"]) == 3
    assert set(again.loc[again[C.COL_SOURCE] == "ddi", C.COL_SPLIT]) != {"test"}  # split like the rest when asked


# Rows each label-bearing format is read from, and the (malignant, diagnosis) each must give: the
# published meaning of the columns (ISIC 2018/HAM10000: MEL, BCC and AKIEC are malignant; 2019 adds
# SCC and AK; 2020's target), so a mapping that is inverted or loses a class fails here.
LABELLED = {
    "isic2016": ("ISIC_0000000,benign\nISIC_0000001,malignant\n",
                 {"ISIC_0000000": (0, "BEN"), "ISIC_0000001": (1, "MEL")}),
    "isic2017": ("image_id,melanoma,seborrheic_keratosis\nISIC_0000000,0.0,1.0\nISIC_0000001,1.0,0.0\n"
                 "ISIC_0000002,0.0,0.0\n",
                 {"ISIC_0000000": (0, "SK"), "ISIC_0000001": (1, "MEL"), "ISIC_0000002": (0, "NV")}),
    "isic2018": ("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\nISIC_1,1,0,0,0,0,0,0\nISIC_2,0,1,0,0,0,0,0\n"
                 "ISIC_3,0,0,1,0,0,0,0\nISIC_4,0,0,0,1,0,0,0\nISIC_5,0,0,0,0,1,0,0\nISIC_6,0,0,0,0,0,1,0\n"
                 "ISIC_7,0,0,0,0,0,0,1\n",
                 {"ISIC_1": (1, "MEL"), "ISIC_2": (0, "NV"), "ISIC_3": (1, "BCC"), "ISIC_4": (1, "AK"),
                  "ISIC_5": (0, "BKL"), "ISIC_6": (0, "DF"), "ISIC_7": (0, "VASC")}),
    "ham10000": ("lesion_id,image_id,dx,dx_type,age,sex,localization\nHAM_1,ISIC_1,mel,histo,50,male,back\n"
                 "HAM_2,ISIC_2,nv,follow_up,30,female,trunk\nHAM_3,ISIC_3,bcc,histo,70,male,face\n"
                 "HAM_4,ISIC_4,akiec,histo,75,male,face\nHAM_5,ISIC_5,bkl,consensus,60,female,back\n",
                 {"ISIC_1": (1, "MEL"), "ISIC_2": (0, "NV"), "ISIC_3": (1, "BCC"), "ISIC_4": (1, "AK"),
                  "ISIC_5": (0, "BKL")}),
    "isic2019": ("image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\nISIC_1,1,0,0,0,0,0,0,0,0\nISIC_2,0,1,0,0,0,0,0,0,0\n"
                 "ISIC_3,0,0,1,0,0,0,0,0,0\nISIC_4,0,0,0,1,0,0,0,0,0\nISIC_5,0,0,0,0,0,0,0,1,0\n",
                 {"ISIC_1": (1, "MEL"), "ISIC_2": (0, "NV"), "ISIC_3": (1, "BCC"), "ISIC_4": (1, "AK"),
                  "ISIC_5": (1, "SCC")}),
    "isic2020_v2": ("image_name,patient_id,lesion_id,sex,age_approx,anatom_site_general_challenge,diagnosis,"
                    "benign_malignant,target\nISIC_1,IP_1,IL_1,male,45,head/neck,unknown,benign,0\n"
                    "ISIC_2,IP_2,IL_2,female,60,torso,melanoma,malignant,1\n",
                    {"ISIC_1": (0, "UNK"), "ISIC_2": (1, "MEL")}),
    "custom": ("image_id,label\nmole_1,benign\nmole_2,malignant\n", {"mole_1": (0, "BENIGN"), "mole_2": (1, "MALIGNANT")}),
}


@pytest.mark.parametrize("kind", sorted(LABELLED))
def test_each_format_gives_the_published_labels(tmp_path, kind):
    text, expected = LABELLED[kind]
    path = tmp_path / "labels.csv"
    path.write_text(text)
    found, frame = read_metadata_csv(path)[:2]
    assert found == kind
    got = {row["image_id"]: (int(row["malignant"]), str(row["diagnosis"])) for _, row in frame.iterrows()}
    assert got == expected
