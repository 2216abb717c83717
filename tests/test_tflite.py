"""TFLite (LiteRT) export and `predict --runtime tflite`; the overlapped, memory-bounded predict runner.

Models: small Keras convnets exported with the same `export_serving` as trained models (converting a
real U-Net and EfficientNet takes a minute; the conversion path is the same): a segmenter whose mask is
"darker than mid-grey" plus a random conv branch through pooling and bilinear upsampling, and a
seeded random classifier. Beside them, tiny synthetic records for calibration and parity.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from kmel import constants as C
from kmel.config import to_plain
from tests.tiny import tiny_config

pytestmark = pytest.mark.slow


def _invoke(*args: str):
    from kmel.cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _segmenter(size: int):
    import keras

    L = keras.layers
    inputs = keras.Input((size, size, 3), name="images")
    x = L.Rescaling(1 / 255.0)(inputs)
    dark = L.Conv2D(1, 1, name="dark")(x)  # logit 16 · (0.5 − mean brightness): a real mask on real images
    y = L.Conv2D(8, 3, padding="same", activation="relu")(x)
    y = L.MaxPooling2D(2)(y)
    y = L.Conv2D(8, 3, padding="same", activation="relu")(y)
    y = L.UpSampling2D(2, interpolation="bilinear")(y)
    y = L.Conv2D(1, 1, kernel_initializer=keras.initializers.RandomNormal(stddev=0.05))(y)
    outputs = L.Activation("sigmoid", dtype="float32")(L.Add()([dark, y]))
    model = keras.Model(inputs, outputs)
    model.get_layer("dark").set_weights([np.full((1, 1, 3, 1), -16 / 3, np.float32), np.array([8.0], np.float32)])
    return model


def _classifier(size: int):
    import keras

    L = keras.layers
    inputs = keras.Input((size, size, 3), name="images")
    x = L.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = L.Conv2D(16, 3, strides=2, padding="same", activation="relu6")(x)
    x = L.DepthwiseConv2D(3, padding="same", activation="relu6")(x)
    x = L.Conv2D(64, 1, activation="relu6")(x)
    x = L.Conv2D(64, 3, padding="same", activation="relu6")(x)  # most of the ~40k weights: file sizes show them
    x = L.GlobalAveragePooling2D()(x)
    outputs = L.Dense(1, activation="sigmoid", dtype="float32")(x)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    import keras

    from kmel.data.records import build_records
    from kmel.data.synthetic import make_prediction_folder, make_synthetic_dataset
    from kmel.serving.export import (
        export_serving,
        saved_model_fingerprint,
        update_pipeline,
    )

    tmp = tmp_path_factory.mktemp("tflite")
    config = tiny_config()
    make_synthetic_dataset(tmp / "data", n_images=24, seed=3, size=96)
    build_records(tmp / "data", tmp / "rec", config, progress=False)
    make_prediction_folder(tmp / "images", n_images=6, seed=4, size=96)
    keras.utils.set_random_seed(0)
    models = tmp / "models"
    seg = _segmenter(config.segmenter.image_size)
    export_serving(seg, models / C.SEGMENTER_DIR, config.segmenter.image_size)
    update_pipeline(models, "segmenter", {
        "image_size": config.segmenter.image_size, "fingerprint": saved_model_fingerprint(models / C.SEGMENTER_DIR),
        "config": to_plain(config.segmenter), "records": to_plain(config.records), "crops": to_plain(config.crops)})
    cls = _classifier(config.classifier.image_size)
    export_serving(cls, models / C.CLASSIFIER_DIR, config.classifier.image_size)
    update_pipeline(models, "classifier", {
        "image_size": config.classifier.image_size, "threshold": 0.5, "class_names": ["benign", "malignant"],
        "fingerprint": saved_model_fingerprint(models / C.CLASSIFIER_DIR), "config": to_plain(config.classifier)})
    result = _invoke("export", "--format", "tflite", "--models", str(models), "--records", str(tmp / "rec"),
                     "--parity-images", "6", "--calibration-images", "8", "--quiet")
    assert result.exit_code == 0, result.output
    return {"tmp": tmp, "records": tmp / "rec", "models": models, "images": tmp / "images", "config": config,
            "export_output": result.output}


def _pipeline(models: Path) -> dict:
    return json.loads((models / C.PIPELINE_JSON).read_text())


def test_export_writes_every_precision_with_its_provenance(setup):
    from kmel.data.records import load_manifest

    models = setup["models"]
    pipeline = _pipeline(models)
    section = pipeline["tflite"]
    n_val = load_manifest(setup["records"])["n_records"]["img"]["val"]
    assert set(section) == {"float32", "float16", "int8"}
    for precision, entry in section.items():
        for model in ("segmenter", "classifier"):
            e = entry[model]
            blob = (models / e["file"]).read_bytes()
            assert e["file"] == f"tflite/{model}-{precision}.tflite"
            assert e["bytes"] == len(blob) and e["sha256"] == hashlib.sha256(blob).hexdigest()
            assert e["source_fingerprint"] == pipeline[model]["fingerprint"]
            assert e["parity_split"] == "val" and e["parity_n"] == min(6, n_val)
            assert f"{e['file']}: " in setup["export_output"]
    size = {p: section[p]["classifier"]["bytes"] for p in section}
    # float16 halves the weights; int8 quarters them (the graph itself adds a little)
    assert size["float16"] < 0.6 * size["float32"] and size["int8"] < 0.35 * size["float32"]
    assert section["int8"]["classifier"]["quantization"].startswith("int8 weights and activations")
    assert section["int8"]["calibration_n"] == 8
    assert not list((models / "tflite").glob("*.tmp")), "no temporary files left"


def test_recorded_parity_is_what_the_files_give(setup):
    """Recompute max |SavedModel − TFLite| on the same val images, apart from the export code's loop."""
    import tensorflow as tf

    from kmel.serving.litert import draw_inputs
    from kmel.serving.runtime import TFLiteModel

    models = setup["models"]
    pipeline = _pipeline(models)
    seg_x, cls_x = draw_inputs(setup["records"], "val", 6, models, pipeline)
    for model, x in (("segmenter", seg_x), ("classifier", cls_x)):
        serve = tf.saved_model.load(str(models / model)).signatures["serve"]
        want = next(iter(serve(tf.constant(x)).values())).numpy()
        for precision, bound in (("float32", 1e-4), ("float16", 5e-2), ("int8", 0.25)):
            entry = pipeline["tflite"][precision][model]
            got = np.concatenate([TFLiteModel(models / entry["file"])(x[i : i + 1]) for i in range(len(x))])
            diff = float(np.abs(got - want).max())
            assert diff == pytest.approx(entry["max_abs_diff"], abs=1e-6), (model, precision)
            assert diff <= bound, (model, precision, diff)


