"""Image + metadata fusion on real images: does the patient's data add to the image model on HAM10000 / ISIC?

usage: python bench/fusion_real.py [--seg bench/out/seg-union] [--cls bench/out/cls-union-sb1]
                                   [--out bench/out/fusion-real] [--bootstrap 500]

Scores the val and test crops of a union benchmark run (bench/seg_quality.py --data union, then
bench/cls_quality.py) with its exported classifier (calibrated, as `predict` does), joins the records' table
(age, sex, anatomic site as published: HAM10000's ``localization``, ISIC 2019's ``anatom_site_general``; lesion
ids but no patient ids, so each image is its own patient and the patient-relative features are flat), fits the
fusion trees on val (kmel/training/fusion.py: cross-fitted, early-stopped, no retraining of the image model) and
reports the test split, overall and per source: AUC and partial AUC above 80 % TPR of the image score alone and
of the fused score, with 95 % intervals from resampling test images (the same resamples for both, so the
difference's interval is paired), and the trees' feature importance (gain).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
from _common import OUT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seg", default=str(OUT / "seg-union"), help="bench/seg_quality.py output (its records)")
    parser.add_argument("--cls", default=str(OUT / "cls-union-sb1"), help="bench/cls_quality.py output")
    parser.add_argument("--out", default=str(OUT / "fusion-real"))
    parser.add_argument("--bootstrap", type=int, default=500)
    args = parser.parse_args()
    from union_eval import score_split

    from kmel import constants as C
    from kmel.evaluation.fusion import compare_scores as compare
    from kmel.lesion.crops import ensure_crop_records
    from kmel.models.fusion import fusion_importance
    from kmel.models.pipeline import read_pipeline
    from kmel.serving.runtime import config_from_pipeline
    from kmel.training.fusion import fit_fusion

    records, models, out = Path(args.seg) / "records", Path(args.cls) / "models", Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipeline = read_pipeline(models)
    config = config_from_pipeline(pipeline, models)
    # The crops this classifier's settings make (built when missing): a crops folder of another run may hold crops
    # made with other settings.
    crops = ensure_crop_records(records, models, config, pipeline=pipeline)
    table = pd.read_csv(records / C.METADATA_CSV, low_memory=False).set_index(C.COL_IMAGE_ID)
    start = time.perf_counter()
    scored = {split: score_split(models, crops, split, config, tta=False) for split in ("val", "test")}
    scoring = time.perf_counter() - start
    rows = {split: table.loc[part[C.COL_IMAGE_ID]].reset_index() for split, part in scored.items()}
    for split, part in scored.items():
        assert (rows[split][C.COL_TARGET].to_numpy() == part["target"].to_numpy()).all(), split

    start = time.perf_counter()
    model = fit_fusion(rows["val"], scored["val"]["probability"].to_numpy(), seed=0)
    fitting = time.perf_counter() - start
    plain = fit_fusion(rows["val"], scored["val"]["probability"].to_numpy(), seed=0, image_offset=False)
    model.save(out)
    test, image = rows["test"], scored["test"]["probability"].to_numpy()
    fused, plain_fused = model.predict(test, image), plain.predict(test, image)
    y = test[C.COL_TARGET].to_numpy().astype(int)
    sources = [(s, (test[C.COL_SOURCE] == s).to_numpy()) for s in sorted(test[C.COL_SOURCE].unique())]
    result = {
        "cls": str(args.cls), "features": list(model.spec.features), "n_trees": model.n_trees,
        "val_out_of_fold": model.metrics, "test": compare(y, image, fused, args.bootstrap),
        "test_by_source": {s: compare(y[m], image[m], fused[m], args.bootstrap) for s, m in sources if m.any()},
        "importance_gain": {k: round(v, 4) for k, v in sorted(fusion_importance(model).items(), key=lambda kv: -kv[1])
                            if v > 0},
        "scoring_seconds": round(scoring, 1), "fit_seconds": round(fitting, 1),
        # the trees started from the base rate, the image logit only a feature (kmel's scheme before 2026-11-29)
        "no_image_offset": {"n_trees": plain.n_trees, "val_out_of_fold": plain.metrics,
                            "test": compare(y, image, plain_fused, args.bootstrap),
                            "test_by_source": {s: compare(y[m], image[m], plain_fused[m], args.bootstrap)
                                               for s, m in sources if m.any()}},
    }
    print(json.dumps(result, indent=2))
    (out / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
