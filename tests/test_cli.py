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
    assert (REPO / "kmel" / "__main__.py").is_file()


@pytest.mark.slow
def test_wheel_installs_the_kmel_command(tmp_path):
    """`python -m build` → wheel → scratch venv: the wheel's kmel (not the clone's) runs as `kmel`.

    The venv sees the system site-packages so TensorFlow is not downloaded again; kmel.__file__
    proves the import comes from the venv. `kmel demo --quick` from such a venv was run by hand
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
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    py, kmel_cmd = venv / "bin" / "python", venv / "bin" / "kmel"
    # --ignore-installed: the clone's editable kmel is visible through the system site-packages.
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--ignore-installed",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = dict(cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # cwd: not the clone
    where = subprocess.run([str(py), "-c", "import kmel; print(kmel.__file__)"], **run)
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr
    version = subprocess.run([str(kmel_cmd), "--version"], **run)
    assert version.returncode == 0 and version.stdout.startswith("kmel "), version.stderr
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
