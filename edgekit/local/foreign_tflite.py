"""TensorFlow-converter-like .tflite files, written without TensorFlow, to test models edgekit did not convert.

``TfliteModel`` infers the schema of a ``.tflite`` that carries no ``edgekit.*`` metadata from its
tensors; the only way to test that without downloading files or depending on TensorFlow is to write
such files here, laid out as ``TFLiteConverter`` lays them out: schema version 3, description
"MLIR Converted.", buffer 0 empty and one buffer per tensor (empty for activations), input
"serving_default_x:0" of shape ``[1, H, W, C]`` (signature ``[-1, H, W, C]``), output
"StatefulPartitionedCall:0", a ``serving_default`` signature and a ``min_runtime_version`` entry.

The network is a Keras ``Sequential`` as TF converts it (NHWC): CONV_2D 3x3, stride 1, SAME, fused
RELU -> MAX_POOL_2D 2x2 -> RESHAPE ``[-1, features]`` (a Flatten) -> FULLY_CONNECTED -> SOFTMAX.
Variants, by ``conv_tflite(quantized=..., input_dtype=...)``, each also ``from_logits=True`` (no SOFTMAX):

- float32 (the default): float input and output.
- ``input_dtype="uint8"``, float: a raw uint8 input without quantization, then CAST and MUL by 1/255
  (a Keras ``Rescaling`` layer): clients send pixel values 0..255 as they are.
- ``quantized=True``: full-integer int8 (``inference_input_type=tf.int8``): int8 input and output with
  scale and zero point, conv weights int8 per output channel with int32 biases, dense weights int8
  per tensor, activation ranges calibrated by min/max, softmax at 1/256, -128.
- ``quantized=True, input_dtype="uint8"``: the same int8 body behind a uint8 input (QUANTIZE uint8 ->
  int8) and before a uint8 output (QUANTIZE int8 -> uint8), as ``inference_input_type=tf.uint8`` does.

Weights are a dict of numpy arrays in TFLite's layouts (``conv_w`` ``[O, 3, 3, C]``, ``conv_b``
``[O]``, ``fc_w`` ``[classes, features]``, ``fc_b``), from a seed (``random_weights``) or fitted on
scikit-learn's digits (``digits_fixture``); ``forward`` is the numpy reference and ``conv_onnx``
writes the same network as ONNX (NHWC input, transposed inside), so ``edgekit validate model.tflite
--reference model.onnx`` compares the two.

Imports: numpy, ai-edge-litert's flatbuffer schema, onnx (``conv_onnx``), scikit-learn (``digits_fixture``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from edgekit.errors import require

F32 = np.float32
INPUT_NAME = "serving_default_x:0"
OUTPUT_NAME = "StatefulPartitionedCall:0"
MIN_RUNTIME_VERSION = b"1.14.0"  # what TF 2.x writes for int8 CONV_2D v3; padded to 16 bytes as TF does
FILTERS = 8
ZERO_128 = np.asarray([-128], np.int64)
INPUT_DTYPES = {False: ("float32", "uint8"), True: ("int8", "uint8")}
# Keras layer names as TF's converter spells the tensors (a Flatten's reshape, a Dense's MatMul...)
NAMES = {
    "conv_w": "sequential/conv2d/Conv2D",
    "conv_b": "sequential/conv2d/BiasAdd/ReadVariableOp",
    "conv": "sequential/conv2d/Relu;sequential/conv2d/BiasAdd;sequential/conv2d/Conv2D",
    "pool": "sequential/max_pooling2d/MaxPool",
    "shape": "sequential/flatten/Const",
    "flat": "sequential/flatten/Reshape",
    "fc_w": "sequential/dense/MatMul",
    "fc_b": "sequential/dense/BiasAdd/ReadVariableOp",
    "logits": "sequential/dense/MatMul;sequential/dense/BiasAdd",
}


# --- the network in numpy: the reference, and the calibration of the int8 variant ----------------------------


def random_weights(
    *, input_shape: tuple[int, ...] = (1, 8, 8, 1), filters: int = FILTERS, classes: int = 10, seed: int = 0
) -> dict[str, np.ndarray]:
    """He-initialised weights from ``seed``: the same seed gives the same bytes on every machine."""
    rng = np.random.default_rng(seed)
    _, height, width, channels = input_shape
    size = (height // 2) * (width // 2) * filters
    return {
        "conv_w": (rng.standard_normal((filters, 3, 3, channels)) * np.sqrt(2 / (9 * channels))).astype(F32),
        "conv_b": (rng.standard_normal(filters) * 0.1).astype(F32),
        "fc_w": (rng.standard_normal((classes, size)) * np.sqrt(1 / size)).astype(F32),
        "fc_b": np.zeros(classes, F32),
    }


def features(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """``[N, H, W, C]`` -> the flattened ``[N, features]`` after conv (SAME), RELU and 2x2 max pooling,
    in NHWC order as TF's Flatten lays them out."""
    x = np.asarray(x, dtype=F32)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))  # [N, H, W, C, 3, 3]
    conv = np.einsum("nhwcij,oijc->nhwo", windows, weights["conv_w"], optimize=True) + weights["conv_b"]
    relu = np.maximum(conv, 0)
    n, height, width, filters = relu.shape
    h2, w2 = height // 2, width // 2
    pooled = relu[:, : 2 * h2, : 2 * w2].reshape(n, h2, 2, w2, 2, filters).max(axis=(2, 4))
    return pooled.reshape(n, -1).astype(F32)


