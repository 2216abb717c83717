"""The diagnosis task's parts, each against what it must give: every source's names mapped onto the classes
(one test per source, through the format readers), the class list checks, class-balanced sampling, the sparse
focal loss and the training metrics by hand and against scikit-learn, class temperature scaling, the report's
multiclass section, the heads and predict's columns."""

from __future__ import annotations

import json

import keras
import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from kmel import constants as C
from kmel.config import ConfigError, load_config
from kmel.data.diagnosis import code_for_name, diagnosis_class, diagnosis_classes
from kmel.data.formats.registry import read_metadata_csv
from kmel.data.metadata import apply_task, diagnosis_drops
from kmel.models.heads import ClassifierHead, head_from_entry, head_from_manifest

# Rows of each source as published and the class each must give (None: no class, dropped and counted).
SOURCES = {
    "isic2016": ("ISIC_0000000,benign\nISIC_0000001,malignant\n", {"ISIC_0000000": None, "ISIC_0000001": "MEL"}),
    "isic2017": ("image_id,melanoma,seborrheic_keratosis\nISIC_1,0.0,1.0\nISIC_2,1.0,0.0\nISIC_3,0.0,0.0\n",
                 {"ISIC_1": "BKL", "ISIC_2": "MEL", "ISIC_3": "NV"}),
    "isic2018": ("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\nISIC_1,1,0,0,0,0,0,0\nISIC_2,0,1,0,0,0,0,0\n"
                 "ISIC_3,0,0,1,0,0,0,0\nISIC_4,0,0,0,1,0,0,0\nISIC_5,0,0,0,0,1,0,0\nISIC_6,0,0,0,0,0,1,0\n"
                 "ISIC_7,0,0,0,0,0,0,1\n",
                 {"ISIC_1": "MEL", "ISIC_2": "NV", "ISIC_3": "BCC", "ISIC_4": "AK", "ISIC_5": "BKL", "ISIC_6": "DF",
                  "ISIC_7": "VASC"}),
    "ham10000": ("lesion_id,image_id,dx,dx_type,age,sex,localization\nHAM_1,ISIC_1,mel,histo,50,male,back\n"
                 "HAM_2,ISIC_2,nv,follow_up,30,female,trunk\nHAM_3,ISIC_3,bcc,histo,70,male,face\n"
                 "HAM_4,ISIC_4,akiec,histo,75,male,face\nHAM_5,ISIC_5,bkl,consensus,60,female,back\n"
                 "HAM_6,ISIC_6,df,histo,40,male,lower extremity\nHAM_7,ISIC_7,vasc,consensus,20,female,trunk\n",
                 {"ISIC_1": "MEL", "ISIC_2": "NV", "ISIC_3": "BCC", "ISIC_4": "AK", "ISIC_5": "BKL", "ISIC_6": "DF",
                  "ISIC_7": "VASC"}),
    "isic2019": ("image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\nISIC_1,1,0,0,0,0,0,0,0,0\nISIC_2,0,0,0,0,0,0,0,1,0\n"
                 "ISIC_3,0,0,0,1,0,0,0,0,0\nISIC_4,0,0,0,0,0,0,0,0,1\n",
                 {"ISIC_1": "MEL", "ISIC_2": "SCC", "ISIC_3": "AK", "ISIC_4": None}),
    "isic2020_v2": ("image_name,patient_id,lesion_id,sex,age_approx,anatom_site_general_challenge,diagnosis,"
                    "benign_malignant,target\nISIC_1,IP_1,IL_1,male,45,torso,nevus,benign,0\n"
                    "ISIC_2,IP_2,IL_2,female,60,torso,melanoma,malignant,1\n"
                    "ISIC_3,IP_3,IL_3,male,70,torso,seborrheic keratosis,benign,0\n"
                    "ISIC_4,IP_4,IL_4,male,70,torso,solar lentigo,benign,0\n"
                    "ISIC_5,IP_5,IL_5,male,70,torso,cafe-au-lait macule,benign,0\n"
                    "ISIC_6,IP_6,IL_6,male,70,torso,unknown,benign,0\n",
                    {"ISIC_1": "NV", "ISIC_2": "MEL", "ISIC_3": "BKL", "ISIC_4": "BKL", "ISIC_5": None,
                     "ISIC_6": None}),
    "isic_archive": ("isic_id,diagnosis_1,diagnosis_2,diagnosis_3,image_type\n"
                     "ISIC_1,Malignant,Malignant melanocytic proliferations (Melanoma),Melanoma in situ,dermoscopic\n"
                     "ISIC_2,Benign,Benign melanocytic proliferations,Nevus,dermoscopic\n"
                     "ISIC_3,Benign,Benign epidermal proliferations,Lichen planus like keratosis,dermoscopic\n"
                     "ISIC_4,Malignant,Malignant epidermal proliferations,Squamous cell carcinoma in situ,dermoscopic\n"
                     "ISIC_5,Malignant,Malignant melanocytic proliferations (Melanoma),Lentigo maligna,dermoscopic\n"
                     "ISIC_6,Benign,Benign soft tissue proliferations - Vascular,Hemangioma,dermoscopic\n",
                     {"ISIC_1": "MEL", "ISIC_2": "NV", "ISIC_3": "BKL", "ISIC_4": "SCC", "ISIC_5": "MEL",
                      "ISIC_6": "VASC"}),
    "fitzpatrick17k": ("md5hash,fitzpatrick_scale,fitzpatrick_centaur,label,nine_partition_label,three_partition_label,"
                       "qc,url,url_alphanum\n"
                       "a1,2,2,basal cell carcinoma,malignant epidermal,malignant,,u,u\n"
                       "a2,5,5,psoriasis,inflammatory,non-neoplastic,,u,u\n"
                       "a3,3,3,becker nevus,benign dermal,benign,,u,u\n"
                       "a4,4,4,pyogenic granuloma,benign dermal,benign,,u,u\n"
                       "a5,1,1,lichen planus,inflammatory,non-neoplastic,,u,u\n"
                       "a6,6,6,melanoma,malignant melanoma,malignant,,u,u\n",
                       {"a1": "BCC", "a2": None, "a3": None, "a4": "VASC", "a5": None, "a6": "MEL"}),
    "ddi": ("DDI_ID,DDI_file,skin_tone,malignant,disease\n1,000001.png,56,True,melanoma-in-situ\n"
            "2,000002.png,12,False,melanocytic-nevi\n3,000003.png,34,False,seborrheic-keratosis-irritated\n"
            "4,000004.png,34,False,epidermal-nevus\n5,000005.png,12,True,squamous-cell-carcinoma-keratoacanthoma\n",
            {"000001": "MEL", "000002": "NV", "000003": "BKL", "000004": None, "000005": "SCC"}),
    "custom": ("image_id,label\nmole_1,benign\nmole_2,malignant\n", {"mole_1": None, "mole_2": None}),
    "isic2024": ("isic_id,target,patient_id,tbp_tile_type,iddx_1,iddx_2,iddx_3,iddx_4\n"
                 "ISIC_1,1,IP_1,3D: XP,Malignant,Malignant melanocytic proliferations (Melanoma),Melanoma Invasive,"
                 "Invasive melanoma\n"
                 "ISIC_2,0,IP_1,3D: XP,Benign,,,\n"
                 "ISIC_3,0,IP_2,3D: XP,Benign,Benign melanocytic proliferations,Nevus,\n"
                 "ISIC_4,1,IP_2,3D: XP,Malignant,Malignant adnexal epithelial proliferations - Follicular,"
                 "Basal cell carcinoma,\n"
                 "ISIC_5,1,IP_3,3D: XP,Malignant,Malignant epidermal proliferations,Squamous cell carcinoma in situ,\n"
                 "ISIC_6,0,IP_3,3D: XP,Benign,Benign epidermal proliferations,Seborrheic keratosis,\n"
                 "ISIC_7,0,IP_3,3D: XP,Benign,Flat melanotic pigmentations - not melanocytic nevus,,\n"
                 "ISIC_8,0,IP_3,3D: XP,Benign,Flat melanotic pigmentations - not melanocytic nevus,Solar lentigo,\n",
                 {"ISIC_1": "MEL", "ISIC_2": None, "ISIC_3": "NV", "ISIC_4": "BCC", "ISIC_5": "SCC", "ISIC_6": "BKL",
                  "ISIC_7": None, "ISIC_8": "BKL"}),
    "pad_ufes20": ("patient_id,lesion_id,fitspatrick,region,diagnostic,img_id\n" + "".join(
        f"PAT_{i},{i},2.0,ARM,{d},PAT_{i}_{i}_1.png\n" for i, d in enumerate(("BCC", "SCC", "MEL", "ACK", "SEK", "NEV"))),
        {"PAT_0_0_1": "BCC", "PAT_1_1_1": "SCC", "PAT_2_2_1": "MEL", "PAT_3_3_1": "AK", "PAT_4_4_1": "BKL",
         "PAT_5_5_1": "NV"}),
}


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_each_source_maps_onto_the_isic_2019_classes(tmp_path, kind):
    text, expected = SOURCES[kind]
    path = tmp_path / "labels.csv"
    path.write_text(text)
    found, frame = read_metadata_csv(path)[:2]
    assert found == kind
    got = {row["image_id"]: diagnosis_class(row["diagnosis"]) for _, row in frame.iterrows()}
    assert got == expected


