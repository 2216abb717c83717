"""``train seg`` and ``train cls``: fit, pick the best epoch, export, record in pipeline.json.

Both loops share one shape: seed → precision → strategy → datasets (global batch scales with
replicas) → model + optimizer built over every weight → staged unfreezing, early stopping,
best-weights checkpoint, BackupAndRestore (a killed run resumes at its last finished epoch),
TensorBoard → best weights → ``.keras`` + SavedModel → metrics → ``pipeline.json``.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kmel import constants as C
from kmel.config import ClassifierConfig, Config, ConfigError, save_config, to_plain
from kmel.data.datasets import (
    class_draw_shares,
    count_records,
    make_dataset,
    steps_per_epoch,
)
from kmel.data.records import load_manifest, shard_paths
from kmel.models.integrity import saved_model_fingerprint
from kmel.serving.export import export_serving, update_pipeline
from kmel.training.callbacks import (
    GroupRecallLogger,
    LearningRateLogger,
    PreciseBatchNorm,
    ResumableEarlyStopping,
    SegmentationImages,
    StagedUnfreezing,
    best_so_far,
    stage_for_epoch,
    take_numpy,
)
from kmel.training.distribute import (
    jit_compile_setting,
    make_strategy,
    multiworker_requested,
    set_precision,
    shard_for_workers,
    worker_index,
)
from kmel.training.run_folder import (
    ENSEMBLE_MEMBER,
    backup_folder,
    commit_run,
    read_history,
    run_folder,
    start_run,
)


def _callbacks(
    name: str, models_dir: Path, logdir: Path, patience: int, extra: list[keras.callbacks.Callback],
    monitor: str = "val_loss", mode: str = "min",
) -> tuple[list[keras.callbacks.Callback], Path]:
    """Backup (resume), extras, checkpoint of the best epoch, early stopping, CSV and TensorBoard.

    A fresh run (no backup folder) first removes a previous run's history and best weights, so
    they are not mixed with its own. A resumed run starts the checkpoint and early stopping from
    the best value in the history of its finished epochs.
    """
    best = models_dir / f".{name}.best.weights.h5"
    history = models_dir / f"{name}_history.csv"
    backup = backup_folder(models_dir, name)
    prior: list[float] = []
    if not backup.exists():
        history.unlink(missing_ok=True)
        best.unlink(missing_ok=True)
    else:
        prior = [row.get(monitor, float("nan")) for row in read_history(models_dir, name)]
    found = best_so_far(prior, mode) if best.exists() else None
    callbacks = [
        keras.callbacks.BackupAndRestore(str(backup)),
        *extra,
        LearningRateLogger(),
        keras.callbacks.ModelCheckpoint(str(best), monitor=monitor, mode=mode, save_best_only=True,
                                        save_weights_only=True,
                                        initial_value_threshold=None if found is None else float(found[0])),
        ResumableEarlyStopping(monitor=monitor, mode=mode, patience=patience, prior=prior),
        keras.callbacks.CSVLogger(str(history), append=True),
        keras.callbacks.TensorBoard(str(logdir / name), write_graph=False, update_freq="epoch"),
    ]
    return callbacks, best


def _val_data(records_dir: Path, kind: str, config: Config, batch: int,
              strat: tf.distribute.Strategy) -> tuple[Any, int]:
    """Validation dataset for ``fit`` and its exact number of batches.

    With several replicas the batch is a multiple of them that the data can fill and the ragged
    last batch is dropped (it cannot be split evenly); the final metrics use every image. Passing
    the step count keeps Keras from reading past the end (its "ran out of data" warning).
    """
    replicas = strat.num_replicas_in_sync
    n = count_records(records_dir, kind, "val")
    if replicas > 1:
        batch = replicas * max(1, min(batch // replicas, n // replicas))
    dataset = make_dataset(records_dir, "val", kind, False, config, drop_remainder=replicas > 1, batch_size=batch)
    # Any distribution strategy, one replica included (MirroredStrategy on one GPU or CPU).
    if isinstance(strat, (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)):
        # Every worker validates on all of it (OFF): the val step count above is for the whole split.
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        # Repeated: under a distribution strategy Keras (3.15) takes one batch from the previous
        # epoch's validation iterator to build the model before each evaluation; on a finite
        # dataset that iterator is spent from the second epoch on and fit dies with StopIteration.
        # Each evaluation still starts a fresh iterator and reads exactly `steps` batches.
        dataset = dataset.with_options(options).repeat()
    steps = n // batch if replicas > 1 else -(-n // batch)
    return dataset, max(1, steps)


def _worker_dirs(strat: tf.distribute.Strategy, models_dir: Path, logdir: Path) -> tuple[Path, Path, Path | None]:
    """Multi-worker runs: only the chief writes to ``models_dir`` / ``logdir``; every other worker
    trains identically into its own scratch folder (removed at the end) so files never collide."""
    if not isinstance(strat, tf.distribute.MultiWorkerMirroredStrategy):
        return models_dir, logdir, None
    is_chief, index = worker_index()
    if is_chief:
        return models_dir, logdir, None
    scratch = models_dir / f".worker-{index}"
    scratch.mkdir(parents=True, exist_ok=True)
    return scratch, logdir / f"worker-{index}", scratch


def weights_digest(model: keras.Model) -> str:
    """SHA-256 (16 hex) of a model's weight values in order: the same digest means the same weights."""
    digest = hashlib.sha256()
    for w in model.get_weights():
        digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()[:16]


