"""``train joint``: the segmenter and a new classifier trained end to end as one model (kmel/models/joint.py).

The trained segmenter of the models folder is the mask's start; the classifier is built from the profile's
classifier section (backbone, weights, head, schedule, balancing, threshold rule). For
``joint.segmenter_warmup_epochs`` the segmenter is frozen while the classifier learns on the gated images, then
both train, the segmenter's layers at ``classifier.backbone_lr_scale`` of the peak rate (its BatchNorm statistics
stay frozen: they were learned on the masks). The loss is the classifier's on every labelled image plus
``joint.mask_loss_weight`` × the segmenter's Tversky loss on the images that have an expert mask.

The joint model takes the classifier's place in the models folder (``classifier.keras``, the ``classifier``
SavedModel, whose ``serve`` returns ``probability`` and ``mask``; pipeline.json's classifier entry says
``"kind": "joint"``): calibration, threshold (global and per source), report, ``predict``, ``serve`` and
``evaluate`` use it with the crop stage skipped. The run is resumable like ``train cls`` (``.run-classifier``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np

from kmel import constants as C
from kmel.config import Config, ConfigError, save_config, to_plain
from kmel.data.datasets import count_joint_records, make_joint_dataset
from kmel.data.records import load_manifest, shard_paths
from kmel.models.pipeline import read_pipeline
from kmel.training.callbacks import PreciseBatchNorm, StagedUnfreezing, stage_for_epoch
from kmel.training.distribute import (
    jit_compile_setting,
    make_strategy,
    set_precision,
    shard_for_workers,
)
from kmel.training.run_folder import read_history, start_run
from kmel.training.train import (
    _callbacks,
    _finish_model,
    _run_settings,
    _worker_dirs,
    calibrate_and_report,
    check_threshold_groups,
    publish_run,
    skin_tone_entry,
)

KIND = "joint"
_SEG_FROZEN, _SEG_TRAINS = "segmenter frozen", "segmenter trains"


def joint_schedule(unfreeze: tuple[tuple[int, str], ...], warmup: int) -> tuple[tuple[int, str], ...]:
    """The classifier's unfreezing schedule merged with the segmenter's warm-up: one stage name per change,
    ``"<classifier stage>/<segmenter frozen|trains>"``, for :class:`StagedUnfreezing`."""
    starts = sorted({0, *(int(e) for e, _ in unfreeze), int(warmup)})
    return tuple((e, f"{stage_for_epoch(unfreeze, e)}/{_SEG_TRAINS if e >= warmup else _SEG_FROZEN}") for e in starts)


def set_joint_stage(model: keras.Model, stage: str, freeze_batchnorm: bool) -> None:
    """Apply a :func:`joint_schedule` stage: the classifier's blocks by its stage, the segmenter all or nothing
    (its BatchNorm always frozen)."""
    from kmel.models.classifier import set_trainable_blocks
    from kmel.models.joint import joint_parts

    classifier_stage, _, segmenter_state = stage.partition("/")
    segmenter, classifier = joint_parts(model)
    set_trainable_blocks(classifier, classifier_stage, freeze_batchnorm)
    trains = segmenter_state == _SEG_TRAINS
    for layer in segmenter.layers:
        layer.trainable = trains and not isinstance(layer, keras.layers.BatchNormalization)


def mask_quality(model: keras.Model, records_dir: Path, split: str, config: Config) -> dict[str, Any]:
    """Thresholded Jaccard, mean Jaccard and Dice of the joint model's mask on the images of ``split`` that have an
    expert mask (at the joint input size): whether the mask is still a lesion mask after the joint training."""
    from kmel.training.losses import DiceCoefficient, IoUScore, ThresholdedJaccard

    metrics = {"iou": IoUScore(), "thresholded_jaccard": ThresholdedJaccard(), "dice": DiceCoefficient()}
    n = 0
    for images, targets in make_joint_dataset(records_dir, split, False, config).as_numpy_iterator():
        masks = targets[C.JOINT_MASK]
        known = masks.reshape(len(masks), -1).min(axis=1) >= 0
        if not known.any():
            continue
        predicted = np.asarray(model.predict_on_batch(images[known])[C.JOINT_MASK])
        for metric in metrics.values():
            metric.update_state(masks[known], predicted)
        n += int(known.sum())
    return {"images": n, **({k: round(float(m.result()), 4) for k, m in metrics.items()} if n else {})}


def fit_joint(
    records_dir: str | Path,
    models_dir: str | Path,
    config: Config,
    logdir: str | Path = "runs",
    strategy: str = "auto",
    precision: str = "auto",
    verbose: int | str = "auto",
    restart: bool = False,
) -> dict[str, Any]:
    """Train the joint segmenter + classifier on ``records_dir``'s whole images, starting from the segmenter exported
    in ``models_dir``; threshold on val, report on test, export in the classifier's place. Returns its pipeline
    entry."""
    from kmel.models.classifier import build_classifier
    from kmel.models.heads import head_from_manifest
    from kmel.models.joint import build_joint, probability_model
    from kmel.training.losses import MaskedTverskyLoss, make_classifier_loss
    from kmel.training.metrics import make_classifier_metrics
    from kmel.training.optimizers import make_classifier_optimizer

    records_dir, models_dir, logdir = Path(records_dir), Path(models_dir), Path(logdir)
    cc, jc, sc = config.classifier, config.joint, config.segmenter
    check_threshold_groups(cc)
    segmenter_entry = read_pipeline(models_dir).get("segmenter")
    segmenter_file = models_dir / C.SEGMENTER_KERAS
    if not segmenter_entry or not segmenter_file.is_file():
        raise FileNotFoundError(f"{models_dir} has no trained segmenter ({C.SEGMENTER_KERAS} and pipeline.json's "
                                f"segmenter): run `kmel train seg --out {models_dir}` first; train joint starts from it")
    if cc.ensemble > 1:
        raise ConfigError("train joint trains one model: classifier.ensemble must be 1")
    manifest = load_manifest(records_dir)
    head = head_from_manifest(manifest)
    if head.multiclass:
        raise ConfigError("train joint is built for the yes/no tasks (records built with --task malignant, melanoma "
                          "or keratosis); for --task diagnosis use train seg + train cls")
    keras.utils.set_random_seed(cc.seed)
    policy = set_precision(precision)
    strat = make_strategy(strategy)
    models_dir, logdir, scratch = _worker_dirs(strat, models_dir, logdir)
    replicas = strat.num_replicas_in_sync
    batch = cc.batch_size * replicas
    train_ds = make_joint_dataset(records_dir, "train", True, config, batch)
    train_ds = shard_for_workers(train_ds, strat, len(shard_paths(records_dir, "seg", "train", manifest)) or 1)
    n_train, n_val = count_joint_records(records_dir, "train", config), count_joint_records(records_dir, "val", config)
    if not n_train or not n_val:
        raise ConfigError(f"{records_dir} has {n_train} labelled train and {n_val} val images: train joint needs both")
    steps = cc.steps_per_epoch or max(1, n_train // batch)
    val_batch = replicas * max(1, min(batch // replicas, n_val // replicas)) if replicas > 1 else batch
    val_ds = make_joint_dataset(records_dir, "val", False, config, val_batch)
    val_steps = n_val // val_batch if replicas > 1 else -(-n_val // val_batch)
    if replicas > 1:
        val_ds = val_ds.repeat()  # as train.py's _val_data: Keras takes a build batch from the previous iterator
    settings = {**_run_settings("classifier", cc, manifest, policy), **{f"joint.{k}": v for k, v in to_plain(jc).items()},
                "segmenter_start": segmenter_entry.get("fingerprint"), "kind": KIND}
    work = start_run(models_dir, "classifier", settings, restart)
    freeze_bn = cc.weights not in ("none", "", None)
    schedule = joint_schedule(cc.unfreeze, jc.segmenter_warmup_epochs)

    with strat.scope():
        segmenter = keras.saving.load_model(segmenter_file, safe_mode=True, compile=False)
        model = build_joint(segmenter, build_classifier(cc, 1), jc.alpha)
        # the segmenter's layers, like the classifier's pretrained ones, at backbone_lr_scale × the head's rate
        optimizer = make_classifier_optimizer(cc, steps * cc.epochs)
        optimizer.build(model.trainable_variables)
        set_joint_stage(model, schedule[0][1], freeze_bn)
        model.compile(
            optimizer=optimizer,
            loss={C.JOINT_PROBABILITY: make_classifier_loss(cc, 1),
                  C.JOINT_MASK: MaskedTverskyLoss(alpha=sc.tversky_alpha, beta=sc.tversky_beta)},
            loss_weights={C.JOINT_PROBABILITY: 1.0, C.JOINT_MASK: jc.mask_loss_weight},
            metrics={C.JOINT_PROBABILITY: make_classifier_metrics(head)},
            jit_compile=jit_compile_setting(),
        )
    extra: list[keras.callbacks.Callback] = []
    if not freeze_bn:  # from scratch: the classifier's BatchNorm statistics recomputed before each validation
        bn_batches = [images for images, _ in train_ds.take(max(1, min(8, 128 // cc.batch_size))).as_numpy_iterator()]
        extra.append(PreciseBatchNorm(bn_batches))
    callbacks, best = _callbacks(
        "classifier", work, logdir, cc.early_stopping_patience,
        [StagedUnfreezing(schedule, lambda m, stage: set_joint_stage(m, stage, freeze_bn)), *extra],
        monitor=f"val_{C.JOINT_PROBABILITY}_auc", mode="max",
    )
    model.fit(train_ds, epochs=cc.epochs, steps_per_epoch=steps, validation_data=val_ds, validation_steps=val_steps,
              callbacks=callbacks, verbose=verbose, shuffle=False)
    fingerprint = _finish_model(model, best, work, C.CLASSIFIER_KERAS, C.CLASSIFIER_DIR, cc.image_size)

    final = keras.saving.load_model(work / C.CLASSIFIER_KERAS, safe_mode=True, compile=False)
    has_test = bool(count_joint_records(records_dir, "test", config))
    decision = calibrate_and_report(probability_model(final), records_dir, KIND, config, head, work / "report", has_test)
    masks = {split: mask_quality(final, records_dir, split, config) for split in ("val", "test")
             if split == "val" or has_test}
    save_config(config, work / "classifier_config.yaml")
    entry = {
        "kind": KIND,
        "image_size": cc.image_size,
        "backbone": cc.backbone,
        **head.to_entry(),
        **decision,
        "fingerprint": fingerprint,
        "crops_dir": None,  # no crops: the whole image, padded square, gated by the model's own mask
        # the segmenter the mask started from (the one beside it in this folder); its fine-tuned copy is inside
        "segmenter_fingerprint": segmenter_entry.get("fingerprint"),
        "joint": to_plain(jc),
        # the records it learned from: predict reduces an image to their image_size before padding it, as they did
        "records": manifest["config"]["records"],
        "mask_metrics": masks,
        "crops": to_plain(config.crops),  # the skin-tone settings predict estimates with
        "records_fingerprint": manifest["fingerprint"],
        "precision": policy,
        "replicas": replicas,
        "epochs_run": len(read_history(work, "classifier")),
        "ensemble": 1,
        "members": [],
        "config": to_plain(cc),
        "skin_tone": skin_tone_entry(),
    }
    return publish_run(work, models_dir, "classifier", entry, final,
                       [C.CLASSIFIER_KERAS, C.CLASSIFIER_DIR, "classifier_history.csv", "classifier_config.yaml",
                        "report"], scratch)