def test_words_decide_by_the_first_fragment_found():
    assert code_for_name("Basal-Cell_Carcinoma  nodular") == "BCC"
    assert code_for_name("lentigo maligna melanoma") == "MEL"  # not the benign lentigo
    assert code_for_name("solar lentigo") == "BKL" and code_for_name("nevus sebaceous of jadassohn") is None
    assert code_for_name("spitz nevus") == "NV" and code_for_name("kaposi sarcoma") is None
    assert code_for_name("eczema") is None and diagnosis_class(float("nan")) is None


def test_apply_task_gives_class_indices_and_counts_what_it_drops():
    table = pd.DataFrame({C.COL_IMAGE_ID: list("abcdef"),
                          C.COL_DIAGNOSIS: ["MEL", "akiec", "UNK", "SCC", "basal cell carcinoma", "CALM"]})
    classes = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC")  # HAM10000's seven: SCC left out
    out = apply_task(table, "diagnosis", classes)
    assert dict(zip(out[C.COL_IMAGE_ID], out[C.COL_TARGET])) == {"a": 0, "b": 3, "e": 2}
    drops = diagnosis_drops(table, classes)
    assert drops["class SCC not in records.classes"] == {"SCC": 1}
    assert sum(n for names in drops.values() for n in names.values()) == 3
    target, reason = diagnosis_classes(table[C.COL_DIAGNOSIS], classes)
    assert (reason.notna() == (target < 0)).all()


