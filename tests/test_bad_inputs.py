"""Bad input at every entry point, through the real CLI: reported by name, the rest done, exit codes kept.

The corpus is made at test time (nothing binary is committed): broken and awkward images
(see also tests/test_images.py for the decoder itself) and broken tables and masks.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from tests.tiny import write_tiny_profile

pytestmark = pytest.mark.slow


def _invoke(*args: str):
    from cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _skin(h: int, w: int, seed: int) -> np.ndarray:
    from kmel.data.synthetic_images import make_lesion_image

    image, _ = make_lesion_image(np.random.default_rng(seed), size=max(h, w), skin_tone=seed % 5, lesion_scale=0.3)
    return cv2.resize(image, (w, h))


def _write(path: Path, rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(path.suffix, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    path.write_bytes(buf.tobytes())  # imencode + write_bytes: non-ASCII names work everywhere


@pytest.fixture(scope="module")
def messy_data(tmp_path_factory) -> Path:
    """A user's own folder: a plain image_id,label CSV plus everything that goes wrong in real folders.

    Masks come from a synthetic circle, not the lesion: the test is about plumbing, not accuracy.
    """
    root = tmp_path_factory.mktemp("messy")
    (root / "photos" / "sub dir").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for i in range(24):
        image_id = f"lesion_{i:03d}"
        _write(root / "photos" / f"{image_id}.jpg", _skin(96, 96, i))
        rows.append((image_id, "malignant" if i % 3 == 0 else "benign"))
    # Awkward but valid images.
    _write(root / "photos" / "sub dir" / "mole één 1.png", _skin(90, 120, 40))  # spaces + non-ASCII
    _write(root / "photos" / "tiny_8x8.bmp", _skin(8, 8, 41))
    _write(root / "photos" / "one_1x1.png", _skin(1, 1, 42))
    big = cv2.resize(_skin(120, 160, 43), (12000, 9000), interpolation=cv2.INTER_NEAREST)
    _write(root / "photos" / "huge_12000x9000.jpg", big)
    gray = cv2.cvtColor(_skin(80, 80, 44), cv2.COLOR_RGB2GRAY)
    cv2.imwrite(str(root / "photos" / "gray.tif"), gray)
    rows += [("mole één 1", "benign"), ("tiny_8x8", "benign"), ("one_1x1", "benign"),
             ("huge_12000x9000", "malignant"), ("gray", "benign")]
    # Broken images.
    good = (root / "photos" / "lesion_000.jpg").read_bytes()
    (root / "photos" / "truncated.jpg").write_bytes(good[: len(good) // 4])
    (root / "photos" / "zero.jpg").write_bytes(b"")
    (root / "photos" / "notes.jpg").write_text("not an image")
    rows += [("truncated", "benign"), ("zero", "malignant"), ("notes", "benign")]
    # Table problems: empty and unknown labels, a conflicting duplicate, a row without an image.
    rows += [("lesion_001", "malignant"), ("lesion_002", ""), ("lesion_004", "maybe"), ("no_such_image", "benign")]
    pd.DataFrame(rows, columns=["image_id", "label"]).to_csv(root / "labels.csv", index=False)
    (root / "unknown.csv").write_text("foo,bar\n1,2\n")
    (root / "partial_2019.csv").write_text("image,MEL,NV\nISIC_0000000,1,0\n")  # official file with columns missing
    # Mask problems: wrong size, all zeros, without its image; one good mask.
    mask = np.zeros((96, 96), np.uint8)
    cv2.circle(mask, (48, 48), 20, 255, -1)
    for i in (5, *range(8, 24)):
        cv2.imwrite(str(root / "masks" / f"lesion_{i:03d}_segmentation.png"), mask)
    cv2.imwrite(str(root / "masks" / "lesion_006_segmentation.png"), np.zeros((40, 90), np.uint8) + 255)
    cv2.imwrite(str(root / "masks" / "lesion_007_segmentation.png"), np.zeros((96, 96), np.uint8))
    cv2.imwrite(str(root / "masks" / "ghost_segmentation.png"), mask)
    # A symlink loop and a directory named like an image.
    (root / "photos" / "loop").symlink_to(root / "photos", target_is_directory=True)
    (root / "photos" / "folder.jpg").mkdir()
    return root


@pytest.fixture(scope="module")
def built(messy_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("built")
    # EfficientNet-Lite0 from scratch: traces faster than B0 (the demo trains B0); the point here is the plumbing.
    profile = write_tiny_profile(tmp, epochs=1, **{"classifier.backbone": "efficientnet_lite0"})
    result = _invoke("build-records", "--data-dir", str(messy_data), "--out", str(tmp / "rec"),
                     "--profile", str(profile), "--quiet")
    return result, tmp / "rec", profile


def test_build_records_reports_every_problem_and_keeps_the_rest(built, messy_data):
    result, rec, _ = built
    assert result.exit_code == 1, result.output  # done, with skipped inputs reported
    assert "Traceback" not in result.output
    manifest = json.loads((rec / "manifest.json").read_text())
    skipped = {s["image_id"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {"truncated", "zero", "notes"}
    assert "truncated.jpg" in skipped["truncated"] and "empty file" in skipped["zero"]
    assert "not an image" in skipped["notes"]
    cleaning = manifest["cleaning"]
    assert cleaning["dropped"]["no usable label (empty, NaN or unknown value)"] == 2
    assert [c["image_id"] for c in cleaning["conflicts"]] == ["lesion_001"]
    assert cleaning["missing_images"] == {"custom": 1}
    unrecognised = " ".join(cleaning["unrecognised_files"])
    assert "unknown.csv" in unrecognised and "partial_2019.csv" in unrecognised
    notes = " ".join(manifest["mask_issues"])
    assert "lesion_006" in notes and "does not match" in notes
    assert "lesion_007" in notes and "empty" in notes
    assert [Path(p).name for p in cleaning["masks_without_image"]] == ["ghost_segmentation.png"]
    # Everything usable made it: 24 + 5 awkward images (the rows with bad labels were second rows).
    assert sum(manifest["n_records"]["img"].values()) == 29
    assert sum(manifest["n_records"]["seg"].values()) == 17  # only the good masks
    table = pd.read_csv(rec / "metadata.csv")
    assert {"mole één 1", "tiny_8x8", "one_1x1", "huge_12000x9000", "gray"} <= set(table["image_id"])
    for line in ("skipped (unreadable) images: 3", "masks not used: 2", "masks without a labelled image: 1",
                 "CSV files not recognised", "label conflicts resolved as malignant: 1"):
        assert line in result.output, result.output


def test_crops_predict_and_evaluate_on_the_messy_folder(built, messy_data, tmp_path):
    """Crop records (the step `train cls` starts with), predict and evaluate run over the same corpus. The
    models are tests/handmade.py's (no training: what is tested is the data, not the models)."""
    from tests.handmade import write_handmade_models

    _, rec, profile = built
    models = write_handmade_models(tmp_path / "models")
    result = _invoke("build-records", "--stage", "crops", "--out", str(rec), "--models", str(models),
                     "--profile", str(profile), "--quiet")
    assert result.exit_code == 0, result.output
    crops = json.loads(next(rec.glob("crops-*/manifest.json")).read_text())
    assert sum(crops["n_records"]["crop"].values()) == 29  # every image that made a record has its crop
    out = tmp_path / "pred.csv"
    result = _invoke("predict", str(messy_data / "photos"), str(out), "--models", str(models), "--quiet")
    assert result.exit_code == 1 and "Traceback" not in result.output
    rows = pd.read_csv(out, dtype=str, keep_default_na=False)
    status = dict(zip(rows["path"].map(lambda p: Path(p).name), rows["status"]))
    for name in ("truncated.jpg", "zero.jpg", "notes.jpg", "folder.jpg"):
        assert status[name] == "error", name
    for name in ("mole één 1.png", "tiny_8x8.bmp", "one_1x1.png", "huge_12000x9000.jpg", "gray.tif", "lesion_010.jpg"):
        assert status[name] == "ok", name
    assert rows["path"].is_unique, "the symlink loop did not list files twice"
    assert "symlink loop" in rows.set_index("image").loc["loop", "error"]  # reported, walked once
    assert len(rows) == 24 + 5 + 3 + 1 + 1  # every image file once, the directory named like one, the loop
    huge = rows[rows["image"] == "huge_12000x9000"].iloc[0]
    assert int(huge["box_x1"]) <= 12000 and int(huge["box_y1"]) <= 9000
    truth = tmp_path / "truth.csv"
    pd.read_csv(messy_data / "labels.csv").rename(columns={"image_id": "image", "label": "target"}).assign(
        target=lambda d: d["target"].map({"benign": 0, "malignant": 1})).dropna().drop_duplicates(
        "image", keep="last").to_csv(truth, index=False)
    result = _invoke("evaluate", "--predictions", str(out), "--truth", str(truth), "--out", str(tmp_path / "rep"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["meta"]["n"] == 29  # every ok prediction has a label
