"""The classification preprocessing, shared by crop records, ``evaluate`` and ``predict``.

:class:`CropPipeline` is the one code path from an RGB image to a classifier input:
resize to the records' long side → (CLAHE + gamma, `crops.enhance_segmenter_input`) → pad square → segmenter (averaged
over four flips with `crops.segmenter_flips`) → probability
map back on the image → :func:`kmel.lesion.lesion.prepare_crop` (clean mask, crop with margin or whole
image, hair removal, skin tone). OpenCV work runs in a thread pool (OpenCV releases the GIL), the
segmenter in batches. Crop records live in ``<records>/crops-<segmenter fingerprint>-<settings hash>/``, one crop
shard per img- shard, each rebuilt only when its source shard changes; other crop settings or another segmenter
get another folder, so the crops a classifier was trained on stay as they were.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm.auto import tqdm

import kmel
from kmel import constants as C
from kmel.config import Config, crops_identity
from kmel.data.images import encode_jpeg, flip_views, pad_to_square, resize_long_side
from kmel.lesion.lesion import CropResult, enhance_for_segmentation, prepare_crop
from kmel.models.integrity import DEFAULT_CHECKS, ModelChecks

SegmentFn = Callable[[np.ndarray], np.ndarray]  # float32 [N, S, S, 3] 0–255 → [N, S, S] probabilities


@dataclass(frozen=True)
class PreparedCrop:
    """A crop plus where it came from, in the ORIGINAL image's pixel coordinates."""

    result: CropResult
    box: tuple[int, int, int, int]
    original_size: tuple[int, int]  # (height, width)


@dataclass(frozen=True)
class PreStage:
    """One image after :meth:`CropPipeline.pre`: at the records' size, ready for the segmenter."""

    small: np.ndarray  # RGB uint8, long side = records.image_size
    seg_input: np.ndarray  # enhanced, padded square, seg_size × seg_size, uint8
    pad: tuple[int, int, int, int]  # top, bottom, left, right
    original_size: tuple[int, int]  # (height, width) of the image as given


def make_segment_fn(
    models_dir: str | Path, pipeline: dict[str, Any] | None = None, checks: ModelChecks = DEFAULT_CHECKS,
) -> tuple[SegmentFn, int]:
    """The exported segmenter's ``serve`` function and its input size (from ``pipeline``, the
    contents of pipeline.json, read from ``models_dir`` when not given), loaded after ``checks``
    (:mod:`kmel.models.integrity`)."""
    from kmel.models.pipeline import load_serving, read_pipeline, signature_fn

    pipeline = read_pipeline(models_dir) if pipeline is None else pipeline
    if "segmenter" not in pipeline:
        raise FileNotFoundError(
            f"{Path(models_dir) / C.PIPELINE_JSON} has no segmenter: run `python cli.py train seg` first"
        )
    serve = signature_fn(load_serving(Path(models_dir) / C.SEGMENTER_DIR, checks, pipeline["segmenter"].get("fingerprint")))

    def segment(batch: np.ndarray) -> np.ndarray:
        return serve(batch)[..., 0]

    return segment, int(pipeline["segmenter"]["image_size"])


def flip_averaged_masks(segment: SegmentFn, batch: np.ndarray) -> np.ndarray:
    """``segment``'s [N, S, S] probabilities averaged over the four :func:`kmel.data.images.flip_views` of
    ``batch``, each view's output flipped back (``crops.segmenter_flips``)."""
    views = flip_views(batch)
    return np.mean([flip_views(np.asarray(segment(np.ascontiguousarray(v))))[k] for k, v in enumerate(views)], axis=0)


