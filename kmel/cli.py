"""kmel command line: each command parses, builds the config, calls one library function, reports.

Installed as the ``kmel`` console script and as ``python -m kmel``; ``python cli.py`` in a clone
runs the same group. Exit codes, the same for every command: 0 every input that could be used was
used (harmless leftovers are reported, not errors); 1 some file could not be read or a mask could
not be used (or, with ``--strict``, anything was reported); 2 usage or configuration error.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import click  # noqa: E402

from kmel.config import ConfigError, list_profiles, load_config  # noqa: E402
from kmel.models.integrity import ModelChecks  # noqa: E402

PROFILE_HELP = (f"Settings profile: a shipped name ({', '.join(list_profiles())}) or a path to your own YAML. "
                "Flags override it; the resolved config is written next to every output.")


def _user_errors() -> tuple[type[BaseException], ...]:
    from kmel.data.records import DataError
    from kmel.models.weights.download import WeightsError

    return ConfigError, FileNotFoundError, DataError, WeightsError


POSITIVE = click.IntRange(min=1)
NON_NEGATIVE = click.IntRange(min=0)

STRICT_HELP = ("Exit 1 when anything is reported (orphan masks, rows without an image, CSVs not "
               "recognised...), not only when a file could not be read.")


def exit_code(n_errors: int, n_notes: int, strict: bool) -> int:
    """The one rule: 1 when a file or mask could not be used (or anything was reported, strict), else 0."""
    return 1 if n_errors or (strict and n_notes) else 0


def run(fn: Callable[[], int | None]) -> None:
    """Run a command body; user errors print one clear line and exit 2 (no stack trace)."""
    try:
        code = fn() or 0
    except KeyboardInterrupt:
        click.echo("interrupted: rerun the same command to resume", err=True)
        sys.exit(130)
    except Exception as exc:
        if isinstance(exc, _user_errors()):
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        raise
    sys.exit(code)


def _config(profile: str, overrides: dict[str, Any], records: str | None = None):
    """Profile + flags; the records section comes from the record set when one is given."""
    from kmel.config import config_from_dict

    config = load_config(profile, overrides)
    if records is not None:
        from kmel.data.records import load_manifest

        manifest = load_manifest(records)
        data = config.to_dict()
        data["records"] = manifest["config"]["records"]
        config = config_from_dict(data)
    return config


def _installed_version(*distributions: str) -> str:
    """Version of the first installed distribution of ``distributions`` (no import of the package)."""
    from importlib import metadata

    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def version_line() -> str:
    """kmel's version and the TensorFlow and Keras it runs with."""
    import kmel

    tf = _installed_version("tensorflow", "tensorflow-cpu", "tensorflow-macos", "tf-nightly")
    return f"kmel {kmel.__version__} (TensorFlow {tf}, Keras {_installed_version('keras')}, Python {sys.version.split()[0]})"


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(version_line())
        ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Print the versions of kmel, TensorFlow, Keras and Python, then exit.")
def cli() -> None:
    """kmel: fair melanoma detection in dermoscopic images (Keras 3 / TensorFlow).

    Typical run: make-synthetic (or your ISIC download) -> build-records -> train seg -> train cls -> predict
    / evaluate. `demo` does all of it on synthetic data. `tensorboard --logdir runs` shows the trainings.
    """


@cli.command("make-synthetic")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--style", type=click.Choice(["isic", "isic2024"]), default="isic", show_default=True,
              help="isic: 2019 + 2020 CSVs, JPEGs, masks; isic2024: ISIC 2024's train-metadata.csv + train-image.hdf5.")
@click.option("--n-images", default=120, show_default=True, type=POSITIVE, help="Number of labelled images to draw.")
@click.option("--size", default=None, type=click.IntRange(min=32), help="Image side in pixels [isic: 256, isic2024: 128].")
@click.option("--seed", default=0, show_default=True, type=NON_NEGATIVE, help="Random seed (same seed, same bytes).")
@click.option("--predict-images", default=0, show_default=True, type=NON_NEGATIVE,
              help="Also write this many held-out ISIC-style images (JPEG files) to OUT/predict/ with truth.csv.")
def make_synthetic(out: str, style: str, n_images: int, size: int | None, seed: int, predict_images: int) -> None:
    """Write a synthetic data folder laid out like an ISIC download (2019 + 2020, or 2024: see --style)."""

    def body() -> int:
        from kmel.data.synthetic import make_prediction_folder, make_synthetic_dataset
        from kmel.data.synthetic_isic2024 import isic2024_counts, make_isic2024_dataset

        if style == "isic2024":
            summary = isic2024_counts(make_isic2024_dataset(Path(out), n_images, seed, size=size or 128, progress=True))
        else:
            summary = make_synthetic_dataset(Path(out), n_images=n_images, seed=seed, size=size or 256)
        click.echo(f"wrote {out}: {summary}")
        if predict_images:
            make_prediction_folder(Path(out) / "predict", n_images=predict_images, seed=seed + 1, size=size or 256)
            click.echo(f"wrote {predict_images} held-out images to {Path(out) / 'predict'}")
        return 0

    run(body)


