"""``evaluate``: score a split of crop records (or a labelled ``predict`` CSV) and write the report.

The report (metrics at the stored threshold, per-skin-tone fairness with bootstrap intervals,
plots) is the same one ``train cls`` writes for its test split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kmel import constants as C
from kmel.config import Config, ConfigError
from kmel.models.heads import ClassifierHead, head_from_entry, head_from_manifest

ScoreFn = Callable[[np.ndarray], np.ndarray]  # float32 [N, S, S, 3] 0–255 → [N, K] outputs (K = 1: yes/no)


def as_score_fn(model: Any) -> ScoreFn:
    """A Keras model, a loaded SavedModel (``serve`` signature) or a batch → outputs function (a
    :class:`kmel.serving.litert.TFLiteModel`, say) as a batch → [N, K] outputs function."""
    from kmel.models.pipeline import signature_fn

    if hasattr(model, "predict_on_batch"):
        return lambda batch: np.asarray(model.predict_on_batch(batch)).reshape(len(batch), -1)
    fn = signature_fn(model) if hasattr(model, "signatures") else model
    return lambda batch: np.asarray(fn(batch)).reshape(len(batch), -1)


def predict_records(
    model: Any, records_dir: str | Path, split: str, config: Config, batch_size: int = 32, progress: bool = False,
    head: ClassifierHead | None = None, kind: str = "crop",
) -> pd.DataFrame:
    """One row per crop record: id, source, target, probability, skin tone, ITA category, crop mode.

    ``head`` (default: the one the records' task calls for) reads the outputs: ``probability`` is the malignant
    side's and ``target`` its 0/1 truth; a diagnosis head adds ``true_class`` (the class index) and one raw
    ``p_<CLASS>`` column per class. ``kind="joint"``: a joint model's input instead, every labelled whole image of
    ``records_dir``'s image records padded square (:func:`kmel.data.datasets.make_joint_records`; ``model`` its
    probability alone), crop mode ``joint_no_crop``."""
    import tensorflow as tf
    from tqdm.auto import tqdm

    from kmel.data.datasets import (
        decode_image,
        make_joint_records,
        make_record_dataset,
        parse_joint_record,
    )
    from kmel.data.records import load_manifest, shard_paths

    score = as_score_fn(model)
    manifest = load_manifest(records_dir)
    head = head_from_manifest(manifest) if head is None else head
    size = config.classifier.image_size
    fields = (C.F_IMAGE_ID, C.F_SOURCE, C.F_TARGET, C.F_SKIN_TONE, C.F_ITA, C.F_ITA_CATEGORY, C.F_CROP_MODE)
    if kind == "joint":
        total = None
        ds = make_joint_records(records_dir, split, config, training=False).map(
            lambda r: (parse_joint_record(r, size)[0], {k: r[k] for k in fields}), num_parallel_calls=tf.data.AUTOTUNE)
    elif kind == "crop":
        files = shard_paths(records_dir, "crop", split, manifest)
        total = manifest.get("n_records", {}).get("crop", {}).get(split)
        ds = make_record_dataset(files, training=False, seed=0).map(
            lambda r: (decode_image(r, size), {k: r[k] for k in fields}), num_parallel_calls=tf.data.AUTOTUNE)
    else:
        raise ValueError(f"kind must be crop or joint, got {kind!r}")
    ds = ds.batch(batch_size).prefetch(2)
    frames = []
    bar = tqdm(total=total, desc=f"score {split}", unit="img", disable=not progress, dynamic_ncols=True)
    for images, meta in ds:
        meta = {k: v.numpy() for k, v in meta.items()}
        outputs = score(images.numpy())
        frames.append(pd.DataFrame({
            C.COL_IMAGE_ID: [b.decode() for b in meta[C.F_IMAGE_ID]],
            C.COL_SOURCE: [b.decode() for b in meta[C.F_SOURCE]],
            C.COL_TARGET: head.malignant_target(meta[C.F_TARGET]),
            **({"true_class": meta[C.F_TARGET].astype(int)} if head.multiclass else {}),
            "probability": head.malignant_probability(outputs),
            **dict(zip(head.class_columns, outputs.T)),
            C.COL_SKIN_TONE_NAME: [C.SKIN_TONE_GROUPS[g] for g in meta[C.F_SKIN_TONE]],
            C.COL_ITA: meta[C.F_ITA],
            "ita_category_name": [C.ITA_CATEGORIES[g] for g in meta[C.F_ITA_CATEGORY]],
            "crop_mode": ([C.JOINT_CROP_MODE] * len(outputs) if kind == "joint"
                          else [C.CROP_MODES[m] for m in meta[C.F_CROP_MODE]]),
        }))
        bar.update(len(frames[-1]))
    bar.close()
    if not frames:
        return pd.DataFrame(columns=[C.COL_IMAGE_ID, C.COL_SOURCE, C.COL_TARGET,
                                     *(["true_class"] if head.multiclass else []), "probability", *head.class_columns,
                                     C.COL_SKIN_TONE_NAME, C.COL_ITA, "ita_category_name", "crop_mode"])
    return pd.concat(frames, ignore_index=True)


# Subgroups reported beside skin tone: report grouping -> column of the table (from records' metadata.csv).
SUBGROUP_COLUMNS = {"fitzpatrick": "fitzpatrick_group", "sex": C.COL_SEX, "age_band": C.COL_AGE,
                    "anatomic_site": C.COL_SITE, "source": C.COL_SOURCE}


def report_groups(table: pd.DataFrame) -> dict[str, np.ndarray]:
    """Groupings for the report: estimated skin tone and ITA, then every subgroup column the table has.

    Missing values are ``unknown``; a grouping with no known value at all is left out.
    """
    from kmel.evaluation.fairness import UNKNOWN, age_bands

    groups = {"skin_tone": table[C.COL_SKIN_TONE_NAME].astype(str).to_numpy()}
    if "ita_category_name" in table:
        groups["ita_category"] = table["ita_category_name"].astype(str).to_numpy()
    for grouping, column in SUBGROUP_COLUMNS.items():
        if column not in table:
            continue
        if grouping == "age_band":
            values = age_bands(pd.to_numeric(table[column], errors="coerce"))
        else:
            text = table[column].astype(object).where(table[column].notna(), "").astype(str).str.strip()
            if grouping != "fitzpatrick":  # bands are I-II .. V-VI; free-text columns vary in case
                text = text.str.lower()
            values = text.where(~text.isin(["", "nan", "none", "None"]), UNKNOWN).to_numpy().astype(str)
        if (values != UNKNOWN).any():
            groups[grouping] = values
    return groups


def read_record_table(records_dir: str | Path) -> pd.DataFrame | None:
    """build-records' metadata.csv of a record set (in ``records_dir``, or its parent for a crops folder), one row
    per image id; None when there is none."""
    for folder in (Path(records_dir), Path(records_dir).parent):
        path = folder / C.METADATA_CSV
        if path.is_file():
            meta = pd.read_csv(path, dtype={C.COL_IMAGE_ID: str, C.COL_PATIENT: str, C.COL_LESION: str},
                               low_memory=False)
            return meta.drop_duplicates(C.COL_IMAGE_ID).set_index(C.COL_IMAGE_ID)
    return None


def with_record_metadata(table: pd.DataFrame, records_dir: str | Path) -> pd.DataFrame:
    """Add sex, age, site and Fitzpatrick band from build-records' metadata.csv (in ``records_dir`` or its parent)."""
    meta = read_record_table(records_dir)
    if meta is None:
        return table
    wanted = [c for c in SUBGROUP_COLUMNS.values() if c in meta and c not in table and c != C.COL_SOURCE]
    return table.join(meta[wanted], on=C.COL_IMAGE_ID) if wanted else table