def test_interpreter_resizes_between_batch_sizes(setup):
    from kmel.serving.runtime import TFLiteModel, tflite_path

    model = TFLiteModel(tflite_path(setup["models"], "classifier", "float32"))
    x = np.random.default_rng(0).uniform(0, 255, (5, 64, 64, 3)).astype(np.float32)
    one_by_one = np.concatenate([model(x[i : i + 1]) for i in range(5)])
    for n in (3, 5, 2):
        np.testing.assert_allclose(model(x[:n]), one_by_one[:n], atol=1e-5)
    with pytest.raises(ValueError, match="takes"):
        model(np.zeros((1, 32, 32, 3), np.float32))


def test_predict_with_tflite_gives_the_savedmodel_rows(setup, tmp_path):
    base = ["predict", str(setup["images"]), "--models", str(setup["models"]), "--quiet"]
    assert _invoke(*base, "--out", str(tmp_path / "tf.csv")).exit_code == 0
    result = _invoke(*base, "--out", str(tmp_path / "lite.csv"), "--runtime", "tflite")
    assert result.exit_code == 0, result.output
    tf_rows = pd.read_csv(tmp_path / "tf.csv").set_index("relpath").sort_index()
    lite = pd.read_csv(tmp_path / "lite.csv").set_index("relpath").sort_index()
    assert len(tf_rows) == len(lite) == 6 and (tf_rows["status"] == "ok").all()
    ok = tf_rows["status"] == "ok"
    np.testing.assert_allclose(lite.loc[ok, "probability"], tf_rows.loc[ok, "probability"], atol=1e-4)
    for col in ("box_x0", "box_y0", "box_x1", "box_y1", "crop_mode", "skin_tone_group"):
        assert (lite.loc[ok, col] == tf_rows.loc[ok, col]).all(), col
    result = _invoke(*base, "--out", str(tmp_path / "int8.csv"), "--runtime", "tflite", "--tflite-precision", "int8")
    assert result.exit_code == 0, result.output
    int8 = pd.read_csv(tmp_path / "int8.csv").set_index("relpath").sort_index()
    assert (int8.loc[ok, "status"] == "ok").all()
    assert np.abs(int8.loc[ok, "probability"] - tf_rows.loc[ok, "probability"]).max() < 0.25


