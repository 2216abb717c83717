"""kmel: fair melanoma detection in dermoscopic images with Keras 3 / TensorFlow.

Sub-packages by stage, dependencies pointing down: ``training`` → ``evaluation`` → ``serving`` →
``lesion`` → ``data``, ``models`` → ``config`` / ``constants``. Each package's ``__init__`` names its
public API; the names are imported on first use, so ``kmel --help`` and a metadata read do not start
TensorFlow.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any, Callable, Mapping

__version__ = "0.1.0"

from kmel.config import Config, ConfigError, load_config, save_config  # noqa: E402

__all__ = ["Config", "ConfigError", "__version__", "load_config", "save_config"]


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for a package whose public names (``name -> module``) load on first use."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