@cli.command("build-records")
@click.option("--data-dir", default="data", show_default=True, type=click.Path(file_okay=False),
              help="Folder with the official CSVs, images (any sub-folder) and masks/ (any depth).")
@click.option("--out", default="tfrecords", show_default=True, type=click.Path(file_okay=False),
              help="Where the shards, metadata.csv, skipped.csv and manifest.json go.")
@click.option("--profile", default="cpu-small", show_default=True, help=PROFILE_HELP)
@click.option("--task", type=click.Choice(["malignant", "melanoma", "keratosis", "diagnosis"]), default=None,
              help="Label to learn: yes/no malignant, melanoma or keratosis, or diagnosis (one of the profile's "
                   "records.classes, by default the 8 ISIC 2019 classes) [profile: malignant].")
@click.option("--workers", type=NON_NEGATIVE, default=None, help="Processes for decoding (0: one per core) [profile].")
@click.option("--stage", type=click.Choice(["images", "crops"]), default="images", show_default=True,
              help="images: records from the data folder; crops: lesion crops from trained segmenter.")
@click.option("--models", default="saved_models", show_default=True, type=click.Path(file_okay=False),
              help="With --stage crops: folder of the exported segmenter.")
@click.option("--max-file-mb", type=POSITIVE, default=None,
              help="Larger image and mask files are refused unread (skipped.csv) [profile: 256].")
@click.option("--strict", is_flag=True, help=STRICT_HELP)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def build_records_cmd(data_dir: str, out: str, profile: str, task: str | None, workers: int | None, stage: str,
                      models: str, max_file_mb: int | None, strict: bool, quiet: bool) -> None:
    """Clean the metadata, drop duplicates, label, split by patient and write sharded TFRecords."""

    def body() -> int:
        from kmel.data.locks import folder_lock
        if stage == "crops":
            from kmel.lesion.crops import build_crop_records

            config = _config(profile, {"crops.workers": workers}, records=out)
            with folder_lock(out, "build-records --stage crops"):
                path = build_crop_records(out, models, config, progress=not quiet)
            click.echo(f"crop records in {path}")
            return 0
        from kmel.data.records import build_records, format_counts

        config = _config(profile, {"records.task": task, "records.workers": workers,
                                   "records.max_file_mb": max_file_mb})
        with folder_lock(out, "build-records"):
            manifest = build_records(data_dir, out, config, progress=not quiet)
        click.echo(format_counts(manifest))
        click.echo(f"records, metadata.csv, skipped.csv and manifest.json in {out}")
        problems = manifest["problems"]
        return exit_code(sum(problems["errors"].values()), sum(problems["notes"].values()), strict)

    run(body)