def _finish_model(
    model: keras.Model, best: Path | None, models_dir: Path, keras_name: str, export_dir: str, size: int,
    gradcam_layer: str | Sequence[str] | None = None,
) -> str:
    """Load the best epoch's weights (``best``: None for a model already final, an ensemble), save the ``.keras``
    file, export the SavedModel; returns its fingerprint."""
    if best is not None and best.exists():
        model.load_weights(str(best))
    model.save(str(models_dir / keras_name))
    export_serving(model, models_dir / export_dir, size, gradcam_layer)
    return saved_model_fingerprint(models_dir / export_dir)


def skin_tone_entry() -> dict[str, Any]:
    """The skin-tone groups and ITA categories a classifier's report and predict use, for its pipeline entry."""
    return {"groups": list(C.SKIN_TONE_GROUPS), "edges": list(C.SKIN_TONE_EDGES),
            "ita_categories": list(C.ITA_CATEGORIES), "ita_edges": list(C.ITA_EDGES)}


def publish_run(work: Path, models_dir: Path, section: str, entry: dict[str, Any], final: keras.Model,
                files: Sequence[str], scratch: Path | None) -> dict[str, Any]:
    """The end of every training: the entry gets the final weights' digest, the run's ``files`` replace the
    previous model's in ``models_dir`` (:func:`commit_run`), pipeline.json's ``section`` is set, and the run folder
    (and a worker's scratch folder) go. Returns the entry."""
    entry["weights_digest"] = weights_digest(final)
    commit_run(work, models_dir, list(files))
    update_pipeline(models_dir, section, entry)
    shutil.rmtree(work, ignore_errors=True)
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    return entry


def _run_settings(section: str, settings: Any, manifest: dict[str, Any], policy: str) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one: the model's settings, the data, the precision."""
    return {**{f"{section}.{k}": v for k, v in to_plain(settings).items()}, "data": manifest["fingerprint"],
            "precision": policy}


