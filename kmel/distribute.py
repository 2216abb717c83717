"""Strategy and precision choice: one place that knows about devices.

``auto`` strategy: MultiWorkerMirroredStrategy when ``TF_CONFIG`` is set, MirroredStrategy over all
GPUs when there are several, the default strategy otherwise. ``auto`` precision: mixed_float16 on
GPUs, float32 on CPUs (on the CPU mixed_float16 is slower and was seen to give NaNs under
MirroredStrategy).
"""

from __future__ import annotations

import json
import os

import keras
import tensorflow as tf

from kmel.config import ConfigError

STRATEGIES = ("auto", "default", "mirrored", "multiworker")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")


def split_cpu(n: int = 2) -> None:
    """Expose ``n`` logical CPU devices (for testing MirroredStrategy without GPUs).

    Must run before TensorFlow initialises its devices; a no-op if already split that way.
    """
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError:
        if len(tf.config.list_logical_devices("CPU")) < n:
            raise


def gpu_count() -> int:
    return len(tf.config.list_logical_devices("GPU"))


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """Build the distribution strategy named on the command line."""
    if name not in STRATEGIES:
        raise ConfigError(f"--strategy must be one of {STRATEGIES}, got {name!r}")
    if name == "auto":
        if os.environ.get("TF_CONFIG"):
            name = "multiworker"
        elif gpu_count() > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "multiworker":
        if not os.environ.get("TF_CONFIG"):
            raise ConfigError(
                "--strategy multiworker needs TF_CONFIG (cluster and task of this worker); see README 'Multi-node'"
            )
        try:
            json.loads(os.environ["TF_CONFIG"])
        except json.JSONDecodeError as exc:
            raise ConfigError(f"TF_CONFIG is not valid JSON: {exc}") from None
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices=devices)


def resolve_precision(name: str = "auto") -> str:
    if name not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {PRECISIONS}, got {name!r}")
    if name == "auto":
        return "mixed_float16" if gpu_count() > 0 else "float32"
    return name


def set_precision(name: str = "auto") -> str:
    """Set the global Keras dtype policy; returns the policy name in force."""
    policy = resolve_precision(name)
    keras.mixed_precision.set_global_policy(policy)
    return policy


def jit_compile_setting() -> bool | str:
    """XLA where it pays (GPUs); off on CPUs, where compiling EfficientNet costs more than it saves."""
    return "auto" if gpu_count() > 0 else False
