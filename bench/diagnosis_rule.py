"""Which class does a diagnosis model name? The arg-max of p against kmel's rule, the arg-max of p_c / q_c.

usage: python bench/diagnosis_rule.py [--cls bench/out/cls-union-diag] [--records DIR] [--out bench/out/diagnosis-rule]
                                     [--levers]

Reads a finished diagnosis run of ``bench/cls_quality.py --task diagnosis`` (its models' report/predictions.csv:
the test split's calibrated class probabilities and true classes; nothing is scored again), computes the training
draw shares q_c the way ``train cls`` now records them (:func:`kmel.data.datasets.class_draw_shares` on the run's
crop records and settings; a model trained since commit a028748 carries them in pipeline.json and is read as is),
and reports per source the balanced multiclass accuracy (mean per-class recall, the ISIC 2018 / 2019 metric) and
each class's recall of both rules. Prints them and writes OUT/result.json.

``--levers`` also scores the val and test crops again, as they are and averaged over four flips (what
``predict --tta`` does; the class vectors calibrated with the model's temperature; cached as
OUT/scores-<model fingerprint>-{split}[-flips].csv), and reports the balanced accuracy of the rule arg-max of log p_c - λ log q_c for
λ in LAMBDAS (0: the arg-max of p over the classes drawn in training, 1: kmel's rule), per source, with the λ that maximises it on val.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from _common import OUT, crops_trained_on, per_source

LAMBDAS = (0.0, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


def balanced_accuracy(truth, decided) -> float:
    """Mean recall over the classes present in ``truth``."""
    import numpy as np

    return float(np.mean([(decided[truth == c] == c).mean() for c in np.unique(truth)]))


def levers(args, head, pipeline) -> dict:
    """Balanced accuracy per source of each prior exponent λ, with and without flips; λ chosen on val."""
    import numpy as np
    import pandas as pd
    from union_eval import score_split

    from kmel.serving.runtime import config_from_pipeline

    models = args.cls / "models"
    config = config_from_pipeline(pipeline, models)
    crops = crops_trained_on(args.records or args.cls / "records", pipeline["classifier"]["records_fingerprint"])
    q = np.asarray(head.class_draw_share, dtype=np.float64)
    log_q = np.log(np.where(q > 0, q, 1.0))
    never = np.where(q > 0, 0.0, -np.inf)  # a class never drawn is never named, as kmel's rule does
    result = {}
    for flips in (False, True):
        tables = {}
        for split in ("val", "test"):
            # keyed by the model, so another --cls with the same --out scores again
            cache = args.out / f"scores-{pipeline['classifier']['fingerprint'][:12]}-{split}{'-flips' if flips else ''}.csv"
            if not cache.exists():
                score_split(models, crops, split, config, tta=flips).to_csv(cache, index=False)
            tables[split] = pd.read_csv(cache, low_memory=False)
        rows = {}
        for lam in LAMBDAS:
            rows[lam] = {}
            for split, table in tables.items():
                log_p = np.log(np.maximum(table[head.class_columns].to_numpy(), 1e-12))
                decided = (log_p - lam * log_q + never).argmax(1)
                truth = table["true_class"].to_numpy()
                rows[lam][split] = {"whole": round(balanced_accuracy(truth, decided), 4), **{
                    source: round(balanced_accuracy(truth[index], decided[index]), 4)
                    for source, index in table.groupby("source").indices.items()}}
        best = max(LAMBDAS, key=lambda lam: rows[lam]["val"]["whole"])
        result["flips" if flips else "plain"] = {"by_lambda": {str(k): v for k, v in rows.items()},
                                                 "lambda_chosen_on_val": best, "test_at_chosen": rows[best]["test"]}
        for lam, row in rows.items():
            print(f"{'flips' if flips else 'plain'} λ={lam:<4} val {row['val']}  test {row['test']}"
                  f"{'  <- best on val' if lam == best else ''}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cls", type=Path, default=OUT / "cls-union-diag")
    ap.add_argument("--records", type=Path, default=None, help="its record set [CLS/records]")
    ap.add_argument("--out", type=Path, default=OUT / "diagnosis-rule")
    ap.add_argument("--levers", action="store_true", help="also: test-time flips and the prior exponent λ (rescores)")
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
    if args.levers:
        result["levers"] = levers(args, head, pipeline)
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out / 'result.json'}")


if __name__ == "__main__":
    main()
