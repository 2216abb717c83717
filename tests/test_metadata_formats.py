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
from kmel.metadata import (
    FORMATS,
    identify_format,
    load_metadata,
    read_csv_table,
    read_metadata_csv,
    register_format,
    split_table,
)

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
    "ham10000": "lesion_id,image_id,dx,dx_type,age,sex,localization\nHAM_0000118,ISIC_0027419,bkl,histo,80.0,male,scalp\n",
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
    "kmel_records_metadata": "image_id,source,year,diagnosis,target,split,image_path\nA,custom,2100,BENIGN,0,train,/x/A.jpg\n",
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
    _, report = load_metadata(tmp_path)
    notes = {Path(n.split(":")[0]).name: n for n in report["unrecognised_files"]}
    assert "resembles isic2019_meta" in notes["a.csv"] and "missing ['anatom_site_general']" in notes["a.csv"]
    assert "unexpected ['anatom_site']" in notes["a.csv"]
    assert "resembles isic2017 " in notes["b.csv"] and "another letter case" in notes["b.csv"]
    assert notes["c.csv"] == str(tmp_path / "c.csv")