def fit_segmenter(
    records_dir: str | Path,
    models_dir: str | Path,
    config: Config,
    logdir: str | Path = "runs",
    strategy: str = "auto",
    precision: str = "auto",
    verbose: int | str = "auto",
    restart: bool = False,
) -> dict[str, Any]:
    """Train the lesion segmenter on seg- records; export ``models_dir/segmenter``. Returns its pipeline entry.

    The run works in ``models_dir/.run-segmenter`` and replaces the previous segmenter only when it is
    complete (:mod:`kmel.training.run_folder`); ``restart`` drops an interrupted run instead of resuming it."""
    from kmel.models.segmenter import (
        build_segmenter,
        load_encoder_weights,
        set_trainable_stages,
    )
    from kmel.training.losses import (
        DiceCoefficient,
        IoUScore,
        ThresholdedJaccard,
        TverskyLoss,
    )

    records_dir, models_dir, logdir = Path(records_dir), Path(models_dir), Path(logdir)
    models_dir.mkdir(parents=True, exist_ok=True)
    sc = config.segmenter
    keras.utils.set_random_seed(sc.seed)
    policy = set_precision(precision)
    strat = make_strategy(strategy)
    models_dir, logdir, scratch = _worker_dirs(strat, models_dir, logdir)
    replicas = strat.num_replicas_in_sync
    batch = sc.batch_size * replicas
    train_ds = make_dataset(records_dir, "train", "seg", True, config, batch_size=batch)
    train_ds = shard_for_workers(train_ds, strat, len(shard_paths(records_dir, "seg", "train")))
    val_ds, val_steps = _val_data(records_dir, "seg", config, batch, strat)
    steps = steps_per_epoch(records_dir, "seg", "train", batch, sc.steps_per_epoch)
    manifest = load_manifest(records_dir)
    work = start_run(models_dir, "segmenter", _run_settings("segmenter", sc, manifest, policy), restart)

    with strat.scope():
        model = build_segmenter(sc, sync_batchnorm=replicas > 1)
        load_encoder_weights(model, sc.weights, mirror=sc.weights_mirror)
        optimizer = keras.optimizers.AdamW(sc.learning_rate, weight_decay=sc.weight_decay)
        optimizer.build(model.trainable_variables)
        set_trainable_stages(model, stage_for_epoch(sc.unfreeze, 0))
        model.compile(
            optimizer=optimizer,
            loss=TverskyLoss(alpha=sc.tversky_alpha, beta=sc.tversky_beta),
            metrics=[DiceCoefficient(name="dice"), IoUScore(name="iou"), ThresholdedJaccard(name="thresholded_jaccard")],
            jit_compile=jit_compile_setting(),
        )
    sample_images, sample_masks = take_numpy(make_dataset(records_dir, "val", "seg", False, config, batch_size=4), 4)
    callbacks, best = _callbacks(
        "segmenter",
        work,
        logdir,
        sc.early_stopping_patience,
        [
            StagedUnfreezing(sc.unfreeze, set_trainable_stages),
            keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=sc.reduce_lr_factor,
                                              patience=sc.reduce_lr_patience, min_lr=1e-6),
            SegmentationImages(str(logdir / "segmenter" / "images"), sample_images, sample_masks),
        ],
    )
    model.fit(train_ds, epochs=sc.epochs, steps_per_epoch=steps, validation_data=val_ds,
              validation_steps=val_steps, callbacks=callbacks, verbose=verbose,
              shuffle=False)  # the tf.data pipeline shuffles
    fingerprint = _finish_model(model, best, work, C.SEGMENTER_KERAS, C.SEGMENTER_DIR, sc.image_size)
    final = keras.saving.load_model(work / C.SEGMENTER_KERAS, safe_mode=True)
    metrics = {}
    for split in ("val", "test"):
        if manifest["n_records"].get("seg", {}).get(split):
            ds = make_dataset(records_dir, split, "seg", False, config, batch_size=sc.batch_size)
            n_batches = -(-count_records(records_dir, "seg", split) // sc.batch_size)
            metrics[split] = final.evaluate(ds, steps=n_batches, return_dict=True, verbose=0)
    save_config(config, work / "segmenter_config.yaml")
    entry = {
        "image_size": sc.image_size,
        "backbone": sc.backbone,
        "fingerprint": fingerprint,
        "records_fingerprint": manifest["fingerprint"],
        "precision": policy,
        "replicas": replicas,
        "metrics": {k: {m: float(v) for m, v in d.items()} for k, d in metrics.items()},
        "epochs_run": len(read_history(work, "segmenter")),
        "config": to_plain(sc),
        "records": to_plain(config.records),
        "crops": to_plain(config.crops),
    }
    return publish_run(work, models_dir, "segmenter", entry, final,
                       [C.SEGMENTER_KERAS, C.SEGMENTER_DIR, "segmenter_history.csv", "segmenter_config.yaml"], scratch)


THRESHOLD_GROUP_COLUMNS = {"skin_tone": C.COL_SKIN_TONE_NAME, "source": C.COL_SOURCE}


def check_threshold_groups(cc: ClassifierConfig) -> None:
    unknown = [g for g in cc.threshold_groups if g not in THRESHOLD_GROUP_COLUMNS]
    if unknown or not cc.threshold_groups:
        raise ConfigError(f"classifier.threshold_groups must be a non-empty list of {sorted(THRESHOLD_GROUP_COLUMNS)}, "
                          f"got {list(cc.threshold_groups)}")


def threshold_group_labels(table: Any, names: Sequence[str]) -> np.ndarray:
    """One group label per row of a scored table: its values of ``names`` joined by "/" (e.g. ``ham10000/light``)."""
    labels = None
    for name in names:
        values = table[THRESHOLD_GROUP_COLUMNS[name]].astype(str)
        labels = values if labels is None else labels + "/" + values
    return labels.to_numpy()


def _threshold_choice(cc: ClassifierConfig, targets: Any, scores: Any, groups: Any) -> dict[str, Any]:
    """``choose_threshold`` with the profile's method, recall floor and target sensitivity."""
    from kmel.evaluation.fairness import choose_threshold

    return choose_threshold(targets, scores, method=cc.threshold_method, groups=groups,
                            min_group_recall=cc.min_group_recall, target_sensitivity=cc.target_sensitivity)


def choose_classifier_threshold(cc: ClassifierConfig, table: Any) -> dict[str, Any]:
    """The threshold ``fit_classifier`` exports, chosen on a scored validation table (``target``, calibrated
    ``probability``, ``skin_tone_name``, ``source``) by the profile's method over ``threshold_groups``."""
    return _threshold_choice(cc, table["target"].to_numpy(), table["probability"].to_numpy(),
                             threshold_group_labels(table, cc.threshold_groups))


# A source needs this many malignant and as many benign validation images for a threshold of its own.
MIN_SOURCE_CASES = 10


def choose_source_thresholds(cc: ClassifierConfig, table: Any) -> dict[str, dict[str, Any]]:
    """One threshold per source (archive or clinic) of a scored validation table, each chosen on that source's
    rows alone by the profile's rule (its threshold groups other than the source itself): what ``predict --source``
    uses, so that a clinic whose images score lower than the others' still gets the sensitivity the rule aims at.
    Sources with fewer than :data:`MIN_SOURCE_CASES` malignant or benign rows get none (the global one applies)."""
    groups = tuple(g for g in cc.threshold_groups if g != "source") or ("skin_tone",)
    rule = replace(cc, threshold_groups=groups)
    out: dict[str, dict[str, Any]] = {}
    for source, part in table.groupby(C.COL_SOURCE, sort=True):
        positives = int((part["target"] == 1).sum())
        if positives < MIN_SOURCE_CASES or len(part) - positives < MIN_SOURCE_CASES:
            continue
        choice = choose_classifier_threshold(rule, part)
        out[str(source)] = {"threshold": float(choice["threshold"]), "n": int(len(part)), "n_malignant": positives,
                            "val_sensitivity": choice["recall"], "val_specificity": choice["specificity"],
                            "floor_met": choice["floor_met"]}
    return out


def _chosen_threshold(cc: ClassifierConfig, targets: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    """The profile's rule over the given groups (the per-epoch skin-tone recall log of GroupRecallLogger)."""
    return float(_threshold_choice(cc, targets, scores, groups)["threshold"])


def _fit_classifier_member(
    config: Config, name: str, crops_dir: Path, work: Path, logdir: Path, strat: tf.distribute.Strategy,
    head: Any, verbose: int | str,
) -> tuple[keras.Model, Path]:
    """Fit one classifier (an ensemble's member ``name``: its own backup, history, best weights and TensorBoard
    folder in the run folder ``work``). Returns the model after its last epoch and its best epoch's weights file."""
    from kmel.models.classifier import build_classifier, set_trainable_blocks
    from kmel.training.losses import make_classifier_loss
    from kmel.training.metrics import make_classifier_metrics
    from kmel.training.optimizers import make_classifier_optimizer

    cc = config.classifier
    batch = cc.batch_size * strat.num_replicas_in_sync
    train_ds = make_dataset(crops_dir, "train", "crop", True, config, batch_size=batch)
    train_ds = shard_for_workers(train_ds, strat, len(shard_paths(crops_dir, "crop", "train")))
    val_ds, val_steps = _val_data(crops_dir, "crop", config, batch, strat)
    steps = steps_per_epoch(crops_dir, "crop", "train", batch, cc.steps_per_epoch)

    # Pretrained BatchNorm statistics stay frozen; from scratch they must be learned.
    freeze_bn = cc.weights not in ("none", "", None)
    with strat.scope():
        model = build_classifier(cc, head.n_outputs)
        # Pretrained layers learn at backbone_lr_scale × the head's rate (kmel/training/optimizers.py says why).
        optimizer = make_classifier_optimizer(cc, steps * cc.epochs)
        optimizer.build(model.trainable_variables)
        set_trainable_blocks(model, stage_for_epoch(cc.unfreeze, 0), freeze_bn)
        model.compile(
            optimizer=optimizer,
            loss=make_classifier_loss(cc, head.n_outputs),
            metrics=make_classifier_metrics(head),
            jit_compile=jit_compile_setting(),
        )
    val_meta = make_dataset(crops_dir, "val", "crop", False, config, batch_size=batch, with_groups=True)
    v_images, v_targets, v_groups = take_numpy(val_meta, 256)
    extra: list[keras.callbacks.Callback] = []
    if not freeze_bn:  # from scratch: BatchNorm statistics recomputed before each validation
        n_bn = max(1, min(8, 128 // cc.batch_size))
        bn_source = make_dataset(crops_dir, "train", "crop", True, config, batch_size=cc.batch_size)
        extra.append(PreciseBatchNorm([images for images, _ in bn_source.take(n_bn).as_numpy_iterator()]))
    callbacks, best = _callbacks(
        name, work, logdir, cc.early_stopping_patience,
        [StagedUnfreezing(cc.unfreeze, functools.partial(set_trainable_blocks, freeze_batchnorm=freeze_bn)),
         *extra, GroupRecallLogger(str(logdir / name / "groups"), v_images, head.malignant_target(v_targets),
                                   v_groups, choose=functools.partial(_chosen_threshold, cc),
                                   score=head.malignant_probability, classes=head.classes, true_class=v_targets)],
        # Ranking, not loss: training is resampled (more malignant than in val), so the val loss
        # mostly measures the calibration shift and favours the earliest, most timid epoch.
        monitor="val_auc", mode="max",
    )
    model.fit(train_ds, epochs=cc.epochs, steps_per_epoch=steps, validation_data=val_ds,
              validation_steps=val_steps, callbacks=callbacks, verbose=verbose,
              shuffle=False)  # the tf.data pipeline shuffles
    return model, best


def _fit_ensemble_members(
    config: Config, crops_dir: Path, work: Path, logdir: Path, strat: tf.distribute.Strategy, head: Any,
    verbose: int | str,
) -> list[keras.Model]:
    """Fit (or, in a resumed run, reuse) the K members of ``train cls --ensemble K``: member k has seed
    ``seed + k`` (its weights' start, the order of the draws and the augmentation), its own history
    (``classifier_history.csv`` for the first, ``classifier_m<k>_history.csv`` after) and is kept in the run folder
    as ``member-<k>.keras`` once finished, so a killed run resumes at the member and epoch it had reached."""
    cc = config.classifier
    members = []
    for k in range(cc.ensemble):
        path = work / f"{ENSEMBLE_MEMBER}{k}.keras"
        if not path.exists():
            name = "classifier" if k == 0 else f"classifier_m{k}"
            print(f"ensemble member {k + 1} of {cc.ensemble} (seed {cc.seed + k})")
            keras.utils.set_random_seed(cc.seed + k)
            member_config = replace(config, classifier=replace(cc, seed=cc.seed + k))
            model, best = _fit_classifier_member(member_config, name, crops_dir, work, logdir, strat, head, verbose)
            if best.exists():
                model.load_weights(str(best))
            model.save(str(work / f".{path.name}.tmp.keras"))
            (work / f".{path.name}.tmp.keras").replace(path)
            del model
            gc.collect()
        members.append(keras.saving.load_model(path, safe_mode=True, compile=False))
    return members


def fit_classifier(
    records_dir: str | Path,
    models_dir: str | Path,
    config: Config,
    logdir: str | Path = "runs",
    strategy: str = "auto",
    precision: str = "auto",
    verbose: int | str = "auto",
    progress: bool = True,
    restart: bool = False,
) -> dict[str, Any]:
    """Train the classifier on crop records (built first if missing or stale); threshold on val,
    report on test; export ``models_dir/classifier``. Returns its pipeline entry.

    The run works in ``models_dir/.run-classifier`` and replaces the previous classifier, its history
    and report only when it is complete (:mod:`kmel.training.run_folder`); ``restart`` drops an
    interrupted run instead of resuming it."""
    from kmel.lesion.crops import ensure_crop_records
    from kmel.models.classifier import (
        build_ensemble,
        classifier_last_conv,
        ensemble_last_convs,
    )
    from kmel.models.heads import head_from_manifest

    records_dir, models_dir, logdir = Path(records_dir), Path(models_dir), Path(logdir)
    cc = config.classifier
    check_threshold_groups(cc)
    # Several workers must not build the same crop records at once: multi-worker runs need them built first.
    crops_dir = ensure_crop_records(records_dir, models_dir, config, progress=progress,
                                    build=not multiworker_requested(strategy))
    keras.utils.set_random_seed(cc.seed)
    policy = set_precision(precision)
    strat = make_strategy(strategy)
    models_dir, logdir, scratch = _worker_dirs(strat, models_dir, logdir)
    replicas = strat.num_replicas_in_sync
    manifest = load_manifest(crops_dir)
    # One sigmoid output, or a softmax over the diagnosis classes: the labels' meaning is the image records'
    # (build-records wrote it; crop records made before the diagnosis task do not say it).
    head = head_from_manifest(load_manifest(records_dir))
    if head.multiclass:  # the class prior the sampler draws under: the diagnosis divides by it (ClassifierHead.decide)
        shares = class_draw_shares(manifest, "train", config)
        head = replace(head, class_draw_share=tuple(shares.get(i, 0.0) for i in range(head.n_outputs)))
    work = start_run(models_dir, "classifier", _run_settings("classifier", cc, manifest, policy), restart)
    print(balance_table(manifest, config))
    if cc.ensemble == 1:
        model, best = _fit_classifier_member(config, "classifier", crops_dir, work, logdir, strat, head, verbose)
        fingerprint = _finish_model(model, best, work, C.CLASSIFIER_KERAS, C.CLASSIFIER_DIR, cc.image_size,
                                    classifier_last_conv(cc.backbone))
    else:
        members = _fit_ensemble_members(config, crops_dir, work, logdir, strat, head, verbose)
        fingerprint = _finish_model(build_ensemble(members), None, work, C.CLASSIFIER_KERAS, C.CLASSIFIER_DIR,
                                    cc.image_size, ensemble_last_convs(cc.backbone, cc.ensemble))
        del members

    # Inference only: no optimizer state (staged unfreezing changes its variable count; Keras warns).
    final = keras.saving.load_model(work / C.CLASSIFIER_KERAS, safe_mode=True, compile=False)
    has_test = bool(manifest["n_records"]["crop"].get("test"))
    decision = calibrate_and_report(final, crops_dir, "crop", config, head, work / "report", has_test)
    save_config(config, work / "classifier_config.yaml")
    entry = {
        "image_size": cc.image_size,
        "backbone": cc.backbone,
        **head.to_entry(),  # task, class names (a diagnosis head's malignant classes and training draw shares)
        # threshold, its choice and split, threshold_by_source, temperature, calibration, report_split, metrics
        **decision,
        "fingerprint": fingerprint,
        "crops_dir": crops_dir.name,
        "segmenter_fingerprint": manifest.get("segmenter_fingerprint"),
        "crops": to_plain(config.crops),  # what its crops were made with: predict prepares images the same way
        "records_fingerprint": manifest["fingerprint"],
        "precision": policy,
        "replicas": replicas,
        "epochs_run": len(read_history(work, "classifier")),
        # train cls --ensemble K: K members averaged in one model; each member's seed, epochs and best val AUC
        "ensemble": cc.ensemble,
        "members": [_member_summary(work, k, cc.seed + k) for k in range(cc.ensemble)] if cc.ensemble > 1 else [],
        "config": to_plain(cc),
        "skin_tone": skin_tone_entry(),
    }
    return publish_run(work, models_dir, "classifier", entry, final,
                       [C.CLASSIFIER_KERAS, C.CLASSIFIER_DIR, "classifier_history.csv",
                        *(f"classifier_m{k}_history.csv" for k in range(1, cc.ensemble)), "classifier_config.yaml",
                        "report"], scratch)


def calibrate_and_report(
    model: Any, data_dir: Path, kind: str, config: Config, head: Any, report_dir: Path, has_test: bool,
) -> dict[str, Any]:
    """After training: a temperature and the decision threshold fitted on val (the global one and one per source),
    the report written for test (or val when there is no test split). Returns those pipeline entry fields.
    ``kind``: what ``data_dir`` holds and the model reads, ``crop`` records or ``joint`` (whole images)."""
    from kmel.evaluation.calibration import (
        expected_calibration_error,
        fit_class_temperature,
        fit_temperature,
    )
    from kmel.evaluation.evaluate import predict_records, write_split_report
    from kmel.models.pipeline import calibrate_outputs

    cc = config.classifier
    # Threshold on validation; report on test, so the reported numbers are not tuned on their own data.
    threshold_split = "val"
    val = predict_records(model, data_dir, threshold_split, config, cc.batch_size, head=head, kind=kind)
    # One temperature fitted on val (a diagnosis head's: of its classes); the threshold is chosen on the
    # calibrated scale that predict reports.
    if head.multiclass:
        outputs = val[head.class_columns].to_numpy()
        temperature = fit_class_temperature(val["true_class"].to_numpy(), outputs)
    else:
        outputs = val["probability"].to_numpy()
        temperature = fit_temperature(val["target"].to_numpy(), outputs)
    _, calibrated = calibrate_outputs(head, outputs, temperature)
    calibration = {"temperature": temperature, "fitted_on": threshold_split, "val_ece_before": expected_calibration_error(
        val["target"].to_numpy(), val["probability"].to_numpy()),
        "val_ece_after": expected_calibration_error(val["target"].to_numpy(), calibrated)}
    scored = val.assign(probability=calibrated)
    choice = choose_classifier_threshold(cc, scored)
    report_split = "test" if has_test else "val"
    report = write_split_report(model, data_dir, report_split, config, cc.batch_size, choice["threshold"], report_dir,
                                meta={"threshold_from": threshold_split, "threshold_split": threshold_split,
                                      "threshold_choice": choice},
                                temperature=temperature, head=head, kind=kind)
    return {
        "threshold": float(choice["threshold"]),
        "threshold_choice": choice,
        "threshold_from": threshold_split,
        # predict --source NAME: the same rule on that source's validation images alone
        "threshold_by_source": choose_source_thresholds(cc, scored),
        "temperature": temperature,
        "calibration": calibration,
        "report_split": report_split,
        "metrics": report.get("summary", {}),
    }


def _member_summary(work: Path, k: int, seed: int) -> dict[str, Any]:
    history = read_history(work, "classifier" if k == 0 else f"classifier_m{k}")
    aucs = [row.get("val_auc") for row in history if row.get("val_auc") is not None]
    return {"member": k, "seed": seed, "epochs_run": len(history), "best_val_auc": max(aucs) if aucs else None}


def balance_table(manifest: dict[str, Any], config: Config) -> str:
    """Before/after composition of one training epoch by (class, skin tone)."""
    from kmel.data.datasets import classifier_balance_weights, group_counts
    from kmel.models.heads import head_from_manifest

    counts = group_counts(manifest, "train")
    weights = classifier_balance_weights(manifest, "train", config)
    head = head_from_manifest(manifest)
    names = head.class_names
    total = sum(counts.values()) or 1
    lines = ["training composition per epoch (natural -> balanced):"]
    for t in sorted({t for t, _ in counts}):
        for g, name in enumerate(C.SKIN_TONE_GROUPS):
            n = counts.get((t, g), 0)
            if n:
                lines.append(f"  {names[t]:9s} {name:10s} {100 * n / total:5.1f}% -> {100 * weights[(t, g)]:5.1f}%  (n={n})")
    malignant = set(head.malignant_index) if head.multiclass else {1}
    mal = sum(n for (t, _), n in counts.items() if t in malignant) / total
    drawn = sum(w for (t, _), w in weights.items() if t in malignant)
    lines.append(f"  malignant overall {100 * mal:.1f}% -> {100 * drawn:.1f}%")
    if config.classifier.source_balance > 0:
        from kmel.data.datasets import source_counts, split_by_source

        by_source = source_counts(manifest, "train")
        shares = split_by_source(weights, by_source, config.classifier.source_balance)
        for source in sorted({s for s, _, _ in by_source}):
            n = sum(v for (s, _, _), v in by_source.items() if s == source)
            w = sum(v for (s, _, _), v in shares.items() if s == source)
            lines.append(f"  source {source:20s} {100 * n / total:5.1f}% -> {100 * w:5.1f}%")
    return "\n".join(lines)


def clear_training_state(models_dir: str | Path, name: str) -> None:
    """Remove an interrupted run's folder (backup, history, best weights) so the next run starts fresh."""
    shutil.rmtree(run_folder(models_dir, name), ignore_errors=True)

