"""`predict` as a runner: inputs (files, folders, stdin), one row per file keyed by relpath, overlays,
CSV / JSONL, resume, files checked before reading, exit codes, pipeline.json read once.

The models are tiny hand-written SavedModels (tests/handmade.py) exported in a second: the point here is
the runner and what it does with files; tests/test_pipeline_e2e.py runs the same command with trained
models, tests/test_integrity.py the checks before models load and what keeps outputs unmixed.
"""

from __future__ import annotations

import json
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from tests.handmade import CLS, write_handmade_models, write_image


def _invoke(*args: str, input: str | None = None):
    from kmel.cli import cli

    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


@contextmanager
def _deadline(seconds: int):
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""

    def fail(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return write_handmade_models(tmp_path_factory.mktemp("models"))


def _image(path: Path, seed: int, size: tuple[int, int] = (48, 64)) -> Path:
    return write_image(path, seed, size)


def _rows(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def test_predictor_takes_images_and_returns_predictions(models):
    from kmel.serving.predictor import Predictor

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 50, 3), dtype=np.uint8), np.full((30, 30, 3), 250, np.uint8)]
    with Predictor(models, explain=True) as predictor:
        out = predictor.predict(images)
        assert predictor.predict([]) == []
    assert len(out) == 2 and out[1].probability < 0.1 and out[1].label == "benign"
    assert out[0].crop.shape == (CLS, CLS, 3) and out[0].heatmap.shape == (CLS, CLS)
    assert all(0 <= b for b in out[0].box) and out[0].box[2] <= 50 and out[0].box[3] <= 40


