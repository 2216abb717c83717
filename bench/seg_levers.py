"""Cheap post-hoc levers for the exported lesion segmenter, scored per source on the union benchmark's test
split (ISIC 2018 Task 1 = source ``isic2019``, HAM10000 = ``ham10000``) against the plain mask
(probability >= 0.5) on the same images. Nothing is trained; everything is scored from the exported model.

usage: python bench/seg_levers.py [--seg bench/out/seg-union-sb] [--out bench/out/seg-levers] [--bootstrap 1000]

Levers:
- ``tta``: mean probability of 4 views (identity, horizontal, vertical, both flips), each flipped back;
- ``val_threshold`` (``_tta``): the probability cut maximising val thresholded Jaccard over all val images,
  grid 0.30..0.70 step 0.05, applied to test (the val curve is reported up to 0.95);
- ``lcc_fill`` (``_tta``): largest 8-connected component, holes filled (scipy.ndimage);
  ``val_threshold_tta_lcc_fill``: the three stacked;
- ``kmel_clean`` (``_tta``): :func:`kmel.lesion.lesion.clean_mask` with the pipeline's crops settings, applied
  as the crop stage applies it (probability resized to the records' image size, cleaned there), then brought
  back to the segmenter size; ``kmel_clean_nodilate``: the same with ``dilate_fraction=0`` (the dilation is a
  deliberate crop margin, not meant to fit the expert outline).
Per lever and source: thresholded Jaccard (per-image Jaccard, 0 below 0.65, averaged: the ISIC 2018 Task 1
metric), mean Jaccard, Dice, and the paired difference of thresholded Jaccard vs plain with a 95% bootstrap
interval over images. Seconds per image of the plain and the 4-view forward pass are recorded too. The
probabilities are kept in OUT/probs-<segmenter fingerprint>-{split}.npz and reused when present.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from _common import OUT

FLOOR = 0.65
GRID = np.round(np.arange(0.30, 0.7001, 0.05), 2)  # where the val threshold is chosen
WIDE = np.round(np.arange(0.30, 0.9501, 0.05), 2)  # the val curve reported, to show whether GRID's edge binds


def predict(seg: Path, config, split: str, cache: Path) -> dict[str, np.ndarray]:
    """Ids, sources, expert masks and plain / 4-flip probabilities of ``split`` (the flips by kmel's own
    :func:`kmel.lesion.crops.flip_averaged_masks`), with the seconds of each."""
    if cache.exists():
        return dict(np.load(cache))
    from kmel import constants as C
    from kmel.data.datasets import decode_image, decode_mask, make_record_dataset
    from kmel.data.records import load_manifest, shard_paths
    from kmel.lesion.crops import flip_averaged_masks
    from kmel.models.pipeline import load_serving, signature_fn

    segment = signature_fn(load_serving(seg / "models" / C.SEGMENTER_DIR))
    size = config.segmenter.image_size
    records = seg / "records"
    files = shard_paths(records, "seg", split, load_manifest(records))
    ds = make_record_dataset(files, False, 0).map(
        lambda r: (decode_image(r, size), decode_mask(r, size), r[C.F_SOURCE], r[C.F_IMAGE_ID])).batch(64)
    out = {k: [] for k in ("id", "source", "truth", "plain", "tta")}
    plain_s = flips_s = 0.0
    for images, masks, sources, ids in ds:
        x = images.numpy()
        start = time.perf_counter()
        plain = segment(x).reshape(len(x), size, size)
        middle = time.perf_counter()
        tta = flip_averaged_masks(segment, x).reshape(len(x), size, size)  # what crops.segmenter_flips runs
        plain_s, flips_s = plain_s + middle - start, flips_s + time.perf_counter() - middle  # flips: all four views
        out["plain"].append(plain)
        out["tta"].append(tta)
        out["truth"].append(masks.numpy()[..., 0] > 0.5)
        out["source"] += [s.decode() for s in sources.numpy()]
        out["id"] += [s.decode() for s in ids.numpy()]
    result = {k: np.concatenate(v) if k in ("truth", "plain", "tta") else np.array(v) for k, v in out.items()}
    result["seconds_plain"], result["seconds_tta"] = np.array(plain_s), np.array(flips_s)
    np.savez(cache, **result)
    return result


def jaccard_dice(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image Jaccard and Dice of boolean N×H×W masks (1 when both are empty, as kmel's metrics)."""
    inter = (pred & truth).sum((1, 2))
    total = pred.sum((1, 2)) + truth.sum((1, 2))
    union = total - inter
    return (np.where(union > 0, inter / np.maximum(union, 1), 1.0),
            np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0))


def thresholded(jac: np.ndarray) -> np.ndarray:
    return np.where(jac >= FLOOR, jac, 0.0)


def choose_threshold(prob: np.ndarray, truth: np.ndarray) -> tuple[float, dict[str, float]]:
    """The GRID cut with the best val thresholded Jaccard, and the val curve over WIDE."""
    curve = {f"{t:.2f}": round(float(thresholded(jaccard_dice(prob >= t, truth)[0]).mean()), 4) for t in WIDE}
    return float(max((f"{t:.2f}" for t in GRID), key=curve.get)), curve