def _train_options(fn: Callable) -> Callable:
    options = [
        click.option("--records", default="tfrecords", show_default=True, type=click.Path(file_okay=False),
                     help="Record set made by build-records."),
        click.option("--out", default="saved_models", show_default=True, type=click.Path(file_okay=False),
                     help="Where the exported model, .keras file, pipeline.json and report go."),
        click.option("--profile", default="cpu-small", show_default=True, help=PROFILE_HELP),
        click.option("--epochs", type=POSITIVE, default=None, help="Training epochs [profile]."),
        click.option("--batch-size", type=POSITIVE, default=None, help="Batch size per replica [profile]."),
        click.option("--steps-per-epoch", type=NON_NEGATIVE, default=None, help="Steps per epoch (0: one pass) [profile]."),
        click.option("--image-size", type=click.IntRange(min=32), default=None, help="Model input side in pixels [profile]."),
        click.option("--backbone", default=None,
                     help="seg: resnet34|resnet18; cls: efficientnet_b0..efficientnet_b7 or efficientnet_lite0..efficientnet_lite4 (ImageNet weights offline for lite0-2) [profile]."),
        click.option("--strategy", type=click.Choice(["auto", "default", "mirrored", "multiworker"]),
                     default="auto", show_default=True,
                     help="auto: multiworker if TF_CONFIG is set, mirrored on several GPUs, else default."),
        click.option("--precision", type=click.Choice(["auto", "float32", "mixed_float16", "mixed_bfloat16"]),
                     default="auto", show_default=True, help="auto: mixed_float16 on GPUs, float32 on CPUs."),
        click.option("--weights", default=None,
                     help="imagenet (downloaded once, verified and kept in the Keras cache ~/.keras/models; "
                          "Lite0-2 come with pip packages), none, or a path to a weights file [profile: none]."),
        click.option("--weights-mirror", default=None, metavar="URL",
                     help="Fetch ImageNet files from URL/NAME instead of the public URLs (a flat folder on any "
                          "static web server, or a local folder path) [profile; env KMEL_WEIGHTS_MIRROR]."),
        click.option("--logdir", default="runs", show_default=True, type=click.Path(file_okay=False),
                     help="TensorBoard log folder."),
        click.option("--seed", type=NON_NEGATIVE, default=None, help="Random seed [profile]."),
        click.option("--restart", is_flag=True, help="Drop an interrupted run of this model in OUT and start afresh "
                     "(by default the same command resumes it; with other settings it is refused)."),
        click.option("--quiet", is_flag=True, help="One line per epoch, no progress bars."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@cli.command("train")
@click.argument("model", type=click.Choice(["seg", "cls"]))
@_train_options
def train(model: str, records: str, out: str, profile: str, epochs: int | None, batch_size: int | None,
          steps_per_epoch: int | None, image_size: int | None, backbone: str | None, strategy: str,
          precision: str, weights: str | None, weights_mirror: str | None, logdir: str, seed: int | None,
          restart: bool, quiet: bool) -> None:
    """Train the segmenter (seg) or the classifier (cls) and export it as a SavedModel.

    cls first builds (or reuses) the lesion crops from the exported segmenter, picks the decision threshold on
    the validation split and writes the fairness report for the test split to OUT/report/; records built with
    --task diagnosis train a softmax over their classes (the malignant probability is the sum of the malignant
    classes). A killed run resumes from its last finished epoch when the same command is run again. The run
    works in OUT/.run-segmenter (or .run-classifier) and replaces the previous model, history and report only
    when it is complete: a failed or killed run leaves OUT as it was.
    """

    def body() -> int:
        section = "segmenter" if model == "seg" else "classifier"
        overrides = {f"{section}.{k}": v for k, v in dict(
            epochs=epochs, batch_size=batch_size, steps_per_epoch=steps_per_epoch, image_size=image_size,
            backbone=backbone, weights=weights, seed=seed).items()}
        overrides.update({"segmenter.weights_mirror": weights_mirror, "classifier.weights_mirror": weights_mirror})
        config = _config(profile, overrides, records=records)
        verbose = 2 if quiet else "auto"
        from kmel.data.locks import folder_lock
        with folder_lock(out, f"train {model}"), _note_failure(out, model):
            if model == "seg":
                from kmel.training.train import fit_segmenter

                entry = fit_segmenter(records, out, config, logdir, strategy, precision, verbose, restart)
                click.echo(f"segmenter exported to {Path(out) / 'segmenter'}; metrics: {entry['metrics']}")
                return 0
            from kmel.training.train import fit_classifier

            entry = fit_classifier(records, out, config, logdir, strategy, precision, verbose, not quiet, restart)
        click.echo(f"classifier exported to {Path(out) / 'classifier'}; threshold {entry['threshold']:.4f} "
                   f"(chosen on {entry['threshold_from']}); {entry['report_split']} metrics: {entry['metrics']}")
        click.echo(f"report: {Path(out) / 'report' / 'report.md'}")
        return 0

    run(body)


@contextmanager
def _note_failure(out: str, model: str) -> Iterator[None]:
    """A training that fails says what it left: OUT as it was, the run's work in its run folder."""
    try:
        yield
    except Exception as exc:
        if not isinstance(exc, _user_errors()):  # those are one line of their own, before any training
            name = "segmenter" if model == "seg" else "classifier"
            click.echo(f"training failed ({type(exc).__name__}); {out} is as it was: its {name} was not replaced. The "
                       f"unfinished run is in {Path(out) / ('.run-' + name)}: rerun the same command to resume it, "
                       "or add --restart", err=True)
        raise


OUTPUT_SUFFIXES = (".csv", ".jsonl", ".ndjson")


def _inputs_and_out(paths: tuple[str, ...], out: str | None) -> tuple[list[str], str]:
    """``INPUT... OUT`` or ``INPUT... --out OUT``; a last argument taken as OUT must look like one."""
    if out is not None:
        inputs = list(paths)
    elif len(paths) >= 2 and Path(paths[-1]).suffix.lower() in OUTPUT_SUFFIXES:
        inputs, out = list(paths[:-1]), paths[-1]
    else:
        raise click.UsageError("give the output file last (a .csv or .jsonl name) or with --out OUT "
                               "(the last argument is never taken as an output unless it ends in .csv or .jsonl)")
    if not inputs:
        raise click.UsageError("no input: give image files, folders, or - to read paths from standard input")
    return inputs, out


def _model_check_options(fn: Callable) -> Callable:
    """--no-verify and --trust-model: what is checked before exported models run (kmel.models.integrity)."""
    fn = click.option("--trust-model", is_flag=True,
                      help="Load SavedModels whose graphs use operations kmel's own models never use (file, "
                           "network or process operations): only for models whose origin you trust.")(fn)
    return click.option("--no-verify", is_flag=True,
                        help="Skip comparing the model files' fingerprints and SHA-256s with pipeline.json "
                             "(and the check that segmenter and classifier come from one training).")(fn)


TFLITE_PRECISION_OPTION = click.option(
    "--tflite-precision", type=click.Choice(["float32", "float16", "int8"]), default="float32", show_default=True,
    help="Which TFLite files --runtime tflite uses (int8: quantised, fastest, least exact; pipeline.json's "
         "tflite section states each one's parity).")


@cli.command("predict")
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
@click.option("--max-file-mb", type=POSITIVE, default=None,
              help="Larger input files get an error row, unread [predict.max_file_mb: 256].")
@click.option("--runtime", type=click.Choice(["tf", "tflite"]), default="tf", show_default=True,
              help="tf: the SavedModels; tflite: the .tflite files `kmel export --format tflite` wrote "
                   "(XNNPACK on the CPU; no --explain).")
@TFLITE_PRECISION_OPTION
@click.option("--overwrite", is_flag=True,
              help="Start OUT afresh (its rows are replaced) instead of resuming it, e.g. after changing models "
                   "or --tta / --runtime / --tflite-precision.")
@_model_check_options
@click.option("--strict", is_flag=True, help=STRICT_HELP)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def predict(paths: tuple[str, ...], out: str | None, fmt: str | None, models: str, batch_size: int | None,
            explain_dir: str | None, explain_class: str | None, tta: bool, max_file_mb: int | None, runtime: str, tflite_precision: str,
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

        inputs, target = _inputs_and_out(paths, out)
        stdin = click.get_text_stream("stdin") if "-" in inputs else None
        s = predict_files(inputs, target, models, batch_size, tta, explain_dir, fmt, stdin, max_file_mb,
                          progress=not quiet, runtime=runtime, tflite_precision=tflite_precision,
                          checks=ModelChecks(not no_verify, trust_model), overwrite=overwrite,
                          explain_class=explain_class)
        click.echo(f"{s.n_ok} ok, {s.n_error} errors, {s.n_skipped} skipped, {s.n_malignant} predicted positive "
                   f"({s.images_per_second:.2f} images/s; {s.n_resumed} rows kept from an earlier run) -> {target}")
        for path, reason in s.errors[:20]:
            click.echo(f"  not read {path}: {reason}", err=True)
        if len(s.errors) > 20:
            click.echo(f"  ... and {len(s.errors) - 20} more (status=error rows in {target})", err=True)
        return exit_code(s.n_error, s.n_skipped, strict)

    run(body)


@cli.command("export")
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


@cli.command("evaluate")
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
@_model_check_options
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
        meta = report.get("meta", {})
        notes = meta.get("unmatched_truth_rows", 0) + meta.get("prediction_rows_not_ok", 0)
        if notes:
            click.echo(f"not scored: {meta.get('unmatched_truth_rows', 0)} truth rows without an ok prediction, "
                       f"{meta.get('prediction_rows_not_ok', 0)} prediction rows that are not ok")
        return exit_code(0, notes, strict)

    run(body)


@cli.command("demo")
@click.option("--out", default="demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for everything the demo makes (data, records, models, runs, reports).")
@click.option("--n-images", default=240, show_default=True, type=click.IntRange(min=16), help="Synthetic labelled images.")
@click.option("--quick", is_flag=True, help="Tiny sizes and one epoch each (a smoke test, not a result).")
@click.option("--quiet", is_flag=True, help="No progress bars (one line per stage and per epoch).")
def demo(out: str, n_images: int, quick: bool, quiet: bool) -> None:
    """Synthetic data end to end: make data, build records, train seg, crops, train cls, predict, evaluate."""

    def body() -> int:
        from kmel.demo import run_demo

        result = run_demo(Path(out), n_images=n_images, quick=quick, progress=not quiet)
        for key, value in result.items():
            click.echo(f"{key}: {value}")
        return 0

    run(body)


def main() -> None:
    """Console-script entry point (``kmel``)."""
    cli()


if __name__ == "__main__":
    main()
