"""`kmel predict`, `kmel export` and `kmel evaluate`: the commands that run exported models."""

from __future__ import annotations

from pathlib import Path

import click

from kmel.cli.common import (
    POSITIVE,
    PROFILE_HELP,
    STRICT_HELP,
    TFLITE_PRECISION_OPTION,
    exit_code,
    inputs_and_out,
    model_check_options,
    run,
)
from kmel.config import ConfigError, load_config
from kmel.models.integrity import ModelChecks


@click.command("predict")
@click.argument("paths", nargs=-1, metavar="INPUT... [OUT]")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="Output file; without it the last argument is the output (it must end in .csv or .jsonl).")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default=None,
              help="Output format [default: jsonl for .jsonl/.ndjson files, else csv].")
@click.option("--models", default="saved_models", show_default=True, type=click.Path(file_okay=False),
              help="Folder with segmenter/, classifier/ and pipeline.json.")
@click.option("--batch-size", type=POSITIVE, default=None, help="Images per model batch [pipeline: predict.batch_size].")
@click.option("--explain", "explain_dir", default=None, type=click.Path(file_okay=False),
              help="Write Grad-CAM overlays (crop | heat map) of the predicted class as PNGs into this folder, "
                   "at each file's relpath + _gradcam.png.")
@click.option("--explain-class", default=None, metavar="CLASS",
              help="With --explain and a diagnosis model: the maps of this class (e.g. MEL) instead.")
@click.option("--tta", is_flag=True, help="Average the classifier over flips (noted in the output's tta column).")
@click.option("--metadata", default=None, type=click.Path(dir_okay=False),
              help="CSV of the patients' data (an id column: relpath, image, image_id, isic_id… and age, sex, site, "
                   "patient_id, measurements): the images it lists get the fusion model's probability (`kmel train "
                   "fusion`), with image_probability and fused columns; the others keep the image model's.")
@click.option("--source", default=None, metavar="NAME",
              help="Every input comes from this archive or clinic (a source of the training records, e.g. "
                   "ham10000): decide with the threshold `train cls` chose on that source's validation images "
                   "(pipeline.json threshold_by_source) instead of the one chosen on all of them.")
@click.option("--max-file-mb", type=POSITIVE, default=None,
              help="Larger input files get an error row, unread [predict.max_file_mb: 256].")
@click.option("--runtime", type=click.Choice(["tf", "tflite"]), default="tf", show_default=True,
              help="tf: the SavedModels; tflite: the .tflite files `kmel export --format tflite` wrote "
                   "(XNNPACK on the CPU; no --explain).")
@TFLITE_PRECISION_OPTION
@click.option("--overwrite", is_flag=True,
              help="Start OUT afresh (its rows are replaced) instead of resuming it, e.g. after changing models "
                   "or --tta / --runtime / --tflite-precision.")
@model_check_options
@click.option("--strict", is_flag=True, help=STRICT_HELP)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def predict(paths: tuple[str, ...], out: str | None, fmt: str | None, models: str, batch_size: int | None,
            explain_dir: str | None, explain_class: str | None, tta: bool, metadata: str | None, source: str | None,
            max_file_mb: int | None, runtime: str, tflite_precision: str,
            overwrite: bool, no_verify: bool, trust_model: bool, strict: bool, quiet: bool) -> None:
    """Classify image files into a CSV or JSONL file, one row per input file.

    INPUT is any mix of image files and folders (searched recursively), or - to read paths from
    standard input, one per line: `kmel predict scans/ out.csv`, `kmel predict a.jpg b.png scans/
    --out out.jsonl`, `find . -name '*.jpg' | kmel predict - out.csv`. Each row names its file by
    relpath (relative to the input folder; with several inputs, to their common folder). Rerunning
    the same command resumes a killed run: files already in the output are skipped, files with an error
    row are tried again. OUT.meta.json records the models and options that wrote OUT; resuming with
    others is refused (use --overwrite or another OUT). Models are checked before they run: their
    files against pipeline.json, and their graphs against the operations kmel's own models use.
    """

    def body() -> int:
        from kmel.serving.runner import predict_files

        inputs, target = inputs_and_out(paths, out)
        stdin = click.get_text_stream("stdin") if "-" in inputs else None
        s = predict_files(inputs, target, models, batch_size, tta, explain_dir, fmt, stdin, max_file_mb,
                          progress=not quiet, runtime=runtime, tflite_precision=tflite_precision,
                          checks=ModelChecks(not no_verify, trust_model), overwrite=overwrite,
                          explain_class=explain_class, metadata=metadata, source=source)
        click.echo(f"{s.n_ok} ok, {s.n_error} errors, {s.n_skipped} skipped, {s.n_malignant} predicted positive "
                   f"({s.images_per_second:.2f} images/s; {s.n_resumed} rows kept from an earlier run) -> {target}")
        if s.n_fused is not None:
            click.echo(f"fused with --metadata: {s.n_fused} of the output's ok rows (the others: image model only)"
                       + (f"; the table lacks {', '.join(s.fusion_missing_columns)} (read as missing)"
                          if s.fusion_missing_columns else ""))
        for path, reason in s.errors[:20]:
            click.echo(f"  not read {path}: {reason}", err=True)
        if len(s.errors) > 20:
            click.echo(f"  ... and {len(s.errors) - 20} more (status=error rows in {target})", err=True)
        return exit_code(s.n_error, s.n_skipped, strict)

    run(body)


@click.command("export")
@click.option("--format", "fmt", type=click.Choice(["tflite"]), default="tflite", show_default=True,
              help="What to export the trained models as (the SavedModels are written by `train`).")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(["float32", "float16", "int8"]),
              help="TFLite precision; repeat for several [default: all three]. int8 is calibrated on train "
                   "images drawn from --records.")
