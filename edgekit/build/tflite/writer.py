"""Writing a ``Plan`` as a .tflite flatbuffer with the schema ai-edge-litert ships (no TensorFlow).

float32: every step as its builtin op. int8 (full integer, float input and output): the float
preprocessing (scalers) stays in float before QUANTIZE, because folding a per-feature scale into
the first layer wrecks its per-tensor range; FULLY_CONNECTED runs on int8 with per-channel int8
weights, an int32 bias at input scale x weight scale, and its activation fused; SOFTMAX outputs
int8 at scale 1/256, zero point -128 (LOGISTIC too; TANH at 1/128, 0); DEQUANTIZE gives floats back.
Buffer 0 is the empty sentinel; operator codes set both ``builtin_code`` and ``deprecated_builtin_code``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekit.build.tflite.plan import Plan, Step
from edgekit.errors import ConversionError, require

FLOAT_OPS = {
    "sub": "SUB",
    "mul": "MUL",
    "add": "ADD",
    "div": "DIV",
    "relu": "RELU",
    "tanh": "TANH",
    "logistic": "LOGISTIC",
    "softmax": "SOFTMAX",
}
INT8_FIXED_OUTPUT = {"softmax": (1 / 256, -128), "logistic": (1 / 256, -128), "tanh": (1 / 128, 0)}


class _Builder:
    def __init__(self) -> None:
        self.schema = require("ai_edge_litert.schema_py_generated", "tflite")
        s = self.schema
        self.buffers = [s.BufferT()]  # buffer 0: the empty sentinel every tensor without data points at
        self.tensors: list[Any] = []
        self.operators: list[Any] = []
        self.codes: dict[tuple[int, int], int] = {}
        self.code_list: list[Any] = []
        self.metadata: dict[str, str] = {}

    def tensor(
        self,
        name: str,
        shape: list[int],
        dtype: str,
        data: np.ndarray | None = None,
        quant: tuple | None = None,
        per_channel: bool = False,
    ) -> int:
        s = self.schema
        t = s.TensorT()
        t.name = name.encode()
        t.shape = np.asarray(shape, dtype=np.int32)
        if shape and shape[0] == 1 and data is None:
            t.shapeSignature = np.asarray([-1, *shape[1:]], dtype=np.int32)
        t.type = {
            "float32": s.TensorType.FLOAT32,
            "int8": s.TensorType.INT8,
            "int32": s.TensorType.INT32,
            "int64": s.TensorType.INT64,
        }[dtype]
        t.buffer = 0
        if data is not None:
            buffer = s.BufferT()
            buffer.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8)
            self.buffers.append(buffer)
            t.buffer = len(self.buffers) - 1
        if quant is not None:
            q = s.QuantizationParametersT()
            scales, zeros = quant
            q.scale = np.asarray(np.atleast_1d(scales), dtype=np.float32)
            q.zeroPoint = np.asarray(
                np.atleast_1d(zeros), dtype=np.int64
            )  # LiteRT wants one per scale, even when all are 0
            q.quantizedDimension = 0
            t.quantization = q
        self.tensors.append(t)
        return len(self.tensors) - 1

    def op(
        self, name: str, inputs: list[int], outputs: list[int], version: int = 1, options: tuple[str, Any] | None = None
    ) -> None:
        s = self.schema
        code = getattr(s.BuiltinOperator, name)
        key = (code, version)
        if key not in self.codes:
            oc = s.OperatorCodeT()
            oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, min(code, 127), version
            self.code_list.append(oc)
            self.codes[key] = len(self.code_list) - 1
        o = s.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = (
            self.codes[key],
            np.asarray(inputs, dtype=np.int32),
            np.asarray(outputs, dtype=np.int32),
        )
        if options is not None:
            o.builtinOptionsType, o.builtinOptions = getattr(s.BuiltinOptions, options[0]), options[1]
        self.operators.append(o)

    def finish(self, inputs: list[int], outputs: list[int], description: str) -> bytes:
        s = self.schema
        metadata = []
        for key, value in self.metadata.items():
            buffer = s.BufferT()
            buffer.data = np.frombuffer(value.encode(), dtype=np.uint8)
            self.buffers.append(buffer)
            entry = s.MetadataT()
            entry.name, entry.buffer = key.encode(), len(self.buffers) - 1
            metadata.append(entry)
        graph = s.SubGraphT()
        graph.tensors, graph.operators = self.tensors, self.operators
        graph.inputs, graph.outputs = np.asarray(inputs, dtype=np.int32), np.asarray(outputs, dtype=np.int32)
        graph.name = b"main"
        model = s.ModelT()
        model.version, model.operatorCodes, model.subgraphs, model.buffers = 3, self.code_list, [graph], self.buffers
        model.description = description.encode()
        model.metadata = metadata
        return _pack(model)

    def fc_options(self, activation: str | None) -> tuple[str, Any]:
        s = self.schema
        options = s.FullyConnectedOptionsT()
        options.fusedActivationFunction = {
            None: s.ActivationFunctionType.NONE,
            "relu": s.ActivationFunctionType.RELU,
            "tanh": s.ActivationFunctionType.TANH,
        }[activation]
        return "FullyConnectedOptions", options

    def label_output(self, logits: int, labels: tuple[Any, ...] | None) -> int | None:
        """``label`` = classes[argmax(logits)], from the logits (int8 softmax ties at 1/256 would flip labels).
        Classes 0..n-1 are their own indices, so ARG_MAX alone gives the label: no GATHER, no class table."""
        if not labels or not all(isinstance(c, int) and not isinstance(c, bool) for c in labels):
            return None
        s = self.schema
        axis = self.tensor("label/axis", [1], "int32", np.asarray([1], dtype=np.int32))
        identity = tuple(labels) == tuple(range(len(labels)))
        index = self.tensor("label" if identity else "label/index", [1], "int64")
        options = s.ArgMaxOptionsT()
        options.outputType = s.TensorType.INT64
        self.op("ARG_MAX", [logits, axis], [index], 2, ("ArgMaxOptions", options))
        if identity:
            return index
        classes = self.tensor("label/classes", [len(labels)], "int64", np.asarray(labels, dtype=np.int64))
        label = self.tensor("label", [1], "int64")
        gather = s.GatherOptionsT()
        gather.axis = 0
        self.op("GATHER", [classes, index], [label], 1, ("GatherOptions", gather))
        return label

    def softmax_options(self) -> tuple[str, Any]:
        options = self.schema.SoftmaxOptionsT()
        options.beta = 1.0
        return "SoftmaxOptions", options


def write_float(
    plan: Plan, output_name: str, labels: tuple[Any, ...] | None = None, metadata: dict[str, str] | None = None
) -> bytes:
    b = _Builder()
    b.metadata = dict(metadata or {})
    logits = None
    current = b.tensor(plan.input_name, [1, plan.width], "float32")
    first = current
    width = plan.width
    for index, step in enumerate(plan.steps):
        last = index == len(plan.steps) - 1
        if step.kind == "fc":
            weights = b.tensor(
                f"{step.name}/weights", list(step.weights.shape), "float32", step.weights.astype(np.float32)
            )
            bias = b.tensor(f"{step.name}/bias", [len(step.bias)], "float32", step.bias.astype(np.float32))
            width = step.weights.shape[0]
            out = b.tensor(output_name if last else f"{step.name}/out", [1, width], "float32")
            b.op("FULLY_CONNECTED", [current, weights, bias], [out], 1, b.fc_options(step.activation))
        else:
            out = b.tensor(output_name if last else f"{step.name or step.kind}{index}/out", [1, width], "float32")
            if step.kind == "softmax" and last:
                logits = current
            inputs = [current]
            if step.constant is not None:
                inputs.append(
                    b.tensor(
                        f"{step.name or step.kind}{index}/constant",
                        list(step.constant.shape),
                        "float32",
                        step.constant.astype(np.float32),
                    )
                )
            b.op(FLOAT_OPS[step.kind], inputs, [out], 1, b.softmax_options() if step.kind == "softmax" else None)
        current = out
    label = b.label_output(logits, labels) if logits is not None else None
    return b.finish([first], [current] + ([label] if label is not None else []), "edgekit float32")


CLIP_PERCENTILES = (100.0, 99.999, 99.99, 99.9, 99.5, 99.0)


def _calibrated_range(values: np.ndarray, *, floor_zero: bool = False) -> tuple[float, int]:
    """The int8 range with the least mean absolute quantize-dequantize error on the calibration values: rare
    outliers (a standardized pixel that is almost always 0) would otherwise spend the whole range."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    sample = flat if flat.size <= 200_000 else np.random.default_rng(0).choice(flat, 200_000, replace=False)
    best, best_error = None, np.inf
    for pct in CLIP_PERCENTILES:
        low = 0.0 if floor_zero else float(np.percentile(sample, 100 - pct))
        high = float(np.percentile(sample, pct))
        scale, zero = _asymmetric(low, high)
        restored = (np.clip(np.round(sample / scale) + zero, -128, 127) - zero) * scale
        error = float(np.mean(np.abs(restored - sample)))
        if error < best_error:
            best, best_error = (scale, zero), error
    return best