def report_from_table(
    table: pd.DataFrame, threshold: float, out_dir: str | Path, config: Config, meta: Mapping[str, Any],
    temperature: float = 1.0, head: ClassifierHead | None = None, decided: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write predictions.csv and the report for a scored, labelled table.

    With a ``temperature`` other than 1 the table's ``probability`` is the model's own: it is kept as
    ``probability_uncalibrated`` and replaced by the calibrated one, the scale ``threshold`` is on. A diagnosis
    ``head`` calibrates the table's ``p_<CLASS>`` columns instead (the probability is their malignant sum), names
    each row's ``diagnosis`` (:meth:`ClassifierHead.decide` of the calibrated classes, or ``decided``: class
    indices decided already, predict's) and, where the table has ``true_class``, adds the multiclass section
    (:mod:`kmel.evaluation.diagnosis`) on that decision.
    """
    from kmel.evaluation.report import write_report
    from kmel.models.pipeline import calibrate_outputs

    head = ClassifierHead() if head is None else head
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = table.copy()
    raw = table["probability"].to_numpy(dtype=np.float64)
    if head.multiclass:
        classes, calibrated = calibrate_outputs(head, table[head.class_columns].to_numpy(np.float64), temperature)
        table[head.class_columns] = classes
        decision = head.decision_rule if decided is None else "predict's diagnosis column"
        decided = head.decide(classes) if decided is None else np.asarray(decided, dtype=int)
        table["diagnosis"] = np.asarray(head.classes)[decided]
    else:
        _, calibrated = calibrate_outputs(head, raw, temperature)
    if temperature != 1.0:
        table["probability_uncalibrated"] = raw
        table["probability"] = calibrated
    table["prediction"] = (table["probability"] >= threshold).astype(int)
    table.to_csv(out_dir / "predictions.csv", index=False)
    report = write_report(
        out_dir, table[C.COL_TARGET].to_numpy(), table["probability"].to_numpy(), threshold, report_groups(table),
        meta={**dict(meta), "temperature": temperature}, n_bootstrap=config.classifier.bootstrap,
        seed=config.classifier.seed, raw_scores=raw, temperature=temperature,
    )
    if head.multiclass and "true_class" in table:
        from kmel.evaluation.diagnosis import add_diagnosis_report

        report = add_diagnosis_report(out_dir, report, table["true_class"].to_numpy(int),
                                      table[head.class_columns].to_numpy(np.float64), head.classes, decided, decision)
    return report


def write_split_report(
    model: Any, records_dir: str | Path, split: str, config: Config, batch_size: int, threshold: float,
    out_dir: str | Path, meta: Mapping[str, Any] | None = None, progress: bool = False, temperature: float = 1.0,
    head: ClassifierHead | None = None, kind: str = "crop",
) -> dict[str, Any]:
    """Score ``split`` and write its report; ``threshold`` applies to probabilities after ``temperature``.
    ``kind``: :func:`predict_records`'."""
    from kmel.data.records import load_manifest

    head = head_from_manifest(load_manifest(records_dir)) if head is None else head
    table = with_record_metadata(predict_records(model, records_dir, split, config, batch_size, progress, head, kind),
                                 records_dir)
    meta = {"split": split, "records": str(records_dir), "n": len(table), **(meta or {})}
    return report_from_table(table, threshold, out_dir, config, meta, temperature=temperature, head=head)


def evaluate_exported(
    records_dir: str | Path, models_dir: str | Path, split: str, out_dir: str | Path, config: Config,
    progress: bool = True, pipeline: Mapping[str, Any] | None = None, runtime: str = "tf",
    tflite_precision: str = "float32", tta: bool = False, checks: Any = None,
) -> dict[str, Any]:
    """Score ``split`` with the exported pipeline (segmenter crops + classifier) and write the report.

    ``pipeline``: the contents of ``models_dir/pipeline.json`` when the caller has read it already.
    ``runtime``: ``tf`` scores with the classifier SavedModel, ``tflite`` with its TFLite file of
    ``tflite_precision`` (``kmel export --format tflite``). Either way the crops are the split's crop
    records, which the SavedModel segmenter made. ``tta``: each crop's score is the mean over its four
    flips, as ``predict --tta`` does (the threshold stays the one chosen without flips). ``checks``: what
    is verified before the models load (:class:`kmel.models.integrity.ModelChecks`; all by default).
    """
    from kmel.lesion.crops import ensure_crop_records
    from kmel.models.integrity import DEFAULT_CHECKS, check_pipeline
    from kmel.models.pipeline import load_serving, read_pipeline
    from kmel.serving.runtime import RUNTIMES

    pipeline = dict(read_pipeline(models_dir) if pipeline is None else pipeline)
    if "classifier" not in pipeline:
        raise FileNotFoundError(f"{Path(models_dir) / C.PIPELINE_JSON} has no classifier: run `kmel train cls`")
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIMES)}")
    checks = DEFAULT_CHECKS if checks is None else checks
    check_pipeline(models_dir, pipeline, checks)
    if pipeline["classifier"].get("kind") == "joint":
        return _evaluate_joint(records_dir, models_dir, split, out_dir, config, progress, pipeline, runtime, tta, checks)
    if runtime == "tflite":
        from kmel.serving.runtime import load_tflite

        model: Any = load_tflite(models_dir, C.CLASSIFIER_DIR, tflite_precision, pipeline, checks=checks)
    else:
        model = load_serving(Path(models_dir) / C.CLASSIFIER_DIR, checks, pipeline["classifier"].get("fingerprint"))
    if tta:
        from kmel.serving.predictor import flip_averaged

        model = flip_averaged(as_score_fn(model))
    crops_dir = ensure_crop_records(records_dir, models_dir, config, progress=progress, pipeline=pipeline,
                                    checks=checks)
    head = head_from_entry(pipeline["classifier"])
    check_same_labels(head, records_dir)
    threshold = float(pipeline["classifier"]["threshold"])
    chosen_on = pipeline["classifier"].get("threshold_from", "val")  # models from before it was recorded: val
    # The threshold in pipeline.json is on the calibrated scale when a temperature is stored with it.
    temperature = float(pipeline["classifier"].get("temperature", 1.0))
    report = write_split_report(model, crops_dir, split, config, config.predict.batch_size, threshold, out_dir,
                                meta={"threshold_from": f"pipeline.json (chosen on {chosen_on})",
                                      "threshold_split": chosen_on, "models": str(models_dir),
                                      "runtime": runtime if runtime == "tf" else f"tflite {tflite_precision}",
                                      "tta": "flips (4 views averaged)" if tta else "none"},
                                progress=progress, temperature=temperature, head=head)
    if pipeline.get("fusion"):
        report["fusion"] = evaluate_fusion(models_dir, pipeline, crops_dir, out_dir, config, threshold, checks,
                                           meta={"split": split, "models": str(models_dir), "tta": tta,
                                                 "runtime": runtime})
        import json

        from kmel.evaluation.fairness import _clean

        (Path(out_dir) / "report.json").write_text(json.dumps(_clean(report), indent=2, allow_nan=False))
    return report