@click.option("--models", default="saved_models", show_default=True, type=click.Path(file_okay=False),
              help="Folder with segmenter/, classifier/ and pipeline.json; the files go to MODELS/tflite/.")
@click.option("--records", default="tfrecords", show_default=True, type=click.Path(file_okay=False),
              help="Records the models were trained on: calibration (train) and parity (val) images come from them.")
@click.option("--calibration-images", default=64, show_default=True, type=POSITIVE,
              help="Train images for int8 calibration.")
@click.option("--parity-images", default=16, show_default=True, type=POSITIVE,
              help="Val images on which each file is compared with its SavedModel (max |difference| is recorded).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def export(fmt: str, precisions: tuple[str, ...], models: str, records: str, calibration_images: int,
           parity_images: int, quiet: bool) -> None:
    """Convert the exported segmenter and classifier to TFLite (LiteRT) for phones and fast CPU serving.

    Writes MODELS/tflite/{segmenter,classifier}-{float32,float16,int8}.tflite and records each file's
    size, SHA-256, source model and parity (max |SavedModel - TFLite| on val images) in pipeline.json.
    Use them with `kmel predict --runtime tflite --tflite-precision P`.
    """

    def body() -> int:
        from kmel.serving.litert import export_tflite
        from kmel.serving.runtime import PRECISIONS

        chosen = list(precisions) or list(PRECISIONS)
        section = export_tflite(models, records, chosen, calibration_images, parity_images, progress=not quiet)
        for precision in chosen:
            for model in ("segmenter", "classifier"):
                e = section[precision][model]
                click.echo(f"{e['file']}: {e['bytes'] / 2**20:.1f} MiB, max |SavedModel - TFLite| "
                           f"{e['max_abs_diff']:.2e} on {e['parity_n']} {e['parity_split']} images")
        return 0

    run(body)


@click.command("evaluate")
@click.option("--records", default="tfrecords", show_default=True, type=click.Path(file_okay=False),
              help="Record set made by build-records (its crop records are built for the segmenter if missing).")
@click.option("--models", default="saved_models", show_default=True, type=click.Path(file_okay=False),
              help="Folder with the exported segmenter/, classifier/ and pipeline.json.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True,
              help="Which split of the records to score.")
@click.option("--out", default="reports", show_default=True, type=click.Path(file_okay=False),
              help="Folder for report.json, report.md, predictions.csv and the PNG plots.")
@click.option("--predictions", default=None, type=click.Path(dir_okay=False),
              help="Evaluate a predict CSV instead of records (needs --truth).")
@click.option("--truth", default=None, type=click.Path(dir_okay=False),
              help="CSV with columns image,target or image,diagnosis (relpath,… to match predict's relpath column).")
@click.option("--profile", default="cpu-small", show_default=True, help=PROFILE_HELP)
@click.option("--strict", is_flag=True,
              help="With --predictions: exit 1 when truth rows are unmatched or predictions hold error rows.")
@click.option("--runtime", type=click.Choice(["tf", "tflite"]), default="tf", show_default=True,
              help="Score the crop records with the classifier SavedModel (tf) or its TFLite file (tflite, from "
                   "`kmel export --format tflite`): the report shows what the served file does.")
@TFLITE_PRECISION_OPTION
@click.option("--tta", is_flag=True,
              help="Score each crop as the mean over its four flips (as predict --tta); the report says so.")
@model_check_options
@click.option("--quiet", is_flag=True, help="No progress bars.")
def evaluate(records: str, models: str, split: str, out: str, predictions: str | None, truth: str | None,
             profile: str, strict: bool, runtime: str, tflite_precision: str, tta: bool, no_verify: bool,
             trust_model: bool, quiet: bool) -> None:
    """Metrics at the stored threshold and per-skin-tone fairness (with bootstrap intervals) and plots."""

    def body() -> int:
        from kmel.evaluation.evaluate import evaluate_exported, evaluate_predictions

        if (predictions is None) != (truth is None):
            raise ConfigError("--predictions and --truth go together")
        if predictions:
            report = evaluate_predictions(predictions, truth, out, load_config(profile))
        else:
            from kmel.serving.runtime import load_pipeline_config

            config, pipeline = load_pipeline_config(models)
            report = evaluate_exported(records, models, split, out, config, progress=not quiet, pipeline=pipeline,
                                       runtime=runtime, tflite_precision=tflite_precision, tta=tta,
                                       checks=ModelChecks(not no_verify, trust_model))
        summary = report.get("summary", {})
        click.echo(" ".join(f"{k}={v:.4f}" for k, v in summary.items() if isinstance(v, float)))
        click.echo(f"report in {Path(out) / 'report.md'}")
        fusion = report.get("fusion")
        if fusion and fusion.get("evaluated"):
            click.echo(f"fusion: AUC image {fusion['image_auc']:.4f} -> fused {fusion['fused_auc']:.4f}, pAUC80 "
                       f"{fusion['image_pauc80']:.4f} -> {fusion['fused_pauc80']:.4f}; report in {fusion['report']}")
        elif fusion:
            click.echo(f"fusion not evaluated: {fusion['reason']}", err=True)
        meta = report.get("meta", {})
        notes = meta.get("unmatched_truth_rows", 0) + meta.get("prediction_rows_not_ok", 0)
        if notes:
            click.echo(f"not scored: {meta.get('unmatched_truth_rows', 0)} truth rows without an ok prediction, "
                       f"{meta.get('prediction_rows_not_ok', 0)} prediction rows that are not ok")
        return exit_code(0, notes, strict)

    run(body)
