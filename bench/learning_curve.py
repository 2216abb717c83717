"""Learning curve of the union benchmark: test AUC against the number of training images, measured with a
LINEAR PROBE on FROZEN ImageNet features (not the fine-tuned classifier), to tell whether more data or a
better recipe is the lever for the union classifier's aims (issue 23: AUC 0.90 on the ISIC 2018 test split,
0.92 on the HAM10000 test split).

usage: python bench/learning_curve.py [--crops CROPS_DIR] [--out bench/out/learning-curve]
                                      [--sizes 250,500,1000,2000,4000,all] [--isic-sizes 250,500,1000,all]
                                      [--repeats 5] [--fresh]

What it measures and how it is sized:
- Features: kmel's EfficientNet-Lite0 with the ImageNet weights its install brings (``build_classifier`` of the
  ``cpu-10k`` profile, ``weights="imagenet"``), cut at ``head_pool`` (global average pool, 1,280-d), at the
  profile's 224 px; the crops are read with kmel's own record decoding (the same resize as evaluation).
  Inference only, batch 64, once: features, target, source, split and image id are cached in
  ``OUT/features.npz`` (numpy arrays only) and reused by later runs (``--fresh`` re-extracts). A fine-tuning run
  costs ~50 minutes on this machine, so a curve of fine-tuned models is out of reach; a linear probe costs seconds.
- Probe: standardised features, scikit-learn ``LogisticRegression``; C chosen from a small grid by val AUC
  (whole val split) once, on the full train split, then fixed for every subset.
- Union curve: stratified (source x target) random subsets of the train split, n in ``--sizes`` (``all`` = every
  train crop, ~8,583; one fit, it is deterministic), ``--repeats`` seeds per n; test AUC on the ISIC split
  (source isic2019: the ISIC 2018 Task 1 images), the HAM10000 split and the whole test split, mean and sd.
- ISIC-only curve: the same on the ISIC train images only (n in ``--isic-sizes``, all ~1,599), scored on the ISIC
  test split: do the ~7,000 HAM images help the ISIC split at all under a linear probe? A control beside it:
  the union subset of the same n as ISIC-only ``all`` (mostly HAM images), on the ISIC test split.
- Power law AUC(n) = a - b * n^(-c) fitted (scipy ``curve_fit``, bounded) to the union curve's means per test
  split, with the n it predicts for the aims, or the asymptote a when it lies below the aim.
- For reference, the fine-tuned union classifier's test AUC per split from its report's predictions.csv.

Writes OUT/result.json (all numbers, timings, the command), OUT/learning_curve.png and prints a table.
The test crops are checked against the fine-tuned model's predictions.csv (same ids, same targets).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from _common import OUT, Timer

# The union benchmark's crops (bench/cls_quality.py --profile cpu-10k --seg bench/out/seg-union) and a classifier
# trained on them; pass --crops / --predictions for others (the crops' fingerprint is checked against the model's).
CROPS = OUT / "seg-union" / "records" / "crops-98687ea35a439efe-2bd65974"
PREDICTIONS = OUT / "cls-union-sb1" / "models" / "report" / "predictions.csv"
AIMS = {"isic2019": 0.90, "ham10000": 0.92}
SPLIT_NAMES = {"isic2019": "ISIC test", "ham10000": "HAM test", "all": "all test"}
C_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 1.0)


def extract(crops: Path, config, batch_size: int = 64) -> dict[str, np.ndarray]:
    """1,280-d ``head_pool`` features of every crop of train / val / test, with target, source, split, id."""
    from dataclasses import replace

    import keras
    import tensorflow as tf

    from kmel import constants as C
    from kmel.data.datasets import decode_image, make_record_dataset
    from kmel.data.records import load_manifest, shard_paths
    from kmel.models.classifier import build_classifier
    from kmel.models.heads import head_from_manifest

    model = build_classifier(replace(config.classifier, weights="imagenet"))
    features = keras.Model(model.input, model.get_layer("head_pool").output)
    size = config.classifier.image_size
    manifest = load_manifest(crops)
    head = head_from_manifest(manifest)
    out = {k: [] for k in ("features", "target", "source", "split", "image_id")}
    for split in ("train", "val", "test"):
        files = shard_paths(crops, "crop", split, manifest)
        ds = make_record_dataset(files, training=False, seed=0).map(
            lambda r: (decode_image(r, size), r[C.F_TARGET], r[C.F_SOURCE], r[C.F_IMAGE_ID]),
            num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(2)
        done, start = 0, time.perf_counter()
        for images, targets, sources, ids in ds:
            out["features"].append(np.asarray(features.predict_on_batch(images), dtype=np.float32))
            out["target"].append(head.malignant_target(targets.numpy()).astype(np.int8))
            out["source"].append(np.array([s.decode() for s in sources.numpy()]))
            out["image_id"].append(np.array([s.decode() for s in ids.numpy()]))
            out["split"].append(np.full(len(ids), split))
            done += len(ids)
            if done % (batch_size * 20) == 0:
                print(f"  {split}: {done} crops, {done / (time.perf_counter() - start):.1f} img/s", flush=True)
        print(f"  {split}: {done} crops in {time.perf_counter() - start:.0f} s", flush=True)
    arrays = {k: np.concatenate(v) for k, v in out.items()}
    arrays["crops_dir"] = np.array(str(crops))
    arrays["crops_fingerprint"] = np.array(str(manifest.get("fingerprint", "")))
    return arrays


def check_test_set(data: dict[str, np.ndarray], predictions: Path) -> dict:
    """Same test ids and targets as the fine-tuned model's report; its test AUC per split for reference."""
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    if not predictions.is_file():
        return {"checked": False, "why": f"{predictions} not found"}
    table = pd.read_csv(predictions)
    test = data["split"] == "test"
    ours = pd.DataFrame({"image_id": data["image_id"][test], "source": data["source"][test],
                         "target": data["target"][test].astype(int)})
    merged = ours.merge(table[["image_id", "source", "target"]], on="image_id", how="outer",
                        suffixes=("", "_report"), indicator=True)
    both = merged["_merge"] == "both"
    same = bool(both.all() and (merged["target"] == merged["target_report"]).all()
                and (merged["source"] == merged["source_report"]).all())
    pipeline = predictions.parent.parent / "pipeline.json"
    trained_on = json.loads(pipeline.read_text()).get("classifier", {}).get("records_fingerprint") \
        if pipeline.is_file() else None
    crops_fingerprint = str(data.get("crops_fingerprint", ""))
    if trained_on != crops_fingerprint:
        print(f"WARNING: the reference model trained on crops {trained_on}, these are {crops_fingerprint}: its AUC "
              "is not on the same crops", flush=True)
    reference = {}
    for source in ("isic2019", "ham10000", "all"):
        part = table if source == "all" else table[table["source"] == source]
        reference[source] = round(float(roc_auc_score(part["target"], part["probability"])), 4)
    return {"checked": True, "same_ids_targets_sources": same, "n_ours": int(test.sum()), "n_report": len(table),
            "n_only_ours": int((merged["_merge"] == "left_only").sum()),
            "n_only_report": int((merged["_merge"] == "right_only").sum()),
            "reference_trained_on_these_crops": trained_on == crops_fingerprint, "fine_tuned_test_auc": reference}