def test_files_folders_and_stdin_one_row_each_keyed_by_relpath(models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _image(tmp_path / "a" / "ISIC_1.jpg", 1)
    _image(tmp_path / "b" / "ISIC_1.jpg", 2)
    _image(tmp_path / "b" / "sub" / "ISIC_2.png", 3)
    _image(tmp_path / "loose.png", 4)
    result = _invoke("predict", "a/ISIC_1.jpg", "b", "loose.png", "out.csv", "--models", str(models),
                     "--explain", "cam", "--quiet")
    assert result.exit_code == 0, result.output
    rows = _rows(tmp_path / "out.csv")
    assert sorted(rows["relpath"]) == ["a/ISIC_1.jpg", "b/ISIC_1.jpg", "b/sub/ISIC_2.png", "loose.png"]
    assert (rows["status"] == "ok").all() and sorted(rows["image"]) == ["ISIC_1", "ISIC_1", "ISIC_2", "loose"]
    overlays = sorted(p.relative_to(tmp_path / "cam").as_posix() for p in (tmp_path / "cam").rglob("*.png"))
    assert overlays == [f"{r}_gradcam.png" for r in sorted(rows["relpath"])]  # nothing overwritten
    # One folder: relpath is relative to it; the old `predict DIR OUT.csv` form.
    assert _invoke("predict", "b", "b.csv", "--models", str(models), "--quiet").exit_code == 0
    assert sorted(_rows(tmp_path / "b.csv")["relpath"]) == ["ISIC_1.jpg", "sub/ISIC_2.png"]
    # Paths on standard input (a missing one gets an error row), --out and --format jsonl.
    listing = "a/ISIC_1.jpg\nb/sub/ISIC_2.png\n\nmissing.jpg\n"
    result = _invoke("predict", "-", "--out", "list.out", "--format", "jsonl", "--models", str(models), "--quiet",
                     input=listing)
    assert result.exit_code == 1, result.output
    lines = [json.loads(line) for line in (tmp_path / "list.out").read_text().splitlines()]
    status = {line["relpath"]: line["status"] for line in lines}
    assert status == {"a/ISIC_1.jpg": "ok", "b/sub/ISIC_2.png": "ok", "missing.jpg": "error"}
    ok = next(line for line in lines if line["status"] == "ok")
    assert isinstance(ok["probability"], float) and isinstance(ok["box_x1"], int) and ok["tta"] is False


def test_usage_errors_exit_2_before_any_work(models, tmp_path):
    _image(tmp_path / "x.jpg", 0)
    for args in (["predict", str(tmp_path / "x.jpg")],  # no output
                 ["predict", str(tmp_path / "x.jpg"), str(tmp_path / "y.jpg")],  # an image is never the output
                 ["predict", str(tmp_path / "nope"), str(tmp_path / "o.csv")],  # a mistyped input
                 ["predict", str(tmp_path), str(tmp_path / "o.csv"), "--models", str(tmp_path / "none")]):
        result = _invoke(*args, "--quiet")
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output
    assert not (tmp_path / "y.jpg").exists() and not (tmp_path / "o.csv").exists()
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    result = _invoke("predict", str(tmp_path / "x.jpg"), str(tmp_path / "other.csv"), "--models", str(models))
    assert result.exit_code == 2 and "not a kmel predict CSV" in result.output
    assert (tmp_path / "other.csv").read_text() == "a,b\n1,2\n"


def test_resume_keys_on_relpath(models, tmp_path):
    for name in ("a", "b"):
        for i in range(3):
            _image(tmp_path / "in" / name / f"ISIC_{i}.jpg", i)
    out = tmp_path / "p.csv"
    inputs = [str(tmp_path / "in" / "a"), str(tmp_path / "in" / "b")]
    assert _invoke("predict", *inputs, str(out), "--models", str(models), "--quiet").exit_code == 0
    full = out.read_text().splitlines()
    assert len(full) == 7
    out.write_text("\n".join(full[:3]) + "\n" + full[3][:15])  # killed mid-row: two rows and a torn one
    result = _invoke("predict", *inputs, str(out), "--models", str(models), "--quiet")
    assert result.exit_code == 0 and "2 rows kept" in result.output, result.output
    again = _rows(out)
    assert len(again) == 6 and again["relpath"].is_unique
    assert sorted(again["relpath"]) == sorted(f"{d}/ISIC_{i}.jpg" for d in "ab" for i in range(3))


def test_files_are_checked_before_reading_and_one_bad_file_costs_one_row(models, tmp_path):
    folder = tmp_path / "in"
    _image(folder / "good.jpg", 0)
    os.mkfifo(folder / "fifo.jpg")
    (folder / "zero.jpg").symlink_to("/dev/zero")
    (folder / "dir.png").mkdir()
    (folder / "photo.heic").write_bytes(b"\0\0\0\x18ftypheic" + b"\0" * 40)
    (folder / "big.jpg").write_bytes(_image(tmp_path / "src.jpg", 1).read_bytes() + b"\0" * (2 << 20))
    rgb = np.full((40, 40, 3), 180, np.uint8)
    cv2.circle(rgb, (20, 20), 8, (60, 40, 30), -1)
    from PIL import Image

    Image.fromarray(rgb).save(folder / "web.webp")
    Image.fromarray(rgb).save(folder / "anim.gif", save_all=True, append_images=[Image.fromarray(255 - rgb)])
    (folder / "notes.txt").write_text("not an image, not listed")
    out = tmp_path / "p.csv"
    with _deadline(120):
        result = _invoke("predict", str(folder), str(out), "--models", str(models), "--max-file-mb", "1", "--quiet")
    assert result.exit_code == 1, result.output
    rows = _rows(out).set_index("relpath")
    assert sorted(rows.index) == sorted(["good.jpg", "fifo.jpg", "zero.jpg", "dir.png", "photo.heic", "big.jpg",
                                         "web.webp", "anim.gif"])
    assert rows.loc[["good.jpg", "web.webp", "anim.gif"], "status"].eq("ok").all()
    errors = rows[rows["status"] == "error"]["error"]
    assert "FIFO" in errors["fifo.jpg"] and "character device" in errors["zero.jpg"]
    assert "directory" in errors["dir.png"] and "HEIC image: format not supported" in errors["photo.heic"]
    assert "over the 1 MiB limit" in errors["big.jpg"]
    assert "5 errors" in result.output


def test_a_symlink_loop_is_reported_not_an_error_unless_strict(models, tmp_path):
    folder = tmp_path / "in"
    _image(folder / "x.jpg", 0)
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    out = tmp_path / "p.csv"
    result = _invoke("predict", str(folder), str(out), "--models", str(models), "--quiet")
    assert result.exit_code == 0 and "1 skipped" in result.output, result.output
    assert dict(zip(_rows(out)["relpath"], _rows(out)["status"])) == {"x.jpg": "ok", "loop": "skipped"}
    out.unlink()
    assert _invoke("predict", str(folder), str(out), "--models", str(models), "--quiet", "--strict").exit_code == 1


def test_pipeline_json_is_read_once_per_run(models, tmp_path, pipeline_reads):
    import kmel.serving.runner  # noqa: F401  (the modules predict uses, loaded before reads are counted)

    _image(tmp_path / "in" / "x.jpg", 0)
    reads = pipeline_reads
    result = _invoke("predict", str(tmp_path / "in"), str(tmp_path / "p.csv"), "--models", str(models),
                     "--explain", str(tmp_path / "cam"), "--quiet")
    assert result.exit_code == 0, result.output
    assert len(reads) == 1, reads


def test_jsonl_resume_and_wrong_output(models, tmp_path):
    from kmel.config import ConfigError
    from kmel.serving.runner import RowsFile

    path = tmp_path / "p.jsonl"
    path.write_text('{"relpath": "a.jpg", "status": "ok"}\n{"relpath": "b.j')
    assert RowsFile(path).done() == {"a.jpg"} and path.read_text().endswith("}\n")
    path.write_text("not json\n")
    with pytest.raises(ConfigError):
        RowsFile(path).done()
    with pytest.raises(ConfigError):
        RowsFile(tmp_path / "x.csv", "xml")
