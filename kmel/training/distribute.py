"""Strategy and precision choice: one place that knows about devices.

``auto`` strategy: MultiWorkerMirroredStrategy when ``TF_CONFIG`` is set, MirroredStrategy over all
GPUs when there are several, the default strategy otherwise. ``auto`` precision: mixed_float16 on
GPUs, float32 on CPUs (on the CPU mixed_float16 is slower and was seen to give NaNs under
MirroredStrategy).
"""

from __future__ import annotations

import json
import os
from typing import Any

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


def read_tf_config() -> dict[str, Any] | None:
    """The parsed ``TF_CONFIG`` (cluster and task of this worker), or None when it is not set."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None
    try:
        conf = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"TF_CONFIG is not valid JSON: {exc}") from None
    if not isinstance(conf, dict):
        raise ConfigError(f"TF_CONFIG must be a JSON object with 'cluster' and 'task', got {raw[:80]!r}")
    return conf


def multiworker_requested(name: str) -> bool:
    """Whether ``--strategy name`` means MultiWorkerMirroredStrategy (``auto`` does when TF_CONFIG is set)."""
    return name == "multiworker" or (name == "auto" and read_tf_config() is not None)


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """Build the distribution strategy named on the command line."""
    if name not in STRATEGIES:
        raise ConfigError(f"--strategy must be one of {STRATEGIES}, got {name!r}")
    if name == "auto":
        if read_tf_config() is not None:
            name = "multiworker"
        elif gpu_count() > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "multiworker":
        if read_tf_config() is None:
            raise ConfigError(
                "--strategy multiworker needs TF_CONFIG (cluster and task of this worker); see docs/training.md, 'Multi-node training'"
            )
        patch_keras_for_multiworker()
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


def worker_index() -> tuple[bool, int]:
    """(is this process the chief, its task index) from ``TF_CONFIG``; (True, 0) without it.

    The chief is the ``chief`` task, or worker 0 when the cluster names no chief (TensorFlow's rule).
    """
    conf = read_tf_config()
    if conf is None:
        return True, 0
    task = conf.get("task", {})
    kind, index = task.get("type", "worker"), int(task.get("index", 0))
    has_chief = bool(conf.get("cluster", {}).get("chief"))
    return (kind == "chief") or (kind == "worker" and index == 0 and not has_chief), index


_PATCHED = False


def patch_keras_for_multiworker() -> None:
    """Work around two Keras 3 defects that stop ``fit`` under MultiWorkerMirroredStrategy.

    Keras' TensorFlow trainer (3.15; keras-team/keras#20585) (1) averages the first distributed
    *data* batch across workers just to learn its shapes, which collective ops cannot do in eager
    mode, and (2) reduces per-replica scalar logs with ``axis=0``, which fails for rank-0 values.
    kmel replaces the first with "take this worker's own first replica batch" and reduces scalars
    with ``axis=None``; both keep Keras' results. Applied once, only when a multi-worker strategy
    is built; tests/test_multiworker.py checks that two workers end with identical weights.
    """
    global _PATCHED
    if _PATCHED:
        return
    from keras.src.backend.tensorflow import trainer as tf_trainer

    original_reduce = tf_trainer.reduce_per_replica
    original_build = tf_trainer.TensorFlowTrainer._maybe_symbolic_build

    def reduce_per_replica(values, strategy, reduction):
        if tf_trainer._collective_all_reduce_multi_worker(strategy) and reduction in ("auto", "mean"):
            def one(v):
                if not isinstance(v, tf.distribute.DistributedValues):
                    return v
                rank = v.values[0].shape.rank
                return strategy.reduce("MEAN", v, axis=0 if rank else None)

            return tf.nest.map_structure(one, values)
        return original_reduce(values, strategy, reduction)

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        if self._distribute_strategy is None or not tf_trainer._collective_all_reduce_multi_worker(
                self._distribute_strategy):
            return original_build(self, iterator=iterator, data_batch=data_batch)
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = tf.nest.map_structure(
                    lambda v: self.distribute_strategy.experimental_local_results(v)[0]
                    if isinstance(v, tf.distribute.DistributedValues) else v,
                    next(it),
                )
                break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    tf_trainer.reduce_per_replica = reduce_per_replica
    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    _PATCHED = True


def shard_for_workers(dataset: tf.data.Dataset, strat: tf.distribute.Strategy, n_files: int) -> tf.data.Dataset:
    """Multi-worker input: each worker reads its own record files when there are enough of them
    (auto-sharding by FILE), else every worker reads all files and keeps its share of records (DATA)."""
    if not isinstance(strat, tf.distribute.MultiWorkerMirroredStrategy):
        return dataset
    cluster = (read_tf_config() or {}).get("cluster", {})
    workers = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
    options = tf.data.Options()
    policy = tf.data.experimental.AutoShardPolicy
    options.experimental_distribute.auto_shard_policy = policy.FILE if n_files >= max(workers, 1) else policy.DATA
    return dataset.with_options(options)
