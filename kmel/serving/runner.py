"""``predict``'s file runner: the exported models over image files, one row per input file (CSV or JSONL).

:func:`predict_files` resolves the inputs (files, folders, ``-`` for paths on standard input) to one
:class:`InputFile` each, identified by its ``relpath``. A background thread (:func:`staged_batches`)
decodes, segments and crops batch after batch into a bounded queue while the caller's thread
classifies (:class:`kmel.serving.predictor.Predictor`) and appends rows in input order, flushed to disk.
Rerunning the same command resumes: files already in the output (by ``relpath`` or path) are skipped, so
a killed run loses nothing and writes no duplicates, and files with an error row are tried again; the
output and its ``OUT.meta.json`` are :mod:`kmel.serving.outputs`. A file that cannot be used gets a row
with ``status=error`` and the reason; so does one the classifier scores as NaN or infinite.

Memory is bounded by settings, not by the number of files: ``predict.queue_batches`` finished batches
wait at most, each image is held at the records' size once decoded, and one model call sees at most
``predict.max_batch_pixels`` input pixels.
"""

from __future__ import annotations

import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, Full, Queue
from typing import Any, Iterable, Iterator, Sequence

from tqdm.auto import tqdm

from kmel.config import ConfigError
from kmel.data.hdf5 import list_members, member_name, read_source
from kmel.data.images import (
    MIB,
    Found,
    ImageReadError,
    found_file,
    load_image_reduced,
    walk_images,
)
from kmel.models.heads import head_from_entry
from kmel.models.integrity import DEFAULT_CHECKS, ModelChecks
from kmel.models.pipeline import read_pipeline, source_threshold
from kmel.serving.explain import save_overlay
from kmel.serving.outputs import (  # noqa: F401 (re-exported)
    COLUMNS,
    RowsFile,
    escape_cell,
    output_columns,
    output_identity,
    printable,
)
from kmel.serving.predictor import Predictor
from kmel.serving.runtime import config_from_pipeline

# === Models: images in, predictions out ===


# === Inputs: files, folders and standard input, one row each ===


@dataclass(frozen=True)
class InputFile:
    """One input file and its identity in the output.

    ``relpath``: the path relative to the folder it was found in — with several inputs, relative to
    their common folder, so two ``ISIC_1.jpg`` in two folders stay two rows. ``status``: ``file`` (to
    read), ``error`` (cannot be read; the reason says why) or ``skipped`` (reported, not an error).
    """

    path: Path
    relpath: str
    status: str = "file"
    reason: str = ""


def collect_inputs(inputs: Sequence[str | Path], stdin: Iterable[str] | None = None) -> list[InputFile]:
    """Every input file once, in order: each file named, every image-like file under each folder, and
    for ``-`` each path read from ``stdin`` (one per line). An ``.hdf5`` / ``.h5`` file (ISIC 2024's) is one input
    per image in it, named ``<file.hdf5>/<key>`` (``relpath`` ``file.hdf5/ISIC_…``).

    A path named on the command line that does not exist is a usage error (``FileNotFoundError``);
    one read from ``stdin`` gets an error row.
    """
    named: list[Path] = []
    for item in inputs:
        if str(item) == "-":
            if stdin is None:
                raise ConfigError("'-' reads the paths to predict from standard input, and none was given")
            named += [Path(line.rstrip("\r\n")) for line in stdin if line.strip()]
        elif not os.path.lexists(item):
            raise FileNotFoundError(f"input {item} does not exist")
        else:
            named.append(Path(item))
    found: list[tuple[str, Found]] = []  # (the folder its relpath is taken from, entry)
    for path in named:
        if path.is_dir():
            found += [(os.path.abspath(path), f) for f in walk_images(path)]
        else:
            found.append((os.path.dirname(os.path.abspath(path)), found_file(path)))
    found = [(base, member) for base, entry in found for member in _members(entry)]
    if not found:
        return []
    common = os.path.commonpath([base for base, _ in found])
    files, seen = [], set()
    for _, entry in found:
        absolute = os.path.abspath(entry.path)
        if absolute in seen:
            continue
        seen.add(absolute)
        relpath = Path(os.path.relpath(absolute, common)).as_posix()
        files.append(InputFile(entry.path, relpath, entry.status, entry.reason))
    return files