def probe(C: float, seed: int = 0):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000, random_state=seed))


def scores(model, x: np.ndarray, y: np.ndarray, source: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    p = model.predict_proba(x)[:, 1]
    out = {"all": float(roc_auc_score(y, p))}
    for name in ("isic2019", "ham10000"):
        keep = source == name
        out[name] = float(roc_auc_score(y[keep], p[keep]))
    return out


def subset(index: np.ndarray, strata: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` of ``index``, stratified on ``strata``; all of them when n covers it."""
    from sklearn.model_selection import train_test_split

    if n >= len(index):
        return index
    chosen, _ = train_test_split(index, train_size=n, stratify=strata, random_state=seed)
    return np.sort(chosen)


def curve(data, train_index, sizes, repeats, C, eval_sources) -> list[dict]:
    """Test AUC (mean, sd over ``repeats`` seeds) of probes on stratified subsets of ``train_index``."""
    from sklearn.metrics import roc_auc_score

    x, y, src = data["features"], data["target"].astype(int), data["source"]
    test = data["split"] == "test"
    strata = np.char.add(src[train_index], y[train_index].astype(str))
    rows = []
    for n in sizes:
        n = min(n, len(train_index))
        runs = 1 if n >= len(train_index) else repeats
        per = {k: [] for k in eval_sources}
        fit_auc = []
        start = time.perf_counter()
        for seed in range(runs):
            chosen = subset(train_index, strata, n, seed)
            model = probe(C, seed).fit(x[chosen], y[chosen])
            fit_auc.append(float(roc_auc_score(y[chosen], model.predict_proba(x[chosen])[:, 1])))
            result = scores(model, x[test], y[test], src[test])
            for k in eval_sources:
                per[k].append(result[k])
        rows.append({"n": int(n), "repeats": runs, "fit_seconds": round(time.perf_counter() - start, 2),
                     "train_auc": round(float(np.mean(fit_auc)), 4),
                     **{k: {"mean": round(float(np.mean(v)), 4), "sd": round(float(np.std(v, ddof=1)) if len(v) > 1
                                                                                 else 0.0, 4),
                            "runs": [round(a, 4) for a in v]} for k, v in per.items()}})
        print(f"  n={n}: " + ", ".join(f"{k} {np.mean(v):.4f}" for k, v in per.items()), flush=True)
    return rows


def power_law(rows, key: str, aim: float | None) -> dict:
    """AUC(n) = a - b n^-c on the means; the n it predicts for ``aim``, or the asymptote when below it."""
    from scipy.optimize import curve_fit

    n = np.array([r["n"] for r in rows], float)
    auc = np.array([r[key]["mean"] for r in rows], float)

    def f(n, a, b, c):
        return a - b * np.power(n, -c)

    try:
        (a, b, c), cov = curve_fit(f, n, auc, p0=(min(auc.max() + 0.02, 1.0), 1.0, 0.5),
                                   bounds=([0.5, 0.0, 0.01], [1.0, 100.0, 3.0]), maxfev=20000)
    except (RuntimeError, ValueError) as err:
        return {"converged": False, "why": str(err)}
    sd = np.sqrt(np.diag(cov)) if np.all(np.isfinite(cov)) else [None] * 3
    out = {"converged": True, "a": round(float(a), 4), "b": round(float(b), 4), "c": round(float(c), 4),
           "a_sd": None if sd[0] is None else round(float(sd[0]), 4),
           "residual_rmse": round(float(np.sqrt(np.mean((f(n, a, b, c) - auc) ** 2))), 5),
           "at_bounds": [name for name, v, lo, hi in (("a", a, 0.5, 1.0), ("b", b, 0.0, 100.0), ("c", c, 0.01, 3.0))
                         if np.isclose(v, lo) or np.isclose(v, hi)]}
    if aim is not None:
        out["aim"] = aim
        need = float((b / (a - aim)) ** (1.0 / c)) if a > aim and b > 0 else None
        out["n_for_aim"] = None if need is None or not np.isfinite(need) else int(np.ceil(need))
        out["verdict"] = (f"n = {out['n_for_aim']:,} for AUC {aim}" if out["n_for_aim"] is not None
                          else f"not reached (asymptote a = {a:.4f})")
        if out["n_for_aim"] is not None and out["n_for_aim"] > 10 * n.max():
            out["verdict"] += f" (extrapolated {out['n_for_aim'] / n.max():,.0f}x past the largest n)"
        if out["at_bounds"]:
            out["verdict"] += f"; {', '.join(out['at_bounds'])} at its bound: the asymptote is not determined"
    return out


def log_linear(rows, key: str, aim: float | None) -> dict:
    """AUC(n) = alpha + beta log2(n) on the means: the gain per doubling of the training set, and the n a straight
    line on the log axis reaches ``aim`` at (no saturation: an optimistic extrapolation of more data)."""
    n = np.array([r["n"] for r in rows], float)
    auc = np.array([r[key]["mean"] for r in rows], float)
    beta, alpha = np.polyfit(np.log2(n), auc, 1)
    out = {"per_doubling": round(float(beta), 4), "intercept": round(float(alpha), 4),
           "residual_rmse": round(float(np.sqrt(np.mean((alpha + beta * np.log2(n) - auc) ** 2))), 5)}
    if aim is not None and beta > 0:
        out["aim"] = aim
        out["n_for_aim"] = float(f"{2 ** ((aim - alpha) / beta):.3g}")
        out["doublings_past_max_n"] = round(float((aim - alpha) / beta - np.log2(n.max())), 2)
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"isic2019": "tab:blue", "ham10000": "tab:orange", "all": "tab:gray"}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    union = result["union_curve"]
    n = np.array([r["n"] for r in union], float)
    grid = np.geomspace(n.min(), max(n.max() * 8, 1e5), 200)
    for key in ("isic2019", "ham10000", "all"):
        ax.errorbar(n, [r[key]["mean"] for r in union], yerr=[r[key]["sd"] for r in union], marker="o", capsize=3,
                    color=colours[key], label=f"union train → {SPLIT_NAMES[key]}")
        fit = result["power_law"].get(key, {})
        if fit.get("converged"):
            ax.plot(grid, fit["a"] - fit["b"] * grid ** (-fit["c"]), ":", color=colours[key], lw=1)
    isic = result["isic_only_curve"]
    ax.errorbar([r["n"] for r in isic], [r["isic2019"]["mean"] for r in isic],
                yerr=[r["isic2019"]["sd"] for r in isic], marker="s", capsize=3, ls="--", color="tab:green",
                label="ISIC-only train → ISIC test")
    for key, aim in AIMS.items():
        ax.axhline(aim, ls="--", lw=1, color=colours[key], alpha=0.7)
        ax.text(grid[-1], aim, f" aim {aim} ({SPLIT_NAMES[key]})", va="bottom", ha="right", fontsize=8,
                color=colours[key])
    ref = result["test_set_check"].get("fine_tuned_test_auc", {})
    for key in ("isic2019", "ham10000"):
        if key in ref:
            ax.plot([n.max()], [ref[key]], "*", ms=12, color=colours[key], mec="k",
                    label=f"fine-tuned model, {SPLIT_NAMES[key]} ({ref[key]:.3f})")
    ax.set_xscale("log")
    ax.set_xlabel("training images (stratified subsets of the train split)")
    ax.set_ylabel("test AUC")
    ax.set_title(f"Linear probe on frozen ImageNet EfficientNet-Lite0 features (C = {result['C']:g}); "
                 "dotted: power-law fit", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(result: dict) -> None:
    print("\nLearning curve — LINEAR PROBE on frozen ImageNet EfficientNet-Lite0 head_pool features "
          "(not the fine-tuned model)")
    by_c = ", ".join(f"{c}: {v:.4f}" for c, v in result["val_auc_by_C"].items())
    print(f"C = {result['C']:g} (val AUC by C: {by_c})")
    print("\nUnion train (ISIC 2018 + HAM10000), stratified on source x target; test AUC mean ± sd")
    print(f"{'n':>6} {'reps':>4}  {'ISIC test (594)':>16}  {'HAM test (1536)':>16}  {'all test (2130)':>16}"
          f"  {'train AUC':>9}")
    for r in result["union_curve"]:
        print(f"{r['n']:>6} {r['repeats']:>4}  " + "  ".join(
            f"{r[k]['mean']:.4f} ± {r[k]['sd']:.4f}".rjust(16) for k in ("isic2019", "ham10000", "all"))
            + f"  {r['train_auc']:>9.4f}")
    print("\nISIC-only train → ISIC test")
    print(f"{'n':>6} {'reps':>4}  {'ISIC test (594)':>16}  {'train AUC':>9}")
    for r in result["isic_only_curve"]:
        print(f"{r['n']:>6} {r['repeats']:>4}  {r['isic2019']['mean']:.4f} ± {r['isic2019']['sd']:.4f}  "
              f"{r['train_auc']:>9.4f}")
    ctrl = result["union_at_isic_all_n"]
    print(f"control: union subset of n = {ctrl['n']} → ISIC test {ctrl['isic2019']['mean']:.4f} ± "
          f"{ctrl['isic2019']['sd']:.4f}")
    print("\nPower law AUC(n) = a - b·n^(-c) on the union means")
    for key, fit in result["power_law"].items():
        if not fit.get("converged"):
            print(f"  {SPLIT_NAMES[key]:>9}: did not converge ({fit.get('why')})")
            continue
        line = (f"  {SPLIT_NAMES[key]:>9}: a = {fit['a']:.4f} (sd {fit['a_sd']}), b = {fit['b']:.4f}, "
                f"c = {fit['c']:.4f}, rmse {fit['residual_rmse']}")
        if fit["at_bounds"]:
            line += f", at bounds: {fit['at_bounds']}"
        if "verdict" in fit:
            line += f"  → {fit['verdict']}"
        print(line)
    print("\nLog-linear AUC(n) = alpha + beta·log2(n) on the means (gain per doubling; no saturation, so optimistic)")
    for name, fit in result["log_linear"].items():
        line = f"  {name:>20}: +{fit['per_doubling']:.4f} AUC per doubling, rmse {fit['residual_rmse']}"
        if "n_for_aim" in fit:
            line += (f"  → AUC {fit['aim']} at n ≈ {fit['n_for_aim']:.3g} "
                     f"({fit['doublings_past_max_n']} doublings past the largest n)")
        print(line)
    ref = result["test_set_check"].get("fine_tuned_test_auc")
    if ref:
        print(f"\nFine-tuned union classifier ({result['predictions']}), same test images: " +
              ", ".join(f"{SPLIT_NAMES[k]} {v:.4f}" for k, v in ref.items()))
    t = result["timings_seconds"]
    print(f"\nTimes: extraction {t['extraction']} s ({'cached' if result['features_cached'] else 'fresh'}), "
          f"C search {t['c_search']} s, curves {t['curves']} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops", default=str(CROPS), help="crop TFRecords folder (crop-*.tfrecord + manifest.json)")
    parser.add_argument("--out", default=str(OUT / "learning-curve"))
    parser.add_argument("--predictions", default=str(PREDICTIONS),
                        help="the fine-tuned model's test predictions.csv (check + reference AUC)")
    parser.add_argument("--profile", default="cpu-10k")
    parser.add_argument("--sizes", default="250,500,1000,2000,4000,all")
    parser.add_argument("--isic-sizes", default="250,500,1000,all")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--fresh", action="store_true", help="re-extract the features even if cached")
    args = parser.parse_args()

    from kmel.config import load_config

    crops, out = Path(args.crops), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "features.npz"
    config = load_config(args.profile)
    cached = False
    data = None
    if cache.is_file() and not args.fresh:
        with np.load(cache, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        if str(data.get("crops_dir")) != str(crops):
            print(f"cache {cache} is of {data.get('crops_dir')}, not {crops}: re-extracting")
            data = None
        else:
            cached = True
            if "crops_fingerprint" not in data:  # caches written before the fingerprint was kept
                data["crops_fingerprint"] = np.array(str(json.loads((crops / "manifest.json").read_text())
                                                         .get("fingerprint", "")))
    with Timer() as t_extract:
        if data is None:
            print(f"extracting head_pool features of {crops} at {config.classifier.image_size} px ...", flush=True)
            data = extract(crops, config, args.batch_size)
            np.savez(cache, **data)
    print(f"features: {data['features'].shape}, " + ", ".join(
        f"{s} {int((data['split'] == s).sum())}" for s in ("train", "val", "test")), flush=True)
    check = check_test_set(data, Path(args.predictions))
    print(f"test set check: {check}", flush=True)

    x, y, src, split = data["features"], data["target"].astype(int), data["source"], data["split"]
    train_index = np.flatnonzero(split == "train")
    val = split == "val"
    with Timer() as t_c:
        from sklearn.metrics import roc_auc_score

        val_auc = {}
        for c in C_GRID:
            model = probe(c).fit(x[train_index], y[train_index])
            val_auc[c] = float(roc_auc_score(y[val], model.predict_proba(x[val])[:, 1]))
            print(f"  C={c:g}: val AUC {val_auc[c]:.4f}", flush=True)
        C = max(val_auc, key=val_auc.get)

    def sizes(text: str, total: int) -> list[int]:
        return sorted({total if s.strip() == "all" else min(int(s), total) for s in text.split(",")})

    isic_index = train_index[src[train_index] == "isic2019"]
    with Timer() as t_curves:
        print("union curve:", flush=True)
        union = curve(data, train_index, sizes(args.sizes, len(train_index)), args.repeats, C,
                      ("isic2019", "ham10000", "all"))
        print("ISIC-only curve:", flush=True)
        isic = curve(data, isic_index, sizes(args.isic_sizes, len(isic_index)), args.repeats, C, ("isic2019",))
        print("control, union subset of the ISIC-only size:", flush=True)
        control = curve(data, train_index, [len(isic_index)], args.repeats, C, ("isic2019", "ham10000", "all"))[0]
    fits = {key: power_law(union, key, AIMS.get(key)) for key in ("isic2019", "ham10000", "all")}
    lines = {f"union→{key}": log_linear(union, key, AIMS.get(key)) for key in ("isic2019", "ham10000", "all")}
    lines["isic_only→isic2019"] = log_linear(isic, "isic2019", AIMS["isic2019"])

    result = {
        "what": "linear probe (standardised features + LogisticRegression) on frozen ImageNet EfficientNet-Lite0 "
                "head_pool features (1,280-d); not the fine-tuned classifier",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cwd": str(Path.cwd()),
        "crops_dir": str(crops), "crops_fingerprint": str(data["crops_fingerprint"]), "predictions": args.predictions,
        "profile": args.profile, "image_size": config.classifier.image_size,
        "features_cache": str(cache), "features_cached": cached,
        "n": {s: {src_name: int(((split == s) & (src == src_name)).sum()) for src_name in ("isic2019", "ham10000")}
              for s in ("train", "val", "test")},
        "malignant": {s: {src_name: int(y[(split == s) & (src == src_name)].sum())
                          for src_name in ("isic2019", "ham10000")} for s in ("train", "val", "test")},
        "test_set_check": check,
        "C_grid": list(C_GRID), "val_auc_by_C": {f"{c:g}": round(v, 4) for c, v in val_auc.items()}, "C": C,
        "repeats": args.repeats,
        "union_curve": union, "isic_only_curve": isic, "union_at_isic_all_n": control,
        "power_law": fits, "log_linear": lines, "aims": AIMS,
        "timings_seconds": {"extraction": round(t_extract.seconds, 1), "c_search": round(t_c.seconds, 1),
                            "curves": round(t_curves.seconds, 1)},
    }
    plot(result, out / "learning_curve.png")
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"\nwrote {out / 'result.json'} and {out / 'learning_curve.png'}")


if __name__ == "__main__":
    main()