def _evaluate_joint(
    records_dir: str | Path, models_dir: str | Path, split: str, out_dir: str | Path, config: Config, progress: bool,
    pipeline: Mapping[str, Any], runtime: str, tta: bool, checks: Any,
) -> dict[str, Any]:
    """:func:`evaluate_exported` of a joint model (``train joint``): the split's whole images (no crops) through its
    SavedModel's probability."""
    from kmel.serving.runtime import load_runtime_models

    if pipeline.get("fusion"):
        raise ConfigError("a fusion model on a joint model is not built: evaluate without it")
    models = load_runtime_models(models_dir, dict(pipeline), runtime, checks=checks)
    score: ScoreFn = models.classify
    if tta:
        from kmel.serving.predictor import flip_averaged

        score = flip_averaged(score)
    entry = pipeline["classifier"]
    head = head_from_entry(entry)
    check_same_labels(head, records_dir)
    chosen_on = entry.get("threshold_from", "val")
    return write_split_report(score, records_dir, split, config, config.predict.batch_size, float(entry["threshold"]),
                              out_dir, meta={"threshold_from": f"pipeline.json (chosen on {chosen_on})",
                                             "threshold_split": chosen_on, "models": str(models_dir), "runtime": runtime,
                                             "model": "joint (no crops)",
                                             "tta": "flips (4 views averaged)" if tta else "none"},
                              progress=progress, temperature=float(entry.get("temperature", 1.0)), head=head,
                              kind="joint")