def lcc_fill(mask: np.ndarray) -> np.ndarray:
    """Largest 8-connected component with its holes filled; an empty mask stays empty."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, np.ones((3, 3)))
    if n == 0:
        return mask
    return ndimage.binary_fill_holes(labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1)


def kmel_clean(prob: np.ndarray, crops, work: int) -> np.ndarray:
    """kmel's crop-stage cleaning: probability resized to ``work`` px (linear), ``clean_mask``, back (area)."""
    import cv2

    from kmel.lesion.lesion import clean_mask

    up = cv2.resize(prob.astype(np.float32), (work, work), interpolation=cv2.INTER_LINEAR)
    mask = clean_mask(up, crops).astype(np.float32)
    return cv2.resize(mask, prob.shape[::-1], interpolation=cv2.INTER_AREA) >= 0.5


def summary(jac: np.ndarray, dice: np.ndarray, base_tj: np.ndarray, n_bootstrap: int) -> dict:
    """Scores of one lever on one source, and its paired thresholded-Jaccard difference vs plain with a 95%
    bootstrap interval (the same image resamples for every lever: seed 0)."""
    tj = thresholded(jac)
    diff = tj - base_tj
    boot = diff[np.random.default_rng(0).integers(0, len(diff), (n_bootstrap, len(diff)))].mean(1)
    return {"n": len(jac), "thresholded_jaccard": round(float(tj.mean()), 4),
            "mean_jaccard": round(float(jac.mean()), 4), "dice": round(float(dice.mean()), 4),
            "delta_tj": round(float(diff.mean()), 4),
            "delta_tj_ci95": [round(float(q), 4) for q in np.percentile(boot, [2.5, 97.5])]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seg", default=str(OUT / "seg-union-sb"))
    parser.add_argument("--out", default=str(OUT / "seg-levers"))
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    from kmel.config import config_from_dict
    from kmel.models.pipeline import read_pipeline

    seg, out = Path(args.seg), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipeline = read_pipeline(seg / "models")["segmenter"]
    config = config_from_dict({"records": pipeline["records"], "crops": pipeline["crops"],
                               "segmenter": pipeline["config"]})
    key = pipeline["fingerprint"][:12]  # another --seg with the same --out predicts again
    val = predict(seg, config, "val", out / f"probs-{key}-val.npz")
    test = predict(seg, config, "test", out / f"probs-{key}-test.npz")
    t_plain, curve_plain = choose_threshold(val["plain"], val["truth"])
    t_tta, curve_tta = choose_threshold(val["tta"], val["truth"])
    work, crops = config.records.image_size, config.crops
    no_dilate = replace(crops, dilate_fraction=0.0)

    def each(f, images: np.ndarray) -> np.ndarray:
        return np.stack([f(m) for m in images])

    P, T = test["plain"], test["tta"]
    levers = {
        "plain": lambda: P >= 0.5,
        "tta": lambda: T >= 0.5,
        "val_threshold": lambda: P >= t_plain,
        "val_threshold_tta": lambda: T >= t_tta,
        "lcc_fill": lambda: each(lcc_fill, P >= 0.5),
        "lcc_fill_tta": lambda: each(lcc_fill, T >= 0.5),
        "val_threshold_tta_lcc_fill": lambda: each(lcc_fill, T >= t_tta),
        "kmel_clean": lambda: each(lambda p: kmel_clean(p, crops, work), P),
        "kmel_clean_tta": lambda: each(lambda p: kmel_clean(p, crops, work), T),
        "kmel_clean_nodilate": lambda: each(lambda p: kmel_clean(p, no_dilate, work), P),
    }
    scores = {name: jaccard_dice(make(), test["truth"]) for name, make in levers.items()}
    n = len(test["id"])
    result = {"seg": str(seg), "images": n, "bootstrap": args.bootstrap,
              "val_threshold": {"plain": t_plain, "tta": t_tta, "val_tj_plain": curve_plain, "val_tj_tta": curve_tta},
              "seconds_per_image": {k: round(float(test[f"seconds_{k}"]) / n, 5) for k in ("plain", "tta")},
              "levers": {}}
    for source in sorted(set(test["source"])):
        index = test["source"] == source
        base = thresholded(scores["plain"][0][index])
        result["levers"][source] = {name: summary(jac[index], dice[index], base, args.bootstrap)
                                    for name, (jac, dice) in scores.items()}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(f"val thresholds: plain {t_plain}, tta {t_tta}; s/image {result['seconds_per_image']}")
    print(f"{'source':9} {'lever':27} {'n':>5} {'thr.Jac':>7} {'Jac':>6} {'Dice':>6} {'dTJ':>7}  95% CI")
    for source, rows in result["levers"].items():
        for name, r in rows.items():
            lo, hi = r["delta_tj_ci95"]
            print(f"{source:9} {name:27} {r['n']:5d} {r['thresholded_jaccard']:7.4f} {r['mean_jaccard']:6.4f} "
                  f"{r['dice']:6.4f} {r['delta_tj']:+7.4f}  [{lo:+.4f}, {hi:+.4f}]")


if __name__ == "__main__":
    main()