@pytest.mark.parametrize("overrides, message", [
    ({"records.task": "lesion"}, "task must be one of"),
    ({"records.classes": ["MEL"]}, "at least two"),
    ({"records.classes": ["MEL", "NV", "MEL"]}, "at least two distinct"),
    ({"records.classes": ["MEL", "SK"]}, "unknown class"),
    ({"records.classes": ["MEL", "NV"], "records.malignant_classes": ["BCC"]}, "subset of classes"),
    ({"records.malignant_classes": []}, "non-empty subset"),
])
def test_class_lists_kmel_cannot_map_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("cpu-small", overrides)


def test_class_balance_draws_classes_by_a_power_of_their_counts():
    from kmel.data.datasets import balance_weights

    counts = {(0, 0): 900, (0, 1): 100, (1, 0): 100, (2, 2): 10}  # class 0: 1,000, class 1: 100, class 2: 10
    natural = balance_weights(counts, 0.38, 0.0, class_balance=0.0)
    assert natural[(2, 2)] == pytest.approx(10 / 1110)  # target_malignant_fraction plays no part
    root = balance_weights(counts, 0.38, 0.0, class_balance=0.5)
    shares = {t: sum(w for (tt, _), w in root.items() if tt == t) for t in (0, 1, 2)}
    total = 1000 ** 0.5 + 100 ** 0.5 + 10 ** 0.5
    assert [shares[t] for t in (0, 1, 2)] == pytest.approx([1000 ** 0.5 / total, 10 / total, 10 ** 0.5 / total])
    assert root[(0, 0)] / root[(0, 1)] == pytest.approx(9.0)  # skin tones within a class: natural (b = 0)
    equal = balance_weights(counts, 0.38, 0.0, class_balance=1.0)
    assert sum(w for (t, _), w in equal.items() if t == 2) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        balance_weights(counts, 0.38, 0.0, class_balance=1.5)