def logits(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    return (features(weights, x) @ weights["fc_w"].T + weights["fc_b"]).astype(F32)


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def forward(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The probabilities the float model computes for float input ``x`` (for raw uint8 input: ``x / 255``)."""
    return softmax(logits(weights, x))


# --- digits: weights whose answers mean something -----------------------------------------------------------


@dataclass(frozen=True)
class DigitsFixture:
    """Fitted weights and scikit-learn's 8x8 digits as NHWC ``[N, 8, 8, 1]`` float32 in [0, 1]."""

    weights: dict[str, np.ndarray]
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray

    def accuracy(self) -> float:
        return float((logits(self.weights, self.X_test).argmax(axis=1) == self.y_test).mean())


def digits_fixture(*, filters: int = FILTERS, seed: int = 0, steps: int = 100) -> DigitsFixture:
    """Random conv filters from ``seed`` and a dense layer fitted on their features by softmax regression:
    deterministic, well under a second, about 0.97 accurate, and confident (peaked probabilities), so
    int8's 1/256 softmax steps rarely tie the top two classes. A quarter of the digits is held out."""
    datasets = require("sklearn.datasets", "host")
    digits = datasets.load_digits()
    X = (digits.images / 16.0).astype(F32)[..., np.newaxis]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(X))
    train, test = order[: len(X) * 3 // 4], order[len(X) * 3 // 4 :]
    weights = random_weights(input_shape=(1, 8, 8, 1), filters=filters, seed=seed)
    fc_w, fc_b = _softmax_regression(features(weights, X[train]), y[train], classes=10, steps=steps)
    weights.update(fc_w=fc_w, fc_b=fc_b)
    return DigitsFixture(weights, X[train], y[train], X[test], y[test])


def _softmax_regression(F: np.ndarray, y: np.ndarray, *, classes: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``(W [classes, features], b)`` minimising cross-entropy (plus a little L2) by full-batch gradient
    descent on standardised features, in float64; the standardisation is folded back into W and b."""
    F = np.asarray(F, dtype=np.float64)
    mean, std = F.mean(axis=0), F.std(axis=0) + 1e-6
    Z = (F - mean) / std
    onehot = np.eye(classes)[y]
    W, b = np.zeros((F.shape[1], classes)), np.zeros(classes)
    for _ in range(steps):
        error = (softmax(Z @ W + b) - onehot) / len(Z)
        W -= Z.T @ error + 1e-4 * W
        b -= error.sum(axis=0)
    W /= std[:, np.newaxis]
    return W.T.astype(F32), (b - mean @ W).astype(F32)


# --- the flatbuffer ------------------------------------------------------------------------------------------


class _Quant(NamedTuple):
    """Affine quantization: ``real = scale * (q - zero)``, per channel along ``axis`` when ``scale`` has several."""

    scale: np.ndarray
    zero: np.ndarray
    axis: int = 0


def _affine(low: float, high: float, dtype: str = "int8") -> _Quant:
    """The asymmetric parameters TF's calibrator gives a range (widened to hold 0, as it must be exact)."""
    info = np.iinfo(dtype)
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    scale = (high - low) / (info.max - info.min) or 1.0
    zero = int(np.clip(np.round(info.min - low / scale), info.min, info.max))
    return _Quant(np.asarray([scale], F32), np.asarray([zero], np.int64))


def _symmetric(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, _Quant]:
    """int8 weights in [-127, 127], zero point 0, one scale per slice along ``axis`` (None: one scale)."""
    reduce = None if axis is None else tuple(i for i in range(w.ndim) if i != axis)
    peak = np.abs(w).max(axis=reduce)
    scale = np.atleast_1d(np.where(peak > 0, peak / 127.0, 1.0)).astype(F32)
    shaped = scale.reshape([-1 if i == axis else 1 for i in range(w.ndim)]) if axis is not None else scale
    q = np.clip(np.round(w / shaped), -127, 127).astype(np.int8)
    return q, _Quant(scale, np.zeros(len(scale), np.int64), axis or 0)


class _Writer:
    """One subgraph's tensors and operators, and the model around them, as TF's converter lays them out."""

    def __init__(self) -> None:
        self.s = require("ai_edge_litert.schema_py_generated", "tflite")
        self.buffers = [self.s.BufferT()]
        self.tensors: list[Any] = []
        self.operators: list[Any] = []
        self.codes: dict[tuple[int, int], int] = {}
        self.code_list: list[Any] = []

    def tensor(self, name: str, shape: list[int], dtype: str, data: Any = None, quant: _Quant | None = None) -> int:
        s = self.s
        t = s.TensorT()
        t.name, t.shape = name.encode(), np.asarray(shape, np.int32)
        t.type = getattr(s.TensorType, dtype.upper())
        if data is None and shape and shape[0] == 1:
            t.shapeSignature = np.asarray([-1, *shape[1:]], np.int32)  # the batch Keras left open
        buffer = s.BufferT()
        if data is not None:
            raw = np.ascontiguousarray(np.asarray(data, dtype=dtype)).tobytes()
            buffer.data = np.frombuffer(raw, np.uint8)
        self.buffers.append(buffer)  # TF gives every tensor a buffer of its own, empty for activations
        t.buffer = len(self.buffers) - 1
        if quant is not None:
            q = s.QuantizationParametersT()
            q.scale, q.zeroPoint, q.quantizedDimension = quant.scale, quant.zero, quant.axis
            t.quantization = q
        self.tensors.append(t)
        return len(self.tensors) - 1

    def op(self, name: str, inputs: list[int], outputs: list[int], version: int = 1, options: Any = None) -> None:
        s = self.s
        code = getattr(s.BuiltinOperator, name)
        if (code, version) not in self.codes:
            entry = s.OperatorCodeT()
            entry.builtinCode, entry.deprecatedBuiltinCode, entry.version = code, min(code, 127), version
            self.code_list.append(entry)
            self.codes[code, version] = len(self.code_list) - 1
        o = s.OperatorT()
        o.opcodeIndex = self.codes[code, version]
        o.inputs, o.outputs = np.asarray(inputs, np.int32), np.asarray(outputs, np.int32)
        if options is not None:
            o.builtinOptionsType = getattr(s.BuiltinOptions, type(options).__name__[:-1])
            o.builtinOptions = options
        self.operators.append(o)

    def finish(self, first: int, last: int) -> bytes:
        s = self.s
        graph = s.SubGraphT()
        graph.tensors, graph.operators, graph.name = self.tensors, self.operators, b"main"
        graph.inputs, graph.outputs = np.asarray([first], np.int32), np.asarray([last], np.int32)
        model = s.ModelT()
        model.version, model.description = 3, b"MLIR Converted."
        model.operatorCodes, model.subgraphs = self.code_list, [graph]
        model.signatureDefs = [self._signature(first, last)]
        version = s.BufferT()
        version.data = np.frombuffer(MIN_RUNTIME_VERSION.ljust(16, b"\0"), np.uint8)
        self.buffers.append(version)
        entry = s.MetadataT()
        entry.name, entry.buffer = b"min_runtime_version", len(self.buffers) - 1
        model.buffers, model.metadata = self.buffers, [entry]
        builder = require("flatbuffers", "tflite").Builder(4096)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())

    def _signature(self, first: int, last: int) -> Any:
        """The ``serving_default`` signature TF writes: Keras's input name "x", output "output_0"."""
        signature = self.s.SignatureDefT()
        signature.signatureKey, signature.subgraphIndex = b"serving_default", 0
        signature.inputs, signature.outputs = [self._map(b"x", first)], [self._map(b"output_0", last)]
        return signature

    def _map(self, name: bytes, index: int) -> Any:
        entry = self.s.TensorMapT()
        entry.name, entry.tensorIndex = name, index
        return entry

    def options(self, kind: str, **fields: Any) -> Any:
        options = getattr(self.s, f"{kind}OptionsT")()
        for key, value in fields.items():
            setattr(options, key, value)
        return options


def conv_tflite(
    *,
    quantized: bool = False,
    input_dtype: str | None = None,
    input_shape: tuple[int, ...] = (1, 8, 8, 1),
    classes: int = 10,
    seed: int = 0,
    weights: dict[str, np.ndarray] | None = None,
    calibration: np.ndarray | None = None,
    filters: int = FILTERS,
    from_logits: bool = False,
) -> bytes:
    """The .tflite bytes of the network (see the module docstring for the variants).

    ``weights`` (e.g. ``digits_fixture().weights``) fixes the network, else it comes from ``seed``
    with ``filters`` and ``classes``. ``calibration`` (``[N, H, W, C]`` float32, TF's representative
    dataset) sets the int8 ranges; without it, 64 uniform [0, 1) examples drawn from ``seed``.
    ``from_logits=True`` ends in the dense layer's logits, no SOFTMAX, as Keras models trained so export."""
    input_dtype = input_dtype or INPUT_DTYPES[quantized][0]
    if input_dtype not in INPUT_DTYPES[quantized]:
        raise ValueError(
            f"input_dtype {input_dtype!r}: a {'quantized' if quantized else 'float'} model takes "
            f"one of {INPUT_DTYPES[quantized]}"
        )
    shape = [int(d) for d in input_shape]
    if len(shape) != 4 or shape[0] != 1:
        raise ValueError(f"input_shape {tuple(input_shape)}: give [1, height, width, channels]")
    if weights is None:
        weights = random_weights(input_shape=tuple(shape), filters=filters, classes=classes, seed=seed)
    _check_weights(weights, shape)
    writer = _Writer()
    if not quantized:
        first, last = _float_graph(writer, weights, shape, input_dtype, not from_logits)
    else:
        if calibration is None:
            calibration = np.random.default_rng(seed).uniform(0, 1, (64, *shape[1:])).astype(F32)
        first, last = _int8_graph(writer, weights, shape, input_dtype, not from_logits, _ranges(weights, calibration))
    return writer.finish(first, last)


def _check_weights(weights: dict[str, np.ndarray], shape: list[int]) -> None:
    """Weights that fit the input, said here rather than as LiteRT's "failed to prepare" later."""
    _, height, width, channels = shape
    filters = len(weights["conv_b"])
    expected = {
        "conv_w": (filters, 3, 3, channels),
        "fc_w": (len(weights["fc_b"]), (height // 2) * (width // 2) * filters),
    }
    for key, want in expected.items():
        if tuple(weights[key].shape) != want:
            raise ValueError(f"weights[{key!r}] has shape {weights[key].shape}, input {shape} needs {want}")


def _float_graph(
    w: _Writer, weights: dict[str, np.ndarray], shape: list[int], input_dtype: str, ends_in_softmax: bool
) -> tuple[int, int]:
    """float32 throughout; a uint8 input is cast and rescaled by 1/255 first, as Keras's Rescaling converts."""
    first = x = w.tensor(INPUT_NAME, shape, input_dtype)
    if input_dtype == "uint8":
        cast = w.tensor("sequential/rescaling/Cast", shape, "float32")
        w.op("CAST", [x], [cast])
        factor = w.tensor("sequential/rescaling/Cast_1/x", [], "float32", F32(1 / 255))
        x = w.tensor("sequential/rescaling/mul", shape, "float32")
        w.op("MUL", [cast, factor], [x], options=w.options("Mul"))
    if not ends_in_softmax:
        return first, _body(w, x, weights, None, OUTPUT_NAME)
    scores = _body(w, x, weights, None, NAMES["logits"])
    last = w.tensor(OUTPUT_NAME, [1, len(weights["fc_b"])], "float32")
    w.op("SOFTMAX", [scores], [last], options=w.options("Softmax", beta=1.0))
    return first, last


def _ranges(weights: dict[str, np.ndarray], calibration: np.ndarray) -> dict[str, _Quant]:
    """int8 parameters of the input and of each activation, from min/max over the calibration data
    (TF's default calibrator); max pooling and the reshape keep the conv's, as TFLite requires."""
    x = np.asarray(calibration, dtype=F32)
    scores = logits(weights, x)
    return {
        "input": _affine(x.min(), x.max()),
        "conv": _affine(0.0, features(weights, x).max()),
        "logits": _affine(scores.min(), scores.max()),
    }


def _int8_graph(
    w: _Writer, weights: dict[str, np.ndarray], shape: list[int], input_dtype: str, ends_in_softmax: bool, ranges: dict
) -> tuple[int, int]:
    """The full-integer body; a uint8 input and output are requantized from and to int8 at the edges."""
    classes, q_in, uint8 = len(weights["fc_b"]), ranges["input"], input_dtype == "uint8"
    if uint8:
        first = w.tensor(INPUT_NAME, shape, "uint8", quant=_Quant(q_in.scale, q_in.zero + 128))
        x = w.tensor("tfl.quantize", shape, "int8", quant=q_in)
        w.op("QUANTIZE", [first], [x], 2)
    else:
        first = x = w.tensor(INPUT_NAME, shape, "int8", quant=q_in)
    end = OUTPUT_NAME if not uint8 else "sequential/dense/Softmax" if ends_in_softmax else NAMES["logits"]
    last = _body(w, x, weights, ranges, NAMES["logits"] if ends_in_softmax else end)
    if ends_in_softmax:  # int8 softmax has fixed output parameters: 1/256, -128
        scores, last = last, w.tensor(end, [1, classes], "int8", quant=_Quant(np.asarray([1 / 256], F32), ZERO_128))
        w.op("SOFTMAX", [scores], [last], 2, w.options("Softmax", beta=1.0))
    if uint8:
        q = w.tensors[last].quantization
        out = w.tensor(OUTPUT_NAME, [1, classes], "uint8", quant=_Quant(q.scale, q.zeroPoint + 128))
        w.op("QUANTIZE", [last], [out], 2)
        last = out
    return first, last


def _body(w: _Writer, x: int, weights: dict[str, np.ndarray], ranges: dict[str, _Quant] | None, name: str) -> int:
    """CONV_2D (RELU) -> MAX_POOL_2D -> RESHAPE -> FULLY_CONNECTED from tensor ``x``; the logits' tensor,
    called ``name``. ``ranges`` None: float32; else int8 with those activation parameters."""
    q = ranges or {}
    dtype, int8 = ("int8", True) if ranges else ("float32", False)
    _, height, width, _ = (int(d) for d in w.tensors[x].shape)
    filters, classes = len(weights["conv_b"]), len(weights["fc_b"])
    padding, relu = w.s.Padding, w.s.ActivationFunctionType.RELU
    kernel, bias = _parameters(w, "conv", weights, q.get("input"), axis=0)
    conv = w.tensor(NAMES["conv"], [1, height, width, filters], dtype, quant=q.get("conv"))
    options = w.options("Conv2D", padding=padding.SAME, strideW=1, strideH=1, fusedActivationFunction=relu)
    w.op("CONV_2D", [x, kernel, bias], [conv], 3 if int8 else 1, options)
    h2, w2 = height // 2, width // 2
    pool = w.tensor(NAMES["pool"], [1, h2, w2, filters], dtype, quant=q.get("conv"))
    options = w.options("Pool2D", padding=padding.VALID, strideW=2, strideH=2, filterWidth=2, filterHeight=2)
    w.op("MAX_POOL_2D", [conv], [pool], 2 if int8 else 1, options)
    size = h2 * w2 * filters
    new_shape = w.tensor(NAMES["shape"], [2], "int32", [-1, size])
    flat = w.tensor(NAMES["flat"], [1, size], dtype, quant=q.get("conv"))
    w.op("RESHAPE", [pool, new_shape], [flat], 1, w.options("Reshape", newShape=[-1, size]))
    matrix, bias = _parameters(w, "fc", weights, q.get("conv"), axis=None)
    scores = w.tensor(name, [1, classes], dtype, quant=q.get("logits"))
    w.op("FULLY_CONNECTED", [flat, matrix, bias], [scores], 4 if int8 else 1, w.options("FullyConnected"))
    return scores


def _parameters(
    w: _Writer, layer: str, weights: dict[str, np.ndarray], q_in: _Quant | None, axis: int | None
) -> tuple[int, int]:
    """A layer's kernel and bias tensors: float32, or int8 weights (symmetric, per channel along
    ``axis``) with an int32 bias at input scale x weight scale, as TF's full-integer quantizer writes."""
    kernel, bias = weights[f"{layer}_w"], weights[f"{layer}_b"]
    if q_in is None:
        return (
            w.tensor(NAMES[f"{layer}_w"], list(kernel.shape), "float32", kernel),
            w.tensor(NAMES[f"{layer}_b"], [len(bias)], "float32", bias),
        )
    q_kernel, kernel_q = _symmetric(kernel, axis)
    bias_scale = np.float64(q_in.scale[0]) * kernel_q.scale.astype(np.float64)
    q_bias = np.round(bias.astype(np.float64) / bias_scale).astype(np.int32)
    bias_q = _Quant(bias_scale.astype(F32), np.zeros(len(bias_scale), np.int64), 0)
    return (
        w.tensor(NAMES[f"{layer}_w"], list(kernel.shape), "int8", q_kernel, kernel_q),
        w.tensor(NAMES[f"{layer}_b"], [len(bias)], "int32", q_bias, bias_q),
    )


# --- the same network as ONNX ---------------------------------------------------------------------------------

ONNX_OPSET, ONNX_IR_VERSION = 17, 8  # what onnxruntime 1.16 and later read, as edgekit's other fixtures


def conv_onnx(
    weights: dict[str, np.ndarray], *, input_shape: tuple[int, ...] = (1, 8, 8, 1), input_dtype: str = "float32"
) -> bytes:
    """The float network as ONNX bytes, from the same NHWC input "x" (``[N, H, W, C]``, transposed to
    NCHW inside) to "probabilities", so one data file feeds both this and ``conv_tflite``; a uint8
    input is cast and scaled by 1/255 as the raw-uint8 .tflite does."""
    onnx = require("onnx", "host")
    from onnx import TensorProto, helper, numpy_helper

    _, height, width, channels = (int(d) for d in input_shape)
    classes, raw = len(weights["fc_b"]), input_dtype == "uint8"
    constants = {
        "conv.weight": weights["conv_w"].transpose(0, 3, 1, 2),  # OHWI -> OIHW
        "conv.bias": weights["conv_b"],
        "fc.weight": weights["fc_w"],
        "fc.bias": weights["fc_b"],
        **({"scale": np.asarray(1 / 255, F32)} if raw else {}),
    }
    node = helper.make_node
    rescale = [node("Cast", ["x"], ["x_float"], to=TensorProto.FLOAT), node("Mul", ["x_float", "scale"], ["x_01"])]
    nodes = [
        *(rescale if raw else []),
        node("Transpose", ["x_01" if raw else "x"], ["nchw"], perm=[0, 3, 1, 2]),
        node("Conv", ["nchw", "conv.weight", "conv.bias"], ["conv"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        node("Relu", ["conv"], ["relu"]),
        node("MaxPool", ["relu"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
        node("Transpose", ["pool"], ["nhwc"], perm=[0, 2, 3, 1]),  # flatten in TF's order, to share fc_w
        node("Flatten", ["nhwc"], ["flat"], axis=1),
        node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], transB=1),
        node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    elem = {"float32": TensorProto.FLOAT, "uint8": TensorProto.UINT8}[input_dtype]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", elem, ["N", height, width, channels])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes])],
        initializer=[numpy_helper.from_array(np.ascontiguousarray(v, dtype=F32), k) for k, v in constants.items()],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        ir_version=ONNX_IR_VERSION,
        producer_name="edgekit-fixtures",
    )
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()
