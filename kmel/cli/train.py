"""`kmel train seg|cls`: the training command."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import click

from kmel.cli.common import (
    NON_NEGATIVE,
    POSITIVE,
    PROFILE_HELP,
    config_for,
    run,
    user_errors,
)


def train_options(fn: Callable) -> Callable:
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
                     help="seg: resnet34|resnet18; cls: efficientnet_b0..efficientnet_b7, efficientnet_lite0..efficientnet_lite4 "
                          "(ImageNet weights offline for lite0-2), resnet18|resnet34|resnet50|resnet101|resnet152 [profile]."),
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
        click.option("--ensemble", type=POSITIVE, default=None, metavar="K",
                     help="cls: train K classifiers (seeds SEED, SEED+1, ...) and export one model that averages "
                          "them; K times the training time and the model's size and inference time [profile: 1]."),
        click.option("--restart", is_flag=True, help="Drop an interrupted run of this model in OUT and start afresh "
                     "(by default the same command resumes it; with other settings it is refused)."),
        click.option("--quiet", is_flag=True, help="One line per epoch, no progress bars."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.command("train")
@click.argument("model", type=click.Choice(["seg", "cls", "joint", "fusion"]))
@train_options
def train(model: str, records: str, out: str, profile: str, epochs: int | None, batch_size: int | None,
          steps_per_epoch: int | None, image_size: int | None, backbone: str | None, strategy: str,
          precision: str, weights: str | None, weights_mirror: str | None, logdir: str, seed: int | None,
          ensemble: int | None, restart: bool, quiet: bool) -> None:
    """Train the segmenter (seg), the classifier (cls), segmenter + classifier end to end (joint), or the
    image + metadata fusion (fusion).

    cls first builds (or reuses) the lesion crops from the exported segmenter, picks the decision threshold on
    the validation split and writes the fairness report for the test split to OUT/report/; records built with
    --task diagnosis train a softmax over their classes (the malignant probability is the sum of the malignant
    classes). A killed run resumes from its last finished epoch when the same command is run again. The run
    works in OUT/.run-segmenter (or .run-classifier) and replaces the previous model, history and report only
    when it is complete: a failed or killed run leaves OUT as it was.

    joint (after seg) trains one model: the segmenter of OUT (its weights as the start) gives a soft lesion mask,
    and a new classifier (the profile's classifier section; --backbone, --image-size ... apply to it) sees the whole
    image x (alpha + (1 - alpha) x mask). The segmenter is frozen for joint.segmenter_warmup_epochs, then both
    train; joint.mask_loss_weight keeps a segmentation loss on images with expert masks (the profile's joint
    section). It takes the classifier's place in OUT (pipeline.json says kind: joint): predict, serve and evaluate
    skip the crop stage for it (crop_mode joint_no_crop). Its input is the seg records' padded square, so
    --image-size must not exceed the records' seg_size.

    fusion (after cls) fits gradient-boosted trees (LightGBM) over the classifier's calibrated score and the
    records' metadata (age, sex, site, ISIC 2024's measurements; each also relative to the same patient's other
    lesions) on the validation split, cross-fitted by patient, and reports image-only vs fused on the test split
    in OUT/fusion/report/. Settings: the profile's fusion section and --seed; `predict --metadata` uses it.
    """

    def body() -> int:
        if ensemble is not None and model != "cls":
            raise click.UsageError("--ensemble is a classifier option: kmel train cls --ensemble K")
        if model == "fusion":
            return _train_fusion(records, out, profile, seed, quiet, dict(
                epochs=epochs, batch_size=batch_size, steps_per_epoch=steps_per_epoch, image_size=image_size,
                backbone=backbone, weights=weights, weights_mirror=weights_mirror,
                strategy=None if strategy == "auto" else strategy, precision=None if precision == "auto" else precision,
                restart=restart or None))
        section = "segmenter" if model == "seg" else "classifier"
        overrides = {f"{section}.{k}": v for k, v in dict(
            epochs=epochs, batch_size=batch_size, steps_per_epoch=steps_per_epoch, image_size=image_size,
            backbone=backbone, weights=weights, seed=seed).items()}
        if model == "cls":
            overrides["classifier.ensemble"] = ensemble
        overrides.update({"segmenter.weights_mirror": weights_mirror, "classifier.weights_mirror": weights_mirror})
        config = config_for(profile, overrides, records=records)
        verbose = 2 if quiet else "auto"
        from kmel.data.locks import folder_lock
        with folder_lock(out, f"train {model}"), _note_failure(out, model):
            if model == "seg":
                from kmel.training.train import fit_segmenter

                entry = fit_segmenter(records, out, config, logdir, strategy, precision, verbose, restart)
                click.echo(f"segmenter exported to {Path(out) / 'segmenter'}; metrics: {entry['metrics']}")
                return 0
            if model == "joint":
                from kmel.training.joint import fit_joint

                entry = fit_joint(records, out, config, logdir, strategy, precision, verbose, restart)
                click.echo(f"joint model exported to {Path(out) / 'classifier'} (probability and mask); mask on test: "
                           f"{entry['mask_metrics'].get('test', entry['mask_metrics'].get('val'))}")
            else:
                from kmel.training.train import fit_classifier

                entry = fit_classifier(records, out, config, logdir, strategy, precision, verbose, not quiet, restart)
        click.echo(f"classifier exported to {Path(out) / 'classifier'}; threshold {entry['threshold']:.4f} "
                   f"(chosen on {entry['threshold_from']}); {entry['report_split']} metrics: {entry['metrics']}")
        click.echo(f"report: {Path(out) / 'report' / 'report.md'}")
        return 0

    run(body)


def _train_fusion(records: str, out: str, profile: str, seed: int | None, quiet: bool, unused: dict) -> int:
    given = sorted(f"--{k.replace('_', '-')}" for k, v in unused.items() if v is not None)
    if given:
        raise click.UsageError(f"train fusion fits trees, not a network: {', '.join(given)} not used (its settings "
                               "are the profile's fusion section and --seed)")
    from kmel.data.locks import folder_lock
    from kmel.training.fusion import train_fusion

    config = config_for(profile, {"fusion.seed": seed})
    with folder_lock(out, "train fusion"):
        entry = train_fusion(records, out, config.fusion, progress=not quiet)
    m = entry["metrics"]
    click.echo(f"fusion model in {Path(out) / entry['file']}: {len(entry['features'])} features, {entry['n_trees']} "
               f"trees, threshold {entry['threshold']:.4f} (chosen on val, out of fold)")
    click.echo(f"test: AUC image {m['image_auc']:.4f} -> fused {m['fused_auc']:.4f}; pAUC80 image "
               f"{m['image_pauc80']:.4f} -> fused {m['fused_pauc80']:.4f} ({m['n']} lesions, {m['n_positive']} "
               "malignant)")
    click.echo(f"report: {Path(out) / 'fusion' / 'report' / 'report.md'}")
    return 0


@contextmanager
def _note_failure(out: str, model: str) -> Iterator[None]:
    """A training that fails says what it left: OUT as it was, the run's work in its run folder."""
    try:
        yield
    except Exception as exc:
        if not isinstance(exc, user_errors()):  # those are one line of their own, before any training
            name = "segmenter" if model == "seg" else "classifier"
            click.echo(f"training failed ({type(exc).__name__}); {out} is as it was: its {name} was not replaced. The "
                       f"unfinished run is in {Path(out) / ('.run-' + name)}: rerun the same command to resume it, "
                       "or add --restart", err=True)
        raise
