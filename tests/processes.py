"""Killing a real training process mid-run (SIGKILL) once it has finished some epochs."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path


def kill_after_epochs(cmd: list[str], history: Path, epochs: int, cwd: Path, env: dict[str, str],
                      timeout: float = 600) -> None:
    """Start ``cmd``; SIGKILL it as soon as its CSV ``history`` lists ``epochs`` finished epochs.

    Fails the test if the process ends (or the time runs out) before it could be killed.
    """
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if history.exists() and history.read_text().count("\n") >= epochs + 1:  # header + epochs
            break
        time.sleep(0.05)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert alive, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]


def kill_then_rerun(cmd: list[str], history: Path, epochs: int, backup: Path, cwd: Path, env: dict[str, str]) -> dict:
    """SIGKILL a tests/scripts/train_tiny.py run after ``epochs`` finished epochs, check that it left
    its ``backup``, and run the same command again to the end; the rerun's RESULT line as a dict."""
    kill_after_epochs(cmd, history, epochs, cwd, env)
    assert backup.exists(), "a killed run leaves its backup"
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    return json.loads(rerun.stdout.split("RESULT ", 1)[1])
