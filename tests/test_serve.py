"""`kmel serve`: the HTTP API (FastAPI's TestClient), its limits and token, the model card, and the page in a real
headless browser (Debian's Chromium through Selenium) against a real uvicorn server.

The models are the tiny hand-written SavedModels of tests/handmade.py (exported in seconds, nothing trained): the
point here is the server; what the models say is tested elsewhere.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
import socket
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from tests.handmade import CLS, write_handmade_models, write_image

# starlette's TestClient asks for httpx2 and works with httpx (the test extra installs httpx)
pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with:UserWarning")

LIMITS = {"max_request_mb": 1, "max_megapixels": 0.02, "max_files": 8, "max_concurrent": 4}
TOKEN = "s3cret-token"


def _report(records: Path) -> dict:
    """A report.json as `train cls` writes one (the keys the model card reads)."""
    groups = {"light": {"n": 12, "n_positive": 3, "recall": 0.667, "specificity": 0.778, "auc": 0.81, "accuracy": 0.75},
              "dark": {"n": 8, "n_positive": 2, "recall": 0.5, "specificity": 0.833, "auc": 0.75, "accuracy": 0.75}}
    return {"meta": {"split": "test", "n": 20, "records": str(records)},
            "summary": {"n": 20, "n_positive": 5, "auc": 0.79, "sensitivity": 0.6, "specificity": 0.8, "f1": 0.5},
            "fairness": {"overall": {"recall": 0.6, "auc": 0.79},
                         "skin_tone": {"groups": groups, "gaps": {"recall": {"max_minus_min": 0.167}}}},
            "calibration": {"overall": {"ece_before": 0.2, "ece_after": 0.1, "n": 20}}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("serve")
    models = write_handmade_models(root / "models")
    pipeline = json.loads((models / "pipeline.json").read_text())  # one source with a threshold of its own
    pipeline["classifier"]["threshold_by_source"] = {"clinic_a": {"threshold": 0.01, "n": 80, "n_malignant": 20}}
    (models / "pipeline.json").write_text(json.dumps(pipeline))
    crops = root / "records" / "crops-x"
    crops.mkdir(parents=True)
    (crops / "manifest.json").write_text(json.dumps({
        "n_records": {"crop": {"train": 30, "val": 5, "test": 20}},
        "counts": {"train": {"isic2019": {"0": {"light": 10, "dark": 5}, "1": {"light": 3}},
                             "isic2020": {"0": {"light": 10}, "1": {"dark": 2}}}}}))
    (models / "report").mkdir()
    (models / "report" / "report.json").write_text(json.dumps(_report(crops)))
    images = {f"img{i}.jpg": write_image(root / "images" / f"img{i}.jpg", i, background=120 + 40 * i)
              for i in range(3)}
    images["big.png"] = write_image(root / "images" / "big.png", 9, size=(200, 200))  # 0.04 MP > 0.02
    return {"root": root, "models": models, "images": images}


@pytest.fixture(scope="module")
def client(setup):
    from fastapi.testclient import TestClient

    from kmel.serving.app import make_app

    with TestClient(make_app(setup["models"], **LIMITS)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def guarded(setup):
    """A second server: with a token, keeping uploads."""
    from fastapi.testclient import TestClient

    from kmel.serving.app import make_app

    kept = setup["root"] / "kept"
    with TestClient(make_app(setup["models"], token=TOKEN, keep_uploads=kept)) as test_client:
        yield test_client, kept


def _files(setup, *names: str, extra: tuple = ()) -> list:
    return [("files", (n, setup["images"][n].read_bytes(), "image/jpeg")) for n in names] + list(extra)


def _post(client, files, query: str = "", **kwargs):
    return client.post("/api/predict" + query, files=files, **kwargs)


def _decode_data_url(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    return cv2.imdecode(np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)


# === /api/predict ===


def test_good_and_corrupt_files_get_one_entry_each_in_order(setup, client):
    good = setup["images"]["img0.jpg"].read_bytes()
    extra = (("files", ("truncated.jpg", good[: len(good) // 2], "image/jpeg")),
             ("files", ("notes.txt", b"not an image at all", "text/plain")),
             ("files", ("empty.png", b"", "image/png")))
    r = _post(client, _files(setup, "img0.jpg", "img1.jpg", extra=extra))
    assert r.status_code == 200, r.text
    body = r.json()
    entries = body["results"]
    assert [e["relpath"] for e in entries] == ["img0.jpg", "img1.jpg", "truncated.jpg", "notes.txt", "empty.png"]
    assert [e["status"] for e in entries] == ["ok", "ok", "error", "error", "error"]
    assert (body["n_ok"], body["n_error"]) == (2, 3)
    for entry in entries[2:]:
        assert entry["relpath"] in entry["error"] and entry["probability"] is None
    assert "not an image" in entries[3]["error"] and "empty" in entries[4]["error"]
    ok = entries[0]
    assert 0 <= ok["probability"] <= 1 and ok["label"] in ("benign", "malignant") and ok["threshold"] == 0.5
    assert ok["prediction"] == int(ok["probability"] >= 0.5) and ok["skin_tone_group"] and ok["crop_mode"]
    assert ok["box_x1"] > ok["box_x0"] and ok["box_y1"] > ok["box_y0"]
    assert "crop" not in ok and "gradcam" not in ok  # only when asked


def test_entries_are_predicts_rows_and_predictors_probabilities(setup, client, tmp_path):
    """Same keys as `kmel predict`'s rows, and the same numbers as the Predictor and as predict (to 1e-5)."""
    from kmel.data.images import load_image_bytes
    from kmel.serving.predictor import Predictor
    from kmel.serving.runner import predict_files

    names = ["img0.jpg", "img1.jpg", "img2.jpg"]
    entries = _post(client, _files(setup, *names)).json()["results"]
    with Predictor(setup["models"]) as predictor:
        direct = predictor.predict([load_image_bytes(setup["images"][n].read_bytes()) for n in names])
    np.testing.assert_allclose([e["probability"] for e in entries], [p.probability for p in direct], atol=1e-5)
    assert [e["box_x0"] for e in entries] == [p.box[0] for p in direct]
    out = tmp_path / "rows.csv"
    predict_files([setup["images"][n] for n in names], out, setup["models"], progress=False)
    rows = pd.read_csv(out)
    assert all(list(e) == list(rows.columns) for e in entries)  # the same keys, in the same order
    np.testing.assert_allclose(rows["probability"], [e["probability"] for e in entries], atol=1e-5)
    for column in ("relpath", "label", "skin_tone_group", "crop_mode", "box_x0", "box_y1", "status"):
        assert list(rows[column]) == [e[column] for e in entries], column


