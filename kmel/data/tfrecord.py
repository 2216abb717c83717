"""The one TFRecord feature spec: written by build-records and the crops stage, read by ``kmel.data.datasets``.

Every record (img-, seg- and crop-) carries every key; a field a kind does not use keeps its
default, so one parser serves all three and a reader can never disagree with the writer.
Shards are written to a temporary name and renamed when complete (see :func:`write_shard`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import tensorflow as tf

from kmel import constants as C

# name -> (kind, default). kind: "bytes" | "int" | "float" | "int4" (fixed length 4).
FIELDS: dict[str, tuple[str, Any]] = {
    C.F_IMAGE: ("bytes", b""),
    C.F_MASK: ("bytes", b""),
    C.F_IMAGE_ID: ("bytes", b""),
    C.F_SOURCE: ("bytes", b""),
    C.F_DIAGNOSIS: ("bytes", b""),
    C.F_PATIENT: ("bytes", b""),
    C.F_TARGET: ("int", -1),
    C.F_SKIN_TONE: ("int", -1),
    C.F_ITA: ("float", 0.0),
    C.F_ITA_CATEGORY: ("int", -1),
    C.F_HEIGHT: ("int", 0),
    C.F_WIDTH: ("int", 0),
    C.F_CROP_MODE: ("int", -1),
    C.F_BOX: ("int4", (0, 0, 0, 0)),
}


def _feature_spec() -> dict[str, tf.io.FixedLenFeature]:
    spec = {}
    for name, (kind, default) in FIELDS.items():
        if kind == "bytes":
            spec[name] = tf.io.FixedLenFeature([], tf.string, default_value=default)
        elif kind == "int":
            spec[name] = tf.io.FixedLenFeature([], tf.int64, default_value=default)
        elif kind == "float":
            spec[name] = tf.io.FixedLenFeature([], tf.float32, default_value=default)
        else:
            spec[name] = tf.io.FixedLenFeature([4], tf.int64, default_value=list(default))
    return spec


FEATURE_SPEC = _feature_spec()


def make_example(**values: Any) -> bytes:
    """Serialise one record; unknown keys are an error, missing keys take their default."""
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise KeyError(f"unknown record fields {sorted(unknown)}; known: {sorted(FIELDS)}")
    feature = {}
    for name, (kind, default) in FIELDS.items():
        value = values.get(name, default)
        if kind == "bytes":
            if isinstance(value, str):
                value = value.encode("utf-8")
            feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[bytes(value)]))
        elif kind == "int":
            feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))
        elif kind == "float":
            feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(value)]))
        else:
            feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in value]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """Graph-safe parse of one serialised record (images stay encoded)."""
    return tf.io.parse_single_example(serialized, FEATURE_SPEC)


def parse_example_numpy(serialized: bytes) -> dict[str, Any]:
    """Python-side parse (crops stage, tests): bytes stay bytes, numbers become Python scalars."""
    example = tf.train.Example.FromString(serialized)
    out: dict[str, Any] = {}
    for name, (kind, default) in FIELDS.items():
        feat = example.features.feature.get(name)
        if feat is None:
            out[name] = default
        elif kind == "bytes":
            out[name] = feat.bytes_list.value[0] if feat.bytes_list.value else default
        elif kind == "int":
            out[name] = int(feat.int64_list.value[0]) if feat.int64_list.value else default
        elif kind == "float":
            out[name] = float(feat.float_list.value[0]) if feat.float_list.value else default
        else:
            out[name] = tuple(int(v) for v in feat.int64_list.value) or default
    for key in (C.F_IMAGE_ID, C.F_SOURCE, C.F_DIAGNOSIS, C.F_PATIENT):
        out[key] = out[key].decode("utf-8")
    return out


def shard_name(prefix: str, split: str, index: int, count: int) -> str:
    return f"{prefix}-{split}-{index:05d}-of-{count:05d}.tfrecord"


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(path: str | Path, records: Iterable[bytes]) -> dict[str, Any]:
    """Write serialised records to ``path`` atomically; return ``{"file", "records", "sha256"}``.

    The data go to ``path + ".tmp"`` first and are renamed only when complete and flushed, so a
    killed run leaves either a whole shard or none under the final name.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tf.io.TFRecordWriter(str(tmp)) as writer:
        for record in records:
            writer.write(record)
            n += 1
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return {"file": path.name, "records": n, "sha256": file_sha256(path)}


def read_records(paths: Iterable[str | Path]) -> Iterable[dict[str, Any]]:
    """Iterate parsed records (Python side) over shard files in order."""
    for path in paths:
        for raw in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
            yield parse_example_numpy(raw)


def summarise_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    """A record's metadata without the encoded pixels (for logs and tests)."""
    return {k: v for k, v in values.items() if k not in (C.F_IMAGE, C.F_MASK)}