def _asymmetric(low: float, high: float) -> tuple[float, int]:
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255.0 or 1e-8
    zero = int(np.clip(round(-128 - low / scale), -128, 127))
    return float(scale), zero


def write_int8(
    plan: Plan,
    output_name: str,
    calibration: np.ndarray,
    labels: tuple[Any, ...] | None = None,
    metadata: dict[str, str] | None = None,
) -> bytes:
    """Full-integer int8; activation ranges from the float plan run on ``calibration`` rows."""
    record: list[np.ndarray] = []
    plan.run(calibration, record=record)
    first_fc = next(i for i, s in enumerate(plan.steps) if s.kind == "fc")
    if any(s.kind in ("sub", "mul", "add", "div") for s in plan.steps[first_fc:]):
        raise ConversionError(
            "elementwise arithmetic after the first dense layer cannot be quantized to full int8 here",
            "use --target tflite without --quantize, or --target onnx",
        )
    b = _Builder()
    b.metadata = dict(metadata or {})
    first, width = b.tensor(plan.input_name, [1, plan.width], "float32"), plan.width
    current = _float_preprocessing(b, plan.steps[:first_fc], first, width)
    source = record[first_fc - 1] if first_fc else np.asarray(calibration, dtype=np.float32)
    scale, zero = _calibrated_range(source)
    quantized = b.tensor("quantized_input", [1, width], "int8", quant=(scale, zero))
    b.op("QUANTIZE", [current], [quantized], 2)
    current, in_scale = quantized, scale
    logits = None
    for index in range(first_fc, len(plan.steps)):
        step = plan.steps[index]
        observed = record[index]
        if step.kind == "softmax" and index == len(plan.steps) - 1:
            logits = current
        if step.kind == "fc":
            current, in_scale, width = _int8_fc(b, step, current, in_scale, observed)
        elif step.kind in INT8_FIXED_OUTPUT:
            out_scale, out_zero = INT8_FIXED_OUTPUT[step.kind]
            out = b.tensor(
                f"{step.kind}{index}/out", [1, width], "int8", quant=(out_scale, out_zero)
            )  # not the ONNX node's name: skl2onnx calls its Softmax "Relu1"
            b.op(FLOAT_OPS[step.kind], [current], [out], 2, b.softmax_options() if step.kind == "softmax" else None)
            current, in_scale = out, out_scale
        elif step.kind == "relu":
            out_scale, out_zero = _calibrated_range(observed, floor_zero=True)
            out = b.tensor(f"relu{index}/out", [1, width], "int8", quant=(out_scale, out_zero))
            b.op("RELU", [current], [out], 2)
            current, in_scale = out, out_scale
        else:
            raise ConversionError(
                f"step {step.kind} cannot be quantized to int8 here", "use --target tflite without --quantize"
            )
    output = b.tensor(output_name, [1, width], "float32")
    b.op("DEQUANTIZE", [current], [output], 2)
    label = b.label_output(logits, labels) if logits is not None else None
    return b.finish([first], [output] + ([label] if label is not None else []), "edgekit int8")