def evaluate_fusion(
    models_dir: str | Path, pipeline: Mapping[str, Any], records_dir: str | Path, out_dir: str | Path,
    config: Config, image_threshold: float, checks: Any, meta: Mapping[str, Any],
) -> dict[str, Any]:
    """The models folder's fusion model on the rows ``evaluate`` just scored (``out_dir/predictions.csv``, joined
    with the records' table): its report beside the image model's in ``out_dir/fusion/``; returns the
    image-only vs fused summary (or why there is none: the fusion belongs to another classifier, say)."""
    from kmel.evaluation.fusion import write_fusion_report
    from kmel.models.fusion import FusionError, fusion_importance, load_models_fusion

    try:
        fusion = load_models_fusion(models_dir, dict(pipeline), verify=checks.verify)
    except FusionError as exc:
        return {"evaluated": False, "reason": str(exc)}
    table = pd.read_csv(Path(out_dir) / "predictions.csv", dtype={C.COL_IMAGE_ID: str}, low_memory=False)
    meta_table = read_record_table(records_dir)
    if meta_table is not None:
        extra = [c for c in meta_table.columns if c not in table.columns]
        table = table.join(meta_table[extra], on=C.COL_IMAGE_ID)
    image = table["probability"].to_numpy(np.float64)
    fused = fusion.predict(table, image)
    report = write_fusion_report(
        Path(out_dir) / "fusion", table[C.COL_TARGET].to_numpy(), image, fused, image_threshold, fusion.threshold,
        report_groups(table), fusion_importance(fusion),
        meta={**dict(meta), "n": len(table), "image_threshold": image_threshold,
              "threshold_from": "pipeline.json fusion (chosen on val, out of fold)", "threshold_split": "val",
              "missing_columns": list(fusion.spec.missing_columns(table.columns))},
        n_bootstrap=config.classifier.bootstrap, seed=config.classifier.seed)
    overall = report["image_vs_fused"]["overall"]
    return {"evaluated": True, "report": str(Path(out_dir) / "fusion" / "report.md"), "n": overall["n"],
            **{f"{score}_{metric}": overall[metric][score] for metric in ("auc", "pauc80")
               for score in ("image", "fused")},
            **{f"difference_{metric}_ci95": overall[metric].get("difference_ci95") for metric in ("auc", "pauc80")}}


