"""``kmel serve``'s models: the Predictor (and the fusion model, when one is served) behind one queue and one thread.

Requests never run the models side by side: each is a job on the queue, and the model thread takes the jobs
waiting, up to ``predict.batch_size`` images, decodes them as ``predict`` does (so the API's numbers are
``predict``'s), segments, crops and classifies them as one batch, then answers each job with its own entries.
With a fusion model, a job that carries patient data gets the fused probability as ``predict --metadata`` gives
it (:func:`fuse_entries`), computed on the same thread.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from queue import Empty, Queue
from typing import Any

import numpy as np
import pandas as pd

from kmel.data.images import ImageReadError, load_image_reduced
from kmel.models.fusion import FusionModel
from kmel.serving.explain import overlay
from kmel.serving.fusion import fuse_rows
from kmel.serving.outputs import output_columns, printable
from kmel.serving.uploads import Upload, png_data_url

log = logging.getLogger("kmel.serve")


def fuse_entries(
    entries: Sequence[dict[str, Any]], metadata: Mapping[str, Any], fusion: FusionModel, image_threshold: float,
    decision_names: Sequence[str],
) -> list[dict[str, Any]]:
    """One request's entries as ``predict --metadata`` rows (:func:`kmel.serving.fusion.fuse_rows`).

    The request's fields describe every file in it: so with a ``patient_id`` its files are one patient's lesions
    and the patient-relative features compare them. Entries are fused when the fields give at least one column
    the fusion reads; otherwise (and for error entries) they keep the image model's result, ``fused=False``.
    """
    keys = [f"upload-{k}" for k in range(len(entries))]  # the table's ids: unique where two files share a name
    described = any(name in metadata for name in fusion.spec.columns)
    table = pd.DataFrame([dict(metadata)] * len(keys) if described else [],
                         index=pd.Index(keys if described else [], name="_stem"))
    rows, _ = fuse_rows([{**e, "relpath": key} for e, key in zip(entries, keys)], fusion, table, image_threshold,
                        decision_names)
    return [{**row, "relpath": entry["relpath"]} for row, entry in zip(rows, entries)]


@dataclass
class _Job:
    uploads: list[Upload]
    explain: bool
    crops: bool
    metadata: dict[str, Any] = field(default_factory=dict)
    threshold: float | None = None  # a source's own threshold (None: the model's)
    future: Future = field(default_factory=Future)


class ModelService:
    """The Predictor behind one queue and one thread: the images of the requests waiting are decoded and
    classified together, a batch at a time, so the models never run twice at once and memory stays flat.
    ``fusion``: the fusion model applied to the entries of requests with patient data (None: image only)."""

    def __init__(self, predictor: Any, fusion: FusionModel | None = None):
        self.predictor = predictor
        self.fusion = fusion
        self.batch_size = predictor.config.predict.batch_size
        records = predictor.config.records
        self.decode_side = max(records.image_size, records.seg_size)
        self.columns = output_columns(predictor.head.class_columns, fused=fusion is not None)
        self.gradcam = None
        loaded = predictor.models.classifier_savedmodel
        if loaded is not None and "gradcam" in loaded.signatures:
            from kmel.serving.explain import make_decision_gradcam_fn

            # the maps of the class each entry's diagnosis names (the malignant side's for a yes/no model)
            self.gradcam = make_decision_gradcam_fn(predictor.models_dir, predictor.head, loaded)
        self._queue: Queue = Queue()
        self._decoder = ThreadPoolExecutor(predictor.crops.workers, thread_name_prefix="kmel-serve-decode")
        self._thread = threading.Thread(target=self._loop, name="kmel-serve-models", daemon=True)
        self._thread.start()

    def submit(self, uploads: list[Upload], explain: bool = False, crops: bool = False,
               metadata: Mapping[str, Any] | None = None, threshold: float | None = None) -> Future:
        """Queue ``uploads``; the future's result is one entry per upload, in order, with ``metadata`` (the
        request's checked fields) echoed into each and, with a fusion model, the fused probability. ``threshold``:
        the image model's decisions at this threshold instead of its own (a source's, ``?source=``)."""
        job = _Job(uploads, explain, crops, dict(metadata or {}), threshold)
        self._queue.put(job)
        return job.future

    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop after the batch in progress; requests still queued are answered 500 (shutting down)."""
        self._queue.put(None)
        self._thread.join(timeout=30)
        while True:
            try:
                job = self._queue.get_nowait()
            except Empty:
                break
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        self._decoder.shutdown()
        self.predictor.close()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs, n = [job], len(job.uploads)
            while n < self.batch_size:  # whatever else is waiting rides along, up to one batch
                try:
                    more = self._queue.get_nowait()
                except Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                jobs.append(more)
                n += len(more.uploads)
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # the client may have gone
            try:
                entries = self._run(jobs)
                answers = {id(j): self._finish(entries[id(j)], j) for j in jobs}
                for j in jobs:
                    j.future.set_result(answers[id(j)])
            except BaseException as exc:  # one failed batch fails its requests (500), not the server
                log.exception("predict batch failed")
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(exc)

    def _decode(self, upload: Upload) -> Any:
        """The upload decoded as ``predict`` decodes a file, reduced to the segmenter's input; or why not."""
        try:
            # the pixel bound was checked on the header (413); the decode keeps predict's own bound
            image, size = load_image_reduced(upload.data, self.decode_side, name=upload.name)
        except ImageReadError as exc:
            return str(exc)
        except Exception as exc:
            return f"{upload.name}: {type(exc).__name__}: {exc}"
        finally:
            upload.data = b""  # the bytes are not needed again
        try:
            return self.predictor.crops.pre(image, original_size=size)
        except Exception as exc:
            return f"{upload.name}: cannot be prepared: {type(exc).__name__}: {exc}"

    def _run(self, jobs: list[_Job]) -> dict[int, list[dict[str, Any]]]:
        entries: dict[int, list[dict[str, Any]]] = {id(j): [None] * len(j.uploads) for j in jobs}  # type: ignore[misc]
        items = [(j, k, u) for j in jobs for k, u in enumerate(j.uploads)]
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            staged = list(self._decoder.map(self._decode, [u for _, _, u in chunk]))
            good = [i for i, s in enumerate(staged) if not isinstance(s, str)]
            prepared = self.predictor.crops.finish([staged[i] for i in good])
            predictions = dict(zip(good, self.predictor.classify(prepared)))
            explain = [i for i in good if chunk[i][0].explain and math.isfinite(predictions[i].probability)]
            heat = {}
            if explain and self.gradcam is not None:
                head = self.predictor.head
                decided = [head.classes.index(predictions[i].diagnosis) for i in explain] if head.multiclass else None
                maps = self.gradcam(np.stack([predictions[i].crop for i in explain]).astype(np.float32), decided)
                heat = dict(zip(explain, maps))
            for i, (job, k, upload) in enumerate(chunk):
                entries[id(job)][k] = self._entry(upload, predictions.get(i), staged[i], job, heat.get(i))
        return entries

    def _entry(self, upload: Upload, prediction: Any, staged: Any, job: _Job, heat: Any) -> dict[str, Any]:
        """``predict``'s row for one upload (``relpath`` and ``path``: its file name), plus the images asked for."""
        row: dict[str, Any] = dict.fromkeys(self.columns)  # every column, null where it has no value (as JSONL)
        row.update(image=PurePosixPath(upload.name).stem, relpath=upload.name, path=upload.name, tta=self.predictor.tta)
        if prediction is None:
            row.update(status="error", error=printable(staged))
        elif not math.isfinite(prediction.probability):
            row.update(status="error", error=f"{upload.name}: the classifier returned {prediction.probability} (not "
                                             "a number): its files may be damaged; `kmel serve` checks them unless "
                                             "--no-verify")
        else:
            row.update(prediction.columns(), status="ok", error="")
            if job.threshold is not None:  # the request's source decides at its own threshold
                decided = int(prediction.probability >= job.threshold)
                row.update(threshold=job.threshold, prediction=decided, label=self.predictor.decision_names[decided])
            if job.crops:
                row["crop"] = png_data_url(prediction.crop)
            if heat is not None:
                row["gradcam"] = png_data_url(overlay(prediction.crop, heat))
        return row

    def _finish(self, entries: list[dict[str, Any]], job: _Job) -> list[dict[str, Any]]:
        """A job's entries with the fusion applied (when served) and its fields echoed (never over a row's key)."""
        if self.fusion is not None:
            entries = fuse_entries(entries, job.metadata, self.fusion,
                                   self.predictor.threshold if job.threshold is None else job.threshold,
                                   self.predictor.decision_names)
        for entry in entries:
            entry.update({name: value for name, value in job.metadata.items() if name not in entry})
        return entries
