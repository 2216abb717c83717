"""The one feature spec: written then read back equal, from Python and from the graph."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from kmel import constants as C
from kmel.data.tfrecord import (
    make_example,
    parse_example,
    parse_example_numpy,
    read_records,
    write_shard,
)


def test_example_round_trip_python_and_graph(tmp_path):
    values = {C.F_IMAGE: b"\xff\xd8jpeg", C.F_MASK: b"png", C.F_IMAGE_ID: "ISIC_0000001", C.F_SOURCE: "isic2020",
              C.F_TARGET: 1, C.F_SKIN_TONE: 3, C.F_ITA: 12.5, C.F_ITA_CATEGORY: 3, C.F_HEIGHT: 450, C.F_WIDTH: 600,
              C.F_CROP_MODE: 0, C.F_BOX: (1, 2, 300, 400), C.F_PATIENT: "IP_1", C.F_DIAGNOSIS: "MEL"}
    entry = write_shard(tmp_path / "x.tfrecord", [make_example(**values), make_example(**{C.F_IMAGE_ID: "b"})])
    assert entry["records"] == 2 and len(entry["sha256"]) == 64
    assert not list(tmp_path.glob("*.tmp"))
    first, second = list(read_records([tmp_path / "x.tfrecord"]))
    assert first == values
    assert second[C.F_TARGET] == -1 and second[C.F_BOX] == (0, 0, 0, 0) and second[C.F_MASK] == b""
    parsed = next(iter(tf.data.TFRecordDataset(str(tmp_path / "x.tfrecord")).map(parse_example)))
    assert parsed[C.F_IMAGE_ID].numpy() == b"ISIC_0000001"
    np.testing.assert_array_equal(parsed[C.F_BOX].numpy(), [1, 2, 300, 400])
    assert parsed[C.F_ITA].numpy() == pytest.approx(12.5)


def test_unknown_field_is_an_error():
    with pytest.raises(KeyError, match="unknown record fields"):
        make_example(labels=1)


def test_parse_numpy_defaults_for_missing_keys():
    raw = tf.train.Example().SerializeToString()
    out = parse_example_numpy(raw)
    assert out[C.F_TARGET] == -1 and out[C.F_IMAGE_ID] == ""


def test_serialisation_is_byte_identical_across_processes():
    """Proto maps serialise in hash order unless asked not to; shard checksums depend on this."""
    import subprocess
    import sys

    code = (
        "from kmel.data.tfrecord import make_example;import hashlib;"
        "print(hashlib.sha256(make_example(image=b'x', image_id='ISIC_1', target=1, ita=12.5)).hexdigest())"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**__import__("os").environ, "PYTHONHASHSEED": str(seed)}).stdout.strip()
        for seed in (1, 2)  # two processes, two hash seeds: each one more costs a TensorFlow start (~20 s)
    }
    assert len(outs) == 1
