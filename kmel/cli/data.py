"""`kmel make-synthetic` and `kmel build-records`: the data commands."""

from __future__ import annotations

from pathlib import Path

import click

from kmel.cli.common import (
    NON_NEGATIVE,
    POSITIVE,
    PROFILE_HELP,
    STRICT_HELP,
    config_for,
    exit_code,
    run,
)


@click.command("make-synthetic")
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


@click.command("build-records")
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

            config = config_for(profile, {"crops.workers": workers}, records=out)
            with folder_lock(out, "build-records --stage crops"):
                path = build_crop_records(out, models, config, progress=not quiet)
            click.echo(f"crop records in {path}")
            return 0
        from kmel.data.records import build_records, format_counts

        config = config_for(profile, {"records.task": task, "records.workers": workers,
                                   "records.max_file_mb": max_file_mb})
        with folder_lock(out, "build-records"):
            manifest = build_records(data_dir, out, config, progress=not quiet)
        click.echo(format_counts(manifest))
        click.echo(f"records, metadata.csv, skipped.csv and manifest.json in {out}")
        problems = manifest["problems"]
        return exit_code(sum(problems["errors"].values()), sum(problems["notes"].values()), strict)

    run(body)