def check_same_labels(head: ClassifierHead, records_dir: str | Path) -> None:
    """Refuse records whose labels mean something else than the model's outputs (another task, or other
    classes or class order): their scores would be silently wrong."""
    from kmel.data.records import load_manifest

    def what(h: ClassifierHead) -> str:
        return h.task + (f" {list(h.classes)}" if h.multiclass else "")

    labels = head_from_manifest(load_manifest(records_dir))
    if labels != head:
        raise ConfigError(f"the records in {records_dir} are labelled for {what(labels)} but the classifier answers "
                          f"{what(head)}: evaluate it on records built with the same --task and classes")


def evaluate_predictions(
    predictions_csv: str | Path, truth_csv: str | Path, out_dir: str | Path, config: Config
) -> dict[str, Any]:
    """Report for a ``predict`` output (CSV or JSONL) against a user's ``image,target`` CSV.

    Optional truth columns ``sex``, ``age``, ``site``, ``source`` and ``fitzpatrick_group`` (I-II / III-IV /
    V-VI) add those subgroups to the report.

    With a ``relpath`` column (as in the predictions) instead of ``image``, rows are matched on it:
    the way to tell apart files with the same name in different folders. Instead of ``target`` the truth may
    have ``diagnosis`` (codes or words, mapped as build-records maps them); for a diagnosis model's
    predictions (``p_<CLASS>`` columns) the report then adds its multiclass section.
    """

    predictions_csv = Path(predictions_csv)
    if predictions_csv.suffix.lower() in (".jsonl", ".ndjson"):
        pred = pd.read_json(predictions_csv, lines=True, dtype={"image": str, "relpath": str})
    else:
        pred = pd.read_csv(predictions_csv, dtype={"image": str, "relpath": str})
    truth = pd.read_csv(truth_csv, dtype={"image": str, "relpath": str})
    key = "relpath" if "relpath" in truth.columns and "relpath" in pred.columns else "image"
    head = _predictions_head(pred)
    if "target" not in truth.columns and "diagnosis" in truth.columns:
        truth = _targets_from_diagnosis(truth, head, truth_csv)
    missing = {key, "target"} - set(truth.columns)
    if missing:
        raise ConfigError(f"{truth_csv} must have columns image,target (or image,diagnosis) or relpath,target "
                          f"(missing: {sorted(missing)})")
    n_not_ok = int((pred["status"] != "ok").sum())
    pred = pred[pred["status"] == "ok"]
    # Subgroup columns the user's truth table carries (sex, age, site, fitzpatrick_group) join the report.
    extra = [c for c in SUBGROUP_COLUMNS.values() if c in truth.columns and c not in pred.columns]
    extra += ["true_class"] if "true_class" in truth.columns and head.multiclass else []
    table = pred.merge(truth[[key, "target", *extra]], on=key, how="inner")
    if table.empty:
        raise ConfigError(f"no {key} in {truth_csv} matches an ok row of {predictions_csv}")
    table = table.rename(columns={"image": C.COL_IMAGE_ID, "skin_tone_group": C.COL_SKIN_TONE_NAME,
                                  "ita_category": "ita_category_name"})
    table[C.COL_TARGET] = table["target"].astype(int)
    threshold = float(table["threshold"].iloc[0])
    # The threshold is the models' (pipeline.json, written into every predicted row), chosen on their validation
    # split, not on these labelled images.
    meta = {"split": "your labelled images", "threshold_from": "the predictions' threshold column (pipeline.json)",
            "threshold_split": "models' validation",
            "predictions": str(predictions_csv), "truth": str(truth_csv), "n": len(table), "matched_on": key,
            "unmatched_truth_rows": int(len(truth) - len(table)), "prediction_rows_not_ok": n_not_ok}
    # The predictions are calibrated already (temperature 1 here); a diagnosis head's p_<CLASS> columns are kept,
    # and so is its diagnosis: the models' decision (their training draw shares are not in the CSV to redo it).
    return report_from_table(table, threshold, out_dir, config, meta, head=head, decided=_predicted_classes(table, head))


