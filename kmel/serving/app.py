"""``kmel serve``'s web app: the exported models behind an HTTP API and one self-contained page.

:func:`make_app` loads the models once (:class:`kmel.serving.predictor.Predictor`) and returns a FastAPI app:
``POST /api/predict`` (images as multipart files → one entry per file with the keys of ``kmel predict``'s row,
optionally the lesion crop and a Grad-CAM overlay as PNG data URLs), ``GET /api/model`` (the model card, from
pipeline.json and MODELS/report/report.json), ``GET /api/health``, ``GET /`` (the page,
kmel/serving/static/index.html: no CDN), ``/openapi.json`` and ``/docs``.

Requests never run the models side by side: each is a job on one queue, and one model thread takes the jobs
waiting, up to ``predict.batch_size`` images, decodes them as ``predict`` does (so the API's numbers are
``predict``'s), segments, crops and classifies them as one batch. Memory is bounded by the limits, not by the
traffic: a request is admitted only while fewer than ``max_concurrent`` are in flight (429 otherwise), its body
is read into memory up to ``max_request_mb`` (413), and each image's size is read from its header before it is
decoded (413 over ``max_megapixels``). The multipart body is parsed in memory, never spooled to temporary files:
uploads reach the disk only when ``keep_uploads`` names a folder. Logs say how many files were served and how
long it took, never their names or contents.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import ipaddress
import json
import logging
import math
import re
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath
from queue import Empty, Queue
from typing import Any

import cv2
import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

import kmel
from kmel import constants as C
from kmel.config import ConfigError
from kmel.data.images import MIB, ImageReadError, load_image_reduced
from kmel.models.heads import head_from_entry
from kmel.models.integrity import DEFAULT_CHECKS, ModelChecks
from kmel.serving.explain import overlay
from kmel.serving.outputs import output_columns, printable

log = logging.getLogger("kmel.serve")

DEFAULT_MAX_REQUEST_MB = 32
DEFAULT_MAX_MEGAPIXELS = 50
DEFAULT_MAX_FILES = 64
DEFAULT_MAX_CONCURRENT = 32
METADATA_FIELDS = (C.COL_AGE, C.COL_SEX, C.COL_SITE)  # echoed into each entry; the image models do not read them
INTENDED_USE = (
    "Research use only. kmel is not a medical device and has not been validated for clinical use: do not use it "
    "to diagnose, to decide on treatment, or to reassure anyone about a lesion. Anyone worried about a mole or a "
    "skin lesion should see a doctor or dermatologist. The model was trained and tested on public dermoscopy "
    "archives; photographs from other cameras, clinics or skin tones may be scored much worse than the test "
    "figures say.")
SKIN_TONE_CAVEAT = (
    "Estimated from the brightness and ITA angle of the skin around the lesion in this one image: lighting, camera, "
    "dermoscope and exposure all change it. It is a rough group used to report fairness, not the person's "
    "Fitzpatrick skin type.")
DOCS_NOTICE = ('<p style="font:14px sans-serif;margin:8px 16px">This page (Swagger UI) loads its script from a CDN, '
               'so it needs the internet; <a href="/openapi.json">/openapi.json</a> (the schema) and '
               '<a href="/">the kmel page</a> work offline.</p>')
PAGE_HEADERS = {  # the page fetches nothing from anywhere but this server
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "img-src 'self' data: blob:; connect-src 'self'; form-action 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
}


class ApiError(Exception):
    """An answer other than 200: its status and one line, sent as ``{"error": ...}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


# === Binding: loopback by default, a token for anything else ===


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; any other name or address may be reachable from outside."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve on a non-loopback address without a token (every /api call then needs it)."""
    if not is_loopback(host) and not token:
        raise ConfigError(f"--host {host} is reachable from other machines: give --token T (or set KMEL_SERVE_TOKEN), "
                          "and every /api call must then send 'Authorization: Bearer T'; or serve on 127.0.0.1")


# === Requests: the body in memory, its multipart parts, the images' sizes ===