def _float_preprocessing(b: _Builder, steps: list[Step], current: int, width: int) -> int:
    """The elementwise scaling before the first dense layer, kept in float32; the tensor it ends in."""
    for index, step in enumerate(steps):
        out = b.tensor(f"{step.name or step.kind}{index}/out", [1, width], "float32")
        constant = b.tensor(
            f"{step.name or step.kind}{index}/constant",
            list(step.constant.shape),
            "float32",
            step.constant.astype(np.float32),
        )
        b.op(FLOAT_OPS[step.kind], [current, constant], [out])
        current = out
    return current


def _int8_fc(b: _Builder, step: Step, current: int, in_scale: float, observed: np.ndarray) -> tuple[int, float, int]:
    weights = step.weights.astype(np.float64)
    channel_max = np.maximum(np.abs(weights).max(axis=1), 1e-12)
    weight_scales = channel_max / 127.0
    q_weights = np.clip(np.round(weights / weight_scales[:, None]), -127, 127).astype(np.int8)
    bias_scales = in_scale * weight_scales
    q_bias = np.round(step.bias / bias_scales).astype(np.int64)
    if np.abs(q_bias).max(initial=0) >= 2**31:
        raise ConversionError(
            f"the bias of {step.name} does not fit int32 at this input scale", "use --target tflite without --quantize"
        )
    w = b.tensor(
        f"{step.name}/weights",
        list(q_weights.shape),
        "int8",
        q_weights,
        quant=(weight_scales, np.zeros(len(weight_scales), np.int64)),
        per_channel=True,
    )
    bias = b.tensor(
        f"{step.name}/bias",
        [len(q_bias)],
        "int32",
        q_bias.astype(np.int32),
        quant=(bias_scales, np.zeros(len(bias_scales), np.int64)),
        per_channel=True,
    )
    out_scale, out_zero = _calibrated_range(observed, floor_zero=step.activation == "relu")
    width = q_weights.shape[0]
    out = b.tensor(f"{step.name}/out", [1, width], "int8", quant=(out_scale, out_zero))
    b.op("FULLY_CONNECTED", [current, w, bias], [out], 4, b.fc_options(step.activation))
    return out, out_scale, width


def _pack(model: Any) -> bytes:
    """The flatbuffer, with each distinct numeric vector written once and shared by every table that
    needs it: a layer's weights and bias point at one all-zero zero-point vector (LiteRT wants one
    int64 per channel), tensors of one shape at one shape vector."""
    import flatbuffers

    class SharingBuilder(flatbuffers.Builder):
        def __init__(self, size: int) -> None:
            super().__init__(size)
            self.written: dict[tuple[str, bytes], int] = {}

        def CreateNumpyVector(self, x: np.ndarray) -> int:
            key = (x.dtype.str, x.tobytes())
            if key not in self.written:
                self.written[key] = super().CreateNumpyVector(x)
            return self.written[key]

    builder = SharingBuilder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