def test_crop_and_gradcam_come_as_png_data_urls(setup, client):
    entry = _post(client, _files(setup, "img1.jpg"), "?explain=1&crop=1").json()["results"][0]
    crop, cam = _decode_data_url(entry["crop"]), _decode_data_url(entry["gradcam"])
    assert crop.shape == (CLS, CLS, 3) and cam.shape == (CLS, CLS, 3)
    assert not np.array_equal(crop, cam)  # the heat map is blended on


def test_many_files_in_one_request_and_the_file_limit(setup, client):
    names = list(setup["images"])[:3]
    files = [("files", (f"{i}-{names[i % 3]}", setup["images"][names[i % 3]].read_bytes(), "image/jpeg"))
             for i in range(LIMITS["max_files"])]
    r = _post(client, files)
    assert r.status_code == 200 and len(r.json()["results"]) == LIMITS["max_files"]
    assert r.json()["n_ok"] == LIMITS["max_files"]
    r = _post(client, files + files[:1])
    assert r.status_code == 413 and "at most 8" in r.json()["error"]


def test_oversized_requests_and_images_get_413_as_json(setup, client):
    big = np.random.default_rng(0).integers(0, 255, 2 * 2**20, dtype=np.uint8).tobytes()
    r = _post(client, [("files", ("noise.jpg", big, "image/jpeg"))])
    assert r.status_code == 413 and "MiB limit" in r.json()["error"]

    def chunks():  # no Content-Length: the limit holds while the body streams in
        for _ in range(40):
            yield b"x" * 65536

    r = client.post("/api/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and "error" in r.json()
    r = _post(client, _files(setup, "img0.jpg", "big.png"))
    assert r.status_code == 413 and "big.png" in r.json()["error"] and "megapixel" in r.json()["error"]
    assert client.get("/api/health").json()["status"] == "ok"


def test_the_pixel_bound_does_not_depend_on_pillows_process_wide_limit(setup, client, monkeypatch):
    """Whatever PIL.Image.MAX_IMAGE_PIXELS the process has, the header check and the decode hold their own bound
    (kmel.data.images.pillow_pixel_limit; tests/test_images.py races decodes with different limits)."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # as another thread might have left it
    assert _post(client, _files(setup, "img0.jpg")).json()["n_ok"] == 1
    r = _post(client, _files(setup, "big.png"))
    assert r.status_code == 413 and r.json()["error"].startswith("big.png: 0.04 megapixels, over the 0.02")


def test_bad_requests_are_one_line_json_errors(setup, client):
    assert _post(client, []).status_code in (400, 415)
    r = client.post("/api/predict", content=b"{}", headers={"content-type": "application/json"})
    assert r.status_code == 415 and "multipart" in r.json()["error"]
    r = _post(client, _files(setup, "img0.jpg"), data={"colour": "red"})
    assert r.status_code == 400 and "colour" in r.json()["error"]
    r = _post(client, [("age", (None, "40"))])
    assert r.status_code == 400 and "no image" in r.json()["error"]
    r = _post(client, _files(setup, "img0.jpg"), data={"age": "old"})
    assert r.status_code == 400 and "age" in r.json()["error"]


def test_metadata_fields_are_echoed_into_each_entry(setup, client):
    answer = _post(client, _files(setup, "img0.jpg", "img1.jpg"), data={"age": "55", "sex": "female"})
    entries = answer.json()["results"]
    assert all(e["age"] == 55 and e["sex"] == "female" and "site" not in e for e in entries)


def test_uploads_never_touch_the_disk_and_logs_hold_no_names(setup, client, monkeypatch, caplog):
    import tempfile

    def refuse(*_a, **_k):
        raise AssertionError("an upload was spooled to a temporary file")

    for name in ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    with caplog.at_level(logging.INFO, logger="kmel.serve"):
        r = _post(client, [("files", ("patient-jane-doe.jpg", setup["images"]["img0.jpg"].read_bytes(), "image/jpeg"))])
    assert r.status_code == 200 and r.json()["n_ok"] == 1
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "kmel.serve"]
    assert any("1 files (1 ok, 0 errors)" in line for line in lines), lines
    assert not any("jane" in line for line in lines)


# === Queueing, batching, concurrency ===


def _blocked(monkeypatch, service) -> tuple[threading.Event, threading.Event]:
    """(entered, release): the model thread sets ``entered`` inside its next batch and waits there for ``release``."""
    entered, release = threading.Event(), threading.Event()
    finish = service.predictor.crops.finish

    def waiting(pres):
        entered.set()
        assert release.wait(30), "never released"
        return finish(pres)

    monkeypatch.setattr(service.predictor.crops, "finish", waiting)
    return entered, release


def test_waiting_requests_are_batched_into_one_model_call(setup, client, monkeypatch):
    from kmel.serving.uploads import Upload

    service = client.app.state.service
    entered, release = _blocked(monkeypatch, service)
    calls: list[int] = []
    classify = service.predictor.classify
    monkeypatch.setattr(service.predictor, "classify", lambda batch: calls.append(len(batch)) or classify(batch))
    data = {n: setup["images"][n].read_bytes() for n in ("img0.jpg", "img1.jpg", "img2.jpg")}
    first = service.submit([Upload("img0.jpg", data["img0.jpg"])])
    assert entered.wait(30)  # the model thread has taken the first job and waits in it
    later = [service.submit([Upload(n, d)]) for n, d in data.items()]
    release.set()
    results = [f.result(timeout=30) for f in (first, *later)]
    assert calls == [1, 3]
    assert [r[0]["relpath"] for r in results] == ["img0.jpg", "img0.jpg", "img1.jpg", "img2.jpg"]
    assert results[0][0]["probability"] == results[1][0]["probability"]


def test_concurrent_requests_each_get_their_own_results(setup, client):
    names = ["img0.jpg", "img1.jpg", "img2.jpg"]
    alone = {n: _post(client, _files(setup, n)).json()["results"][0]["probability"] for n in names}
    answers: dict[int, list] = {}

    def one(i: int) -> None:
        order = names[i % 3:] + names[: i % 3]
        answers[i] = (order, _post(client, _files(setup, *order)).json()["results"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(LIMITS["max_concurrent"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(answers) == LIMITS["max_concurrent"]
    for order, entries in answers.values():
        assert [e["relpath"] for e in entries] == order
        assert [e["probability"] for e in entries] == pytest.approx([alone[n] for n in order], abs=1e-6)


def test_requests_beyond_the_concurrency_limit_get_429_and_the_others_finish(setup, client, monkeypatch):
    _, release = _blocked(monkeypatch, client.app.state.service)
    codes: list[int] = []
    threads = [threading.Thread(target=lambda: codes.append(_post(client, _files(setup, "img0.jpg")).status_code))
               for _ in range(LIMITS["max_concurrent"])]
    for t in threads:
        t.start()
    deadline = time.time() + 20
    while client.get("/api/health").json()["in_flight"] < LIMITS["max_concurrent"] and time.time() < deadline:
        time.sleep(0.05)
    r = _post(client, _files(setup, "img1.jpg"))
    release.set()
    for t in threads:
        t.join(60)
    assert r.status_code == 429 and "busy" in r.json()["error"] and r.headers["retry-after"] == "1"
    assert codes == [200] * LIMITS["max_concurrent"]
    assert client.get("/api/health").json()["in_flight"] == 0


# === Token, binding ===


def test_with_a_token_every_api_call_needs_it(setup, guarded, monkeypatch):
    import hmac

    import kmel.serving.app as app_module

    client, kept = guarded
    compared, original, before = [], hmac.compare_digest, set(kept.iterdir())
    monkeypatch.setattr(app_module.hmac, "compare_digest", lambda a, b: compared.append(1) or original(a, b))
    for path in ("/api/health", "/api/model"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            r = client.get(path, headers=headers)
            assert r.status_code == 401 and "token" in r.json()["error"] and r.headers["www-authenticate"] == "Bearer"
        assert client.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert _post(client, _files(setup, "img0.jpg")).status_code == 401
    assert set(kept.iterdir()) == before  # refused before the body is read
    r = _post(client, _files(setup, "img0.jpg"), headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["n_ok"] == 1
    assert compared
    assert client.get("/").status_code == 200 and client.get("/openapi.json").status_code == 200
    schemes = client.get("/openapi.json").json()["components"]["securitySchemes"]
    assert any(s.get("scheme", "").lower() == "bearer" for s in schemes.values())


def test_keep_uploads_saves_each_file_under_a_new_name(setup, guarded):
    client, kept = guarded
    before = set(kept.iterdir())
    data = setup["images"]["img1.jpg"].read_bytes()
    files = [("files", ("../../etc/x y.jpg", data, "image/jpeg"))]
    assert _post(client, files, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    new = set(kept.iterdir()) - before
    assert len(new) == 1 and next(iter(new)).read_bytes() == data and next(iter(new)).name.endswith("x_y.jpg")


def test_without_a_token_no_api_call_needs_one(client):
    assert client.get("/api/health").status_code == 200
    assert "securitySchemes" not in client.get("/openapi.json").json().get("components", {})


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("[::1]", True),
                                           ("localhost", True), ("0.0.0.0", False), ("::", False),
                                           ("192.168.1.20", False), ("myhost", False)])
def test_only_loopback_binds_go_without_a_token(host, loopback):
    from kmel.config import ConfigError
    from kmel.serving.app import check_bind, is_loopback

    assert is_loopback(host) is loopback
    check_bind(host, "t")
    if loopback:
        check_bind(host, None)
    else:
        with pytest.raises(ConfigError, match="--token"):
            check_bind(host, None)


def _invoke(*args: str, env: dict | None = None):
    from kmel.cli import cli

    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_a_non_loopback_bind_without_a_token_refuses_to_start(setup, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server started"))
    result = _invoke("serve", "--models", str(setup["models"]), "--host", "0.0.0.0", "--port", "0",
                     env={"KMEL_SERVE_TOKEN": ""})
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "--token" in lines[0] and "KMEL_SERVE_TOKEN" in lines[0]


def test_serve_refuses_missing_tflite_files_and_a_taken_port_before_serving(setup, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server started"))
    result = _invoke("serve", "--models", str(setup["models"]), "--runtime", "tflite", "--port", "0")
    assert result.exit_code == 2 and "kmel export --format tflite" in result.output, result.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        result = _invoke("serve", "--models", str(setup["models"]), "--port", str(taken.getsockname()[1]))
    assert result.exit_code == 2 and "--port" in result.output, result.output


def test_the_commands_defaults_are_the_apps():
    from kmel.cli.serve import serve
    from kmel.serving import app

    defaults = {p.name: p.default for p in serve.params}
    assert (defaults["max_request_mb"], defaults["max_megapixels"], defaults["max_files"], defaults["max_concurrent"]) \
        == (app.DEFAULT_MAX_REQUEST_MB, app.DEFAULT_MAX_MEGAPIXELS, app.DEFAULT_MAX_FILES, app.DEFAULT_MAX_CONCURRENT)
    assert defaults["host"] == "127.0.0.1"


# === /api/model, /api/health, the page, the schema ===


def test_a_requests_source_decides_at_that_sources_threshold(setup, client):
    names = ["img0.jpg", "img1.jpg", "img2.jpg"]
    plain = _post(client, _files(setup, *names)).json()["results"]
    clinic = _post(client, _files(setup, *names), "?source=CLINIC_A").json()["results"]
    assert [e["probability"] for e in clinic] == [e["probability"] for e in plain]
    assert all(e["threshold"] == 0.01 and e["prediction"] == int(e["probability"] >= 0.01) for e in clinic)
    assert [e["label"] for e in clinic] == [("benign", "malignant")[e["prediction"]] for e in clinic]
    assert any(a["prediction"] != b["prediction"] for a, b in zip(plain, clinic))  # the same scores, other decisions
    unknown = _post(client, _files(setup, "img0.jpg"), "?source=clinic_b")
    assert unknown.status_code == 400 and "sources with one: clinic_a" in unknown.json()["error"]
    assert client.get("/api/model").json()["threshold_by_source"]["clinic_a"]["threshold"] == 0.01


def test_model_card_says_what_the_model_is(setup, client):
    card = client.get("/api/model").json()
    pipeline = json.loads((setup["models"] / "pipeline.json").read_text())
    assert card["task"] == "malignant" and card["classes"] == ["benign", "malignant"] and card["threshold"] == 0.5
    assert card["calibration"]["temperature"] == 1.0
    assert card["fingerprints"]["segmenter"] == pipeline["segmenter"]["fingerprint"]
    assert card["fingerprints"]["classifier"] == pipeline["classifier"]["fingerprint"]
    assert card["test"]["metrics"]["auc"] == 0.79 and card["test"]["split"] == "test"
    assert card["test"]["groups"]["skin_tone"]["groups"]["dark"]["recall"] == 0.5
    assert card["training_data"]["by_source"]["train"] == {"isic2019": 18, "isic2020": 12}
    assert card["training_data"]["n_records"] == {"train": 30, "val": 5, "test": 20}
    assert "not a medical device" in card["intended_use"] and "Fitzpatrick" in card["skin_tone"]["caveat"]
    assert card["serving"] == {"runtime": "tf", "precision": "float32", "tta": False, "explain": True}
    assert card["limits"]["max_files"] == LIMITS["max_files"]
    assert card["fusion"]["active"] is False and card["fusion"]["present"] is False  # no fusion model here
    import kmel

    assert card["kmel_version"] == kmel.__version__


def test_health(client):
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["runtime"] == "tf" and health["served"]["requests"] >= 0


def test_the_page_and_the_schema_work_offline(client):
    r = client.get("/")
    assert r.status_code == 200 and "Research use only" in r.text and "not a medical device" in r.text
    assert "http://" not in r.text and "https://" not in r.text  # nothing fetched from elsewhere
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert 'accept="image/*"' in r.text and "capture" in r.text and "multiple" in r.text
    schema = client.get("/openapi.json").json()
    assert "multipart/form-data" in schema["paths"]["/api/predict"]["post"]["requestBody"]["content"]
    assert {"/api/predict", "/api/model", "/api/health"} <= set(schema["paths"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text and "needs the internet" in docs.text


def test_the_page_ships_in_the_package():
    from importlib import resources

    assert "<!doctype html>" in resources.files("kmel.serving").joinpath("static", "index.html").read_text()
    setup_cfg = (Path(__file__).resolve().parents[1] / "setup.cfg").read_text()
    assert "serving/static/*" in setup_cfg


# === With a fusion model: the image score and the patient's data ===

FIELDS = {"age": "72", "sex": "male", "site": "back", "patient_id": "P1"}  # as a --metadata CSV gives them


def _add_fusion(models: Path, image_fingerprint: str | None = None) -> dict:
    """Fit a fusion model on synthetic patients (age drives the label; 2 folds: about a second) into
    ``models/fusion/`` and record it in pipeline.json as `kmel train fusion` does (tests/test_fusion_cli.py
    trains one through the CLI). ``image_fingerprint``: the classifier it claims to belong to (default: the
    folder's). Returns the pipeline entry."""
    import hashlib

    from kmel.models.fusion import fusion_path
    from kmel.serving.export import update_pipeline
    from kmel.training.fusion import fit_fusion

    pipeline = json.loads((models / "pipeline.json").read_text())
    rng = np.random.default_rng(0)
    n = 240
    age = rng.integers(20, 90, n)
    target = (age + rng.normal(0, 12, n) > 65).astype(int)
    table = pd.DataFrame({"age": age.astype(str), "sex": rng.choice(["female", "male"], n),
                          "site": rng.choice(["back", "face", "leg"], n), "target": target,
                          "patient_id": [f"P{i // 3}" for i in range(n)]})
    scores = np.clip(0.3 + 0.3 * target + rng.normal(0, 0.2, n), 0.01, 0.99)
    fingerprint = pipeline["classifier"]["fingerprint"] if image_fingerprint is None else image_fingerprint
    model = fit_fusion(table, scores, folds=2, params={"min_data_in_leaf": 5, "num_iterations": 60,
                                                       "early_stopping_round": 10}, image_fingerprint=fingerprint)
    path = model.save(fusion_path(models).parent)
    entry = {"file": "fusion/fusion.json", "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
             "image_fingerprint": fingerprint, "threshold": model.threshold, "features": list(model.spec.features),
             "report_split": "test", "metrics": {"n": 40, "n_positive": 9, "image_auc": 0.7, "fused_auc": 0.8}}
    update_pipeline(models, "fusion", entry)
    return entry


@pytest.fixture(scope="module")
def fused_client(setup):
    """A server over a copy of the models with a fusion model fitted on their classifier's fingerprint."""
    from fastapi.testclient import TestClient

    from kmel.serving.app import make_app

    models = setup["root"] / "models-fused"
    shutil.copytree(setup["models"], models)
    entry = _add_fusion(models)
    with TestClient(make_app(models)) as test_client:
        yield test_client, models, entry


def _expected(fusion_dir: Path, entries: list[dict], fields: dict) -> list[dict]:
    """predict --metadata's rows for these entries' image probabilities, every file described by ``fields``."""
    from kmel.models.fusion import load_fusion
    from kmel.serving.fusion import fuse_rows

    ids = [f"file{i}" for i in range(len(entries))]
    rows = [{"relpath": i, "status": e["status"], "probability": e["image_probability"]} for i, e in zip(ids, entries)]
    table = pd.DataFrame([fields] * len(ids), index=pd.Index(ids, name="_stem"))
    return fuse_rows(rows, load_fusion(fusion_dir), table, 0.5, ["benign", "malignant"])[0]


def test_with_patient_fields_each_entry_is_predicts_fused_row(setup, fused_client):
    """The entries of a request with patient fields (one patient's three lesions) get what fuse_rows gives
    predict --metadata rows for the same image probabilities and fields (the patient-relative features compare
    the three); image_probability is the image model's; an unreadable file stays an error entry, not fused."""
    from kmel.serving.outputs import output_columns

    client, models, _ = fused_client
    names = ["img0.jpg", "img1.jpg", "img2.jpg"]
    alone = _post(client, _files(setup, *names)).json()["results"]
    extra = (("files", ("notes.txt", b"not an image", "text/plain")),)
    r = _post(client, _files(setup, *names, extra=extra), data=FIELDS)
    assert r.status_code == 200, r.text
    entries = r.json()["results"]
    assert [e["fused"] for e in entries] == [True, True, True, None] and entries[3]["status"] == "error"
    assert [e["image_probability"] for e in entries[:3]] == pytest.approx([e["probability"] for e in alone], abs=1e-9)
    expected = _expected(models / "fusion", entries[:3], FIELDS)
    for got, want in zip(entries, expected):
        for key in ("probability", "image_probability", "threshold", "prediction", "label", "fused"):
            assert got[key] == pytest.approx(want[key], abs=1e-9) if key.endswith("probability") else \
                got[key] == want[key], key
    assert not np.allclose([e["probability"] for e in entries[:3]], [e["image_probability"] for e in entries[:3]])
    assert list(entries[0])[: len(output_columns(fused=True))] == list(output_columns(fused=True))
    assert entries[0]["age"] == 72 and entries[0]["patient_id"] == "P1"  # the fields, echoed after the row
    one = _post(client, _files(setup, "img1.jpg"), data=FIELDS).json()["results"][0]
    assert one["probability"] == pytest.approx(_expected(models / "fusion", [one], FIELDS)[0]["probability"], abs=1e-9)


def test_without_patient_fields_entries_keep_the_image_models_result(setup, fused_client):
    """No fields (or only a patient id, which the trees read nothing from alone): fused is false and
    image_probability is probability, at the image model's threshold. Official ISIC names are aliases; a
    field the fusion does not read is still a 400."""
    client, models, _ = fused_client
    for data in ({}, {"patient_id": "P1"}):
        entry = _post(client, _files(setup, "img0.jpg"), data=data).json()["results"][0]
        assert entry["fused"] is False and entry["image_probability"] == entry["probability"]
        assert entry["threshold"] == 0.5 and entry["prediction"] == int(entry["probability"] >= 0.5)
    aliased = _post(client, _files(setup, "img0.jpg"),
                    data={"age_approx": "72", "sex": "male", "anatom_site_general": "back", "patient": "P1"})
    named = _post(client, _files(setup, "img0.jpg"), data=FIELDS)
    assert aliased.json()["results"][0]["probability"] == named.json()["results"][0]["probability"]
    assert aliased.json()["results"][0]["fused"] is True
    r = _post(client, _files(setup, "img0.jpg"), data={"colour": "red"})
    assert r.status_code == 400 and "colour" in r.json()["error"] and "patient_id" in r.json()["error"]
    r = _post(client, _files(setup, "img0.jpg"), data={"age": "72", "age_approx": "70"})
    assert r.status_code == 400 and "twice" in r.json()["error"]
    r = _post(client, _files(setup, "img0.jpg"), data={"site": "x" * 65})
    assert r.status_code == 400 and "64 characters" in r.json()["error"]


def test_the_model_card_shows_the_fusion_model(fused_client):
    client, models, entry = fused_client
    fusion = client.get("/api/model").json()["fusion"]
    assert fusion["active"] is True and fusion["features"] == entry["features"]
    assert fusion["test"]["metrics"] == entry["metrics"] and fusion["threshold"] == entry["threshold"]
    assert {"age", "sex", "site", "patient_id"} <= set(fusion["fields"]) and fusion["patient_field"] == "patient_id"
    assert fusion["aliases"]["age_approx"] == "age"
    schema = client.get("/openapi.json").json()["paths"]["/api/predict"]["post"]["requestBody"]
    assert "patient_id" in schema["content"]["multipart/form-data"]["schema"]["properties"]


def test_a_fusion_fitted_on_another_classifier_is_reported_and_not_applied(setup, tmp_path, caplog):
    from fastapi.testclient import TestClient

    from kmel.serving.app import make_app

    models = tmp_path / "models"
    shutil.copytree(setup["models"], models)
    _add_fusion(models, image_fingerprint="another-classifier")
    with caplog.at_level(logging.WARNING, logger="kmel.serve"), TestClient(make_app(models)) as client:
        fusion = client.get("/api/model").json()["fusion"]
        assert fusion["active"] is False and fusion["present"] is True and "another-classifier" in fusion["reason"]
        assert "refit the fusion" in fusion["reason"]
        entry = _post(client, _files(setup, "img0.jpg"), data={"age": "72", "sex": "male"}).json()["results"][0]
        assert "fused" not in entry and "image_probability" not in entry and entry["age"] == 72
        assert _post(client, _files(setup, "img0.jpg"), data={"patient_id": "P1"}).status_code == 400
    warnings = [rec for rec in caplog.records if rec.name == "kmel.serve" and rec.levelno == logging.WARNING]
    assert len(warnings) == 1 and "image model alone" in warnings[0].getMessage()


# === The page in a real browser, against a real server ===


def _browser():
    """Debian's Chromium and chromedriver through Selenium (never a downloaded driver), or a skip saying what is
    missing."""
    import os

    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install 'kmel[test]')")
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    debian = Path("/usr/bin/chromedriver")
    driver = shutil.which("chromedriver") or (str(debian) if debian.exists() else None)
    if not browser or not driver:
        pytest.skip("no Chromium or chromedriver found (apt-get install chromium chromium-driver)")
    os.environ["SE_OFFLINE"] = "true"  # selenium-manager must never try to download anything
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1000,1600",
                "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


class _Server:
    """uvicorn serving ``app`` on a free loopback port, in a thread."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        assert self.server.started, "uvicorn did not start"
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def _api_predict(url: str, paths: list[Path]) -> list[dict]:
    """POST /api/predict over real HTTP (the standard library's client, as a user's script would)."""
    import urllib.request

    boundary = "kmel-test-boundary"
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{p.name}"\r\n'
                    f"Content-Type: image/jpeg\r\n\r\n".encode() + p.read_bytes() + b"\r\n" for p in paths)
    body += f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{url}/api/predict", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["results"]


@pytest.mark.realdata
def test_the_page_in_a_real_browser_shows_the_apis_probabilities(setup, shared_data, tmp_path):
    import os

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from kmel.serving.app import make_app

    images = sorted((shared_data / "ham10000-sample").rglob("*.jpg"))[:2]
    assert len(images) == 2, "../shared/data/ham10000-sample has no JPEGs"
    driver = _browser()
    try:
        with _Server(make_app(setup["models"])) as url:
            expected = {e["relpath"]: e for e in _api_predict(url, images)}
            assert all(e["status"] == "ok" for e in expected.values()), expected
            driver.get(url + "/")
            WebDriverWait(driver, 30).until(lambda d: "Test metrics" in d.find_element(By.ID, "card-body").text)
            driver.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in images))
            WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result .probability"))
                                            == 2)
            WebDriverWait(driver, 10).until(lambda d: "analysed" in d.find_element(By.ID, "status").text)
            for card in driver.find_elements(By.CSS_SELECTOR, ".result"):
                entry = expected[card.get_attribute("data-file")]
                shown = card.find_element(By.CSS_SELECTOR, ".probability")
                assert shown.text == f"{entry['probability']:.6f}"
                assert float(shown.get_attribute("data-probability")) == entry["probability"]
                assert entry["label"] in card.text and entry["skin_tone_group"] in card.text
                assert len(card.find_elements(By.CSS_SELECTOR, "img")) == 3  # the image, its crop, Grad-CAM
            # the source picker lists the sources with a threshold of their own; picking one decides with it
            from selenium.webdriver.support.ui import Select

            assert driver.find_element(By.ID, "source-field").is_displayed()
            picker = Select(driver.find_element(By.ID, "source"))
            assert [o.get_attribute("value") for o in picker.options] == ["", "clinic_a"]
            picker.select_by_value("clinic_a")
            driver.find_element(By.ID, "files").send_keys(str(images[0]))
            WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result")) == 3)
            latest = driver.find_elements(By.CSS_SELECTOR, ".result")[-1]
            assert "threshold 0.0100" in latest.text and "malignant" in latest.text, latest.text
            logs = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
            assert not logs, logs  # no script error, nothing the page's policy blocked
            driver.save_screenshot(str(tmp_path / "serve.png"))
            if os.environ.get("KMEL_SERVE_SCREENSHOT"):
                shutil.copy(tmp_path / "serve.png", os.environ["KMEL_SERVE_SCREENSHOT"])
    finally:
        driver.quit()


def test_the_page_shows_the_image_only_and_the_fused_probability(setup, fused_client):
    """With a fusion model the page says that patient details give the fused probability, and each result of an
    upload with details shows both numbers, as the API gives them."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from kmel.serving.app import make_app

    client, models, _ = fused_client
    names = ["img0.jpg", "img2.jpg"]
    fields = {"age": "72", "sex": "male", "site": "back"}
    expected = {e["relpath"]: e for e in _post(client, _files(setup, *names), data=fields).json()["results"]}
    assert all(e["fused"] for e in expected.values())
    driver = _browser()
    try:
        with _Server(make_app(models)) as url:
            driver.get(url + "/")
            WebDriverWait(driver, 30).until(lambda d: "Image + patient data" in d.find_element(By.ID, "card-body").text)
            summary = driver.find_element(By.ID, "meta-summary")
            assert "fused" in summary.get_attribute("textContent")
            summary.click()
            driver.find_element(By.ID, "age").send_keys(fields["age"])
            Select(driver.find_element(By.ID, "sex")).select_by_visible_text(fields["sex"])
            driver.find_element(By.ID, "site").send_keys(fields["site"])
            driver.find_element(By.ID, "files").send_keys("\n".join(str(setup["images"][n]) for n in names))
            WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result .probability"))
                                            == 2)
            for card in driver.find_elements(By.CSS_SELECTOR, ".result"):
                entry = expected[card.get_attribute("data-file")]
                assert card.find_element(By.CSS_SELECTOR, ".probability").text == f"{entry['probability']:.6f}"
                assert card.find_element(By.CSS_SELECTOR, ".image-probability").text == \
                    f"{entry['image_probability']:.6f}"
                assert card.find_element(By.CSS_SELECTOR, ".fused-probability").text == f"{entry['probability']:.6f}"
                assert "With patient data" in card.text and "Image only" in card.text
            logs = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
            assert not logs, logs
    finally:
        driver.quit()