def test_sparse_focal_loss_by_hand():
    from kmel.training.losses import SparseFocalCrossentropy

    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], "float32")
    y = np.array([[0], [1]], "float32")
    by_hand = [-(0.3 ** 2) * np.log(0.7), -(0.9 ** 2) * np.log(0.1)]
    assert float(SparseFocalCrossentropy(gamma=2.0)(y, p)) == pytest.approx(np.mean(by_hand), rel=1e-5)
    assert float(SparseFocalCrossentropy(gamma=0.0)(y, p)) == pytest.approx(-np.mean(np.log([0.7, 0.1])), rel=1e-5)
    q = np.array([0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3])  # label smoothing 0.1 of class 0 over three classes
    smoothed = -(q * np.log(p[0])).sum()
    assert float(SparseFocalCrossentropy(gamma=0.0, label_smoothing=0.1)(y[:1], p[:1])) == pytest.approx(smoothed,
                                                                                                          rel=1e-5)


def test_training_metrics_read_the_malignant_side_and_balanced_accuracy():
    from kmel.training.metrics import make_classifier_metrics

    head = ClassifierHead("diagnosis", ("MEL", "NV", "BCC", "BKL"), ("MEL", "BCC"))
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    p = rng.dirichlet(np.ones(4), 200).astype("float32")
    p[np.arange(200), y] += rng.random(200).astype("float32")  # better than chance
    p /= p.sum(axis=1, keepdims=True)
    metrics = {m.name: m for m in make_classifier_metrics(head)}
    assert set(metrics) == {"auc", "recall", "precision", "balanced_accuracy"}
    for m in metrics.values():
        m.update_state(y[:, None].astype("float32"), p)
    truth, score = np.isin(y, [0, 2]), p[:, [0, 2]].sum(axis=1)
    assert float(metrics["auc"].result()) == pytest.approx(skm.roc_auc_score(truth, score), abs=2e-3)
    assert float(metrics["recall"].result()) == pytest.approx(skm.recall_score(truth, score >= 0.5), abs=1e-6)
    assert float(metrics["balanced_accuracy"].result()) == pytest.approx(
        skm.balanced_accuracy_score(y, p.argmax(axis=1)), abs=1e-6)


def test_class_temperature_softens_and_sums_to_one():
    from kmel.evaluation.calibration import fit_class_temperature
    from kmel.models.pipeline import apply_class_temperature, calibrate_outputs

    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 400)
    logits = rng.normal(0, 1, (400, 3))
    logits[np.arange(400), y] += 1.0
    sharp = np.exp(4 * logits) / np.exp(4 * logits).sum(axis=1, keepdims=True)  # over-confident by 4x
    t = fit_class_temperature(y, sharp)
    assert 2.5 < t < 6.0
    soft = apply_class_temperature(sharp, t)
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-12)
    assert (soft.argmax(axis=1) == sharp.argmax(axis=1)).all()  # the ranking within an image stays
    head = ClassifierHead("diagnosis", ("MEL", "NV", "BCC"), ("MEL", "BCC"))
    classes, malignant = calibrate_outputs(head, sharp, t)
    np.testing.assert_allclose(malignant, soft[:, 0] + soft[:, 2])
    np.testing.assert_allclose(classes, soft)
    assert fit_class_temperature([1, 1, 1], sharp[:3]) == 1.0


def test_diagnosis_report_section(tmp_path):
    from kmel.evaluation.diagnosis import add_diagnosis_report, diagnosis_metrics

    classes = ("MEL", "NV", "BCC", "DF")
    y = np.array([0, 0, 1, 1, 1, 2])  # no DF in the truths
    p = np.array([[.6, .3, .1, 0], [.2, .7, .1, 0], [.1, .8, .1, 0], [.1, .6, .3, 0], [.5, .4, .1, 0],
                  [.3, .2, .5, 0]])
    m = diagnosis_metrics(y, p, classes)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)  # DF absent: not counted
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, p.argmax(axis=1)))
    assert m["top2_accuracy"] == pytest.approx(6 / 6) and m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion"] == [[1, 1, 0, 0], [1, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert m["per_class"]["DF"]["sensitivity"] is None and m["per_class"]["MEL"]["auc"] == pytest.approx(
        skm.roc_auc_score(y == 0, p[:, 0]))
    (tmp_path / "report.json").write_text("{}")
    (tmp_path / "report.md").write_text("# kmel report\n")
    report = add_diagnosis_report(tmp_path, {"summary": {}}, y, p, classes)
    assert json.loads((tmp_path / "report.json").read_text())["diagnosis"]["confusion"] == m["confusion"]
    md = (tmp_path / "report.md").read_text()
    assert "Balanced multiclass accuracy" in md and "| MEL | 1 | 1 | 0 | 0 |" in md and "| NV | 0.33 | 0.67 |" in md
    assert (tmp_path / "confusion.png").stat().st_size > 0 and report["diagnosis"]["n"] == 6


