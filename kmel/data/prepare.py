"""Per-image work of build-records, run in worker processes (OpenCV side; no TensorFlow import).

:func:`prepare_image` reads one image (and its mask), hashes the file, estimates skin tone with a
model-free lesion exclusion (the expert mask where there is one), and writes the encoded payloads
of its img- and seg- records into a cache folder, so that the parent process keeps only small
dicts in memory and a killed run can reuse every image it already prepared.

One cache file per image (``<id>.prep``: a JSON line with the result and the payload lengths,
then the payloads), written to a temporary name and renamed: on a virtual disk, creating and
renaming four small files per image cost more system time than decoding the image.
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
from kmel.data.hdf5 import read_source
from kmel.data.images import (
    MIB,
    ImageReadError,
    encode_jpeg,
    encode_png,
    load_image_reduced,
    pad_to_square,
    read_file,
    resize_long_side,
)
from kmel.lesion.lesion import estimate_skin_tone, model_free_lesion_mask

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


PAYLOADS = ("img", "seg_image", "seg_mask")


def cache_path(cache_dir: str | Path, image_id: str) -> Path:
    return Path(cache_dir) / f"{image_id}.prep"


def _write_prepared(path: Path, result: dict[str, Any], payloads: dict[str, bytes]) -> None:
    header = json.dumps({"result": result, "lengths": {k: len(v) for k, v in payloads.items()}})
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(header.encode() + b"\n")
        for name in PAYLOADS:
            if name in payloads:
                f.write(payloads[name])
    os.replace(tmp, path)


def read_prepared(cache_dir: str | Path, image_id: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The cached result and payloads of one image; raises ``ValueError`` if the file is damaged."""
    data = cache_path(cache_dir, image_id).read_bytes()
    end = data.index(b"\n")
    header = json.loads(data[:end])
    payloads, offset = {}, end + 1
    for name in PAYLOADS:
        if name in header["lengths"]:
            n = header["lengths"][name]
            payloads[name] = data[offset : offset + n]
            offset += n
    if offset != len(data):
        raise ValueError(f"{cache_path(cache_dir, image_id)}: {len(data)} bytes, header says {offset}")
    return header["result"], payloads


def _load_mask(
    mask_path: str, full_shape: tuple[int, int], shape: tuple[int, int], max_bytes: int
) -> tuple[np.ndarray | None, str]:
    """Binary 0/1 mask at ``shape`` (the decoded image's size) or (None, reason it was not used).

    ``full_shape`` is the image file's own size: the mask must have its aspect ratio.
    """
    try:
        data = read_file(mask_path, max_bytes)
    except ImageReadError as exc:
        return None, f"mask {exc}"
    raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
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
    if cache_path(task.cache_dir, task.image_id).exists():
        try:
            return read_prepared(task.cache_dir, task.image_id)[0]
        except (OSError, ValueError, KeyError):
            pass  # damaged cache file: prepare again
    try:
        # Only a regular file within the size bound is opened: a FIFO or /dev/zero named like an image
        # is one skipped row, not a hung or killed run.
        data = read_source(task.image_path, task.records.max_file_mb * MIB)  # a file, or a crop in an .hdf5
    except ImageReadError as exc:
        return {"image_id": task.image_id, "error": str(exc)}
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
        mask, note = _load_mask(task.mask_path, (h, w), image.shape[:2], task.records.max_file_mb * MIB)
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
    payloads = {"img": encode_jpeg(small, task.records.jpeg_quality)}
    if mask is not None:
        square, _ = pad_to_square(image)
        square_mask, _ = pad_to_square(mask * 255)
        size = task.records.seg_size
        seg_image = cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA)
        seg_mask = cv2.resize(square_mask, (size, size), interpolation=cv2.INTER_AREA)
        seg_mask = np.where(seg_mask >= 128, 255, 0).astype(np.uint8)
        payloads["seg_image"] = encode_jpeg(seg_image, task.records.jpeg_quality)
        payloads["seg_mask"] = encode_png(seg_mask)
        result["has_mask"] = True
    _write_prepared(cache_path(task.cache_dir, task.image_id), result, payloads)
    return result

