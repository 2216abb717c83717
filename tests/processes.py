"""Killing a real training process mid-run (SIGKILL) once it has finished some epochs."""

from __future__ import annotations

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