@dataclass
class Upload:
    """One uploaded file: the client's file name (its last path part, printable) and its bytes."""

    name: str
    data: bytes


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``limit`` bytes."""
    too_large = ApiError(413, f"request larger than the {limit / MIB:g} MiB limit (kmel serve --max-request-mb): "
                              "send fewer or smaller images per request")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def parse_multipart(body: bytes, content_type: str) -> tuple[list[Upload], dict[str, str]]:
    """The files and text fields of a multipart/form-data body, parsed in memory (nothing is spooled to disk)."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise ApiError(415, "send the images as multipart/form-data, e.g. curl -F files=@a.jpg -F files=@b.jpg URL")
    parts: list[tuple[dict[bytes, bytes], bytes]] = []
    state: dict[str, Any] = {}

    def begin() -> None:
        state.update(headers={}, data=[], field=b"", value=b"")

    def header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state.update(field=b"", value=b"")

    callbacks = {
        "on_part_begin": begin, "on_header_end": header_end,
        "on_header_field": lambda d, s, e: state.update(field=state["field"] + d[s:e]),
        "on_header_value": lambda d, s, e: state.update(value=state["value"] + d[s:e]),
        "on_part_data": lambda d, s, e: state["data"].append(d[s:e]),
        "on_part_end": lambda: parts.append((state["headers"], b"".join(state["data"]))),
    }
    try:
        parser = MultipartParser(options[b"boundary"], callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except Exception as exc:
        raise ApiError(400, f"malformed multipart body ({type(exc).__name__}: {exc})") from None
    uploads, fields = [], {}
    for headers, data in parts:
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in disposition:
            filename = disposition[b"filename"].decode("utf-8", "surrogateescape").replace("\\", "/")
            if filename or data:  # a browser sends an empty part for a file input left empty
                base = PurePosixPath(filename).name or f"upload-{len(uploads) + 1}"
                uploads.append(Upload(printable(base), data))
        else:
            fields[name] = data.decode("utf-8", "replace").strip()
    return uploads, fields


def check_metadata(fields: dict[str, str]) -> dict[str, Any]:
    """The metadata fields given (age, sex, site), checked; an unknown field is a 400 naming the known ones."""
    unknown = sorted(set(fields) - set(METADATA_FIELDS))
    if unknown:
        raise ApiError(400, f"unknown form field(s) {unknown}: images go in file fields, metadata in "
                            f"{', '.join(METADATA_FIELDS)}")
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if not value:
            continue
        if len(value) > 64:
            raise ApiError(400, f"form field {name}: at most 64 characters")
        if name == C.COL_AGE:
            try:
                age = float(value)
            except ValueError:
                age = -1.0
            if not 0 <= age <= 130:
                raise ApiError(400, f"form field {C.COL_AGE}: {value!r} is not an age in years")
            out[name] = age
        else:
            out[name] = value
    return out


def image_pixels(data: bytes) -> float | None:
    """Width × height from an image's header (nothing decoded); None when the bytes are no image Pillow knows
    (the decode then reports why, as that file's error entry).

    Pillow refuses to open an image over twice its process-wide ``MAX_IMAGE_PIXELS`` (which decoding threads
    change while they decode): its error states the image's size, which is read from it, so the answer does not
    depend on what another thread set."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                return float(img.width * img.height)
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        return float(found[1]) if found else math.inf
    except Exception:
        return None


def png_data_url(rgb: np.ndarray) -> str:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb, np.uint8), cv2.COLOR_RGB2BGR))
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


# === The models: one thread, one queue, requests batched together ===


@dataclass
class _Job:
    uploads: list[Upload]
    explain: bool
    crops: bool
    future: Future = field(default_factory=Future)


class ModelService:
    """The Predictor behind one queue and one thread: the images of the requests waiting are decoded and
    classified together, a batch at a time, so the models never run twice at once and memory stays flat."""

    def __init__(self, predictor: Any):
        self.predictor = predictor
        self.batch_size = predictor.config.predict.batch_size
        records = predictor.config.records
        self.decode_side = max(records.image_size, records.seg_size)
        self.columns = output_columns(predictor.head.class_columns)
        self.gradcam = None
        loaded = predictor.models.classifier_savedmodel
        if loaded is not None and "gradcam" in loaded.signatures:
            from kmel.serving.explain import make_gradcam_fn

            self.gradcam = make_gradcam_fn(predictor.models_dir, loaded)
        self._queue: Queue = Queue()
        self._decoder = ThreadPoolExecutor(predictor.crops.workers, thread_name_prefix="kmel-serve-decode")
        self._thread = threading.Thread(target=self._loop, name="kmel-serve-models", daemon=True)
        self._thread.start()

    def submit(self, uploads: list[Upload], explain: bool = False, crops: bool = False) -> Future:
        """Queue ``uploads``; the future's result is one entry per upload, in order."""
        job = _Job(uploads, explain, crops)
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
                for j in jobs:
                    j.future.set_result(entries[id(j)])
            except BaseException as exc:  # one failed batch fails its requests (500), not the server
                log.exception("predict batch failed")
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(exc)

    def _decode(self, upload: Upload) -> Any:
        """The upload decoded as ``predict`` decodes a file, reduced to the segmenter's input; or why not."""
        try:
            # the pixel bound was checked on the header (413); the decode keeps predict's own bound, so the
            # process-wide Pillow limit it sets while decoding is the one predict uses
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
                maps = self.gradcam(np.stack([predictions[i].crop for i in explain]).astype(np.float32))
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
            if job.crops:
                row["crop"] = png_data_url(prediction.crop)
            if heat is not None:
                row["gradcam"] = png_data_url(overlay(prediction.crop, heat))
        return row


# === The model card ===


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def training_data(pipeline: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """Where the classifier's data came from and how much of it: pipeline.json's ``data`` section where a
    training wrote one, else the crop records' manifest the report names (when it is still on this machine)."""
    cls = pipeline.get("classifier", {})
    recorded = cls.get("data") or pipeline.get("data")
    if isinstance(recorded, dict):
        return recorded
    records = report.get("meta", {}).get("records")
    manifest = _read_json(Path(records) / "manifest.json") if isinstance(records, str) and records else {}
    out: dict[str, Any] = {"records_fingerprint": cls.get("records_fingerprint"), "task": cls.get("task", "malignant")}
    counts = manifest.get("counts")
    if not isinstance(counts, dict):
        out["note"] = ("the records' sizes are not recorded in this models folder (the records it was trained on "
                       "are not on this machine); see the training's pipeline.json and tfrecords/manifest.json")
        return out
    out["n_records"] = manifest.get("n_records", {}).get("crop", manifest.get("n_records"))
    try:  # counts: split -> source -> target -> skin tone -> n
        out["by_source"] = {split: {source: sum(sum(tones.values()) for tones in targets.values())
                                    for source, targets in sources.items()} for split, sources in counts.items()}
    except (AttributeError, TypeError):
        pass
    return out


def model_card(predictor: Any, explain: bool) -> dict[str, Any]:
    """What the served model is: task, classes, threshold and its choice, calibration, data, test metrics by
    group (MODELS/report/report.json), versions and fingerprints, and what it is (not) for."""
    pipeline, models_dir = predictor.pipeline, predictor.models_dir
    seg, cls = pipeline.get("segmenter", {}), pipeline.get("classifier", {})
    report = _read_json(models_dir / "report" / "report.json")
    head = head_from_entry(cls)
    fairness = report.get("fairness", {})
    return {
        "kmel_version": kmel.__version__, "trained_with_kmel": pipeline.get("kmel_version"),
        "task": head.task, "classes": head.class_names, "decision": list(predictor.decision_names),
        "malignant_classes": list(head.malignant_classes) or None,
        "threshold": predictor.threshold, "threshold_from": cls.get("threshold_from"),
        "threshold_choice": cls.get("threshold_choice"),
        "calibration": cls.get("calibration") or {"temperature": predictor.temperature},
        "models": {"segmenter": {k: seg.get(k) for k in ("backbone", "image_size", "metrics")},
                   "classifier": {k: cls.get(k) for k in ("backbone", "image_size", "precision", "epochs_run")}},
        "fingerprints": {"segmenter": seg.get("fingerprint"), "classifier": cls.get("fingerprint"),
                         "classifier_trained_on_segmenter": cls.get("segmenter_fingerprint"),
                         "records": cls.get("records_fingerprint"), "weights_digest": cls.get("weights_digest")},
        "training_data": training_data(pipeline, report),
        "test": {"split": report.get("meta", {}).get("split", cls.get("report_split")),
                 "n": report.get("meta", {}).get("n"),
                 "metrics": report.get("summary") or cls.get("metrics"),
                 "overall": fairness.get("overall"),
                 "groups": {name: {"groups": part.get("groups", {}), "gaps": part.get("gaps", {})}
                            for name, part in fairness.items() if isinstance(part, dict) and "groups" in part},
                 "calibration": report.get("calibration", {}).get("overall"),
                 "report": "MODELS/report/report.json" if report else "no MODELS/report/report.json: test metrics "
                           "come from pipeline.json only (run `kmel evaluate` for the full report)"},
        "serving": {"runtime": predictor.models.runtime, "precision": predictor.models.precision,
                    "tta": predictor.tta, "explain": explain},
        "skin_tone": {**cls.get("skin_tone", {"groups": list(C.SKIN_TONE_GROUPS)}), "caveat": SKIN_TONE_CAVEAT},
        "intended_use": INTENDED_USE,
    }


# === The app ===


def _page() -> str:
    return resources.files("kmel.serving").joinpath("static", "index.html").read_text(encoding="utf-8")


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[-100:] or "upload"


def make_app(models_dir: str | Path = "saved_models", *, runtime: str = "tf", tflite_precision: str = "float32",
             token: str | None = None, workers: int | None = None, tta: bool = False,
             max_request_mb: float = DEFAULT_MAX_REQUEST_MB, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
             max_files: int = DEFAULT_MAX_FILES, max_concurrent: int = DEFAULT_MAX_CONCURRENT,
             keep_uploads: str | Path | None = None, checks: ModelChecks = DEFAULT_CHECKS) -> FastAPI:
    """The FastAPI app serving ``models_dir`` (loaded and checked now, once). ``token``: when given, every
    /api call needs ``Authorization: Bearer <token>``. The limits: ``max_request_mb`` per request body,
    ``max_megapixels`` per image, ``max_files`` per request (413), ``max_concurrent`` requests in flight (429).
    ``keep_uploads``: a folder where every upload is saved (otherwise none ever is)."""
    from kmel.serving.predictor import Predictor
    from kmel.serving.runner import check_writable_folder

    if keep_uploads is not None:
        check_writable_folder(keep_uploads, "--keep-uploads")
    predictor = Predictor(models_dir, tta=tta, workers=workers, runtime=runtime, tflite_precision=tflite_precision,
                          checks=checks)
    service = ModelService(predictor)
    card = model_card(predictor, explain=service.gradcam is not None)
    card["limits"] = {"max_request_mb": max_request_mb, "max_megapixels": max_megapixels, "max_files": max_files,
                      "max_concurrent": max_concurrent}
    page = _page()
    stats = {"requests": 0, "images": 0, "errors": 0, "in_flight": 0, "started": time.time()}
    bearer = HTTPBearer(auto_error=False, description="the token kmel serve was started with (--token)")

    def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode("utf-8"), (token or "").encode("utf-8")):
            raise ApiError(401, "this server needs its token: send 'Authorization: Bearer <token>' "
                                "(kmel serve --token)", {"WWW-Authenticate": "Bearer"})

    api = [Depends(require_token)] if token else []

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()  # the model thread stops after the batch it is on; the crop threads with it

    app = FastAPI(title="kmel", version=kmel.__version__, docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="Melanoma detection in dermoscopic images (Keras 3 / TensorFlow). " + INTENDED_USE)
    app.state.service, app.state.card = service, card

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, exc.status, headers=exc.headers)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(page, headers=PAGE_HEADERS)

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs() -> HTMLResponse:
        html = get_swagger_ui_html(openapi_url="/openapi.json", title="kmel API", swagger_favicon_url="")
        body = html.body.decode("utf-8").replace("<body>", "<body>" + DOCS_NOTICE, 1)
        return HTMLResponse(body)

    @app.get("/api/health", dependencies=api, summary="Whether the models are loaded and the model thread runs")
    def health() -> JSONResponse:
        ok = service.alive()
        return JSONResponse({"status": "ok" if ok else "error", "kmel_version": kmel.__version__,
                             "runtime": predictor.models.runtime, "in_flight": stats["in_flight"],
                             "max_concurrent": max_concurrent,
                             "served": {k: stats[k] for k in ("requests", "images", "errors")},
                             "uptime_s": round(time.time() - stats["started"], 1)}, 200 if ok else 503)

    @app.get("/api/model", dependencies=api,
             summary="The model card: task, threshold, calibration, data, metrics by group")
    def model() -> dict[str, Any]:
        return card

    predict_body = {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["files"],
        "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"},
                                 "description": "one or more images (JPEG, PNG, WebP, BMP, TIFF, GIF)"},
                       C.COL_AGE: {"type": "number", "description": "optional; echoed in each entry"},
                       C.COL_SEX: {"type": "string", "description": "optional; echoed in each entry"},
                       C.COL_SITE: {"type": "string",
                                    "description": "optional anatomic site; echoed in each entry"}}}}}}

    @app.post("/api/predict", dependencies=api, openapi_extra={"requestBody": predict_body},
              summary="Classify images: one entry per file, with predict's row keys")
    async def predict(request: Request,
                      explain: bool = Query(False, description="add a Grad-CAM overlay (PNG data URL) per ok entry"),
                      crop: bool = Query(False, description="add the lesion crop the classifier saw (PNG data URL)"),
                      ) -> JSONResponse:
        if explain and service.gradcam is None:
            raise ApiError(400, "Grad-CAM needs the SavedModel runtime with its gradcam endpoint: start kmel serve "
                                "with --runtime tf, or leave explain off")
        if stats["in_flight"] >= max_concurrent:
            raise ApiError(429, f"busy: {max_concurrent} requests already in flight (kmel serve --max-concurrent); "
                                "retry in a moment", {"Retry-After": "1"})
        stats["in_flight"] += 1
        start = time.perf_counter()
        try:
            body = await read_body(request, int(max_request_mb * MIB))
            uploads, fields = await asyncio.to_thread(parse_multipart, body, request.headers.get("content-type", ""))
            del body
            metadata = check_metadata(fields)
            if not uploads:
                raise ApiError(400, "no image: send one or more files, e.g. curl -F files=@a.jpg URL")
            if len(uploads) > max_files:
                raise ApiError(413, f"{len(uploads)} files: at most {max_files} per request (kmel serve --max-files)")
            sizes = await asyncio.to_thread(lambda found: [image_pixels(u.data) for u in found], uploads)
            for upload, pixels in zip(uploads, sizes):
                if pixels is not None and pixels > max_megapixels * 1e6:
                    raise ApiError(413, f"{upload.name}: {pixels / 1e6:.3g} megapixels, over the {max_megapixels:g} "
                                        "megapixel limit (kmel serve --max-megapixels): send a smaller image")
            if keep_uploads is not None:
                await asyncio.to_thread(_keep, Path(keep_uploads), uploads)
            queued = time.perf_counter()
            future = service.submit(uploads, explain=explain, crops=crop)  # it drops each file's bytes once decoded
            try:
                results = await asyncio.wrap_future(future)
            except Exception as exc:
                raise ApiError(500, f"the models failed on this request ({type(exc).__name__}); the server goes "
                                    "on") from None
        finally:
            stats["in_flight"] -= 1
        for entry in results:
            entry.update(metadata)
        n_error = sum(e["status"] != "ok" for e in results)
        seconds = time.perf_counter() - start
        stats["requests"] += 1
        stats["images"] += len(results)
        stats["errors"] += n_error
        log.info("predict: %d files (%d ok, %d errors) in %.2f s (%.2f s before the models; %d requests in flight)",
                 len(results), len(results) - n_error, n_error, seconds, queued - start, stats["in_flight"])
        return JSONResponse({"results": results, "n_ok": len(results) - n_error, "n_error": n_error,
                             "seconds": round(seconds, 4)})

    return app


def _keep(folder: Path, uploads: list[Upload]) -> None:
    """Save the uploads in ``folder`` (``--keep-uploads``), each under a new name: time, random id, its own name."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for upload in uploads:
        (folder / f"{stamp}-{uuid.uuid4().hex[:8]}-{_safe_name(upload.name)}").write_bytes(upload.data)