class CropPipeline:
    """Image → classifier crop, identical for training records, evaluation and prediction."""

    def __init__(self, segment: SegmentFn | None, seg_size: int, config: Config, workers: int = 0):
        self.segment, self.seg_size, self.config = segment, seg_size, config
        self.workers = workers if workers > 0 else (os.cpu_count() or 1)
        self.pool = ThreadPoolExecutor(self.workers)

    def close(self) -> None:
        self.pool.shutdown()

    def __enter__(self) -> CropPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pre(self, image: np.ndarray, original_size: tuple[int, int] | None = None) -> PreStage:
        """The segmenter's input for one image, and what :meth:`finish` needs of it. The original
        image is not kept (only its size), so a caller can drop a full-resolution decode right away.
        ``original_size``: (height, width) of the file when ``image`` was decoded reduced (boxes are
        reported in the file's pixels)."""
        small = resize_long_side(image, self.config.records.image_size)
        crops = self.config.crops
        enhanced = enhance_for_segmentation(small, crops) if crops.enhance_segmenter_input else small
        square, pad = pad_to_square(enhanced)
        seg_input = cv2.resize(square, (self.seg_size, self.seg_size), interpolation=cv2.INTER_AREA)
        size = original_size if original_size is not None else image.shape[:2]
        return PreStage(small, seg_input, pad, (int(size[0]), int(size[1])))

    def _post(self, pre: PreStage, prob: np.ndarray | None) -> PreparedCrop:
        small = pre.small
        prob_small = None
        if prob is not None:
            h, w = small.shape[:2]
            top, bottom, left, right = pre.pad
            side = h + top + bottom
            prob_sq = cv2.resize(prob.astype(np.float32), (side, side), interpolation=cv2.INTER_LINEAR)
            prob_small = prob_sq[top : top + h, left : left + w]
        result = prepare_crop(small, prob_small, self.config.classifier.image_size, self.config.crops)
        height, width = pre.original_size
        scale_y = height / small.shape[0]
        scale_x = width / small.shape[1]
        x0, y0, x1, y1 = result.box
        box = (
            int(round(x0 * scale_x)),
            int(round(y0 * scale_y)),
            min(width, int(round(x1 * scale_x))),
            min(height, int(round(y1 * scale_y))),
        )
        return PreparedCrop(result, box, pre.original_size)

    def finish(self, pres: Sequence[PreStage]) -> list[PreparedCrop]:
        """Segment a batch of :meth:`pre` outputs, then crop, remove hair and estimate skin tone."""
        if not pres:
            return []
        probs: list[np.ndarray | None] = [None] * len(pres)
        if self.segment is not None:
            batch = np.stack([p.seg_input for p in pres]).astype(np.float32)
            probs = list(flip_averaged_masks(self.segment, batch) if self.config.crops.segmenter_flips
                         else self.segment(batch))
        return list(self.pool.map(self._post, pres, probs))

    def run(self, images: Sequence[np.ndarray]) -> list[PreparedCrop]:
        """Crops for a batch of RGB uint8 images of any size."""
        return self.finish(list(self.pool.map(self.pre, images)))


# === Crop records ===


def crop_settings(config: Config, segmenter_fingerprint: str) -> str:
    """Everything that changes a crop record's pixels, as one canonical JSON string."""
    return json.dumps({"crops": crops_identity(config.crops), "size": config.classifier.image_size,
                       "records": config.records.image_size, "segmenter": segmenter_fingerprint}, sort_keys=True)


def crops_dir_for(records_dir: str | Path, segmenter_fingerprint: str, config: Config) -> Path:
    """``<records>/crops-<segmenter fingerprint>-<settings hash>``: crops made with other settings (another crop
    size, colour constancy on) get their own folder, so a classifier's crops are never rebuilt under it."""
    settings = hashlib.sha256(crop_settings(config, segmenter_fingerprint).encode()).hexdigest()[:8]
    return Path(records_dir) / f"crops-{segmenter_fingerprint}-{settings}"


def _crop_example(record: dict[str, Any], crop: PreparedCrop, quality: int) -> bytes:
    from kmel.data.tfrecord import make_example

    tone = crop.result.skin_tone
    return make_example(
        **{
            C.F_IMAGE: encode_jpeg(crop.result.crop, quality),
            C.F_IMAGE_ID: record[C.F_IMAGE_ID],
            C.F_SOURCE: record[C.F_SOURCE],
            C.F_DIAGNOSIS: record[C.F_DIAGNOSIS],
            C.F_PATIENT: record[C.F_PATIENT],
            C.F_TARGET: record[C.F_TARGET],
            C.F_SKIN_TONE: tone.group,
            C.F_ITA: tone.ita,
            C.F_ITA_CATEGORY: tone.ita_category,
            C.F_HEIGHT: record[C.F_HEIGHT],
            C.F_WIDTH: record[C.F_WIDTH],
            C.F_CROP_MODE: C.CROP_MODES.index(crop.result.crop_mode),
            C.F_BOX: crop.box,
        }
    )


