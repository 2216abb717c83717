"""Which class does a diagnosis model name? The arg-max of p against kmel's rule, the arg-max of p_c / q_c.

usage: python bench/diagnosis_rule.py [--cls bench/out/cls-union-diag] [--records DIR] [--out bench/out/diagnosis-rule]

Reads a finished diagnosis run of ``bench/cls_quality.py --task diagnosis`` (its models' report/predictions.csv:
the test split's calibrated class probabilities and true classes; nothing is scored again), computes the training
draw shares q_c the way ``train cls`` now records them (:func:`kmel.data.datasets.class_draw_shares` on the run's
crop records and settings; a model trained since commit a028748 carries them in pipeline.json and is read as is),
and reports per source the balanced multiclass accuracy (mean per-class recall, the ISIC 2018 / 2019 metric) and
each class's recall of both rules. Prints them and writes OUT/result.json.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from _common import OUT, per_source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cls", type=Path, default=OUT / "cls-union-diag")
    ap.add_argument("--records", type=Path, default=None, help="its record set [CLS/records]")
    ap.add_argument("--out", type=Path, default=OUT / "diagnosis-rule")
    args = ap.parse_args()
    import pandas as pd

    from kmel.data.datasets import class_draw_shares
    from kmel.data.records import load_manifest
    from kmel.models.heads import head_from_entry
    from kmel.models.pipeline import read_pipeline
    from kmel.serving.runtime import config_from_pipeline

    models = args.cls / "models"
    pipeline = read_pipeline(models)
    entry = pipeline["classifier"]
    head = head_from_entry(entry)
    if head.class_draw_share is None:
        records = args.records or args.cls / "records"
        crops = records / entry["crops_dir"]
        shares = class_draw_shares(load_manifest(crops), "train", config_from_pipeline(pipeline, models))
        head = replace(head, class_draw_share=tuple(shares.get(i, 0.0) for i in range(head.n_outputs)))
        source_of_shares = f"class_draw_shares on {crops} (the model predates recorded shares)"
    else:
        source_of_shares = "pipeline.json"
    table = pd.read_csv(models / "report" / "predictions.csv", low_memory=False)
    table["diagnosis"] = [head.classes[i] for i in head.decide(table[head.class_columns].to_numpy())]
    rows = per_source(table.assign(source="whole"), float(entry["threshold"]))
    rows.update(per_source(table, float(entry["threshold"])))
    result = {"cls": str(args.cls), "shares": dict(zip(head.classes, head.class_draw_share)),
              "shares_from": source_of_shares, "by_source": rows}
    for source, r in rows.items():
        print(f"{source:<10} n={r['n']:<5} balanced accuracy: arg-max p {r['argmax_balanced_multiclass_accuracy']:.4f}"
              f" -> p/q {r['balanced_multiclass_accuracy']:.4f}; recall p/q {r['recall_by_class']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out / 'result.json'}")


if __name__ == "__main__":
    main()
