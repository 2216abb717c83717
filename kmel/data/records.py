"""build-records: official metadata + image folders in, sharded TFRecords and a manifest out.

The walk: read every known CSV (by header) into one table → find images and masks → prepare each
image in parallel (hash, decode, skin tone, encoded payloads cached on disk) → drop byte-identical
duplicates → labels for the task → patient-level / stratified split → write shards atomically →
``metadata.csv``, ``skipped.csv`` and ``manifest.json`` (written last: training reads only the
shards a manifest lists, so a killed run's partial output is never read).

A rerun after a kill reuses every prepared image and every complete shard whose plan (the ordered
ids it holds plus the settings that shape its bytes) is unchanged, and ends with the same manifest.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pandas as pd
from tqdm.auto import tqdm

import kmel
from kmel import constants as C
from kmel.config import LEGACY_CROPS, Config, ConfigError, save_config, to_plain
from kmel.data.metadata import (
    apply_task,
    diagnosis_drops,
    drop_content_duplicates,
    find_images,
    find_masks,
    load_metadata,
    split_table,
)
from kmel.data.prepare import PrepareTask, prepare_image, read_prepared

PLAN_DIR = ".plans"


class DataError(ValueError):
    """Input data that cannot be used at all (no labelled images, no CSV); the message says why."""


def resolve_workers(workers: int) -> int:
    return max(1, workers if workers > 0 else (os.cpu_count() or 1))


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already; OpenCV threads would oversubscribe


def run_parallel(
    fn: Callable[[Any], dict], tasks: Sequence[Any], workers: int, desc: str, progress: bool = True
) -> list[dict]:
    """Map ``fn`` over ``tasks`` in a spawn-started process pool (TensorFlow is never forked)."""
    results: list[dict] = []
    bar = tqdm(total=len(tasks), desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    if workers <= 1 or len(tasks) < 2:
        for task in tasks:
            results.append(fn(task))
            bar.update()
    else:
        ctx = multiprocessing.get_context("spawn")
        chunk = max(1, min(32, len(tasks) // (workers * 8) or 1))
        with ctx.Pool(workers, initializer=_init_worker) as pool:
            for result in pool.imap_unordered(fn, tasks, chunksize=chunk):
                results.append(result)
                bar.update()
    bar.close()
    return results


def _records_crops(config: Config) -> dict[str, Any]:
    """The crop settings image records depend on (the skin tone's): not those added later that only the crop
    stage reads (LEGACY_CROPS), so adding one leaves existing records current."""
    return {k: v for k, v in to_plain(config.crops).items() if k not in LEGACY_CROPS}


def _prepare_cache_dir(out_dir: Path, config: Config) -> Path:
    """Cache keyed by every setting that changes a prepared payload."""
    key = json.dumps(
        {
            "image_size": config.records.image_size,
            "seg_size": config.records.seg_size,
            "jpeg_quality": config.records.jpeg_quality,
            "crops": _records_crops(config),
            "version": 2,  # 2: one .prep file per image
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    path = out_dir / f".prepare-{digest}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _counts(table: pd.DataFrame) -> dict[str, Any]:
    """split → source → target → skin-tone name → count."""
    out: dict[str, Any] = {}
    for (split, source, target, tone), n in (
        table.groupby([C.COL_SPLIT, C.COL_SOURCE, C.COL_TARGET, C.COL_SKIN_TONE_NAME]).size().items()
    ):
        out.setdefault(split, {}).setdefault(source, {}).setdefault(str(int(target)), {})[tone] = int(n)
    return out


def _example(row: pd.Series, image: bytes, mask: bytes = b"") -> bytes:
    from kmel.data.tfrecord import make_example

    return make_example(
        **{
            C.F_IMAGE: image,
            C.F_MASK: mask,
            C.F_IMAGE_ID: row[C.COL_IMAGE_ID],
            C.F_SOURCE: row[C.COL_SOURCE],
            C.F_DIAGNOSIS: str(row.get(C.COL_DIAGNOSIS, "") or ""),
            C.F_PATIENT: str(row.get(C.COL_PATIENT, "") or ""),
            C.F_TARGET: int(row[C.COL_TARGET]),
            C.F_SKIN_TONE: int(row[C.COL_SKIN_TONE]),
            C.F_ITA: float(row[C.COL_ITA]),
            C.F_ITA_CATEGORY: int(row[C.COL_ITA_CATEGORY]),
            C.F_HEIGHT: int(row["height"]),
            C.F_WIDTH: int(row["width"]),
        }
    )


def write_sharded(
    out_dir: Path,
    prefix: str,
    split: str,
    items: Sequence[Any],
    make_records: Callable[[Sequence[Any]], Iterable[bytes]],
    item_key: Callable[[Any], str],
    shard_size: int,
    settings: dict[str, Any],
) -> list[dict[str, Any]]:
    """Write ``items`` into ``prefix-split-*`` shards, reusing complete shards whose plan is unchanged.

    Stale shards of the same prefix and split (another count, or another plan) are removed.
    """
    from kmel.data.tfrecord import file_sha256, shard_name, write_shard

    plan_dir = out_dir / PLAN_DIR
    plan_dir.mkdir(exist_ok=True)
    count = max(1, -(-len(items) // shard_size)) if items else 0
    wanted = set()
    entries = []
    for index in range(count):
        chunk = items[index * shard_size : (index + 1) * shard_size]
        name = shard_name(prefix, split, index, count)
        wanted.add(name)
        plan = hashlib.sha256(json.dumps([[item_key(i) for i in chunk], settings], sort_keys=True).encode()).hexdigest()
        plan_file = plan_dir / f"{name}.plan"
        path = out_dir / name
        if path.exists() and plan_file.exists() and plan_file.read_text() == plan:
            entries.append({"file": name, "records": len(chunk), "sha256": file_sha256(path)})
            continue
        entries.append(write_shard(path, make_records(chunk)))
        plan_file.write_text(plan)
    for stale in out_dir.glob(f"{prefix}-{split}-*.tfrecord*"):
        if stale.name not in wanted:
            stale.unlink()
    return entries


def build_records(
    data_dir: str | Path, out_dir: str | Path, config: Config, progress: bool = True
) -> dict[str, Any]:
    """Clean, label, split and write records; return the manifest (also written to ``out_dir``)."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    rc = config.records
    if not data_dir.is_dir():
        raise DataError(
            f"data folder {data_dir} does not exist: point --data-dir at your ISIC/HAM10000 download, "
            "or make a synthetic one with `python cli.py make-synthetic data`"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = [Path(p) for p in rc.duplicate_lists]
    for path in extra:
        if not path.is_file():
            raise ConfigError(f"duplicate list {path} (records.duplicate_lists) does not exist")
    table, report = load_metadata(data_dir, extra_duplicate_lists=extra, sources=rc.sources)
    if table.empty:
        raise DataError(
            f"no labelled rows found under {data_dir}: expected official ISIC / HAM10000 / Fitzpatrick17k CSVs "
            f"or a plain image_id,label CSV (unrecognised files: {report.get('unrecognised_files', [])})"
        )

    twins: list[dict[str, str]] = []
    unreadable: list[str] = []
    images, masks = find_images(data_dir, twins, unreadable), find_masks(data_dir)
    report["unrecognised_files"] = report.get("unrecognised_files", []) + unreadable
    base = table["base_id"] if "base_id" in table else table[C.COL_IMAGE_ID]
    known = set(table[C.COL_IMAGE_ID]) | set(base)
    report["id_twins"] = [t for t in twins if t["image_id"] in known]
    table[C.COL_IMAGE_PATH] = [
        str(images.get(i) or images.get(b) or "") for i, b in zip(table[C.COL_IMAGE_ID], base)
    ]
    table[C.COL_MASK_PATH] = [
        str(masks.get(i) or masks.get(b) or "") for i, b in zip(table[C.COL_IMAGE_ID], base)
    ]
    report["masks_without_image"] = sorted(str(masks[k]) for k in masks if k not in known)
    missing = table[table[C.COL_IMAGE_PATH] == ""]
    report["missing_images"] = {k: int(v) for k, v in missing[C.COL_SOURCE].value_counts().sort_index().items()}
    table = table[table[C.COL_IMAGE_PATH] != ""].reset_index(drop=True)
    if table.empty:
        raise DataError(
            f"none of the {len(missing)} labelled images was found under {data_dir} "
            "(images are matched by id: <image_id>.jpg/.png/... in any sub-folder)"
        )

    cache = _prepare_cache_dir(out_dir, config)
    tasks = [
        PrepareTask(i, p, m, str(cache), rc, config.crops)
        for i, p, m in zip(table[C.COL_IMAGE_ID], table[C.COL_IMAGE_PATH], table[C.COL_MASK_PATH])
    ]
    results = run_parallel(prepare_image, tasks, resolve_workers(rc.workers), "prepare images", progress)
    by_id = {r["image_id"]: r for r in results}
    skipped = [
        {C.COL_IMAGE_ID: r["image_id"], "path": p, "reason": r["error"]}
        for i, p in zip(table[C.COL_IMAGE_ID], table[C.COL_IMAGE_PATH])
        if "error" in (r := by_id[i])
    ]
    mask_issues = sorted(r["mask_note"] for r in results if r.get("mask_note"))
    ok = [i for i in table[C.COL_IMAGE_ID] if "error" not in by_id[i]]
    table = table[table[C.COL_IMAGE_ID].isin(set(ok))].reset_index(drop=True)
    for key in ("sha256", "height", "width", "skin_tone", "skin_tone_name", "ita", "ita_category", "has_mask"):
        table[key] = [by_id[i][key] for i in table[C.COL_IMAGE_ID]]

    table, content_dups = drop_content_duplicates(table)
    before_task = len(table)
    if rc.task == "diagnosis":
        report["dropped_for_classes"] = diagnosis_drops(table, rc.classes)
    table = apply_task(table, rc.task, rc.classes)
    report["dropped_unknown_label_for_task"] = before_task - len(table)
    report["content_duplicates"] = content_dups
    if table.empty:
        raise DataError(f"no images left with a known label for task {rc.task!r}")
    table = split_table(table, rc.val_fraction, rc.test_fraction, rc.seed, eval_only_sources=rc.eval_only_sources)
    table = table.sort_values([C.COL_SPLIT, C.COL_IMAGE_ID], kind="stable").reset_index(drop=True)

    shards: dict[str, dict[str, list]] = {"img": {}, "seg": {}}
    settings = {"records": to_plain(rc), "crops": _records_crops(config)}
    bar = tqdm(total=len(table) + int(table["has_mask"].sum()), desc="write shards", unit="rec",
               disable=not progress, dynamic_ncols=True)

    def img_records(rows: Sequence[pd.Series]) -> Iterable[bytes]:
        for row in rows:
            bar.update()
            yield _example(row, read_prepared(cache, row[C.COL_IMAGE_ID])[1]["img"])

    def seg_records(rows: Sequence[pd.Series]) -> Iterable[bytes]:
        for row in rows:
            bar.update()
            payloads = read_prepared(cache, row[C.COL_IMAGE_ID])[1]
            yield _example(row, payloads["seg_image"], payloads["seg_mask"])

    for split in C.SPLITS:
        part = table[table[C.COL_SPLIT] == split]
        rows = [r for _, r in part.iterrows()]
        shards["img"][split] = write_sharded(
            out_dir, "img", split, rows, img_records, lambda r: r[C.COL_IMAGE_ID], rc.shard_size, settings
        )
        seg_rows = [r for r in rows if r["has_mask"]]
        shards["seg"][split] = write_sharded(
            out_dir, "seg", split, seg_rows, seg_records, lambda r: r[C.COL_IMAGE_ID], rc.shard_size, settings
        )
    bar.close()

    columns = [c for c in table.columns if c not in (C.COL_MASK_PATH,)]
    table[columns].to_csv(out_dir / C.METADATA_CSV, index=False)
    twin_rows = [{C.COL_IMAGE_ID: t["image_id"], "path": t["other"],
                  "reason": f"another file of this image id, {t['used']}, has different content and was used: "
                            "rename or remove one"} for t in report["id_twins"]]
    pd.DataFrame(skipped + twin_rows, columns=[C.COL_IMAGE_ID, "path", "reason"]).to_csv(out_dir / C.SKIPPED_CSV,
                                                                                         index=False)
    save_config(config, out_dir / C.CONFIG_YAML)

    shard_hashes = [e["sha256"] for kind in ("img", "seg") for s in C.SPLITS for e in shards[kind][s]]
    manifest = {
        "kmel_version": kmel.__version__,
        "task": rc.task,
        **({"classes": list(rc.classes), "malignant_classes": list(rc.malignant_classes),
            "class_counts": _class_counts(table, rc.classes)} if rc.task == "diagnosis" else {}),
        "data_dir": str(data_dir.resolve()),
        "fingerprint": hashlib.sha256("".join(shard_hashes).encode()).hexdigest()[:16],
        "n_records": {kind: {s: sum(e["records"] for e in shards[kind][s]) for s in C.SPLITS} for kind in shards},
        "counts": _counts(table),
        "shards": shards,
        "skipped": skipped,
        "mask_issues": mask_issues,
        "cleaning": report,
        "config": config.to_dict(),
    }
    manifest["problems"] = records_problems(manifest)
    tmp = out_dir / (C.MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=_json_default))
    os.replace(tmp, out_dir / C.MANIFEST)
    shutil.rmtree(cache, ignore_errors=True)
    return manifest


def _class_counts(table: pd.DataFrame, classes: Sequence[str]) -> dict[str, dict[str, int]]:
    """split → class name → images, every class listed (0 where a split has none)."""
    return {split: {name: int(((table[C.COL_SPLIT] == split) & (table[C.COL_TARGET] == i)).sum())
                    for i, name in enumerate(classes)} for split in C.SPLITS}


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def load_manifest(records_dir: str | Path) -> dict[str, Any]:
    path = Path(records_dir) / C.MANIFEST
    if not path.is_file():
        raise DataError(
            f"{path} not found: run `python cli.py build-records --out {records_dir}` first "
            "(a folder without a manifest holds no finished record set)"
        )
    return json.loads(path.read_text())


def shard_paths(records_dir: str | Path, kind: str, split: str, manifest: dict | None = None) -> list[Path]:
    """The complete shards of one kind and split, as listed in the manifest."""
    manifest = manifest or load_manifest(records_dir)
    entries = manifest.get("shards", {}).get(kind, {}).get(split, [])
    return [Path(records_dir) / e["file"] for e in entries]


def records_problems(manifest: dict[str, Any]) -> dict[str, dict[str, int]]:
    """What a record set reports, sorted by the exit-code rule (counts; the details are in the manifest).

    ``errors``: an image file could not be read or a mask could not be used (exit 1).
    ``notes``: inputs not usable as given but harmless — labelled rows without an image, masks without a
    labelled image, CSVs not recognised, rows without a usable label, label conflicts (exit 0; 1 with
    ``--strict``).
    """
    cleaning = manifest.get("cleaning", {})
    errors = {
        "unreadable images": len(manifest.get("skipped", [])),
        "unusable masks": len(manifest.get("mask_issues", [])),
    }
    notes = {
        "labelled rows without an image": sum(cleaning.get("missing_images", {}).values()),
        "masks without a labelled image": len(cleaning.get("masks_without_image", [])),
        "CSV files not recognised": len(cleaning.get("unrecognised_files", [])),
        "rows without a usable label": sum(n for reason, n in cleaning.get("dropped", {}).items()
                                           if reason.startswith("no usable label")),
        "label conflicts": len(cleaning.get("conflicts", [])),
        "image ids with two different files": len(cleaning.get("id_twins", [])),
    }
    return {"errors": {k: v for k, v in errors.items() if v}, "notes": {k: v for k, v in notes.items() if v}}


def format_counts(manifest: dict[str, Any]) -> str:
    """A short human summary of a manifest for the CLI."""
    lines = []
    for kind, splits in manifest["n_records"].items():
        lines.append(f"{kind}: " + ", ".join(f"{s} {n}" for s, n in splits.items()))
    skipped = len(manifest.get("skipped", []))
    missing = sum(manifest.get("cleaning", {}).get("missing_images", {}).values())
    lines.append(f"skipped (unreadable) images: {skipped}; labelled rows without an image: {missing}")
    cleaning = manifest.get("cleaning", {})
    masks = len(manifest.get("mask_issues", []))
    orphans = len(cleaning.get("masks_without_image", []))
    if masks or orphans:
        lines.append(f"masks not used: {masks} (wrong size, empty or unreadable); masks without a labelled image: {orphans}")
    if cleaning.get("unrecognised_files"):
        lines.append(f"CSV files not recognised (header unknown): {len(cleaning['unrecognised_files'])}")
    if cleaning.get("conflicts"):
        lines.append(f"label conflicts resolved as malignant: {len(cleaning['conflicts'])}")
    for split, counts in manifest.get("class_counts", {}).items():
        lines.append(f"{split} classes: " + ", ".join(f"{name} {n}" for name, n in counts.items()))
    for reason, names in cleaning.get("dropped_for_classes", {}).items():
        top = sorted(names.items(), key=lambda kv: -kv[1])[:5]
        lines.append(f"no class ({reason}): {sum(names.values())} rows, e.g. " + ", ".join(f"{k} {n}" for k, n in top))
    lines.append("details: manifest.json (cleaning, skipped, mask_issues) and skipped.csv")
    return "\n".join(lines)