def _members(entry: Found) -> list[Found]:
    """An HDF5 file as one entry per image in it (``<file.hdf5>/<key>``), or as one error row; others as they are."""
    if entry.status != "container":
        return [entry]
    try:
        return [Found(Path(member_name(entry.path, key))) for key in list_members(entry.path)]
    except ImageReadError as exc:
        return [Found(entry.path, "error", str(exc))]


# === The runner ===


@dataclass
class PredictSummary:
    n_ok: int = 0
    n_error: int = 0
    n_skipped: int = 0  # reported only (a folder reached twice through a symlink)
    n_malignant: int = 0
    n_resumed: int = 0
    seconds: float = 0.0
    errors: list[tuple[str, str]] = field(default_factory=list)
    n_fused: int | None = None  # with --metadata: rows given the fused probability (all rows of the output)
    fusion_missing_columns: list[str] = field(default_factory=list)  # the fusion's columns the table lacks

    @property
    def images_per_second(self) -> float:
        return (self.n_ok + self.n_error) / self.seconds if self.seconds else 0.0


@dataclass
class _Staged:
    """One batch of input files on its way through predict: crops for the files that could be used,
    the reason for each that could not (keys: index in ``items``)."""

    items: list[InputFile]
    prepared: dict[int, Any]
    errors: dict[int, str]


_DONE = object()


def _decode_and_pre(item: InputFile, max_bytes: int, crops: Any) -> Any:
    """The file decoded and reduced to the segmenter's input (:class:`kmel.lesion.crops.PreStage`), or why not.

    Decoded as ``build-records`` decodes (a large JPEG at 1/2–1/8 scale in the DCT domain, down to the
    records' size), so predict sees the pixels training saw, faster and in a fraction of the memory.
    The decode is dropped here: at most one per decoding thread is alive at a time.
    """
    if item.status != "file":
        return item.reason
    records = crops.config.records
    try:
        data = read_source(item.path, max_bytes)  # a regular file within the size bound, or a crop in an .hdf5
        image, size = load_image_reduced(data, max(records.image_size, records.seg_size), name=str(item.path))
        del data
    except ImageReadError as exc:
        return str(exc)
    except Exception as exc:  # an unexpected decoder failure is still one bad file, not the end of the run
        return f"{item.path}: {type(exc).__name__}: {exc}"
    try:
        return crops.pre(image, original_size=size)
    except Exception as exc:  # an image the preprocessing cannot use (e.g. 1 × 1 px) is one bad file
        return f"{item.path}: cannot be prepared: {type(exc).__name__}: {exc}"