@pytest.mark.parametrize("precision", ["float32", "float16", "int8"])
def test_predict_opens_the_files_of_the_precision_asked_for(setup, tmp_path, monkeypatch, precision):
    """``--tflite-precision P`` runs ``<model>-P.tflite`` for both models, never another precision's."""
    from kmel.serving import runtime

    opened = []
    original = runtime.TFLiteModel.__init__

    def spy(self, path, *args, **kwargs):
        opened.append(Path(path).name)
        original(self, path, *args, **kwargs)

    monkeypatch.setattr(runtime.TFLiteModel, "__init__", spy)
    result = _invoke("predict", str(setup["images"]), "--models", str(setup["models"]), "--quiet", "--runtime",
                     "tflite", "--tflite-precision", precision, "--out", str(tmp_path / "p.csv"))
    assert result.exit_code == 0, result.output
    assert sorted(opened) == [f"classifier-{precision}.tflite", f"segmenter-{precision}.tflite"]


def test_tensorflows_interpreter_is_the_fallback_without_litert(setup, monkeypatch):
    import sys

    import tensorflow as tf

    from kmel.serving import runtime

    path = runtime.tflite_path(setup["models"], "classifier", "float32")
    x = np.random.default_rng(1).uniform(0, 255, (3, 64, 64, 3)).astype(np.float32)
    with_litert = runtime.TFLiteModel(path)(x)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)  # `import` raises ImportError
    assert runtime._interpreter_class() is tf.lite.Interpreter
    np.testing.assert_allclose(runtime.TFLiteModel(path)(x), with_litert, atol=1e-6)


def test_int8_falls_back_to_dynamic_range_when_the_runtime_refuses_full_integer(setup, tmp_path, monkeypatch):
    """The U-Net case: XNNPACK refuses a fully quantised graph; the export then writes dynamic-range int8
    (and says so) instead of failing. The refusal is simulated for the first full-integer blob."""
    import shutil

    from kmel.serving import litert

    models = Path(shutil.copytree(setup["models"], tmp_path / "models"))
    refused = []
    original = litert.xnnpack_refusal

    def refuse_first(blob):
        if not refused:
            refused.append(len(blob))
            return "failed to prepare (simulated)"
        return original(blob)

    monkeypatch.setattr(litert, "xnnpack_refusal", refuse_first)
    pipeline = _pipeline(models)
    held_out = litert.draw_inputs(setup["records"], "val", 4, models, pipeline)
    calibration = litert.draw_inputs(setup["records"], "train", 4, models, pipeline)
    section = litert.write_tflite(models, pipeline, ["int8"], held_out, calibration, "val")
    segmenter = section["int8"]["segmenter"]
    assert refused and segmenter["quantization"] == litert.QUANTIZATION["dynamic-int8"]
    assert "refused by XNNPACK" in segmenter["note"]
    assert section["int8"]["classifier"]["quantization"].startswith("int8 weights and activations")


def test_evaluate_with_tflite_scores_the_file(setup, tmp_path):
    """`evaluate --runtime tflite` scores the crop records with the TFLite classifier: float32 gives the
    SavedModel's probabilities, int8 its own (close), and the report names the runtime."""
    base = ["evaluate", "--records", str(setup["records"]), "--models", str(setup["models"]), "--split", "val",
            "--quiet"]
    tables = {}
    for name, extra in (("tf", []), ("float32", ["--runtime", "tflite"]),
                        ("int8", ["--runtime", "tflite", "--tflite-precision", "int8"])):
        result = _invoke(*base, "--out", str(tmp_path / name), *extra)
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / name / "report.json").read_text())
        assert report["meta"]["runtime"] == ("tf" if name == "tf" else f"tflite {name}")
        tables[name] = pd.read_csv(tmp_path / name / "predictions.csv").set_index("image_id").sort_index()
    tf_p = tables["tf"]["probability"]
    assert len(tf_p) > 0 and tf_p.std() > 1e-4, "a classifier that says the same for every crop proves nothing"
    np.testing.assert_allclose(tables["float32"]["probability"], tf_p, atol=1e-4)
    int8_diff = np.abs(tables["int8"]["probability"] - tf_p)
    assert 0 < int8_diff.max() < 0.25, "int8 is its own file: close to the SavedModel, not identical"


