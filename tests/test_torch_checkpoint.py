"""The PyTorch-free checkpoint reader: both formats, views, and hostile files refused."""

from __future__ import annotations

import collections
import zipfile

import numpy as np
import pytest

from kmel.models.weights.torch_checkpoint import CheckpointError, load_torch_state_dict
from tests import torch_fixtures as tf_

ARRAYS = {
    "conv.weight": np.arange(2 * 3 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 3) / 7,
    "bn.running_var": np.array([0.5, 2.0], dtype=np.float32),
    "bn.num_batches_tracked": np.array(12, dtype=np.int64),
    "half": np.array([[1.5, -2.25]], dtype=np.float16),
    "mask": np.array([True, False, True]),
}


@pytest.mark.parametrize("fmt", ["legacy", "zip"])
def test_state_dict_round_trip(tmp_path, fmt):
    path = tf_.write_checkpoint(tmp_path / f"sd.{fmt}.pth", ARRAYS, fmt)
    assert zipfile.is_zipfile(path) == (fmt == "zip")
    loaded = load_torch_state_dict(path)
    assert list(loaded) == list(ARRAYS)
    for name, array in ARRAYS.items():
        assert (loaded[name].dtype, loaded[name].shape) == (array.dtype, array.shape), name
        np.testing.assert_array_equal(loaded[name], array, err_msg=name)


@pytest.mark.parametrize("fmt", ["legacy", "zip"])
def test_views_offsets_and_shared_storage(tmp_path, fmt):
    """Tensors are views: two of them share one storage at different offsets, one is transposed."""
    base = np.arange(20, dtype=np.float32)
    storage = tf_.Storage("0", base)
    state = collections.OrderedDict(
        a=tf_.Tensor(storage, 0, (2, 3), (3, 1)),
        b=tf_.Tensor(storage, 6, (3, 2), (1, 3)),  # a transposed 2x3 block starting at element 6
        c=tf_.Tensor(storage, 19, (), ()),  # a scalar at the end
    )
    writer = tf_.write_legacy if fmt == "legacy" else tf_.write_zip
    loaded = load_torch_state_dict(writer(tmp_path / "views.pth", state, [storage]))
    np.testing.assert_array_equal(loaded["a"], base[:6].reshape(2, 3))
    np.testing.assert_array_equal(loaded["b"], base[6:12].reshape(2, 3).T)
    assert loaded["c"].shape == () and float(loaded["c"]) == 19.0
    loaded["a"][0, 0] = -1  # copies, not views of each other
    assert loaded["b"][0, 0] == 6


def test_wrapped_state_dict_is_unwrapped(tmp_path):
    state, storages = tf_.as_tensors({"w": np.ones((2, 2), np.float32)})
    path = tf_.write_legacy(tmp_path / "wrapped.pth", {"state_dict": state, "epoch": 3}, storages)
    assert list(load_torch_state_dict(path)) == ["w"]


@pytest.mark.parametrize("fmt", ["legacy", "zip"])
def test_hostile_pickle_is_refused_before_it_runs(tmp_path, fmt):
    marker = tmp_path / "pwned"
    state, storages = tf_.as_tensors({"w": np.ones(3, np.float32)})
    state["payload"] = tf_.Call(tf_.Global("os", "system"), f"touch {marker}")
    writer = tf_.write_legacy if fmt == "legacy" else tf_.write_zip
    path = writer(tmp_path / "evil.pth", state, storages)
    with pytest.raises(CheckpointError, match=r"refuses to load os\.system"):
        load_torch_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("module, name", [("builtins", "eval"), ("torch.nn.modules.conv", "Conv2d"),
                                          ("numpy.core.multiarray", "_reconstruct"), ("subprocess", "Popen")])
def test_only_allow_listed_globals(tmp_path, module, name):
    path = tf_.write_legacy(tmp_path / "x.pth", {"x": tf_.Call(tf_.Global(module, name), "1")}, [])
    with pytest.raises(CheckpointError, match=f"refuses to load {module}.{name}"):
        load_torch_state_dict(path)


def test_truncated_and_garbage_files(tmp_path):
    good = tf_.write_checkpoint(tmp_path / "good.pth", ARRAYS, "legacy").read_bytes()
    (tmp_path / "cut.pth").write_bytes(good[:-5])
    with pytest.raises(CheckpointError, match="truncated"):
        load_torch_state_dict(tmp_path / "cut.pth")
    (tmp_path / "text.pth").write_text("<html>404 not found</html>")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_torch_state_dict(tmp_path / "text.pth")
    (tmp_path / "plain.pth").write_bytes(b"\x80\x02K\x05.")  # a pickle of the number 5
    with pytest.raises(CheckpointError, match="wrong magic number"):
        load_torch_state_dict(tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="no such file"):
        load_torch_state_dict(tmp_path / "missing.pth")


def test_tensor_past_its_storage_is_refused(tmp_path):
    storage = tf_.Storage("0", np.zeros(4, np.float32))
    state = {"w": tf_.Tensor(storage, 2, (3,), (1,))}
    with pytest.raises(CheckpointError, match="reaches past its storage"):
        load_torch_state_dict(tf_.write_legacy(tmp_path / "bad.pth", state, [storage]))


def test_zip_missing_storage_member(tmp_path):
    path = tf_.write_checkpoint(tmp_path / "z.pth", {"w": np.ones(3, np.float32)}, "zip")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp_path / "broken.pth", "w") as dst:
        for item in src.namelist():
            if "/data/" not in item:
                dst.writestr(item, src.read(item))
    with pytest.raises(CheckpointError, match="missing from the archive"):
        load_torch_state_dict(tmp_path / "broken.pth")