def test_heads_from_manifest_and_pipeline_entry():
    binary = head_from_manifest({"task": "melanoma"})
    assert not binary.multiclass and binary.class_names == ["other", "melanoma"] and binary.class_columns == []
    assert binary.malignant_probability(np.array([[0.2], [0.9]])).tolist() == [0.2, 0.9]
    head = head_from_manifest({"task": "diagnosis", "classes": ["MEL", "NV", "BCC"], "malignant_classes": ["MEL", "BCC"]})
    assert head.malignant_index == [0, 2] and head.class_columns == ["p_MEL", "p_NV", "p_BCC"]
    assert head.malignant_target([0, 1, 2]).tolist() == [1, 0, 1]
    assert head_from_entry(head.to_entry()) == head and head_from_entry({}) == ClassifierHead()
    with pytest.raises(ValueError):
        ClassifierHead("diagnosis", ("MEL", "NV"), ("BCC",))


def test_predict_columns_of_a_diagnosis_model():
    from kmel.serving.outputs import COLUMNS, output_columns

    assert output_columns() == COLUMNS
    cols = output_columns(["p_MEL", "p_NV"])
    assert cols[:6] == ("image", "relpath", "path", "p_MEL", "p_NV", "diagnosis") and cols[6:] == COLUMNS[3:]


def _invoke(*args: str):
    from click.testing import CliRunner

    from cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.slow
