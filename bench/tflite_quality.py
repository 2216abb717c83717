"""What TFLite precision costs in skill: `predict` on the real test split with each runtime.

usage: python bench/tflite_quality.py --models DIR --records DIR [--precisions float32,float16,int8]

``--models``: trained models (e.g. ``bench/out/cls-pretrained-r4/models``) — the TFLite files are
exported into a copy (``bench/out/tflite-quality/models``) so the original stays as it was;
``--records``: the records they were trained on (``bench/out/seg-lite0/records``). Each runtime
predicts the records' test images from their files (the same command a user runs) and is scored
against the records' labels: AUC, sensitivity / specificity at ``pipeline.json``'s threshold, and how
many decisions differ from the SavedModel's. Prints a table and writes ``result.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from _common import OUT, Timer, require_shared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", required=True)
    parser.add_argument("--records", required=True)
    parser.add_argument("--precisions", default="float32,float16,int8")
    parser.add_argument("--out", default=str(OUT / "tflite-quality"))
    args = parser.parse_args()
    require_shared()
    from sklearn.metrics import roc_auc_score

    from kmel.serving.litert import export_tflite
    from kmel.serving.runner import predict_files
    from kmel.serving.runtime import tflite_status

    out = Path(args.out)
    models = out / "models"
    if not models.exists():
        shutil.copytree(args.models, models, ignore=shutil.ignore_patterns("report", "*.keras"))
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    missing = [p for p in precisions if tflite_status(models, p) != "ok"]
    if missing:
        with Timer() as t:
            export_tflite(models, args.records, missing, n_parity=32, progress=False)
        print(f"exported {', '.join(missing)} in {t.seconds:.0f} s")
    meta = pd.read_csv(Path(args.records) / "metadata.csv")
    test = meta[meta["split"] == "test"]
    folder = out / "test-images"
    folder.mkdir(parents=True, exist_ok=True)
    for path in test["image_path"]:
        link = folder / Path(path).name
        if not link.exists():
            link.symlink_to(Path(path).resolve())
    truth = dict(zip((Path(p).stem for p in test["image_path"]), test["target"].astype(int)))
    pipeline = json.loads((models / "pipeline.json").read_text())
    results, reference = {}, None
    print(f"{len(test)} test images, {sum(truth.values())} malignant; threshold {pipeline['classifier']['threshold']:.3f}")
    print(f"{'runtime':16s} {'AUC':>6s} {'sens':>6s} {'spec':>6s} {'decisions ≠ tf':>15s} {'max |Δp| vs tf':>15s} {'img/s':>6s}")
    for runtime in ["tf"] + [f"tflite-{p}" for p in precisions]:
        csv = out / f"{runtime}.csv"
        csv.unlink(missing_ok=True)
        tflite = runtime.startswith("tflite")
        summary = predict_files([folder], csv, models, progress=False, runtime="tflite" if tflite else "tf",
                                tflite_precision=runtime.split("-", 1)[1] if tflite else "float32")
        rows = pd.read_csv(csv)
        rows = rows[rows["status"] == "ok"].set_index("image").sort_index()
        y = np.array([truth[i] for i in rows.index])
        p, d = rows["probability"].to_numpy(), rows["prediction"].to_numpy()
        if reference is None:
            reference = rows
        r = {"auc": float(roc_auc_score(y, p)), "sensitivity": float(d[y == 1].mean()),
             "specificity": float(1 - d[y == 0].mean()),
             "decisions_differing_from_tf": int((d != reference["prediction"].to_numpy()).sum()),
             "max_abs_probability_diff_from_tf": float(np.abs(p - reference["probability"].to_numpy()).max()),
             "images_per_s": summary.images_per_second, "n": int(len(rows))}
        results[runtime] = r
        print(f"{runtime:16s} {r['auc']:6.3f} {r['sensitivity']:6.3f} {r['specificity']:6.3f} "
              f"{r['decisions_differing_from_tf']:15d} {r['max_abs_probability_diff_from_tf']:15.4f} "
              f"{r['images_per_s']:6.1f}")
    results["tflite"] = json.loads((models / "pipeline.json").read_text()).get("tflite", {})
    (out / "result.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
