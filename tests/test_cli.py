"""The command line as a user meets it: installed from a wheel, `--version`, help text, exit codes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]


def _invoke(*args: str):
    from kmel.cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_version_names_kmel_tensorflow_and_keras():
    import kmel

    result = _invoke("--version")
    assert result.exit_code == 0
    line = result.output.strip()
    assert line.startswith(f"kmel {kmel.__version__} (TensorFlow 2.") and "Keras 3." in line, line


def test_the_clone_shim_and_python_m_kmel_run_the_same_group():
    import cli as shim
    from kmel.cli import cli

    assert shim.cli is cli
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ran = subprocess.run([sys.executable, "-m", "kmel", "--version"], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=300)
    assert ran.returncode == 0 and ran.stdout.startswith("kmel "), ran.stdout + ran.stderr


@pytest.mark.slow
def test_wheel_installs_the_kmel_command(tmp_path):
    """`python -m build` → wheel → scratch venv: the wheel's kmel (not the clone's) runs as `kmel`.

    The venv sees this interpreter's site-packages through a ``.pth`` file (so TensorFlow is not
    downloaded again, and this works when the suite itself runs in a virtualenv, whose
    ``--system-site-packages`` would be the base Python's); kmel.__file__ proves the import comes from
    the venv. `kmel demo --quick` from such a venv was run by hand
    (4.5 min on 2 busy cores, exit 0); here the cheap commands are checked.
    """
    pytest.importorskip("build")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "kmel", src / "kmel", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp_path / "dist"
    # No isolation: the build uses the installed setuptools, so the test needs no network.
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--skip-dependency-check",
                    "--outdir", str(dist), str(src)], check=True, capture_output=True, timeout=300)
    wheel = next(dist.glob("kmel-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py, kmel_cmd = venv / "bin" / "python", venv / "bin" / "kmel"
    import site
    import sysconfig

    purelib = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    parents = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"]])
    # Plain paths: .pth files inside them (the clone's editable install) are not run, so no kmel comes from here.
    (purelib / "_kmel_test_parent_site.pth").write_text("\n".join(parents) + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = dict(cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # cwd: not the clone
    where = subprocess.run([str(py), "-c", "import kmel; print(kmel.__file__)"], **run)
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr
    version = subprocess.run([str(kmel_cmd), "--version"], **run)
    assert version.returncode == 0 and version.stdout.startswith("kmel "), version.stderr
    assert subprocess.run([str(py), "-m", "kmel", "--version"], **run).stdout.startswith("kmel ")
    profile = subprocess.run([str(py), "-c", "from kmel.config import load_config, resolve_profile; "
                              "load_config('cpu-10k'); print(resolve_profile('cpu-small'))"], **run)
    assert profile.returncode == 0 and profile.stdout.strip().startswith(str(venv)), profile.stdout + profile.stderr
    helped = subprocess.run([str(py), "-m", "kmel", "--help"], **run)
    assert helped.returncode == 0 and "python -m kmel" in helped.stdout and "predict" in helped.stdout
    records_help = subprocess.run([str(kmel_cmd), "build-records", "--help"], **run)
    assert "cpu-small" in records_help.stdout, "the shipped profiles are inside the wheel"
    made = subprocess.run([str(kmel_cmd), "make-synthetic", str(tmp_path / "data"), "--n-images", "4",
                           "--size", "32"], **run)
    assert made.returncode == 0, made.stderr
    assert list((tmp_path / "data").glob("*.csv")), made.stdout


def _commands(group, prefix: str = ""):
    """(name, command) for every command in the click tree, groups included."""
    import click

    yield prefix or group.name, group
    if isinstance(group, click.Group):
        for name, command in group.commands.items():
            yield from _commands(command, f"{prefix} {name}".strip())


def test_every_option_of_every_command_has_help_text():
    import click

    from kmel.cli import cli

    missing = [f"{name or 'kmel'} {param.opts[0]}" for name, command in _commands(cli)
               for param in command.params if isinstance(param, click.Option) and not (param.help or "").strip()]
    assert not missing, f"options without help text: {missing}"
    undocumented = [name for name, command in _commands(cli) if not (command.help or "").strip()]
    assert not undocumented, f"commands without a description: {undocumented}"


def test_long_commands_take_quiet():
    from kmel.cli import cli

    for name in ("build-records", "train", "predict", "evaluate", "demo"):
        assert "quiet" in {p.name for p in cli.commands[name].params}, name


# === Exit codes: 0 all usable input used, 1 a file or mask unusable (or anything reported, --strict), 2 usage ===


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory) -> Path:
    import yaml

    path = tmp_path_factory.mktemp("profile") / "tiny.yaml"
    path.write_text(yaml.safe_dump({"records": {"image_size": 48, "seg_size": 32, "shard_size": 32, "workers": 1}}))
    return path


def _tiny_data(root: Path) -> Path:
    from kmel.data.synthetic import make_synthetic_dataset

    make_synthetic_dataset(root, n_images=16, seed=3, size=48)
    return root


def _build(data: Path, out: Path, profile: Path, *extra: str):
    return _invoke("build-records", "--data-dir", str(data), "--out", str(out), "--profile", str(profile),
                   "--quiet", *extra)


def test_build_records_orphan_mask_and_missing_image_exit_0_and_1_when_strict(tmp_path, tiny_profile):
    import json

    import cv2
    import numpy as np

    data = _tiny_data(tmp_path / "data")
    cv2.imwrite(str(data / "masks" / "ISIC_0000001_segmentation.png"), np.full((48, 48), 255, np.uint8))
    next((data / "images").rglob("*.jpg")).unlink()  # a labelled row without its image
    result = _build(data, tmp_path / "rec", tiny_profile)
    assert result.exit_code == 0, result.output
    assert "masks without a labelled image: 1" in result.output and "labelled rows without an image: 1" in result.output
    problems = json.loads((tmp_path / "rec" / "manifest.json").read_text())["problems"]
    assert problems == {"errors": {}, "notes": {"labelled rows without an image": 1,
                                                "masks without a labelled image": 1}}
    assert _build(data, tmp_path / "rec", tiny_profile, "--strict").exit_code == 1


def test_build_records_corrupt_image_exits_1(tmp_path, tiny_profile):
    data = _tiny_data(tmp_path / "data")
    victim = sorted((data / "images").rglob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    result = _build(data, tmp_path / "rec", tiny_profile)
    assert result.exit_code == 1, result.output
    assert "skipped (unreadable) images: 1" in result.output


def test_configuration_errors_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("records:\n  imagesize: 64\n")
    result = _invoke("build-records", "--data-dir", str(tmp_path), "--profile", str(bad))
    assert result.exit_code == 2 and "imagesize" in result.output and "Traceback" not in result.output
    assert _invoke("build-records", "--no-such-flag").exit_code == 2
    assert _invoke("evaluate", "--predictions", str(tmp_path / "p.csv")).exit_code == 2  # needs --truth


def test_build_records_checks_files_before_reading_them(tmp_path, tiny_profile):
    """A FIFO, /dev/zero, an oversized and a HEIC file labelled like images: each one skipped row, no hang;
    WebP and GIF images become records."""
    import json
    import signal

    import numpy as np
    import pandas as pd
    from PIL import Image

    from kmel.data.synthetic_images import make_lesion_image

    data = tmp_path / "data"
    (data / "photos").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        image, _ = make_lesion_image(rng, size=48, malignant=i % 3 == 0, skin_tone=i % 5)
        name = f"img_{i:02d}" + (".webp" if i == 0 else ".gif" if i == 1 else ".jpg")
        Image.fromarray(image).save(data / "photos" / name)
        rows.append((Path(name).stem, "malignant" if i % 3 == 0 else "benign"))
    os.mkfifo(data / "photos" / "fifo.jpg")
    os.mkfifo(data / "pipe.csv")  # a table that would block pandas
    (data / "photos" / "zero.jpg").symlink_to("/dev/zero")
    (data / "photos" / "phone.heic").write_bytes(b"\0\0\0\x18ftypheic" + b"\0" * 40)
    (data / "photos" / "big.jpg").write_bytes((data / "photos" / "img_05.jpg").read_bytes() + b"\0" * (2 << 20))
    rows += [("fifo", "benign"), ("zero", "benign"), ("phone", "malignant"), ("big", "benign")]
    pd.DataFrame(rows, columns=["image_id", "label"]).to_csv(data / "labels.csv", index=False)

    def hung(*_):
        raise TimeoutError("build-records still running after 120 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        result = _build(data, tmp_path / "rec", tiny_profile, "--max-file-mb", "1")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert result.exit_code == 1, result.output
    manifest = json.loads((tmp_path / "rec" / "manifest.json").read_text())
    skipped = {s["image_id"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {"fifo", "zero", "phone", "big"}
    assert "FIFO" in skipped["fifo"] and "character device" in skipped["zero"]
    assert "HEIC image: format not supported" in skipped["phone"] and "over the 1 MiB limit" in skipped["big"]
    assert sum(manifest["n_records"]["img"].values()) == 12  # the WebP and the GIF included
    assert any("pipe.csv: is a FIFO" in f for f in manifest["cleaning"]["unrecognised_files"])


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory) -> Path:
    """Records of 12 synthetic images built through the CLI with --task and --workers, which must reach the run."""
    import json

    from kmel.data.synthetic import make_synthetic_dataset

    tmp = tmp_path_factory.mktemp("cli-records")
    make_synthetic_dataset(tmp / "data", n_images=12, seed=1, size=64)
    result = _invoke("build-records", "--data-dir", str(tmp / "data"), "--out", str(tmp / "rec"), "--task",
                     "melanoma", "--workers", "1", "--quiet")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp / "rec" / "manifest.json").read_text())
    assert manifest["task"] == "melanoma" and manifest["config"]["records"]["task"] == "melanoma"
    assert manifest["config"]["records"]["workers"] == 1
    assert "task: melanoma" in (tmp / "rec" / "config.yaml").read_text()
    return tmp / "rec"


@pytest.mark.parametrize("model,backbone", [("seg", "resnet34"), ("cls", "efficientnet_lite0")])
def test_every_train_flag_reaches_the_run(tiny_records, tmp_path, monkeypatch, model, backbone):
    """Each `train` flag ends up in what the training function is given (the config it writes beside its
    outputs, the strategy, the precision, the log folder, --restart); build-records' --task/--workers: above."""
    from kmel.training import train as train_module

    seen = {}

    def fake(records, out, config, logdir, strategy, precision, verbose, *rest):
        seen.update(records=records, out=out, config=config, logdir=logdir, strategy=strategy, precision=precision,
                    restart=rest[-1])
        return {"metrics": {}, "threshold": 0.5, "threshold_from": "val", "report_split": "test"}

    monkeypatch.setattr(train_module, "fit_segmenter" if model == "seg" else "fit_classifier", fake)
    result = _invoke("train", model, "--records", str(tiny_records), "--out", str(tmp_path / "m"), "--epochs", "3",
                     "--batch-size", "5", "--steps-per-epoch", "7", "--image-size", "96", "--backbone", backbone,
                     "--strategy", "mirrored", "--precision", "mixed_bfloat16", "--seed", "11", "--weights", "none",
                     "--weights-mirror", "http://127.0.0.1:9/weights", "--logdir", str(tmp_path / "logs"),
                     "--restart", "--quiet", *(["--ensemble", "3"] if model == "cls" else []))
    assert result.exit_code == 0, result.output
    section = seen["config"].segmenter if model == "seg" else seen["config"].classifier
    assert model == "seg" or section.ensemble == 3
    assert (section.epochs, section.batch_size, section.steps_per_epoch, section.image_size) == (3, 5, 7, 96)
    assert (section.backbone, section.seed, section.weights) == (backbone, 11, "none")
    assert section.weights_mirror == "http://127.0.0.1:9/weights"
    assert (seen["strategy"], seen["precision"], seen["restart"]) == ("mirrored", "mixed_bfloat16", True)
    assert seen["logdir"] == str(tmp_path / "logs") and seen["out"] == str(tmp_path / "m")
    assert seen["config"].records.task == "melanoma"  # the records' own settings, not the profile's


def test_a_training_that_fails_says_what_it_left(tiny_records, tmp_path, monkeypatch):
    from kmel.cli import cli
    from kmel.training import train as train_module

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory in epoch 3")

    monkeypatch.setattr(train_module, "fit_segmenter", boom)
    result = CliRunner().invoke(cli, ["train", "seg", "--records", str(tiny_records), "--out", str(tmp_path / "m")])
    assert isinstance(result.exception, RuntimeError)
    assert "training failed (RuntimeError)" in result.output and "is as it was" in result.output
    assert str(tmp_path / "m" / ".run-segmenter") in result.output and "--restart" in result.output