def test_stale_or_missing_tflite_files_are_refused_with_the_fix(setup, tmp_path):
    import shutil

    models = tmp_path / "models"
    shutil.copytree(setup["models"], models)
    pipeline = _pipeline(models)
    pipeline["segmenter"]["fingerprint"] = "retrained"
    (models / C.PIPELINE_JSON).write_text(json.dumps(pipeline))
    base = ["predict", str(setup["images"]), "--out", str(tmp_path / "p.csv"), "--models", str(models), "--quiet",
            "--runtime", "tflite"]
    result = _invoke(*base)
    assert result.exit_code == 2
    assert "earlier segmenter" in result.output and "kmel export --format tflite" in result.output
    pipeline["segmenter"]["fingerprint"] = _pipeline(setup["models"])["segmenter"]["fingerprint"]
    (models / C.PIPELINE_JSON).write_text(json.dumps(pipeline))
    (models / "tflite" / "classifier-float16.tflite").unlink()
    result = _invoke(*base, "--tflite-precision", "float16")
    assert result.exit_code == 2 and "classifier-float16.tflite is missing" in result.output
    result = _invoke("evaluate", "--records", str(setup["records"]), "--models", str(models), "--out",
                     str(tmp_path / "report"), "--runtime", "tflite", "--tflite-precision", "float16", "--quiet")
    assert result.exit_code == 2 and "classifier-float16.tflite is missing" in result.output
    result = _invoke("predict", str(setup["images"]), "--out", str(tmp_path / "q.csv"), "--models",
                     str(setup["models"]), "--runtime", "tflite", "--explain", str(tmp_path / "cams"))
    assert result.exit_code == 2 and "--explain" in result.output
    assert not (tmp_path / "p.csv").exists() or (tmp_path / "p.csv").stat().st_size == 0


def test_export_without_records_names_the_fix(setup, tmp_path):
    result = _invoke("export", "--models", str(setup["models"]), "--records", str(tmp_path / "nothing"), "--quiet")
    assert result.exit_code == 2 and "build-records" in result.output and "nothing" in result.output


@pytest.mark.realdata
def test_parity_on_real_crops(setup, shared_data):
    """The exported files against their SavedModels on real dermoscopic images: 24 ISIC images through
    CropPipeline (segmenter inputs) and the tiny segmenter's crops (classifier inputs); bounds per format."""
    import tensorflow as tf

    from kmel.lesion.crops import CropPipeline
    from kmel.serving.litert import parity
    from kmel.serving.runtime import TFLiteModel, load_runtime_models

    models = setup["models"]
    pipeline = _pipeline(models)
    paths = sorted((shared_data / "isic2018-task1-256" / "images").glob("*.jpg"))[:24]
    images = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths]
    tf_models = load_runtime_models(models, pipeline)
    with CropPipeline(tf_models.segment, tf_models.seg_size, setup["config"], workers=1) as crops:
        pres = [crops.pre(image) for image in images]
        prepared = crops.finish(pres)
    inputs = {"segmenter": np.stack([p.seg_input for p in pres]).astype(np.float32),
              "classifier": np.stack([p.result.crop for p in prepared]).astype(np.float32)}
    bounds = {"float32": 1e-4, "float16": 5e-2, "int8": 0.25}
    for model, x in inputs.items():
        serve = tf.saved_model.load(str(models / model)).signatures["serve"]
        want = next(iter(serve(tf.constant(x)).values())).numpy()
        for precision, bound in bounds.items():
            got = TFLiteModel(models / pipeline["tflite"][precision][model]["file"])(x)
            measured = parity(want, got, model)
            if model == "classifier" or precision == "float32":
                assert measured["max_abs_diff"] <= bound, (model, precision, measured)
            if model == "segmenter":
                # the crop comes from the mask: it must hardly move, whatever the precision
                assert measured["mask_iou"] > (0.99 if precision == "float32" else 0.9), (precision, measured)


# === The runner: overlap and memory bounds ===


class _SlowPredictor:
    """Stands in for Predictor in staged_batches: records when batches are made and consumed."""

    def __init__(self, config, fail_at: int | None = None):
        from kmel.lesion.crops import CropPipeline

        self.config = config
        self.fail_at = fail_at
        self.made: list[int] = []
        self.lock = threading.Lock()
        self.crops = CropPipeline(None, 32, config, workers=2)
        original = self.crops.finish

        def finish(pres):
            with self.lock:
                self.made.append(len(pres))
                if self.fail_at is not None and len(self.made) == self.fail_at:
                    raise RuntimeError("segmenter blew up")
            return original(pres)

        self.crops.finish = finish