def _predicted_classes(table: pd.DataFrame, head: ClassifierHead) -> np.ndarray | None:
    """Class indices of a diagnosis model's predictions from their ``diagnosis`` column; None when there is none
    (the report then decides by the plain arg-max, all it can without the models' shares)."""
    if not head.multiclass or "diagnosis" not in table:
        return None
    index = table["diagnosis"].map({c: i for i, c in enumerate(head.classes)})
    if index.isna().any():
        bad = sorted(set(table["diagnosis"][index.isna()].astype(str)))
        raise ConfigError(f"the predictions' diagnosis column names {bad[:5]}, not among their classes "
                          f"{list(head.classes)}")
    return index.to_numpy(int)


def _predictions_head(pred: pd.DataFrame) -> ClassifierHead:
    """A diagnosis head when the predictions have ``p_<CLASS>`` columns (its malignant classes: kmel's defaults
    among them; only the truths of a ``diagnosis`` column depend on them), else yes/no."""
    classes = tuple(c[2:] for c in pred.columns if c.startswith("p_"))
    if len(classes) < 2:
        labels = set(pred.get("label", pd.Series(dtype=str)).dropna().astype(str)) - {"benign", "malignant", "other"}
        return ClassifierHead(labels.pop() if len(labels) == 1 and labels <= set(C.BINARY_TASKS) else "malignant")
    malignant = tuple(c for c in classes if c in C.MALIGNANT_CLASSES)
    if not malignant:
        raise ConfigError(f"the predictions' classes {list(classes)} include none of kmel's malignant classes "
                          f"{list(C.MALIGNANT_CLASSES)}: give the truth as image,target instead of image,diagnosis")
    return ClassifierHead("diagnosis", classes, malignant)


def _targets_from_diagnosis(truth: pd.DataFrame, head: ClassifierHead, truth_csv: str | Path) -> pd.DataFrame:
    """``target`` (malignant or not) and, for a diagnosis head, ``true_class`` from a ``diagnosis`` truth column
    (codes or words, mapped as build-records maps them: kmel/data/diagnosis.py); rows naming no class are left out."""
    from kmel.data.diagnosis import diagnosis_class

    names = truth["diagnosis"].map(diagnosis_class)
    known = names.notna() & (names.isin(head.classes) if head.multiclass else True)
    if not known.any():
        raise ConfigError(f"{truth_csv}: no row's diagnosis names one of the classes "
                          f"{list(head.classes) or list(C.DIAGNOSIS_CLASSES)} (see docs/data.md, 'Diagnosis classes')")
    truth = truth[known].copy()
    if head.task not in ("malignant", "diagnosis"):
        if head.task != "melanoma":
            raise ConfigError(f"{truth_csv}: a diagnosis column cannot say which images are {head.task} (its BKL "
                              "class lumps keratoses with lentigines): give image,target")
    malignant = head.malignant_classes if head.multiclass else (("MEL",) if head.task == "melanoma"
                                                                  else C.MALIGNANT_CLASSES)
    truth["target"] = names[known].isin(malignant).astype(int)
    if head.multiclass:
        truth["true_class"] = names[known].map({c: i for i, c in enumerate(head.classes)}).astype(int)
    return truth
