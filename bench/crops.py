"""Crop stage speed and a contact sheet to look at.

usage: python bench/crops.py [--models bench/out/seg/models] [--profile cpu-small] [--out bench/out/crops]

1. crops/s of :class:`kmel.lesion.crops.CropPipeline` (the function crop records and `predict` share) over
   the 24 full-resolution ISIC Archive images and over 594 images of the 256 px set (test split),
   with the exported segmenter from ``--models`` (``bench/seg_quality.py`` writes one) or, without
   one, the model-free fallback.
2. The time split of the same work done step by step on one thread: resize + enhance, segmenter,
   mask cleaning + box, crop resize, hair removal, skin tone.
3. ``contact_sheet.png``: original / predicted mask (expert outline in green) / crop / crop with
   hair removed, for 12 real images (the 6 hairiest of the test split and 6 others).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
from _common import OUT, require_shared


def _load(paths):
    from kmel.data.images import load_image

    return [load_image(p) for p in paths]


def _throughput(pipeline, images, batch: int) -> float:
    pipeline.run(images[:batch])  # warm-up (graph tracing, thread start)
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        pipeline.run(images[i : i + batch])
    return len(images) / (time.perf_counter() - start)


def _time_split(images, segment, seg_size, config) -> dict[str, float]:
    """Seconds per image of each step, one thread, same functions CropPipeline calls."""
    from kmel.data.images import pad_to_square, resize_long_side
    from kmel.lesion.lesion import (
        clean_mask,
        crop_box,
        enhance_for_segmentation,
        estimate_skin_tone,
        remove_hair,
    )

    cc = config.crops
    size = config.classifier.image_size
    t = dict.fromkeys(["resize_enhance", "segmenter", "clean_mask_box", "crop_resize", "hair_removal", "skin_tone"], 0.0)
    for image in images:
        s = time.perf_counter()
        small = resize_long_side(image, config.records.image_size)
        square, pad = pad_to_square(enhance_for_segmentation(small, cc))
        seg_in = cv2.resize(square, (seg_size, seg_size), interpolation=cv2.INTER_AREA)
        t["resize_enhance"] += time.perf_counter() - s
        s = time.perf_counter()
        prob = segment(seg_in[None].astype(np.float32))[0] if segment else None
        t["segmenter"] += time.perf_counter() - s
        s = time.perf_counter()
        h, w = small.shape[:2]
        if prob is not None:
            top, bottom, left, right = pad
            prob = cv2.resize(prob, (h + top + bottom,) * 2)[top : top + h, left : left + w]
            mask = clean_mask(prob, cc)
        else:
            mask = np.zeros((h, w), np.uint8)
        _, (x0, y0, x1, y1) = crop_box(mask, cc)
        t["clean_mask_box"] += time.perf_counter() - s
        s = time.perf_counter()
        cut, _ = pad_to_square(small[y0:y1, x0:x1])
        crop = cv2.resize(cut, (size, size), interpolation=cv2.INTER_AREA)
        t["crop_resize"] += time.perf_counter() - s
        s = time.perf_counter()
        remove_hair(crop, cc, scale=size / 512)
        t["hair_removal"] += time.perf_counter() - s
        s = time.perf_counter()
        estimate_skin_tone(small, mask, cc)
        t["skin_tone"] += time.perf_counter() - s
    return {k: round(1000 * v / len(images), 2) for k, v in t.items()}


def _contact_sheet(paths, masks_dir, pipeline, plain_pipeline, out: Path, tile: int = 160) -> None:
    from kmel.data.images import load_image

    rows = []
    for path in paths:
        image = load_image(path)
        with_hair_removed = pipeline.run([image])[0]
        without = plain_pipeline.run([image])[0]
        original = cv2.resize(image, (tile, tile), interpolation=cv2.INTER_AREA)
        mask_view = cv2.resize(with_hair_removed.result.mask * 255, (tile, tile), interpolation=cv2.INTER_NEAREST)
        mask_view = cv2.cvtColor(mask_view, cv2.COLOR_GRAY2RGB)
        truth_path = masks_dir / f"{path.stem}_segmentation.png"
        if truth_path.exists():
            truth = cv2.resize(cv2.imread(str(truth_path), cv2.IMREAD_GRAYSCALE), (tile, tile))
            contours, _ = cv2.findContours((truth > 127).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(mask_view, contours, -1, (0, 200, 0), 1)
        x0, y0, x1, y1 = with_hair_removed.box
        sy, sx = tile / image.shape[0], tile / image.shape[1]
        cv2.rectangle(original, (int(x0 * sx), int(y0 * sy)), (int(x1 * sx) - 1, int(y1 * sy) - 1), (255, 255, 0), 1)
        crop = cv2.resize(without.result.crop, (tile, tile))
        clean = cv2.resize(with_hair_removed.result.crop, (tile, tile))
        row = np.concatenate([original, mask_view, crop, clean], axis=1)
        label = f"{path.stem} {with_hair_removed.result.crop_mode} {with_hair_removed.result.skin_tone.group_name}"
        cv2.putText(row, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
        rows.append(row)
    header = np.full((22, rows[0].shape[1], 3), 255, np.uint8)
    for i, text in enumerate(["original + crop box", "mask (expert in green)", "crop", "crop, hair removed"]):
        cv2.putText(header, text, (i * tile + 4, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    sheet = np.concatenate([header, *rows], axis=0)
    cv2.imwrite(str(out), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=str(OUT / "seg" / "models"))
    parser.add_argument("--profile", default="cpu-small")
    parser.add_argument("--out", default=str(OUT / "crops"))
    args = parser.parse_args()
    import pandas as pd

    from kmel.config import load_config
    from kmel.lesion.crops import CropPipeline, make_segment_fn
    from kmel.lesion.lesion import hair_mask

    shared = require_shared()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = load_config(args.profile)
    segment, seg_size = None, config.segmenter.image_size
    if (Path(args.models) / "segmenter" / "saved_model.pb").exists():
        segment, seg_size = make_segment_fn(args.models)
    else:
        print(f"no segmenter under {args.models}: model-free crops (run bench/seg_quality.py first)")

    full_paths = sorted((shared / "isic-archive-fullres" / "images").glob("*.jpg"))
    labels = pd.read_csv(shared / "isic2018-task1-256" / "labels.csv")
    test_ids = labels.loc[labels["split"] == "test", "image_id"].tolist()
    small_paths = [shared / "isic2018-task1-256" / "images" / f"{i}.jpg" for i in test_ids]
    full, small = _load(full_paths), _load(small_paths)
    batch = config.crops.batch_size
    result: dict = {"segmenter": bool(segment), "profile": args.profile, "batch": batch}
    with CropPipeline(segment, seg_size, config) as pipeline:
        result["fullres_24_crops_per_s"] = round(_throughput(pipeline, full, batch), 2)
        result["px256_594_crops_per_s"] = round(_throughput(pipeline, small, batch), 2)
    result["ms_per_image_fullres"] = _time_split(full, segment, seg_size, config)
    result["ms_per_image_256"] = _time_split(small[:200], segment, seg_size, config)

    hairiness = [float(hair_mask(img, config.crops, scale=img.shape[0] / 512).mean()) for img in small]
    order = np.argsort(hairiness)[::-1]
    chosen = [small_paths[i] for i in order[:6]] + [small_paths[i] for i in order[len(order) // 2 :: 50][:6]]
    plain = replace(config, crops=replace(config.crops, remove_hair=False))
    with CropPipeline(segment, seg_size, config) as pipeline, CropPipeline(segment, seg_size, plain) as p2:
        _contact_sheet(chosen, shared / "isic2018-task1-256" / "masks", pipeline, p2, out / "contact_sheet.png")
    result["contact_sheet"] = str(out / "contact_sheet.png")
    print(json.dumps(result, indent=2))
    (out / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