def _files(tmp_path: Path, n: int):
    from kmel.serving.runner import collect_inputs

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(n):
        image = np.full((40 + i, 50, 3), 180, np.uint8)
        cv2.circle(image, (25, 20), 8, (40, 30, 20), -1)
        cv2.imwrite(str(folder / f"{i:03d}.png"), image)
    (folder / "999_broken.jpg").write_bytes(b"not a jpeg")
    return collect_inputs([folder])


def test_staged_batches_keep_order_and_report_bad_files(tmp_path):
    from kmel.serving.runner import staged_batches

    items = _files(tmp_path, 10)
    predictor = _SlowPredictor(tiny_config())
    got = list(staged_batches(predictor, items, batch_size=4, max_bytes=1 << 30, depth=1))
    assert [it.relpath for b in got for it in b.items] == [it.relpath for it in items]
    last = got[-1]
    assert list(last.errors) == [len(last.items) - 1] and "999_broken.jpg" in last.errors[len(last.items) - 1]
    sizes = [p.original_size for b in got for p in b.prepared.values()]
    assert sizes == [(40 + i, 50) for i in range(10)]
    predictor.crops.close()


def test_staged_batches_run_ahead_at_most_the_queue_depth(tmp_path):
    """The producer makes batch k+1 while the caller works on batch k, and never more than ``depth``
    batches ahead: memory is bounded by the queue, not by the number of files. Events, not timings:
    after each batch the caller waits (up to a minute, however loaded the machine) until the producer,
    unasked, has filled the queue; then checks that it went no further."""
    from kmel.serving.runner import staged_batches

    items = _files(tmp_path, 12)
    total = -(-len(items) // 2)
    depth = 2
    predictor = _SlowPredictor(tiny_config())
    ahead = []
    consumed = 0
    for _ in staged_batches(predictor, items, batch_size=2, max_bytes=1 << 30, depth=depth):
        consumed += 1
        target = min(consumed + depth, total)
        deadline = time.monotonic() + 60
        while len(predictor.made) < target:
            assert time.monotonic() < deadline, f"the producer did not work ahead: {len(predictor.made)} made"
            time.sleep(0.01)
        time.sleep(0.05)  # room to overrun, were the queue not bounded
        with predictor.lock:
            ahead.append(len(predictor.made) - consumed)
    assert consumed == total
    # made but not yet taken: `depth` waiting in the queue plus one being put
    assert max(ahead) <= depth + 1, ahead
    assert ahead[0] >= depth, ahead
    predictor.crops.close()


def test_staged_batches_raise_the_producers_error_and_stop_when_abandoned(tmp_path):
    from kmel.serving.runner import staged_batches

    items = _files(tmp_path, 12)
    predictor = _SlowPredictor(tiny_config(), fail_at=2)
    with pytest.raises(RuntimeError, match="segmenter blew up"):
        for _ in staged_batches(predictor, items, batch_size=2, max_bytes=1 << 30, depth=1):
            pass
    predictor = _SlowPredictor(tiny_config())
    stream = staged_batches(predictor, items, batch_size=2, max_bytes=1 << 30, depth=1)
    next(stream)
    stream.close()  # the caller stops early (Ctrl-C, an error while writing)
    made = len(predictor.made)
    time.sleep(0.3)
    assert len(predictor.made) == made <= 3, "the producer stopped with the caller"
    assert not [t for t in threading.enumerate() if t.name == "kmel-prepare"]
    predictor.crops.close()


def test_model_calls_are_bounded_in_pixels():
    from kmel.serving.runtime import _chunked, model_chunk

    assert model_chunk(512, 4 * 512 * 512) == 4 and model_chunk(224, 4 * 512 * 512) == 20
    assert model_chunk(1024, 4 * 512 * 512) == 1  # always at least one image
    calls = []
    fn = _chunked(lambda x: (calls.append(len(x)), x.sum(axis=(1, 2, 3)))[1], 4)
    x = np.random.default_rng(0).uniform(size=(11, 2, 2, 3))
    np.testing.assert_allclose(fn(x), x.sum(axis=(1, 2, 3)))
    assert calls == [4, 4, 3]
