"""``kmel serve``'s web app: the exported models behind an HTTP API and one self-contained page.

:func:`make_app` loads the models once (:class:`kmel.serving.predictor.Predictor`, and the folder's fusion model
when it has one) and returns a FastAPI app: ``POST /api/predict`` (images as multipart files → one entry per file
with the keys of ``kmel predict``'s row, optionally the lesion crop and a Grad-CAM overlay as PNG data URLs; with a
fusion model and patient fields, the fused probability as ``predict --metadata`` gives it), ``GET /api/model``
(the model card, from pipeline.json and MODELS/report/report.json), ``GET /api/health``, ``GET /`` (the page,
kmel/serving/static/index.html: no CDN), ``/openapi.json`` and ``/docs``.

The models run in one thread fed by one queue (:mod:`kmel.serving.service`). Memory is bounded by the limits, not
by the traffic: a request is admitted only while fewer than ``max_concurrent`` are in flight (429 otherwise), its
body is read into memory up to ``max_request_mb`` (413), and each image's size is read from its header before it
is decoded (413 over ``max_megapixels``). The multipart body is parsed in memory, never spooled to temporary files
(:mod:`kmel.serving.uploads`): uploads reach the disk only when ``keep_uploads`` names a folder. Logs say how many
files were served and how long it took, never their names, contents or fields.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

import kmel
from kmel import constants as C
from kmel.config import ConfigError
from kmel.data.images import DEFAULT_MAX_PIXELS, MIB
from kmel.models.fusion import FusionError, FusionModel, load_models_fusion
from kmel.models.heads import head_from_entry
from kmel.models.integrity import DEFAULT_CHECKS, ModelChecks
from kmel.models.pipeline import source_threshold
from kmel.serving.fusion import ALIASES
from kmel.serving.service import ModelService
from kmel.serving.uploads import (
    METADATA_FIELDS,
    ApiError,
    check_metadata,
    image_pixels,
    parse_multipart,
    read_body,
    save_uploads,
)

log = logging.getLogger("kmel.serve")

DEFAULT_MAX_REQUEST_MB = 32
DEFAULT_MAX_MEGAPIXELS = 50
DEFAULT_MAX_FILES = 64
DEFAULT_MAX_CONCURRENT = 32
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
        "diagnosis_decision": {"rule": head.decision_rule, "class_draw_share": cls.get("class_draw_share")}
        if head.multiclass else None,
        "threshold": predictor.threshold, "threshold_from": cls.get("threshold_from"),
        "threshold_choice": cls.get("threshold_choice"),
        # /api/predict?source=NAME decides with NAME's (chosen on that source's validation images alone)
        "threshold_by_source": cls.get("threshold_by_source") or {},
        "calibration": cls.get("calibration") or {"temperature": predictor.temperature},
        "models": {"segmenter": {k: seg.get(k) for k in ("backbone", "image_size", "metrics")},
                   "classifier": {k: cls.get(k) for k in ("backbone", "image_size", "precision", "epochs_run")},
                   # train joint: one model, segmenter and classifier; the whole image in, no crop stage
                   **({"joint": {"settings": cls.get("joint"), "mask_metrics": cls.get("mask_metrics")}}
                      if cls.get("kind") == "joint" else {})},
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


# === The fusion model: the image score and the patient's data ===


def fusion_fields(fusion: FusionModel) -> tuple[str, ...]:
    """The form fields a request may carry with this fusion model: age, sex and site, every column it reads, and
    its patient id when it compares a patient's lesions."""
    names = [*METADATA_FIELDS, *fusion.spec.columns]
    if fusion.spec.relative:
        names.append(fusion.spec.patient_column)
    return tuple(dict.fromkeys(names))


