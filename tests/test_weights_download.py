"""ImageNet weights downloads, for real, from an HTTP server on 127.0.0.1: fetched once, verified, cached.

Every test points ``KERAS_HOME`` at a temporary folder and the public download bases at a loopback
port where nothing listens, so nothing here can leave this machine even if the mirror setting broke.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from kmel.models.classifier import build_classifier
from kmel.models.segmenter import build_segmenter, load_encoder_weights
from kmel.models.weights import resolve as kw
from kmel.models.weights.download import (
    MIRROR_ENV,
    WeightsError,
    fetch_verified,
    mirror_base,
    source_url,
)
from tests import torch_fixtures
from tests.loopback import dead_url, legacy_h5, listing, offline_keras_cache
from tests.tiny import tiny_config


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    return offline_keras_cache(tmp_path, monkeypatch, EFFICIENTNET_BASE_URL="keras-applications/",
                               TORCHVISION_BASE_URL="models/")


BODY = np.random.default_rng(0).integers(0, 256, 2_500_000, dtype=np.uint8).tobytes()  # three 1 MiB reads
SHA = hashlib.sha256(BODY).hexdigest()


# --- fetch_verified ------------------------------------------------------------------------------------------
def test_fetched_once_verified_then_served_from_cache(weights_server, cache, monkeypatch):
    weights_server.serve("blob.bin", BODY)
    monkeypatch.setenv(MIRROR_ENV, weights_server.url)  # the environment variable alone is enough
    path = fetch_verified("https://public.invalid/some/dir/blob.bin", cache / "blob.bin", sha256=SHA,
                          progress=False)
    assert path == cache / "blob.bin" and path.read_bytes() == BODY
    assert weights_server.count("blob.bin") == 1 and weights_server.requests[0][1].startswith("kmel/")
    assert listing(cache) == ["blob.bin"]  # no temporary file left
    fetch_verified("https://public.invalid/some/dir/blob.bin", cache / "blob.bin", sha256=SHA, progress=False)
    assert len(weights_server.requests) == 1  # second call: no request at all


@pytest.mark.parametrize("check", [
    {"sha256": hashlib.sha256(b"another file").hexdigest()},
    {"sha256_prefix": "00000000" if not SHA.startswith("00000000") else "11111111"},
    {"md5": hashlib.md5(b"another file").hexdigest()},
])
def test_wrong_hash_is_refused_and_not_kept(weights_server, cache, check):
    weights_server.serve("blob.bin", BODY)
    with pytest.raises(WeightsError, match=r"(sha256|md5) is [0-9a-f]+.*not kept") as info:
        fetch_verified("http://x/blob.bin", cache / "blob.bin", mirror=weights_server.url, progress=False, **check)
    assert f"{weights_server.url}/blob.bin" in str(info.value)
    assert listing(cache) == []


def test_truncated_download_is_refused_and_not_kept(weights_server, cache):
    weights_server.serve("blob.bin", BODY, declared_length=len(BODY) + 5000)  # the connection closes 5000 bytes short
    with pytest.raises(WeightsError, match=f"truncated: received {len(BODY)} of {len(BODY) + 5000} bytes"):
        fetch_verified("http://x/blob.bin", cache / "blob.bin", sha256=SHA, mirror=weights_server.url, progress=False)
    assert listing(cache) == []


def test_damaged_cached_file_is_fetched_again(weights_server, cache):
    cache.mkdir(parents=True)
    (cache / "blob.bin").write_bytes(BODY[:1000])  # e.g. an interrupted copy by hand
    weights_server.serve("blob.bin", BODY)
    fetch_verified("http://x/blob.bin", cache / "blob.bin", sha256=SHA, mirror=weights_server.url, progress=False)
    assert (cache / "blob.bin").read_bytes() == BODY and weights_server.count("blob.bin") == 1
    assert listing(cache) == ["blob.bin"]


def test_http_error_names_status(weights_server, cache):
    with pytest.raises(WeightsError, match="HTTP 404"):
        fetch_verified("http://x/missing.bin", cache / "missing.bin", sha256=SHA, mirror=weights_server.url,
                       progress=False)
    assert listing(cache) == []


def test_mirror_setting(monkeypatch, tmp_path):
    assert mirror_base("") is None and source_url("https://a.b/c/f.h5") == "https://a.b/c/f.h5"
    monkeypatch.setenv(MIRROR_ENV, "http://127.0.0.1:9/env/")
    assert source_url("https://a.b/c/f.h5") == "http://127.0.0.1:9/env/f.h5"  # flat: only the name is kept
    assert source_url("https://a.b/c/f.h5", "http://127.0.0.1:9/cfg") == "http://127.0.0.1:9/cfg/f.h5"  # field wins
    assert mirror_base(str(tmp_path)) == tmp_path.resolve().as_uri()  # a folder path works too
    with pytest.raises(WeightsError, match="must be an http"):
        mirror_base("ftp://127.0.0.1/x")


def test_mirror_can_be_a_local_folder(cache, tmp_path):
    (tmp_path / "share").mkdir()
    (tmp_path / "share" / "blob.bin").write_bytes(BODY)
    fetch_verified("http://x/blob.bin", cache / "blob.bin", sha256=SHA, mirror=str(tmp_path / "share"),
                   progress=False)
    assert (cache / "blob.bin").read_bytes() == BODY


# --- classifier: Keras' efficientnetb0_notop.h5 ----------------------------------------------------------------
def _cls_config(**overrides):
    return tiny_config(**{"classifier.weights": "imagenet", "classifier.image_size": 32,
                          **{f"classifier.{k}": v for k, v in overrides.items()}}).classifier


def test_classifier_dead_server_gives_clear_error(cache):
    dead = dead_url()
    for mirror, tried in ((dead, f"{dead}/efficientnetb0_notop.h5"),
                          ("", kw.EFFICIENTNET_BASE_URL + "efficientnetb0_notop.h5")):  # no mirror: public URL
        with pytest.raises(WeightsError) as info:
            build_classifier(_cls_config(weights_mirror=mirror))
        message = str(info.value)
        assert "\n" not in message
        for part in ("efficientnetb0_notop.h5", str(cache), tried, "refused", "KMEL_WEIGHTS_MIRROR",
                     "--weights PATH", "--weights none"):
            assert part in message, (part, message)
    assert listing(cache) == []


def test_classifier_b0_downloads_verifies_caches_and_builds(weights_server, cache, tmp_path, monkeypatch):
    source = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(32, 32, 3))
    conv = source.get_layer("top_conv")
    conv.set_weights([np.random.default_rng(1).normal(size=w.shape).astype("float32") for w in conv.get_weights()])
    body = legacy_h5(source, tmp_path / "b0.h5")
    name = "efficientnetb0_notop.h5"

    # Keras' md5 for the real file does not match this one: refused, nothing kept.
    weights_server.serve(name, body)
    with pytest.raises(WeightsError, match="md5 is"):
        build_classifier(_cls_config(weights_mirror=weights_server.url))
    assert listing(cache) == []

    monkeypatch.setitem(kw.EFFICIENTNET_NOTOP_MD5, "b0", hashlib.md5(body).hexdigest())
    model = build_classifier(_cls_config(weights_mirror=weights_server.url))
    assert weights_server.count(name) == 2 and listing(cache) == [name]
    np.testing.assert_array_equal(model.get_layer("top_conv").get_weights()[0], conv.get_weights()[0])
    weights_server.close()  # second build: from the cache alone
    again = build_classifier(_cls_config(weights_mirror=weights_server.url))
    np.testing.assert_array_equal(again.get_layer("top_conv").get_weights()[0], conv.get_weights()[0])
    assert weights_server.count(name) == 2


# --- segmenter: torchvision's resnet18 checkpoint --------------------------------------------------------------
def _fake_resnet18(rng) -> dict[str, np.ndarray]:
    """Random arrays named and shaped as torchvision's resnet18 state dict (fc left out)."""
    sd: dict[str, np.ndarray] = {}

    def bn(prefix: str, c: int) -> None:
        sd[f"{prefix}.weight"] = rng.uniform(0.5, 1.5, c).astype("float32")
        sd[f"{prefix}.bias"] = rng.normal(size=c).astype("float32")
        sd[f"{prefix}.running_mean"] = rng.normal(size=c).astype("float32")
        sd[f"{prefix}.running_var"] = rng.uniform(0.5, 2, c).astype("float32")
        sd[f"{prefix}.num_batches_tracked"] = np.array(100, dtype=np.int64)

    def conv(key: str, shape: tuple[int, ...]) -> None:
        sd[key] = rng.standard_normal(shape, dtype=np.float32)

    conv("conv1.weight", (64, 3, 7, 7))
    bn("bn1", 64)
    c_in = 64
    for stage, c in enumerate((64, 128, 256, 512), start=1):
        for b in range(2):
            p = f"layer{stage}.{b}"
            conv(f"{p}.conv1.weight", (c, c_in if b == 0 else c, 3, 3))
            bn(f"{p}.bn1", c)
            conv(f"{p}.conv2.weight", (c, c, 3, 3))
            bn(f"{p}.bn2", c)
            if b == 0 and stage > 1:
                conv(f"{p}.downsample.0.weight", (c, c_in, 1, 1))
                bn(f"{p}.downsample.1", c)
        c_in = c
    return sd


