"""An ensemble classifier (``train cls --ensemble K``) read closely: each member's test AUC beside the average's,
and what the ensemble costs at inference.

    python bench/ensemble_check.py --cls bench/out/cls-union-ens2 --seg bench/out/seg-union

Members are read out of the exported ``classifier.keras`` (the ``m<k>_probability`` layers), so they are exactly
the members the average was made of; the test crops are the ones the run trained on (checked by fingerprint).
Cost: forward time per image of the ensemble SavedModel against one member's graph, batch 32 on random crops
(median of 5 runs after a warm-up), and the files' sizes. Writes OUT/result.json (default bench/out/ensemble-check).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from _common import OUT, crops_trained_on


def main() -> None:
    import keras
    import tensorflow as tf
    from sklearn.metrics import roc_auc_score

    from kmel import constants as C
    from kmel.data.datasets import decode_image, make_record_dataset
    from kmel.data.records import load_manifest, shard_paths
    from kmel.models.heads import head_from_entry
    from kmel.models.pipeline import load_serving, read_pipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cls", type=Path, required=True, help="a bench/cls_quality.py run with --ensemble K")
    parser.add_argument("--seg", type=Path, default=OUT / "seg-union")
    parser.add_argument("--out", type=Path, default=OUT / "ensemble-check")
    args = parser.parse_args()
    models = args.cls / "models"
    entry = read_pipeline(models)["classifier"]
    k = int(entry.get("ensemble", 1))
    if k < 2:
        raise SystemExit(f"{models} holds one classifier, not an ensemble")
    crops = crops_trained_on(args.seg / "records", entry["records_fingerprint"])
    ensemble = keras.saving.load_model(models / C.CLASSIFIER_KERAS, safe_mode=True, compile=False)
    head = head_from_entry(entry)
    outputs = [ensemble.get_layer(f"m{i}_probability").output for i in range(k)]
    every = keras.Model(ensemble.inputs, [*outputs, ensemble.outputs[0]])  # each member's output and the mean
    scores, targets, sources = [], [], []
    manifest = load_manifest(crops)
    size = int(entry["image_size"])
    ds = make_record_dataset(shard_paths(crops, "crop", "test", manifest), training=False, seed=0).map(
        lambda r: (decode_image(r, size), r[C.F_TARGET], r[C.F_SOURCE]), num_parallel_calls=tf.data.AUTOTUNE,
    ).batch(64).prefetch(2)
    for images, target, source in ds:
        scores.append(np.concatenate([np.asarray(o).reshape(len(target), -1)[:, :1]
                                      for o in every.predict_on_batch(images)], axis=1))
        targets.append(head.malignant_target(target.numpy()))
        sources.append([s_.decode() for s_ in source.numpy()])
        print(f"  scored {sum(map(len, targets))} test crops", flush=True)
    raw, y_all, src = np.concatenate(scores), np.concatenate(targets), np.concatenate(sources)
    result = {"command": f"python bench/ensemble_check.py --cls {args.cls} --seg {args.seg}", "members": k,
              "test_auc": {}}
    names = [f"member {i} (seed {m['seed']})" for i, m in enumerate(entry["members"])] + ["ensemble"]
    for source in ("isic2019", "ham10000", None):
        rows = np.ones(len(y_all), bool) if source is None else src == source
        result["test_auc"][source or "all"] = {
            name: round(float(roc_auc_score(y_all[rows], raw[rows, j])), 4) for j, name in enumerate(names)}
        print(source or "all", result["test_auc"][source or "all"])

    served = load_serving(models / C.CLASSIFIER_DIR)
    batch = tf.constant(np.random.default_rng(0).uniform(0, 255, (32, size, size, 3)).astype(np.float32))
    member = tf.function(keras.Model(ensemble.inputs, outputs[0]))
    timing = {}
    for name, fn in (("ensemble SavedModel", lambda: served.serve(batch)), ("one member", lambda: member(batch))):
        fn()
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - start)
        timing[name] = round(1000 * statistics.median(runs) / 32, 2)
    result["forward_ms_per_image_batch32"] = timing
    result["saved_model_mib"] = round(sum(p.stat().st_size for p in (models / C.CLASSIFIER_DIR).rglob("*")
                                          if p.is_file()) / 2**20, 1)
    result["head"] = head.task
    print(json.dumps({k_: v for k_, v in result.items() if k_ != "test_auc"}, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'result.json'}")


if __name__ == "__main__":
    main()