def load_fusion(predictor: Any) -> tuple[FusionModel | None, dict[str, Any]]:
    """The models folder's fusion model and its model-card section; (None, why) where it has none, or where it
    cannot be used — another file than pipeline.json records, or fitted on another classifier's scores: one
    warning, and the server answers with the image model alone."""
    entry = predictor.pipeline.get("fusion") or {}
    try:
        fusion = load_models_fusion(predictor.models_dir, predictor.pipeline, verify=True)
    except FusionError as exc:
        log.warning("the fusion model is not used, the image model alone is served: %s", exc)
        return None, {"active": False, "present": True, "reason": str(exc)}
    if fusion is None:
        return None, {"active": False, "present": False,
                      "reason": "no fusion model in this models folder (`kmel train fusion` fits one)"}
    fields = fusion_fields(fusion)
    patients = (f"; the files of one request are one patient's lesions when {fusion.spec.patient_column} is given"
                if fusion.spec.relative else "")
    return fusion, {
        "active": True, "present": True, "fields": list(fields),
        "aliases": {a: n for a, n in ALIASES.items() if n in fields},
        "patient_field": fusion.spec.patient_column if fusion.spec.relative else None,
        "features": list(fusion.spec.features), "threshold": fusion.threshold, "temperature": fusion.temperature,
        "n_trees": fusion.n_trees, "image_fingerprint": fusion.image_fingerprint,
        "test": {"split": entry.get("report_split"), "metrics": entry.get("metrics")},
        "use": "a request with any of the columns the fusion reads gets, in each entry, the fused probability "
               "(image score and patient data) as probability, its decision at the fusion's threshold, the image "
               "model's own as image_probability, and fused=true" + patients,
    }


# === The app ===


def _page() -> str:
    return resources.files("kmel.serving").joinpath("static", "index.html").read_text(encoding="utf-8")


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
    fusion, card_fusion = load_fusion(predictor)
    fields = fusion_fields(fusion) if fusion is not None else METADATA_FIELDS
    aliases = ALIASES if fusion is not None else {}
    service = ModelService(predictor, fusion)
    card = model_card(predictor, explain=service.gradcam is not None)
    card["fusion"] = card_fusion
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

    read = "read by the fusion model and echoed in each entry" if fusion is not None else "echoed in each entry"
    properties: dict[str, Any] = {"files": {"type": "array", "items": {"type": "string", "format": "binary"},
                                            "description": "one or more images (JPEG, PNG, WebP, BMP, TIFF, GIF)"}}
    for name in fields:
        kind = "number" if name == C.COL_AGE else "string"
        properties[name] = {"type": kind, "description": f"optional{' (years)' if kind == 'number' else ''}; {read}"}
    predict_body = {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["files"], "properties": properties}}}}

    @app.post("/api/predict", dependencies=api, openapi_extra={"requestBody": predict_body},
              summary="Classify images: one entry per file, with predict's row keys")
    async def predict(request: Request,
                      explain: bool = Query(False, description="add a Grad-CAM overlay (PNG data URL) per ok entry"),
                      crop: bool = Query(False, description="add the lesion crop the classifier saw (PNG data URL)"),
                      source: str | None = Query(None, description="the images come from this source of the training "
                                                 "records (an archive or clinic): decide with the threshold chosen on "
                                                 "its validation images (the model card's threshold_by_source)"),
                      ) -> JSONResponse:
        if source is not None:
            try:
                threshold = source_threshold(predictor.pipeline.get("classifier", {}), source)
            except ConfigError as exc:
                raise ApiError(400, str(exc).replace("--source", "source")) from None
        else:
            threshold = None
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
            uploads, form = await asyncio.to_thread(parse_multipart, body, request.headers.get("content-type", ""))
            del body
            metadata = check_metadata(form, fields, aliases)
            if not uploads:
                raise ApiError(400, "no image: send one or more files, e.g. curl -F files=@a.jpg URL")
            if len(uploads) > max_files:
                raise ApiError(413, f"{len(uploads)} files: at most {max_files} per request (kmel serve --max-files)")
            sizes = await asyncio.to_thread(lambda found: [image_pixels(u.data) for u in found], uploads)
            for upload, pixels in zip(uploads, sizes):
                if pixels is not None and pixels > max_megapixels * 1e6:
                    size = (f"{pixels / 1e6:.3g} megapixels" if math.isfinite(pixels) else
                            f"over {2 * DEFAULT_MAX_PIXELS / 1e6:g} megapixels")
                    raise ApiError(413, f"{upload.name}: {size}, over the {max_megapixels:g} megapixel limit (kmel "
                                        "serve --max-megapixels): send a smaller image")
            if keep_uploads is not None:
                await asyncio.to_thread(save_uploads, Path(keep_uploads), uploads)
            queued = time.perf_counter()
            # the service drops each file's bytes once decoded, and echoes the fields (fused with a fusion model)
            future = service.submit(uploads, explain=explain, crops=crop, metadata=metadata, threshold=threshold)
            try:
                results = await asyncio.wrap_future(future)
            except Exception as exc:
                raise ApiError(500, f"the models failed on this request ({type(exc).__name__}); the server goes "
                                    "on") from None
        finally:
            stats["in_flight"] -= 1
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

