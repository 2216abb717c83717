"""Segmenter input check: is the segmenter worse on the enhanced input it gets at crop/predict time
than on the raw input it was trained on?

The seg records (kmel/data/prepare.py) hold the RAW image padded square and INTER_AREA-resized to
seg_size; ``CropPipeline.pre`` (kmel/lesion/crops.py) feeds the segmenter the image resized to
records.image_size long side, then ``enhance_for_segmentation`` (CLAHE on Lab L + gamma), padded
square and resized to seg_size. On one split (default test) of a record set with expert masks, per
image and per source, against the expert mask (padded square, INTER_AREA to seg_size, >= 128, as
in the seg records):

  (a) enhanced   ``CropPipeline(segment, seg_size, config).pre(image).seg_input`` with
                 crops.enhance_segmenter_input on (the predict path until that setting, now off by default)
  (b) raw        the same without enhancement (resize_long_side -> pad_to_square -> INTER_AREA)
  (b2) raw_as_records  the original image padded square -> INTER_AREA -> JPEG at records.jpeg_quality
                 -> decode (byte-for-byte what prepare.py writes, without going through the records)
  (c) records    the seg records' own test images and masks (kmel's record reader)

Each: mean per-image Jaccard of the prediction thresholded at 0.5, the ISIC 2018 thresholded Jaccard
(per-image Jaccard set to 0 below 0.65, then the mean) and Dice; plus paired differences (a) - (b).

usage: nice -n 19 python bench/seg_input_check.py [--seg-models DIR] [--records DIR] [--root DIR]
       [--split test] [--limit N] [--threads 1] [--no-records] [--out bench/out/seg-input-check]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from _common import OUT

DEFAULT_MODELS = OUT / "seg-union" / "models"  # bench/seg_quality.py --data union --profile cpu-10k
DEFAULT_RECORDS = OUT / "seg-union" / "records"
FLOOR = 0.65


def scores(true: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Per-image Jaccard and Dice of ``prob >= threshold`` against ``true`` (bool), [N, H, W]; 1 when
    both are empty (as kmel.training.losses)."""
    t = true.reshape(len(true), -1).astype(bool)
    p = prob.reshape(len(prob), -1) >= threshold
    inter = (t & p).sum(1).astype(np.float64)
    st, sp = t.sum(1).astype(np.float64), p.sum(1).astype(np.float64)
    union = st + sp - inter
    jac = np.where(union > 0, inter / np.maximum(union, 1.0), 1.0)
    dice = np.where(st + sp > 0, 2 * inter / np.maximum(st + sp, 1.0), 1.0)
    return jac, dice


def summary(jac: np.ndarray, dice: np.ndarray) -> dict[str, float]:
    return {
        "images": int(len(jac)),
        "jaccard": round(float(jac.mean()), 4),
        "thresholded_jaccard": round(float(np.where(jac >= FLOOR, jac, 0.0).mean()), 4),
        "dice": round(float(dice.mean()), 4),
        "below_0.65": int((jac < FLOOR).sum()),
    }


def paired(ja: np.ndarray, jb: np.ndarray) -> dict[str, float]:
    """(a) - (b) per image: mean and its standard error, thresholded-Jaccard difference, how many
    images move by more than 0.05 either way and how many cross 0.65."""
    d = ja - jb
    ta, tb = np.where(ja >= FLOOR, ja, 0.0), np.where(jb >= FLOOR, jb, 0.0)
    td = ta - tb
    n = len(d)
    return {
        "jaccard_diff_mean": round(float(d.mean()), 4),
        "jaccard_diff_se": round(float(d.std(ddof=1) / np.sqrt(n)), 4) if n > 1 else None,
        "thresholded_jaccard_diff_mean": round(float(td.mean()), 4),
        "thresholded_jaccard_diff_se": round(float(td.std(ddof=1) / np.sqrt(n)), 4) if n > 1 else None,
        "images_a_better_by_0.05": int((d > 0.05).sum()),
        "images_b_better_by_0.05": int((d < -0.05).sum()),
        "images_fail_only_a": int(((ja < FLOOR) & (jb >= FLOOR)).sum()),
        "images_fail_only_b": int(((jb < FLOOR) & (ja >= FLOOR)).sum()),
    }


def mask_path(root: Path, image_path: str) -> Path:
    """The staged expert mask of a staged image (bench/_common.py stage_union: images/[ham/]X.jpg ->
    masks/[ham/]X_segmentation.png)."""
    parts = list(Path(image_path).parts)
    i = len(parts) - 1 - parts[::-1].index("images")
    parts[i] = "masks"
    rel = Path(*parts)
    return root / rel.with_name(rel.stem + "_segmentation.png")