def _assert_encoder_is(model: keras.Model, sd: dict[str, np.ndarray]) -> None:
    # torch conv weights are [out, in, kh, kw]; Keras kernels [kh, kw, in, out].
    np.testing.assert_array_equal(np.array(model.get_layer("encoder_stem_conv").kernel),
                                  sd["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(np.array(model.get_layer("encoder_stage3_block1_down_conv").kernel),
                                  sd["layer3.0.downsample.0.weight"].transpose(2, 3, 1, 0))
    bn = model.get_layer("encoder_stage4_block2_2_bn")
    np.testing.assert_array_equal(np.array(bn.moving_variance), sd["layer4.1.bn2.running_var"])
    np.testing.assert_array_equal(np.array(bn.gamma), sd["layer4.1.bn2.weight"])


def test_segmenter_resnet18_downloads_converts_and_caches_npz(weights_server, cache, tmp_path, monkeypatch):
    sd = _fake_resnet18(np.random.default_rng(2))
    body = torch_fixtures.write_checkpoint(tmp_path / "resnet18.pth", sd, fmt="zip").read_bytes()
    digest = hashlib.sha256(body).hexdigest()
    seg_config = tiny_config(**{"segmenter.weights": "imagenet", "segmenter.weights_mirror": weights_server.url}).segmenter
    model = build_segmenter(seg_config)

    # A file whose sha256 does not start with the hex in its name: refused, nothing kept.
    wrong = "resnet18-" + ("0" * 8 if not digest.startswith("0" * 8) else "1" * 8) + ".pth"
    monkeypatch.setitem(kw.TORCHVISION_RESNET, "18", wrong)
    weights_server.serve(wrong, body)
    with pytest.raises(WeightsError, match=f"{wrong}.*does not start with {wrong[9:17]}"):
        load_encoder_weights(model, "imagenet", mirror=seg_config.weights_mirror, progress=False)
    assert listing(cache) == []

    name = f"resnet18-{digest[:8]}.pth"  # torchvision's naming: the start of the file's sha256
    monkeypatch.setitem(kw.TORCHVISION_RESNET, "18", name)
    weights_server.serve(name, body)
    load_encoder_weights(model, "imagenet", mirror=seg_config.weights_mirror, progress=False)
    assert weights_server.count(name) == 1
    assert listing(cache) == ["kmel_resnet18_imagenet.npz"]  # .pth deleted after conversion, no temp files
    _assert_encoder_is(model, sd)

    weights_server.close()  # second run: the .npz alone, no network, no .pth
    fresh = build_segmenter(seg_config)
    load_encoder_weights(fresh, "imagenet", mirror=seg_config.weights_mirror)
    _assert_encoder_is(fresh, sd)
    assert weights_server.count(name) == 1


def test_segmenter_pth_copied_into_cache_is_used_offline(cache, tmp_path, monkeypatch):
    """Offline route: the torchvision file copied into the cache folder is converted without any request."""
    sd = _fake_resnet18(np.random.default_rng(3))
    cache.mkdir(parents=True)
    pth = torch_fixtures.write_checkpoint(tmp_path / "r18.pth", sd, fmt="legacy")
    name = f"resnet18-{hashlib.sha256(pth.read_bytes()).hexdigest()[:8]}.pth"
    pth.rename(cache / name)
    monkeypatch.setitem(kw.TORCHVISION_RESNET, "18", name)
    model = build_segmenter(tiny_config(**{"segmenter.weights": "imagenet"}).segmenter)
    load_encoder_weights(model, "imagenet", mirror=dead_url(), progress=False)  # the dead mirror is never asked
    _assert_encoder_is(model, sd)
    assert listing(cache) == ["kmel_resnet18_imagenet.npz"]


def test_cli_weights_mirror_reaches_config_and_errors_exit_2(monkeypatch):
    """``--weights-mirror`` sets both sections; a failed download is one ``error:`` line and exit code 2."""
    import kmel.data.records
    import kmel.training.train
    from cli import cli

    dead = dead_url()
    seen = {}

    def fake_fit_segmenter(records, out, config, *args, **kwargs):
        seen["mirrors"] = (config.segmenter.weights_mirror, config.classifier.weights_mirror)
        kw.imagenet_resnet_npz("18", mirror=config.segmenter.weights_mirror, progress=False)

    monkeypatch.setattr(kmel.data.records, "load_manifest", lambda _: {"config": {"records": {}}})
    monkeypatch.setattr(kmel.training.train, "fit_segmenter", fake_fit_segmenter)
    result = CliRunner().invoke(cli, ["train", "seg", "--weights", "imagenet", "--weights-mirror", dead])
    assert seen["mirrors"] == (dead, dead)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    assert f"{dead}/resnet18-f37072fd.pth" in lines[0] and "kmel_resnet18_imagenet.npz" in lines[0]