def test_diagnosis_task_from_records_to_predict_evaluate_and_tflite(tmp_path, monkeypatch):
    """build-records --task diagnosis → train cls --ensemble 2 (an untrained exported segmenter makes the crops; the
    first call fails in member 2 and the same command resumes there without refitting member 1) → predict,
    CSV and JSONL with flips → evaluate --predictions with a diagnosis truth column → TFLite float32: per-class columns
    summing to 1, the training draw shares recorded and the diagnosis decided by them (arg-max of p / q), a
    malignant probability that is the calibrated malignant classes' sum, a report with the multiclass section,
    Grad-CAM of the predicted class and of any class asked for."""
    import tensorflow as tf

    from kmel.data.synthetic import make_synthetic_dataset
    from kmel.models.pipeline import apply_class_temperature, load_serving
    from kmel.serving.predictor import Predictor
    from tests.handmade import write_untrained_segmenter
    from tests.tiny import tiny_config, write_tiny_profile

    classes = {"records.classes": ["MEL", "NV", "BCC", "BKL"], "records.malignant_classes": ["MEL", "BCC"],
               "classifier.backbone": "resnet18"}
    data, rec, models = tmp_path / "data", tmp_path / "rec", tmp_path / "models"
    make_synthetic_dataset(data, n_images=48, seed=5, size=96)
    profile = write_tiny_profile(tmp_path, epochs=1, steps=2, **classes)
    built = _invoke("build-records", "--data-dir", data, "--out", rec, "--profile", profile, "--task", "diagnosis",
                    "--quiet")
    manifest = json.loads((rec / C.MANIFEST).read_text())
    assert manifest["task"] == "diagnosis" and manifest["classes"] == ["MEL", "NV", "BCC", "BKL"]
    assert "train classes: MEL" in built.output
    table = pd.read_csv(rec / C.METADATA_CSV)
    assert sorted(table[C.COL_TARGET].unique()) == [0, 1, 2, 3]
    assert sum(manifest["class_counts"]["train"].values()) == manifest["n_records"]["img"]["train"]

    write_untrained_segmenter(models, tiny_config(**classes))
    # Two members averaged in one model (tests/test_ensemble.py checks the averaging and its Grad-CAM on its own).
    import kmel.training.train as train

    fitted, fit_member = [], train._fit_classifier_member

    def failing_in_member_2(member_config, name, *args, **kwargs):
        fitted.append((name, member_config.classifier.seed))
        if name == "classifier_m1" and len(fitted) == 2:
            raise RuntimeError("killed in member 2")
        return fit_member(member_config, name, *args, **kwargs)

    monkeypatch.setattr(train, "_fit_classifier_member", failing_in_member_2)
    command = ["train", "cls", "--records", rec, "--out", models, "--profile", profile, "--logdir", tmp_path / "runs",
               "--ensemble", 2, "--quiet"]
    with pytest.raises(RuntimeError, match="member 2"):
        _invoke(*command)
    assert not (models / C.CLASSIFIER_DIR).exists() and (models / ".run-classifier" / "member-0.keras").is_file()
    _invoke(*command)
    assert fitted == [("classifier", 42), ("classifier_m1", 43), ("classifier_m1", 43)]  # member 1 fitted once
    entry = json.loads((models / C.PIPELINE_JSON).read_text())["classifier"]
    assert entry["ensemble"] == 2 and [(m["seed"], m["epochs_run"]) for m in entry["members"]] == [(42, 1), (43, 1)]
    assert isinstance(entry["threshold_by_source"], dict)  # per-source thresholds (none: too few images per source)
    assert (models / "classifier_history.csv").is_file() and (models / "classifier_m1_history.csv").is_file()
    assert not (models / ".run-classifier").exists()
    kernels = [np.array(w) for w in (keras.saving.load_model(models / C.CLASSIFIER_KERAS, safe_mode=True, compile=False)
                                     .get_layer(f"m{k}_head_dense").kernel for k in range(2))]
    assert kernels[0].shape == (512, 4) and not np.allclose(kernels[0], kernels[1])  # two members, not one twice
    assert (entry["task"], entry["class_names"], entry["malignant_classes"]) == (
        "diagnosis", ["MEL", "NV", "BCC", "BKL"], ["MEL", "BCC"])
    # The class shares the sampler drew the training crops with (kmel/data/datasets.py, same counts and settings).
    from kmel.data.datasets import balance_weights, group_counts

    counts = group_counts(json.loads((rec / entry["crops_dir"] / C.MANIFEST).read_text()), "train")
    cc = entry["config"]
    drawn = balance_weights(counts, cc["target_malignant_fraction"], cc["skin_tone_balance"], cc["class_balance"])
    assert entry["class_draw_share"] == pytest.approx(
        {name: sum(w for (t, _), w in drawn.items() if t == i) for i, name in enumerate(entry["class_names"])})
    n = np.array([sum(v for (t, _), v in counts.items() if t == i) for i in range(4)], float)
    np.testing.assert_allclose(list(entry["class_draw_share"].values()),
                               n ** (1 - cc["class_balance"]) / (n ** (1 - cc["class_balance"])).sum())
    report = json.loads((models / "report" / "report.json").read_text())
    assert report["diagnosis"]["classes"] == entry["class_names"] and report["summary"]["n"] == report["diagnosis"]["n"]
    assert "q_c" in report["diagnosis"]["decision"] and "argmax_balanced_accuracy" in report["diagnosis"]
    assert (models / "report" / "confusion.png").is_file()
    assert "Balanced multiclass accuracy" in (models / "report" / "report.md").read_text()

    photos = tmp_path / "photos"
    photos.mkdir()
    for image in sorted((data / "images").rglob("*.jpg"))[:5]:
        (photos / image.name).write_bytes(image.read_bytes())
    _invoke("predict", photos, tmp_path / "pred.csv", "--models", models, "--explain", tmp_path / "cams", "--quiet")
    _invoke("predict", photos, tmp_path / "tta.jsonl", "--models", models, "--explain", tmp_path / "mel",
            "--explain-class", "mel", "--tta", "--quiet")
    rows = pd.read_csv(tmp_path / "pred.csv")
    cols = ["p_MEL", "p_NV", "p_BCC", "p_BKL"]
    assert list(rows.columns[3:8]) == [*cols, "diagnosis"] and (rows["status"] == "ok").all()
    np.testing.assert_allclose(rows[cols].sum(axis=1), 1.0, atol=1e-4)
    shares = np.array([entry["class_draw_share"][c[2:]] for c in cols])  # a class never drawn is never named
    ratio = np.where(shares > 0, rows[cols].to_numpy() / np.where(shares > 0, shares, 1.0), -np.inf)
    assert list(rows["diagnosis"]) == [cols[i][2:] for i in ratio.argmax(axis=1)]
    np.testing.assert_allclose(rows["probability"], rows["p_MEL"] + rows["p_BCC"], atol=2e-6)
    assert list(rows["prediction"]) == [int(p >= entry["threshold"]) for p in rows["probability"]]
    flips = pd.DataFrame([json.loads(line) for line in (tmp_path / "tta.jsonl").read_text().splitlines()])
    assert list(flips.columns[3:8]) == [*cols, "diagnosis"]
    np.testing.assert_allclose(flips[cols].sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(flips["probability"], flips["p_MEL"] + flips["p_BCC"], atol=2e-6)
    assert flips["tta"].all() and not np.allclose(flips[cols], rows[cols], atol=1e-6)  # four views averaged
    assert len(list((tmp_path / "cams").glob("*.png"))) == len(list((tmp_path / "mel").glob("*.png"))) == 5
    from click.testing import CliRunner

    from cli import cli

    wrong = CliRunner().invoke(cli, ["predict", str(photos), str(tmp_path / "x.csv"), "--models", str(models),
                                     "--explain", str(tmp_path / "x"), "--explain-class", "SK"])
    assert wrong.exit_code == 2 and "not one of the model's classes" in wrong.output

    # The columns are the served model's outputs, temperature-scaled over the classes.
    from kmel.data.images import load_image

    with Predictor(models) as predictor:
        prepared = predictor.prepare([load_image(photos / name) for name in rows["image"].map(lambda i: f"{i}.jpg")])
        crops = np.stack([p.result.crop for p in prepared]).astype(np.float32)
    served = load_serving(models / C.CLASSIFIER_DIR)
    raw = served.signatures["serve"](images=tf.constant(crops))
    raw = np.asarray(next(iter(raw.values())))
    np.testing.assert_allclose(rows[cols], apply_class_temperature(raw, entry["temperature"]), atol=2e-6)
    mel = served.gradcam_class(tf.constant(crops), tf.constant(0, tf.int32)).numpy()
    top = served.gradcam(tf.constant(crops)).numpy()
    assert mel.shape == top.shape == crops.shape[:3] and np.isfinite(mel).all()
    argmax_mel = raw.argmax(axis=1) == 0
    np.testing.assert_allclose(mel[argmax_mel], top[argmax_mel], atol=1e-5)  # MEL predicted: the same map

    truth = tmp_path / "truth.csv"
    names = pd.read_csv(data / "ISIC_2019_Training_GroundTruth.csv").set_index("image")
    pd.DataFrame({"image": rows["image"], "diagnosis": [names.loc[i].drop("UNK").idxmax() if i in names.index
                                                        else "melanoma" for i in rows["image"]]}).to_csv(truth,
                                                                                                       index=False)
    _invoke("evaluate", "--predictions", tmp_path / "pred.csv", "--truth", truth, "--out", tmp_path / "eval")
    evaluated = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert evaluated["diagnosis"]["n"] == evaluated["summary"]["n"] == 5
    assert {c: v["predicted"] for c, v in evaluated["diagnosis"]["per_class"].items()} == {
        c: int((rows["diagnosis"] == c).sum()) for c in entry["class_names"]}  # predict's diagnosis, as written

    _invoke("export", "--format", "tflite", "--precision", "float32", "--models", models, "--records", rec,
            "--parity-images", 4, "--quiet")
    tflite = json.loads((models / C.PIPELINE_JSON).read_text())["tflite"]["float32"][C.CLASSIFIER_DIR]
    assert tflite["max_abs_diff"] < 1e-4 and tflite["parity_n"] == 4
    _invoke("predict", photos, tmp_path / "lite.csv", "--models", models, "--runtime", "tflite", "--quiet")
    np.testing.assert_allclose(pd.read_csv(tmp_path / "lite.csv")[cols], rows[cols], atol=1e-4)


def test_explain_class_needs_a_diagnosis_model_and_one_of_its_classes(tmp_path):
    from click.testing import CliRunner

    from cli import cli
    from tests.handmade import write_handmade_models, write_image

    models = write_handmade_models(tmp_path / "models")  # a yes/no model
    write_image(tmp_path / "in" / "a.png", 0)
    result = CliRunner().invoke(cli, ["predict", str(tmp_path / "in"), str(tmp_path / "out.csv"), "--models",
                                      str(models), "--explain", str(tmp_path / "cams"), "--explain-class", "MEL"])
    assert result.exit_code == 2 and "only a diagnosis model" in result.output
    assert not (tmp_path / "out.csv").exists()
    (tmp_path / "kept.csv").write_text("an earlier output\n")
    for extra in (["--explain", str(tmp_path / "cams"), "--explain-class", "MEL"], ["--explain-class", "MEL"]):
        result = CliRunner().invoke(cli, ["predict", str(tmp_path / "in"), str(tmp_path / "kept.csv"), "--models",
                                          str(models), "--overwrite", *extra])
        assert result.exit_code == 2 and "--explain" in result.output, result.output
        assert (tmp_path / "kept.csv").read_text() == "an earlier output\n"  # refused before it was touched


def test_group_recall_logger_logs_each_class_recall_of_a_diagnosis_head(tmp_path):
    import keras
    import tensorflow as tf

    from kmel.training.callbacks import GroupRecallLogger

    outputs = np.array([[.7, .2, .1], [.2, .7, .1], [.6, .3, .1], [.1, .1, .8], [.5, .4, .1]], "float32")
    true_class = np.array([0, 0, 1, 2, 2])  # MEL recall 1/2, NV 0/1, BCC 1/2
    head = ClassifierHead("diagnosis", ("MEL", "NV", "BCC"), ("MEL", "BCC"))
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Identity()(inputs))  # its outputs are its inputs
    logger = GroupRecallLogger(str(tmp_path), outputs, head.malignant_target(true_class), np.zeros(5, int),
                               score=head.malignant_probability, classes=head.classes, true_class=true_class)
    logger.set_model(model)
    logger.on_epoch_end(0)
    got = {}
    for file in tmp_path.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(file)):
            for value in event.summary.value:
                got[value.tag] = float(tf.make_ndarray(value.tensor))
    assert {k: v for k, v in got.items() if "by_class" in k} == pytest.approx(
        {"val_recall_by_class/MEL": 0.5, "val_recall_by_class/NV": 0.0, "val_recall_by_class/BCC": 0.5})
    # malignant = MEL + BCC: 0.8, 0.3, 0.7, 0.9, 0.6 for truths 1, 1, 0, 1, 1: recall at 0.5 is 3/4
    assert got["val_recall_by_skin_tone_at_0.5/very_light"] == pytest.approx(0.75)


