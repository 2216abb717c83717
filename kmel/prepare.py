"""Per-image work of build-records, run in worker processes (OpenCV side; no TensorFlow import).

:func:`prepare_image` reads one image (and its mask), hashes the file, estimates skin tone with a
model-free lesion exclusion (the expert mask where there is one), and writes the encoded payloads
of its img- and seg- records into a cache folder, so that the parent process keeps only small
dicts in memory and a killed run can reuse every image it already prepared.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from kmel.config import CropsConfig, RecordsConfig
from kmel.images import (
    ImageReadError,
    encode_jpeg,
    encode_png,
    load_image_reduced,
    pad_to_square,
    resize_long_side,
)
from kmel.lesion import estimate_skin_tone, model_free_lesion_mask

# A mask whose aspect ratio differs from its image's by more than this is not the image's mask.
MASK_ASPECT_TOLERANCE = 0.03


@dataclass(frozen=True)
class PrepareTask:
    image_id: str
    image_path: str
    mask_path: str  # "" when there is no mask
    cache_dir: str
    records: RecordsConfig
    crops: CropsConfig


def cache_paths(cache_dir: str | Path, image_id: str) -> dict[str, Path]:
    base = Path(cache_dir)
    return {
        "meta": base / f"{image_id}.json",
        "img": base / f"{image_id}.img.jpg",
        "seg_image": base / f"{image_id}.seg.jpg",
        "seg_mask": base / f"{image_id}.seg.png",
    }


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _load_mask(
    mask_path: str, full_shape: tuple[int, int], shape: tuple[int, int]
) -> tuple[np.ndarray | None, str]:
    """Binary 0/1 mask at ``shape`` (the decoded image's size) or (None, reason it was not used).

    ``full_shape`` is the image file's own size: the mask must have its aspect ratio.
    """
    raw = cv2.imread(mask_path, cv2.IMREAD_UNCHANGED)
    if raw is None:
        return None, f"mask {mask_path}: cannot be read"
    if raw.ndim == 3:
        raw = raw.max(axis=2)
    fh, fw = full_shape
    h, w = shape
    mh, mw = raw.shape[:2]
    if abs(mw / mh - fw / fh) > MASK_ASPECT_TOLERANCE * (fw / fh):
        return None, f"mask {mask_path}: size {mw}x{mh} does not match image {fw}x{fh}"
    if (mh, mw) != (h, w):
        # Area averaging when shrinking (a DCT-reduced image), then the threshold below re-binarises.
        interp = cv2.INTER_AREA if mh > h else cv2.INTER_NEAREST
        raw = cv2.resize(raw, (w, h), interpolation=interp)
    mask = (raw > (raw.max() / 2 if raw.max() > 0 else 0)).astype(np.uint8)
    if mask.sum() == 0:
        return None, f"mask {mask_path}: empty (all zeros)"
    return mask, ""


def prepare_image(task: PrepareTask) -> dict[str, Any]:
    """Prepare one image; never raises for bad input: returns ``{"image_id", "error": reason}``."""
    paths = cache_paths(task.cache_dir, task.image_id)
    if paths["meta"].exists():
        try:
            return json.loads(paths["meta"].read_text())
        except (OSError, json.JSONDecodeError):
            pass  # torn write from a killed run: prepare again
    try:
        data = Path(task.image_path).read_bytes()
    except OSError as exc:
        return {"image_id": task.image_id, "error": f"{task.image_path}: cannot read file ({exc.strerror or exc})"}
    try:
        # Nothing downstream needs more than the larger record size: large JPEGs decode reduced.
        need = max(task.records.image_size, task.records.seg_size)
        image, (h, w) = load_image_reduced(data, need, name=task.image_path)
    except ImageReadError as exc:
        return {"image_id": task.image_id, "error": str(exc)}
    result: dict[str, Any] = {
        "image_id": task.image_id,
        "sha256": hashlib.sha256(data).hexdigest(),
        "height": int(h),
        "width": int(w),
        "mask_note": "",
        "has_mask": False,
    }
    mask = None
    if task.mask_path:
        mask, note = _load_mask(task.mask_path, (h, w), image.shape[:2])
        result["mask_note"] = note

    small = resize_long_side(image, task.records.image_size)
    small_mask = None
    if mask is not None:
        small_mask = cv2.resize(mask, (small.shape[1], small.shape[0]), interpolation=cv2.INTER_NEAREST)
    lesion = small_mask if small_mask is not None else model_free_lesion_mask(small)
    tone = estimate_skin_tone(small, lesion, task.crops)
    result.update(
        skin_tone=int(tone.group),
        skin_tone_name=tone.group_name,
        brightness=float(tone.brightness),
        ita=float(tone.ita),
        ita_category=int(tone.ita_category),
        skin_pixels=int(tone.n_pixels),
    )
    _atomic_write(paths["img"], encode_jpeg(small, task.records.jpeg_quality))
    if mask is not None:
        square, _ = pad_to_square(image)
        square_mask, _ = pad_to_square(mask * 255)
        size = task.records.seg_size
        seg_image = cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA)
        seg_mask = cv2.resize(square_mask, (size, size), interpolation=cv2.INTER_AREA)
        seg_mask = np.where(seg_mask >= 128, 255, 0).astype(np.uint8)
        _atomic_write(paths["seg_image"], encode_jpeg(seg_image, task.records.jpeg_quality))
        _atomic_write(paths["seg_mask"], encode_png(seg_mask))
        result["has_mask"] = True
    _atomic_write(paths["meta"], json.dumps(result).encode())
    return result

