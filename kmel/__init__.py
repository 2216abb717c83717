"""kmel: fair melanoma detection in dermoscopic images with Keras 3 / TensorFlow."""

__version__ = "0.1.0"

from kmel.config import Config, ConfigError, load_config, save_config

__all__ = ["Config", "ConfigError", "__version__", "load_config", "save_config"]