def from_files(table, root: Path, config, model, batch: int) -> dict[str, dict[str, np.ndarray]]:
    """Per-image Jaccard / Dice of (a), (b), (b2) for every row of ``table``, keyed by image_id."""
    import cv2

    from kmel.data.images import (
        encode_jpeg,
        load_image,
        pad_to_square,
        resize_long_side,
    )
    from kmel.data.prepare import _load_mask
    from kmel.lesion.crops import CropPipeline

    size = config.segmenter.image_size
    pipe = CropPipeline(None, size, config, workers=1)
    variants = ("enhanced", "raw", "raw_as_records")
    out = {v: {} for v in variants}
    pending: dict[str, list] = {v: [] for v in variants}
    masks, ids = [], []

    def flush() -> None:
        if not ids:
            return
        true = np.stack(masks)
        for v in variants:
            x = np.stack(pending[v]).astype(np.float32)
            prob = np.asarray(model(x, training=False))[..., 0]
            jac, dice = scores(true, prob)
            for k, image_id in enumerate(ids):
                out[v][image_id] = (jac[k], dice[k])
            pending[v].clear()
        masks.clear()
        ids.clear()

    for row in table.itertuples(index=False):
        image = load_image(root / row.image_path)
        mask, note = _load_mask(str(mask_path(root, row.image_path)), image.shape[:2], image.shape[:2],
                                config.records.max_file_mb * 2**20)
        if mask is None:
            raise SystemExit(f"{row.image_id}: {note}")
        sq_mask, _ = pad_to_square(mask * 255)
        true = cv2.resize(sq_mask, (size, size), interpolation=cv2.INTER_AREA) >= 128
        # (a) the predict path, exactly
        pending["enhanced"].append(pipe.pre(image).seg_input)
        # (b) the same without the enhancement
        small = resize_long_side(image, config.records.image_size)
        square, _ = pad_to_square(small)
        pending["raw"].append(cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA))
        # (b2) what prepare.py writes into the seg records (original padded, resized, JPEG round trip)
        square, _ = pad_to_square(image)
        rec = cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA)
        rec = cv2.cvtColor(cv2.imdecode(np.frombuffer(encode_jpeg(rec, config.records.jpeg_quality), np.uint8),
                                        cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        pending["raw_as_records"].append(rec)
        masks.append(true)
        ids.append(row.image_id)
        if len(ids) >= batch:
            flush()
    flush()
    pipe.close()
    return out


def from_records(records: Path, split: str, config, model, batch: int) -> dict[str, tuple[float, float, str]]:
    """(c): per-image Jaccard / Dice on the seg records' own images and masks, keyed by image_id."""
    from kmel import constants as C
    from kmel.data.datasets import _parse_eval_data, make_record_dataset
    from kmel.data.records import load_manifest, shard_paths

    size = config.segmenter.image_size
    files = shard_paths(records, "seg", split, load_manifest(records))
    ds = make_record_dataset(files, False, 0).map(
        lambda r: (*_parse_eval_data(r, "seg", size), r[C.F_IMAGE_ID], r[C.F_SOURCE])).batch(batch)
    out = {}
    for images, masks, image_ids, sources in ds:
        prob = np.asarray(model(images, training=False))[..., 0]
        jac, dice = scores(masks.numpy()[..., 0] > 0.5, prob)
        for k in range(len(jac)):
            out[image_ids[k].numpy().decode()] = (jac[k], dice[k], sources[k].numpy().decode())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seg-models", default=str(DEFAULT_MODELS), help="folder with segmenter.keras and pipeline.json")
    parser.add_argument("--records", default=str(DEFAULT_RECORDS), help="record set (metadata.csv, seg- shards)")
    parser.add_argument("--root", default=None,
                        help="folder the metadata's image_path is relative to (default: 3 levels above --records)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=0, help="first N images per source only (a quick run)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="TensorFlow intra/inter-op threads")
    parser.add_argument("--no-records", action="store_true", help="skip (c), the seg records' own images")
    parser.add_argument("--out", default=str(OUT / "seg-input-check"))
    args = parser.parse_args()

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import cv2
    import keras
    import pandas as pd

    import kmel.training.losses  # noqa: F401  (custom objects)
    from kmel import constants as C
    from kmel.config import config_from_dict

    cv2.setNumThreads(1)
    start = time.perf_counter()
    models, records = Path(args.seg_models), Path(args.records)
    root = Path(args.root) if args.root else records.resolve().parents[3]
    seg = json.loads((models / C.PIPELINE_JSON).read_text())["segmenter"]
    # (a) is the enhanced input whatever the stored setting (crops.enhance_segmenter_input, off since this check)
    config = config_from_dict({"records": seg["records"], "crops": {**seg["crops"], "enhance_segmenter_input": True},
                               "segmenter": seg["config"]})
    model = keras.saving.load_model(models / C.SEGMENTER_KERAS, safe_mode=True, compile=False)

    table = pd.read_csv(records / "metadata.csv")
    table = table[(table["split"] == args.split) & table["has_mask"].astype(bool)]
    if args.limit:
        table = table.groupby("source", sort=False).head(args.limit)
    files = from_files(table, root, config, model, args.batch)
    files_s = time.perf_counter() - start
    recs = {} if args.no_records else from_records(records, args.split, config, model, args.batch)

    result: dict = {
        "seg_models": str(models), "records": str(records), "split": args.split,
        "seg_size": config.segmenter.image_size, "records_image_size": config.records.image_size,
        "enhancement": {"clahe_clip": config.crops.clahe_clip, "clahe_tiles": config.crops.clahe_tiles,
                        "gamma": config.crops.gamma},
        "by_source": {},
    }
    for source, part in table.groupby("source"):
        ids = list(part["image_id"])
        block: dict = {}
        arrays = {}
        for v in ("enhanced", "raw", "raw_as_records"):
            j = np.array([files[v][i][0] for i in ids])
            d = np.array([files[v][i][1] for i in ids])
            arrays[v] = j
            block[v] = summary(j, d)
        if recs:
            have = [i for i in ids if i in recs]
            j = np.array([recs[i][0] for i in have])
            d = np.array([recs[i][1] for i in have])
            block["records"] = summary(j, d)
            # records hold images the table does not list (or the reverse) only if something is off
            block["records"]["matched_to_files"] = len(have)
        block["enhanced_minus_raw"] = paired(arrays["enhanced"], arrays["raw"])
        result["by_source"][source] = block
    result["seconds"] = {"files": round(files_s, 1), "total": round(time.perf_counter() - start, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2)
    print(text)
    (out / "result.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