def staged_batches(
    predictor: Predictor, items: Sequence[InputFile], batch_size: int, max_bytes: int, depth: int | None = None,
) -> Iterator[_Staged]:
    """Batches of ``items`` decoded, segmented and cropped, in order, made by a background thread while
    the caller classifies and writes earlier ones.

    Memory is bounded by design, not by the number of files: at most ``depth`` finished batches wait in
    the queue (``predict.queue_batches``), one more is being made, and each holds only images at the
    records' size (full-resolution decodes are dropped as soon as they are reduced; at most one per
    decoding thread exists at a time). Stopping early (an error, Ctrl-C) stops the thread after the
    batch it is on.
    """
    depth = predictor.config.predict.queue_batches if depth is None else depth
    queue: Queue = Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(value: Any) -> bool:
        while not stop.is_set():
            try:
                queue.put(value, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            with ThreadPoolExecutor(predictor.crops.workers, thread_name_prefix="kmel-decode") as decoder:
                for start in range(0, len(items), batch_size):
                    if stop.is_set():
                        return
                    batch = list(items[start : start + batch_size])
                    staged = list(decoder.map(lambda it: _decode_and_pre(it, max_bytes, predictor.crops), batch))
                    good = [i for i, s in enumerate(staged) if not isinstance(s, str)]
                    crops = predictor.crops.finish([staged[i] for i in good])
                    errors = {i: s for i, s in enumerate(staged) if isinstance(s, str)}
                    del staged
                    if not put(_Staged(batch, dict(zip(good, crops)), errors)):
                        return
        except BaseException as exc:  # handed to the caller's thread, which raises it
            put(exc)
            return
        put(_DONE)

    thread = threading.Thread(target=produce, name="kmel-prepare", daemon=True)
    thread.start()
    try:
        while True:
            value = queue.get()
            if value is _DONE:
                return
            if isinstance(value, BaseException):
                raise value
            yield value
    finally:
        stop.set()
        while thread.is_alive():
            try:
                queue.get(timeout=0.1)  # unblock a producer waiting to put
            except Empty:
                pass
        thread.join()


def check_writable_folder(folder: str | Path, option: str) -> None:
    """Create ``folder`` if needed and make sure files can be written in it, or say why not (one line)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".kmel-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{option} folder {folder} cannot be written ({exc.strerror or type(exc).__name__}): "
                          "choose a folder you can write to") from None


def overlay_path(explain_dir: str | Path, relpath: str) -> Path:
    """Where the Grad-CAM overlay of the file at ``relpath`` goes: the same relative path, so none collide."""
    return Path(explain_dir) / f"{relpath}_gradcam.png"


def run_predictions(
    predictor: Predictor, items: Sequence[InputFile], rows_file: RowsFile, batch_size: int | None = None,
    explain_dir: str | Path | None = None, max_file_mb: int | None = None, progress: bool = True,
    done: set[str] | None = None,
) -> PredictSummary:
    """Predict ``items`` whose ``relpath`` is not in ``rows_file`` yet (``done``: its relpaths, when
    the caller has read them already) and append their rows."""
    done = rows_file.done() if done is None else done
    todo = [item for item in items if printable(item.relpath) not in done and os.path.abspath(item.path) not in done]
    summary = PredictSummary(n_resumed=len(items) - len(todo))
    batch_size = batch_size or predictor.config.predict.batch_size
    max_bytes = (max_file_mb if max_file_mb is not None else predictor.config.predict.max_file_mb) * MIB
    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc="predict", unit="img", disable=not progress, dynamic_ncols=True)
    with rows_file:
        for staged in staged_batches(predictor, todo, batch_size, max_bytes):
            good = sorted(staged.prepared)
            predictions = dict(zip(good, predictor.classify([staged.prepared[i] for i in good])))
            rows = []
            for i, item in enumerate(staged.items):
                row = {"image": printable(item.path.stem), "relpath": printable(item.relpath),
                       "path": printable(str(item.path)), "tta": predictor.tta}
                if i in predictions and not math.isfinite(predictions[i].probability):
                    reason = (f"{printable(str(item.path))}: the classifier returned {predictions[i].probability} (not "
                              "a number): its files may be damaged; `kmel predict` checks them unless --no-verify")
                    row.update(status="error", error=reason)
                    summary.n_error += 1
                    summary.errors.append((printable(str(item.path)), reason))
                elif i in predictions:
                    result = predictions[i]
                    row.update(result.columns(), image_probability=round(result.probability, 6), fused=False,
                               status="ok", error="")
                    summary.n_ok += 1
                    summary.n_malignant += result.prediction
                    if explain_dir is not None and result.heatmap is not None:
                        target = overlay_path(explain_dir, item.relpath)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        save_overlay(target, result.crop, result.heatmap)
                elif item.status == "skipped":
                    row.update(status="skipped", error=item.reason)
                    summary.n_skipped += 1
                else:
                    row.update(status="error", error=printable(staged.errors[i]))
                    summary.n_error += 1
                    summary.errors.append((printable(str(item.path)), printable(staged.errors[i])))
                rows.append(row)
            rows_file.write(rows)
            bar.update(len(rows))
            bar.set_postfix(ok=summary.n_ok, errors=summary.n_error)
    bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


def predict_files(
    inputs: Sequence[str | Path],
    out: str | Path,
    models_dir: str | Path = "saved_models",
    batch_size: int | None = None,
    tta: bool = False,
    explain_dir: str | Path | None = None,
    fmt: str | None = None,
    stdin: Iterable[str] | None = None,
    max_file_mb: int | None = None,
    progress: bool = True,
    runtime: str = "tf",
    tflite_precision: str = "float32",
    checks: ModelChecks = DEFAULT_CHECKS,
    overwrite: bool = False,
    explain_class: str | None = None,
    metadata: str | Path | None = None,
    source: str | None = None,
) -> PredictSummary:
    """Predict every input file (files, folders, ``-`` for paths on ``stdin``) into ``out``
    (CSV or JSONL by ``fmt`` or the file's suffix), resuming a partial output. ``runtime``: ``tf``
    (SavedModels) or ``tflite`` (the ``tflite_precision`` files of ``kmel export --format tflite``).
    ``checks``: what is verified before the models run (:mod:`kmel.models.integrity`). An output that
    other models or options wrote is refused, unless ``overwrite`` (start it afresh). ``explain_class``: with
    ``explain_dir`` and a diagnosis model, the Grad-CAM maps of that class instead of the predicted one.
    ``metadata``: a CSV of the patients' data; its images get the fusion model's probability
    (:mod:`kmel.serving.fusion`). ``source``: every input comes from this archive or clinic, decided by the threshold
    ``train cls`` chose on its validation images (an unknown one is refused before anything runs)."""
    RowsFile(out, fmt)  # a known format
    # Wrong inputs, models, output file or explain folder are usage errors before anything is written
    # (an --overwrite output is only replaced once all of them are right) and before the models load.
    items = collect_inputs(inputs, stdin)
    pipeline = read_pipeline(models_dir)
    config_from_pipeline(pipeline, models_dir)  # both models trained, or the fix named
    head = head_from_entry(pipeline["classifier"])
    source_threshold(pipeline["classifier"], source)  # a source the model has a threshold for
    fusion = table = None
    if metadata is not None:
        from kmel.models.fusion import load_models_fusion
        from kmel.serving.fusion import check_matches, describe, read_metadata_table

        fusion = load_models_fusion(models_dir, pipeline, verify=checks.verify)
        if fusion is None:
            raise ConfigError(f"--metadata needs a fusion model in {models_dir}: run `kmel train fusion` after "
                              "`kmel train cls`, or drop --metadata")
        table, key = read_metadata_table(metadata)
        missing = describe(fusion, table, metadata)["missing_columns"]
        check_matches(table, key, metadata, [item.relpath for item in items])
    rows_file = RowsFile(out, fmt, output_columns(head.class_columns, fused=fusion is not None))
    if explain_class is not None:
        if explain_dir is None:
            raise ConfigError("--explain-class says which class's Grad-CAM maps to draw: give --explain DIR too")
        head.class_index(explain_class)  # a diagnosis model, and one of its classes
    if explain_dir is not None:
        check_writable_folder(explain_dir, "--explain")
    rows_file.check_identity(output_identity(pipeline, models_dir, tta, runtime, tflite_precision,
                                             fused=fusion is not None, source=source), overwrite)
    done = rows_file.done()
    with Predictor(models_dir, tta, explain=explain_dir is not None, runtime=runtime, explain_class=explain_class,
                   tflite_precision=tflite_precision, checks=checks, pipeline=pipeline, source=source) as predictor:
        summary = run_predictions(predictor, items, rows_file, batch_size, explain_dir, max_file_mb, progress, done)
    if fusion is not None:
        from kmel.serving.fusion import fuse_rows

        rows, summary.n_fused = fuse_rows(rows_file.read_rows(), fusion, table, predictor.threshold,
                                          predictor.decision_names)
        rows_file.rewrite(rows)
        summary.fusion_missing_columns = list(missing)
        new = [r for r in rows if r.get("status") == "ok" and r["relpath"] not in done]
        summary.n_malignant = sum(int(r["prediction"]) for r in new)
    return summary


def predict_folder(
    input_dir: str | Path,
    out_csv: str | Path,
    models_dir: str | Path = "saved_models",
    batch_size: int | None = None,
    tta: bool = False,
    explain_dir: str | Path | None = None,
    progress: bool = True,
) -> PredictSummary:
    """Predict every image under ``input_dir`` into ``out_csv`` (see :func:`predict_files`)."""
    if not Path(input_dir).is_dir():
        raise FileNotFoundError(f"input folder {input_dir} does not exist")
    return predict_files([input_dir], out_csv, models_dir, batch_size, tta, explain_dir, progress=progress)
