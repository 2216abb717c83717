"""What is checked before an exported model runs: that its files are the ones ``pipeline.json`` names
(SavedModel fingerprints, TFLite SHA-256s), that its parts come from one training, that the folder's
format is one this kmel reads, and that each SavedModel graph uses only the operations kmel's own
exports use.

A SavedModel is a program: its graph can hold file, network or process operations that run when it is
called. kmel's segmenters and classifiers use a known set of operations (:data:`ALLOWED_OPS`, gathered by
exporting every backbone in float32, float16 and bfloat16 with its Grad-CAM endpoint); a graph with any
other operation is refused before it is loaded, naming the operations, unless the user says they trust
the model (``--trust-model``). The graph is read as a protocol buffer, which runs nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmel import constants as C
from kmel.config import ConfigError

# pipeline.json's layout version: written by every export, refused when newer than this kmel reads.
FORMAT_VERSION = 1


class ModelIntegrityError(ConfigError):
    """An exported model that is damaged, mixed, newer than this kmel or not kmel's: exit 2, naming the file."""


@dataclass(frozen=True)
class ModelChecks:
    """``verify``: compare fingerprints / SHA-256s with pipeline.json and refuse mixed folders (``--no-verify``
    turns it off). ``trust_model``: skip the graph allow-list (``--trust-model``)."""

    verify: bool = True
    trust_model: bool = False


DEFAULT_CHECKS = ModelChecks()

# Every operation type in the graphs (functions included) of kmel's exports, outside the checkpoint
# save / restore functions: EfficientNet and EfficientNet-Lite classifiers (one output, or a softmax over the
# diagnosis classes with its gradcam_class endpoint: OneHot, Softmax) with the gradcam endpoint, ResNet18–152
# classifiers (no operation of their own; tests/test_resnet_classifier.py checks), ResNet18/34 and Lite
# U-Nets, each in float32, mixed_float16 and mixed_bfloat16 (tests/test_integrity.py exports them again and
# fails on an operation missing here).
ALLOWED_OPS = frozenset({
    "AddN", "AddV2", "AssignVariableOp", "BiasAdd", "BiasAddGrad", "BroadcastGradientArgs", "BroadcastTo", "Cast",
    "ConcatV2", "Const", "Conv2D", "Conv2DBackpropFilter", "Conv2DBackpropInput", "DepthwiseConv2dNative",
    "DepthwiseConv2dNativeBackpropFilter", "DepthwiseConv2dNativeBackpropInput", "DisableCopyOnRead",
    "DynamicStitch", "Fill", "FloorMod", "GatherV2", "Identity", "IdentityN", "MatMul", "Max", "MaxPool", "Maximum",
    "Mean", "Minimum", "Mul", "Neg", "NoOp", "Pack", "Pad", "Placeholder", "Prod", "Range", "ReadVariableOp",
    "RealDiv", "Relu", "Relu6", "Relu6Grad", "Reshape", "ResizeBilinear", "Rsqrt", "Select", "Shape", "ShapeN",
    "Sigmoid", "SigmoidGrad", "Slice", "Sqrt", "Square", "Squeeze", "StatefulPartitionedCall", "StridedSlice", "Sub",
    "Sum", "Tile", "VarHandleOp", "VarIsInitializedOp", "ZerosLike", "OneHot", "Softmax",
})
# Pure tensor operations (no state, no I/O) that other TensorFlow / Keras versions, hand-made test models
# or a user's own exports may use for the same layers: allowed as well.
ALLOWED_OPS |= frozenset({
    "Abs", "ArgMax", "ArgMin", "BatchMatMulV2", "ClipByValue", "Elu", "Equal", "Exp", "ExpandDims", "Floor",
    "FloorDiv", "Gelu", "Greater", "GreaterEqual", "LeakyRelu", "Less", "LessEqual", "Log", "Log1p", "LogicalAnd",
    "LogicalNot", "LogicalOr", "Min", "NotEqual", "OnesLike", "PartitionedCall", "Reciprocal", "ResizeNearestNeighbor",
    "Round", "Selu", "SelectV2", "Sign", "Softmax", "Softplus", "Split", "SplitV", "SquaredDifference", "Tanh",
    "Transpose", "Unpack", "Where",
    # the antialiased resize (train joint's segmenter input: kmel/models/joint.py)
    "ScaleAndTranslate", "ScaleAndTranslateGrad",
    # their gradients (Grad-CAM endpoints differentiate through the layers) and pooling / normalisation
    "AvgPool", "AvgPoolGrad", "EluGrad", "FusedBatchNormV3", "FusedBatchNormGradV3", "LeakyReluGrad", "MaxPoolGrad",
    "ReluGrad", "ResizeBilinearGrad", "ResizeNearestNeighborGrad", "RsqrtGrad", "SeluGrad", "SoftplusGrad",
    "SqrtGrad", "TanhGrad",
})
# The checkpoint operations: allowed only in the functions the SavedModel's saver calls (and nothing else calls).
SAVER_OPS = frozenset({"MergeV2Checkpoints", "RestoreV2", "SaveV2", "ShardedFilename", "StaticRegexFullMatch",
                       "StringJoin"})


def _load_graph(path: Path) -> Any:
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    graph = path / "saved_model.pb"
    if not graph.is_file():
        raise FileNotFoundError(f"{path} is not an exported kmel model (no saved_model.pb): train it with `kmel train`")
    saved = saved_model_pb2.SavedModel()
    try:
        saved.ParseFromString(graph.read_bytes())
    except DecodeError:
        raise ModelIntegrityError(f"{graph} is damaged (not a SavedModel graph): export the model again "
                                  "or copy the models folder again") from None
    return saved