def _batched(items: Iterable[Any], n: int) -> Iterable[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def build_crop_records(
    records_dir: str | Path, models_dir: str | Path, config: Config, progress: bool = True,
    pipeline: dict[str, Any] | None = None, checks: ModelChecks = DEFAULT_CHECKS,
) -> Path:
    """Run the exported segmenter over every img- record and write crop records; returns their folder.

    ``pipeline``: the contents of ``models_dir/pipeline.json`` when the caller has read it already.
    """
    from kmel.data.records import load_manifest
    from kmel.data.tfrecord import file_sha256, read_records, write_shard
    from kmel.models.pipeline import read_pipeline

    records_dir = Path(records_dir)
    manifest = load_manifest(records_dir)
    pipeline = read_pipeline(models_dir) if pipeline is None else pipeline
    fingerprint = pipeline.get("segmenter", {}).get("fingerprint")
    if not fingerprint:
        raise FileNotFoundError(f"no trained segmenter in {models_dir}: run `python cli.py train seg` first")
    segment, seg_size = make_segment_fn(models_dir, pipeline, checks)
    out = crops_dir_for(records_dir, fingerprint, config)
    out.mkdir(parents=True, exist_ok=True)
    settings = crop_settings(config, fingerprint)
    total = sum(manifest["n_records"]["img"].values())
    bar = tqdm(total=total, desc="lesion crops", unit="img", disable=not progress, dynamic_ncols=True)
    shards: dict[str, list[dict[str, Any]]] = {}
    counts: dict[str, Any] = {}
    modes: dict[str, dict[str, int]] = {}
    rows: list[dict[str, Any]] = []
    quality = config.records.jpeg_quality
    with CropPipeline(segment, seg_size, config, config.crops.workers) as pipeline:
        for split in C.SPLITS:
            shards[split] = []
            for entry in manifest["shards"]["img"].get(split, []):
                name = entry["file"].replace("img-", "crop-", 1)
                plan = hashlib.sha256((entry["sha256"] + settings).encode()).hexdigest()
                plan_file, path, meta_file = out / f".{name}.plan", out / name, out / f".{name}.rows.json"
                if not (path.exists() and plan_file.exists() and plan_file.read_text() == plan and meta_file.exists()):

                    def examples() -> Iterable[bytes]:
                        shard_rows = []
                        for batch in _batched(read_records([records_dir / entry["file"]]), config.crops.batch_size):
                            images = [cv2.cvtColor(cv2.imdecode(np.frombuffer(r[C.F_IMAGE], np.uint8),
                                                                cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB) for r in batch]
                            for record, crop in zip(batch, pipeline.run(images)):
                                tone = crop.result.skin_tone
                                shard_rows.append({"image_id": record[C.F_IMAGE_ID], "source": record[C.F_SOURCE],
                                                   "target": record[C.F_TARGET], "skin_tone": tone.group_name,
                                                   "ita_category": tone.ita_category,
                                                   "crop_mode": crop.result.crop_mode})
                                yield _crop_example(record, crop, quality)
                            bar.update(len(batch))
                        meta_file.write_text(json.dumps(shard_rows))

                    shards[split].append(write_shard(path, examples()))
                    plan_file.write_text(plan)
                else:
                    shards[split].append({"file": name, "records": entry["records"], "sha256": file_sha256(path)})
                    bar.update(entry["records"])
                for row in json.loads(meta_file.read_text()):
                    rows.append(row)
                    node = counts.setdefault(split, {}).setdefault(row["source"], {}).setdefault(str(row["target"]), {})
                    node[row["skin_tone"]] = node.get(row["skin_tone"], 0) + 1
                    modes.setdefault(split, {})[row["crop_mode"]] = modes.get(split, {}).get(row["crop_mode"], 0) + 1
    bar.close()
    crop_manifest = {
        "kmel_version": kmel.__version__,
        "kind": "crop",
        # the labels' meaning, as build-records wrote it (kmel.models.heads.head_from_manifest reads it)
        **{key: manifest[key] for key in ("task", "classes", "malignant_classes") if key in manifest},
        "source_records": str(records_dir.resolve()),
        "source_fingerprint": manifest["fingerprint"],
        "segmenter_fingerprint": fingerprint,
        "fingerprint": hashlib.sha256("".join(e["sha256"] for s in C.SPLITS for e in shards[s]).encode()).hexdigest()[:16],
        "n_records": {"crop": {s: sum(e["records"] for e in shards[s]) for s in C.SPLITS}},
        "counts": counts,
        "crop_modes": modes,
        "shards": {"crop": shards},
        "config": config.to_dict(),
    }
    tmp = out / (C.MANIFEST + ".tmp")
    tmp.write_text(json.dumps(crop_manifest, indent=2))
    os.replace(tmp, out / C.MANIFEST)
    return out


def ensure_crop_records(
    records_dir: str | Path, models_dir: str | Path, config: Config, progress: bool = True, build: bool = True,
    pipeline: dict[str, Any] | None = None, checks: ModelChecks = DEFAULT_CHECKS,
) -> Path:
    """Crop records for the current segmenter: reused when complete, (re)built otherwise
    (``build=False``: an error instead, for multi-worker training where one machine builds them first).
    ``pipeline``: the contents of ``models_dir/pipeline.json`` when the caller has read it already."""
    from kmel.models.pipeline import read_pipeline

    pipeline = read_pipeline(models_dir) if pipeline is None else pipeline
    fingerprint = pipeline.get("segmenter", {}).get("fingerprint")
    if not fingerprint:
        raise FileNotFoundError(f"no trained segmenter in {models_dir}: run `python cli.py train seg` first")
    out = crops_dir_for(records_dir, fingerprint, config)
    manifest = out / C.MANIFEST
    if manifest.exists():
        data = json.loads(manifest.read_text())
        from kmel.data.records import load_manifest

        current = load_manifest(records_dir)["fingerprint"]
        if data.get("source_fingerprint") == current \
                and crops_identity(data["config"].get("crops", {})) == crops_identity(config.crops) \
                and data["config"]["classifier"]["image_size"] == config.classifier.image_size:
            return out
    if not build:
        raise FileNotFoundError(
            f"crop records for this segmenter are missing or stale under {out}: build them once with "
            f"`python cli.py build-records --stage crops --out {records_dir}` before multi-worker training"
        )
    return build_crop_records(records_dir, models_dir, config, progress, pipeline, checks)