def test_a_model_is_not_scored_on_records_labelled_for_another_task(tmp_path):
    from kmel.evaluation.evaluate import check_same_labels

    diagnosis = ClassifierHead("diagnosis", ("MEL", "NV", "BCC"), ("MEL", "BCC"))
    for name, manifest in (("yesno", {"task": "malignant"}),
                           ("diag", {"task": "diagnosis", "classes": ["MEL", "NV", "BCC"],
                                     "malignant_classes": ["MEL", "BCC"]}),
                           ("order", {"task": "diagnosis", "classes": ["NV", "MEL", "BCC"],
                                      "malignant_classes": ["MEL", "BCC"]})):
        (tmp_path / name).mkdir()
        (tmp_path / name / C.MANIFEST).write_text(json.dumps(manifest))
    check_same_labels(diagnosis, tmp_path / "diag")
    check_same_labels(ClassifierHead(), tmp_path / "yesno")
    for head, records in ((diagnosis, "yesno"), (ClassifierHead(), "diag"), (diagnosis, "order")):
        with pytest.raises(ConfigError, match="labelled for"):
            check_same_labels(head, tmp_path / records)


def test_truths_from_a_diagnosis_column(tmp_path):
    from kmel.evaluation.evaluate import _predictions_head, _targets_from_diagnosis

    truth = pd.DataFrame({"image": list("abcd"), "diagnosis": ["MEL", "nevus", "basal cell carcinoma", "eczema"]})
    yes_no = _targets_from_diagnosis(truth, ClassifierHead(), "t.csv")
    assert dict(zip(yes_no["image"], yes_no["target"])) == {"a": 1, "b": 0, "c": 1}  # eczema names no class
    melanoma = _targets_from_diagnosis(truth, _predictions_head(pd.DataFrame({"label": ["other", "melanoma"]})), "t")
    assert dict(zip(melanoma["image"], melanoma["target"])) == {"a": 1, "b": 0, "c": 0}
    with pytest.raises(ConfigError, match="keratoses"):
        _targets_from_diagnosis(truth, ClassifierHead("keratosis"), "t.csv")
    head = _predictions_head(pd.DataFrame(columns=["p_MEL", "p_NV", "p_BCC", "probability"]))
    assert head.malignant_classes == ("MEL", "BCC")
    classes = _targets_from_diagnosis(truth, head, "t.csv")
    assert classes["true_class"].tolist() == [0, 1, 2]
    with pytest.raises(ConfigError, match="none of kmel's malignant classes"):
        _predictions_head(pd.DataFrame(columns=["p_NV", "p_DF"]))