def _called(nodes: Any, functions: set[str]) -> set[str]:
    """The library functions ``nodes`` call: as their operation, or through a function-valued attribute."""
    called = set()
    for node in nodes:
        if node.op in functions:
            called.add(node.op)
        for value in node.attr.values():
            if value.func.name:
                called.add(value.func.name)
            called.update(fn.name for fn in value.list.func)
    return called


def _closure(roots: set[str], calls: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name not in calls:
            continue
        seen.add(name)
        todo.extend(calls[name])
    return seen


def graph_ops(path: str | Path) -> tuple[set[str], set[str]]:
    """The operation types of a SavedModel's graphs, as (everywhere but the saver, the saver's own).

    The saver's functions are those reached only from the nodes ``saver_def`` names (checkpoint save /
    restore); a function any other node or function calls counts as everywhere, so a serving function
    cannot borrow the saver's file writes. Calls of the model's own functions are not operations.
    """
    saved = _load_graph(Path(path))
    general: set[str] = set()
    saver: set[str] = set()
    for meta in saved.meta_graphs:
        library = {fn.signature.name: fn for fn in meta.graph_def.library.function}
        names = set(library)
        calls = {name: _called(fn.node_def, names) for name, fn in library.items()}
        saver_nodes = {meta.saver_def.save_tensor_name.split(":")[0], meta.saver_def.restore_op_name.split(":")[0]}
        top = [node for node in meta.graph_def.node if node.name not in saver_nodes]
        saver_only = _closure(_called([n for n in meta.graph_def.node if n.name in saver_nodes], names), calls)
        strict = _closure(_called(top, names) | (names - saver_only), calls)
        general.update(node.op for node in meta.graph_def.node)
        for name, fn in library.items():
            (general if name in strict else saver).update(node.op for node in fn.node_def)
        general -= names
        saver -= names
    return general, saver


def check_graph(path: str | Path, checks: ModelChecks = DEFAULT_CHECKS) -> None:
    """Refuse a SavedModel whose graph uses operations kmel's exports never use (unless trusted)."""
    if checks.trust_model:
        return
    general, saver = graph_ops(path)
    foreign = sorted((general - ALLOWED_OPS) | (saver - ALLOWED_OPS - SAVER_OPS))
    if foreign:
        raise ModelIntegrityError(
            f"{path} uses operations kmel's own models never use ({', '.join(foreign)}): it may read or write "
            "files, reach the network or run programs when called. Refused; if you know where the model comes "
            "from and trust it, pass --trust-model")


def saved_model_fingerprint(path: str | Path) -> str:
    """Hash of a SavedModel's variables: names the weights, not the export time."""
    digest = hashlib.sha256()
    var_dir = Path(path) / "variables"
    for file in sorted(var_dir.glob("*")):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def check_fingerprint(path: str | Path, expected: str | None, checks: ModelChecks = DEFAULT_CHECKS) -> None:
    """Refuse a SavedModel whose variables are not the ones pipeline.json recorded (``expected``)."""
    if not checks.verify or not expected:
        return
    actual = saved_model_fingerprint(path)
    if actual != expected:
        raise ModelIntegrityError(
            f"{path} is not the model {Path(path).parent / C.PIPELINE_JSON} describes (its weights' fingerprint "
            f"is {actual}, pipeline.json records {expected}): it was damaged, or copied in from another training. "
            "Copy the whole models folder again or retrain; --no-verify skips this check")


def check_file_sha256(path: str | Path, expected: str | None, checks: ModelChecks = DEFAULT_CHECKS) -> None:
    """Refuse a file (a TFLite model) whose SHA-256 is not the one pipeline.json recorded."""
    if not checks.verify or not expected:
        return
    actual = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if actual != expected:
        raise ModelIntegrityError(
            f"{path} has SHA-256 {actual[:16]}…, pipeline.json records {expected[:16]}…: the file was damaged or "
            "replaced. Export it again (`kmel export --format tflite`); --no-verify skips this check")


def segmenter_of_classifier(classifier: dict[str, Any]) -> str | None:
    """The fingerprint of the segmenter whose crops the classifier learned from (recorded, or in its crops folder name)."""
    if classifier.get("segmenter_fingerprint"):
        return str(classifier["segmenter_fingerprint"])
    crops = str(classifier.get("crops_dir", ""))
    return crops[len("crops-"):] if crops.startswith("crops-") else None


def check_pipeline(models_dir: str | Path, pipeline: dict[str, Any], checks: ModelChecks = DEFAULT_CHECKS) -> None:
    """Refuse a pipeline.json newer than this kmel, and (``verify``) one whose classifier learned from
    another segmenter's crops than the segmenter beside it."""
    path = Path(models_dir) / C.PIPELINE_JSON
    version = pipeline.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelIntegrityError(f"{path} has format_version {version!r}; this kmel reads up to {FORMAT_VERSION}: "
                                  "upgrade kmel (pip install -U kmel) to use these models")
    if not checks.verify or "classifier" not in pipeline or "segmenter" not in pipeline:
        return
    made_with, segmenter = segmenter_of_classifier(pipeline["classifier"]), pipeline["segmenter"].get("fingerprint")
    if made_with and segmenter and made_with != segmenter:
        raise ModelIntegrityError(
            f"{path}: the classifier learned from crops of segmenter {made_with}, but the segmenter here is "
            f"{segmenter} (retrained, or copied in from another training): its crops are not the ones the classifier "
            "knows. Retrain the classifier (`kmel train cls`) or restore the segmenter; --no-verify skips this check")
