#!/usr/bin/env python3
"""edgekit's .tflite writer side by side with the converters a user would otherwise reach for; print a table
and write JSON.

For the MobileNet-class 96x96 network (``make_mobilenet96``) and the keyword-spotting CNN (``make_kws_cnn``):

- edgekit: ``convert_model(onnx, out, target_format="tflite")`` float32, and with
  ``quantize=QuantizeOptions(force=True)`` and ``calibration=<npz>`` full-integer int8 (float in and out,
  QUANTIZE and DEQUANTIZE inside), in this process, without TensorFlow;
- TensorFlow's own converter: the same network built in Keras (NHWC) from the ONNX fixture's weights
  (conv kernels as HWIO, depthwise as HWC1, the Gemm as it is), checked against onnxruntime on the
  held-out tensors, then ``TFLiteConverter.from_keras_model`` float32 and full-integer int8 with the same
  calibration rows as ``representative_dataset`` and float in and out (as edgekit's int8 file);
- onnx2tf on the ONNX file: float32, and ``-oiqt`` with ``-cind`` (the same rows, mean 0, std 1), its
  ``*_integer_quant.tflite`` (float in and out) being the comparable int8 file.

TensorFlow and onnx2tf run in a venv of their own (``--peer-venv``, made with pip on first use; never a
dependency of edgekit), as subprocesses; the Keras side is ``PEER_HELPER`` below. Every .tflite is then
loaded here with ai-edge-litert's ``Interpreter`` (its default XNNPACK delegate): file size, p50 latency
at batch 1 and 8 with 1 and 4 threads (all files interleaved in each setting), top-1 agreement with
onnxruntime's float32 on the held-out tensors, and the wall time to convert. The int8 files of edgekit and
TensorFlow are also compared op by op and tensor by tensor (``ai_edge_litert.schema_py_generated``) and
timed without XNNPACK (LiteRT's own kernels), so a difference can be put down to a part of the file or to
a kernel: that goes into ``notes``. Speed is reported as ratios measured in the same run, because the
machines this runs on are shared and noisy.

    python scripts/bench_tflite_peers.py [--json bench-results/bench_tflite_peers.json] [--data DIR]
        [--peer-venv ~/.cache/edgekit-bench/tf-venv] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_report import Check, print_checks, print_run, write_json
from bench_tabular import Timing, interleaved, p50_us

NETWORKS = ("mobilenet96", "kws_cnn")
PEER_PACKAGES = ("tensorflow-cpu", "onnx2tf", "onnx", "onnxruntime", "onnx-graphsurgeon", "sng4onnx", "tf_keras")
PEER_PACKAGES += ("psutil",)  # onnx2tf imports it without declaring it
DEFAULT_PEER_VENV = Path.home() / ".cache" / "edgekit-bench" / "tf-venv"
TARGETS = {
    "int8_size_ratio_max": 1.0,
    "int8_latency_ratio_max": 1.05,
    "agreement_drop_max": 0.0,
    "edgekit_convert_seconds_max": 10.0,
}
CONTROL = "tensorflow int8 again"  # the same file timed twice: the ratio a setting shows by noise alone
FILES = (  # (converter, precision): the rows of the table
    ("edgekit", "float32"),
    ("edgekit", "int8"),
    ("tensorflow", "float32"),
    ("tensorflow", "int8"),
    ("onnx2tf", "float32"),
    ("onnx2tf", "int8"),
)


@dataclass(frozen=True)
class Plan:
    """How each (network, batch, threads) setting is timed, and the settings."""

    b1: Timing
    b8: Timing
    threads: tuple[int, ...] = (1, 4)
    batches: tuple[int, ...] = (1, 8)
    no_xnnpack: Timing = field(default_factory=lambda: Timing(rounds=10, block=3))

    def timing(self, batch: int) -> Timing:
        return self.b1 if batch == 1 else self.b8


FULL = Plan(b1=Timing(rounds=60, block=5), b8=Timing(rounds=20, block=4), no_xnnpack=Timing(rounds=15, block=4))
QUICK = Plan(b1=Timing(rounds=2, block=2), b8=Timing(rounds=1, block=2), no_xnnpack=Timing(rounds=1, block=2))

PEER_HELPER = '''
"""Runs in the peer venv (tensorflow-cpu): the network in Keras from the bench's spec and weights, checked
against onnxruntime's probabilities, then TFLiteConverter float32 and full-integer int8 (float in and out).
Usage: python helper.py WORK (reads WORK/keras.json and WORK/keras.npz; writes tf_*.tflite and tf.json)."""

import json
import sys
import time
from pathlib import Path

import numpy as np

started = time.perf_counter()
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - started


def layer(spec, arrays):
    op = spec["op"]
    if op in ("conv", "dense"):
        kernel, bias = arrays[spec["weights"]], arrays[spec["bias"]]
        if op == "dense":
            return keras.layers.Dense(kernel.shape[1]), [kernel, bias]
        options = dict(strides=spec["stride"], padding=spec["padding"])
        if spec["depthwise"]:
            return keras.layers.DepthwiseConv2D(kernel.shape[:2], **options), [kernel, bias]
        return keras.layers.Conv2D(kernel.shape[3], kernel.shape[:2], **options), [kernel, bias]
    made = {
        "rescale": lambda: keras.layers.Rescaling(spec.get("scale"), offset=spec.get("offset")),
        "pad": lambda: keras.layers.ZeroPadding2D(tuple(map(tuple, spec.get("pads", [])))),
        "relu": lambda: keras.layers.ReLU(),
        "relu6": lambda: keras.layers.ReLU(6.0),
        "maxpool": lambda: keras.layers.MaxPooling2D(spec.get("size"), spec.get("stride")),
        "gap": lambda: keras.layers.GlobalAveragePooling2D(),
        "softmax": lambda: keras.layers.Softmax(),
    }[op]()
    return made, None


def build(doc, arrays):
    inputs = keras.Input(tuple(doc["input_shape"]), name="x")
    x, weighted = inputs, []
    for spec in doc["layers"]:
        made, weights = layer(spec, arrays)
        x = made(x)
        if weights is not None:
            weighted.append((made, weights))
    model = keras.Model(inputs, x)
    for made, weights in weighted:
        made.set_weights(weights)
    return model


def converter_for(model, doc):
    try:
        return tf.lite.TFLiteConverter.from_keras_model(model), "from_keras_model"
    except Exception as exc:  # a Keras/TF pairing without it: the function it would trace
        spec = tf.TensorSpec([None, *doc["input_shape"]], tf.float32)
        function = tf.function(lambda x: model(x)).get_concrete_function(spec)
        return tf.lite.TFLiteConverter.from_concrete_functions([function], model), f"concrete function ({exc})"


def convert(model, doc, calibration, quantize):
    start = time.perf_counter()
    converter, api = converter_for(model, doc)
    if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([calibration[i : i + 1]] for i in range(len(calibration)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    data = converter.convert()
    return data, time.perf_counter() - start, api


def main(work):
    doc = json.loads((work / "keras.json").read_text())
    arrays = dict(np.load(work / "keras.npz"))
    start = time.perf_counter()
    model = build(doc, arrays)
    build_seconds = time.perf_counter() - start
    got = model.predict(arrays["test"], batch_size=64, verbose=0)
    result = {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "import_seconds": IMPORT_SECONDS,
        "build_seconds": build_seconds,
        "keras_max_abs_diff": float(np.abs(got - arrays["reference"]).max()),
        "keras_agreement": float(np.mean(got.argmax(1) == arrays["reference"].argmax(1))),
    }
    for name, quantize in (("float32", False), ("int8", True)):
        data, seconds, api = convert(model, doc, arrays["calibration"], quantize)
        (work / f"tf_{name}.tflite").write_bytes(data)
        result[f"{name}_seconds"], result["api"] = seconds, api
    (work / "tf.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
'''


# -- the peer venv --------------------------------------------------------------------------------
def peer_venv(path: Path) -> Path:
    """The peer venv's python, the venv made and filled with pip first when it is missing."""
    python = path / "bin" / "python"
    if not (path / ".bench-complete").exists():
        print(f"making the peer venv {path} (tensorflow-cpu, onnx2tf): a few minutes, once", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
        (path / ".bench-complete").write_text(" ".join(PEER_PACKAGES) + "\n")
    return python


def peer_versions(python: Path) -> dict[str, str]:
    code = "import importlib.metadata as m, json, sys; print(json.dumps({p: m.version(p) for p in sys.argv[1:]}))"
    names = ["tensorflow-cpu", "keras", "onnx2tf", "onnx", "onnxruntime"]
    done = subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-400:]}


# -- the network as Keras layers ------------------------------------------------------------------
def keras_spec(onnx_path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The sequential ONNX network as Keras layers (NHWC) and their weights: conv kernels HWIO, depthwise
    HWC1, Gemm ``[in, out]``; explicit padding where ONNX's is not TensorFlow's SAME (stride 2 on an even
    size pads 1 and 1 in ONNX, 0 and 1 in SAME). Only the operators of these two fixtures are known."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(onnx_path))
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise ValueError(f"{onnx_path.name}: this bench builds Keras networks of NCHW inputs, not of rank {len(dims)}")
    _, channels, height, width = dims
    layers: list[dict[str, Any]] = []
    arrays: dict[str, np.ndarray] = {}
    size = [height, width]
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        layers += _keras_layers(node, attrs, constants, arrays, size, layers)
    return {"input_shape": [height, width, channels], "layers": layers}, arrays


def _keras_layers(
    node: Any, attrs: dict, constants: dict, arrays: dict, size: list[int], layers: list[dict]
) -> list[dict[str, Any]]:
    """The Keras layers of one ONNX node (``size``, the current height and width, is updated)."""
    op = node.op_type
    if op == "Conv":
        return _keras_conv(node, attrs, constants, arrays, size)
    if op == "Gemm":
        matrix = constants[node.input[1]]
        arrays[f"{node.output[0]}.kernel"] = matrix.T if attrs.get("transB", 0) else matrix
        arrays[f"{node.output[0]}.bias"] = constants[node.input[2]]
        return [{"op": "dense", "weights": f"{node.output[0]}.kernel", "bias": f"{node.output[0]}.bias"}]
    if op == "Mul":
        return [{"op": "rescale", "scale": float(constants[node.input[1]].reshape(-1)[0]), "offset": 0.0}]
    if op == "Add" and layers and layers[-1]["op"] == "rescale":
        layers[-1]["offset"] = float(constants[node.input[1]].reshape(-1)[0])
        return []
    if op == "Clip":
        low, high = (float(constants[n].reshape(-1)[0]) for n in node.input[1:3])
        return [{"op": "relu6" if (low, high) == (0.0, 6.0) else "unknown Clip"}]
    if op == "MaxPool":
        kernel, stride = attrs["kernel_shape"][0], attrs.get("strides", [1])[0]
        size[:] = [(s - kernel) // stride + 1 for s in size]
        return [{"op": "maxpool", "size": kernel, "stride": stride}]
    if op == "Flatten" and layers and layers[-1]["op"] == "gap":
        return []  # Keras' global pooling is [N, C] already
    simple = {"Relu": "relu", "GlobalAveragePool": "gap", "Softmax": "softmax"}
    if op not in simple:
        raise ValueError(f"{op} has no Keras layer in this bench (it knows only its two fixtures)")
    return [{"op": simple[op]}]


def _keras_conv(node: Any, attrs: dict, constants: dict, arrays: dict, size: list[int]) -> list[dict[str, Any]]:
    from edgekit.build.tflite.graph import same_padding

    weight = constants[node.input[1]]
    kernel, stride = weight.shape[-1], attrs.get("strides", [1, 1])[0]
    depthwise = attrs.get("group", 1) > 1
    pads = attrs.get("pads", [0, 0, 0, 0])
    pairs = [(pads[0], pads[2]), (pads[1], pads[3])]
    layers: list[dict[str, Any]] = []
    padding = "valid"
    if pairs == [same_padding(s, kernel, stride) for s in size]:
        padding = "same"
    elif any(pads):
        layers.append({"op": "pad", "pads": pairs})
        size[:] = [s + sum(p) for s, p in zip(size, pairs, strict=True)]
    name = node.output[0]
    arrays[f"{name}.kernel"] = weight.transpose(2, 3, 0, 1) if depthwise else weight.transpose(2, 3, 1, 0)
    arrays[f"{name}.bias"] = constants[node.input[2]]
    layers.append(
        {"op": "conv", "weights": f"{name}.kernel", "bias": f"{name}.bias", "stride": stride}
        | {"padding": padding, "depthwise": depthwise}
    )
    size[:] = [-(-s // stride) if padding == "same" else (s - kernel) // stride + 1 for s in size]
    return layers


# -- the fixtures ---------------------------------------------------------------------------------
@dataclass
class Network:
    """A fixture as this bench uses it: NCHW calibration and held-out tensors, onnxruntime's probabilities."""

    name: str
    onnx: Path
    calibration: np.ndarray
    test: np.ndarray
    reference: np.ndarray
    work: Path

    @property
    def calibration_npz(self) -> Path:
        return self.work / "calibration.npz"

    def nhwc(self, X: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(X.transpose(0, 2, 3, 1), dtype=np.float32)


def fixtures(directory: Path) -> dict[str, dict[str, Any]]:
    """Both fixtures, reused from ``directory/fixtures.json`` when made there before."""
    from edgekit.local.tensor_fixtures import make_kws_cnn, make_mobilenet96

    index = directory / "fixtures.json"
    if index.exists():
        return json.loads(index.read_text())
    made = {"mobilenet96": make_mobilenet96(directory / "mobilenet96"), "kws_cnn": make_kws_cnn(directory / "kws")}
    index.write_text(json.dumps(made, indent=1))
    return made


def calibration_rows(name: str, paths: dict[str, Any]) -> np.ndarray:
    """The rows both converters calibrate on: the kws training tensors, or the 96x96 network's training
    crops through its preprocessing (as the fixture made its test tensors, as ``--calibration <folder>``)."""
    if name == "kws_cnn":
        return np.load(paths["train"])["X"]
    from device_agent.preprocess import Preprocess
    from device_agent.tensors import TensorSpec
    from edgekit.local.tensor_fixtures import MOBILENET_IMAGE

    spec = TensorSpec("x", "float32", (None, 3, 96, 96), "NCHW", "image")
    items = [p.read_bytes() for p in sorted(Path(paths["train_images"]).glob("*.jpg"))]
    return Preprocess.from_dict({"image": MOBILENET_IMAGE}, spec).batch(items)


def reference(onnx_path: Path, X: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: X.astype(np.float32)})[0]


def network(name: str, paths: dict[str, Any], work: Path) -> Network:
    work.mkdir(parents=True, exist_ok=True)
    onnx_path = Path(paths["model"])
    calibration = calibration_rows(name, paths).astype(np.float32)
    test = np.load(paths["test"])["X"].astype(np.float32)
    net = Network(name, onnx_path, calibration, test, reference(onnx_path, test), work)
    np.savez(net.calibration_npz, X=calibration)
    return net


# -- converting -----------------------------------------------------------------------------------
class StageClock:
    """A ``Progress`` that notes when each stage starts and advances: convert_model's own timeline."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []

    def start(self, total: int, label: str) -> None:
        self.marks.append((label, time.perf_counter()))

    def advance(self, steps: int = 1) -> None:
        self.marks.append(("advance", time.perf_counter()))

    def finish(self) -> None:
        self.marks.append(("finish", time.perf_counter()))

    def steps_after(self, label: str) -> list[float]:
        """Seconds of each step from the start of stage ``label`` to the next finish."""
        at = next((i for i, (name, _) in enumerate(self.marks) if name == label), None)
        if at is None:
            return []
        end = next((i for i in range(at, len(self.marks)) if self.marks[i][0] == "finish"), len(self.marks) - 1)
        return [self.marks[i + 1][1] - self.marks[i][1] for i in range(at, end)]


def convert_edgekit(net: Network) -> dict[str, Any]:
    """edgekit's float32 and int8 files, each timed. The int8 wall includes convert's own checks (both files
    scored against onnxruntime on the calibration rows, then timed): ``int8_stage_seconds`` splits it."""
    from edgekit.build.convert import QuantizeOptions, convert_model

    result: dict[str, Any] = {"files": {}}
    for precision in ("float32", "int8"):
        out, clock = net.work / f"edgekit_{precision}.tflite", StageClock()
        options = {"quantize": QuantizeOptions(force=True), "calibration": str(net.calibration_npz)}
        start = time.perf_counter()
        convert_model(
            str(net.onnx), str(out), target_format="tflite", progress=clock, **(options if precision == "int8" else {})
        )
        result[f"{precision}_seconds"] = time.perf_counter() - start
        if precision == "int8":  # convert's three stages: write both files, score them, time them
            steps = clock.steps_after("building .tflite") + [None] * 3
            result["int8_stage_seconds"] = dict(zip(("write", "score", "time"), steps[:3], strict=True))
            result["int8_calibration_seconds"] = calibration_seconds(net, Path(result["files"]["float32"]))
        result["files"][precision] = str(out)
    return result


def calibration_seconds(net: Network, float_file: Path) -> float:
    """How long edgekit's calibration pass takes alone: the float .tflite run over the calibration rows with
    every tensor kept, so without XNNPACK (``tensor_export.calibrated_ranges``)."""
    import onnx

    from edgekit.build.tflite.onnx_ops import graph_from_onnx
    from edgekit.build.tflite.tensor_export import calibrated_ranges, to_tflite_layout

    graph = graph_from_onnx(onnx.load(str(net.onnx)), ["probabilities"], source=str(net.onnx))
    X = to_tflite_layout(net.calibration, graph)
    start = time.perf_counter()
    calibrated_ranges(float_file.read_bytes(), graph, X)
    return time.perf_counter() - start


def convert_tensorflow(python: Path, net: Network) -> dict[str, Any]:
    """TFLiteConverter in the peer venv, from the Keras network (the helper's own timings, and its wall)."""
    spec, arrays = keras_spec(net.onnx)
    work = net.work / "tensorflow"
    work.mkdir(exist_ok=True)
    (work / "keras.json").write_text(json.dumps(spec))
    arrays |= {"calibration": net.nhwc(net.calibration), "test": net.nhwc(net.test), "reference": net.reference}
    np.savez(work / "keras.npz", **arrays)
    helper = work / "helper.py"
    helper.write_text(PEER_HELPER)
    start = time.perf_counter()
    done = subprocess.run([str(python), str(helper), str(work)], capture_output=True, text=True, env=_quiet_env())
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"error": done.stderr[-2000:], "wall_seconds": wall}
    result = json.loads((work / "tf.json").read_text())
    files = {p: str(work / f"tf_{p}.tflite") for p in ("float32", "int8")}
    return {**result, "wall_seconds": wall, "files": files}


def convert_onnx2tf(python: Path, net: Network) -> dict[str, Any]:
    """onnx2tf's CLI: a float run (it writes float32 and float16) and an -oiqt run (every int8 variant,
    calibrated with ``-cind`` on the same rows), each timed as a whole process."""
    onnx2tf = python.parent / "onnx2tf"
    np.save(net.work / "calibration_nhwc.npy", net.nhwc(net.calibration))
    name = net.onnx.stem
    runs = {
        "float32": ([], f"float/{name}_float32.tflite"),
        "int8": (["-oiqt", "-cind", "x", str(net.work / "calibration_nhwc.npy"), "[[[[0.]]]]", "[[[[1.]]]]"],
                 f"int8/{name}_integer_quant.tflite"),
    }  # fmt: skip
    result: dict[str, Any] = {"files": {}}
    for precision, (extra, file) in runs.items():
        out = net.work / "onnx2tf" / file.split("/")[0]
        command = [str(onnx2tf), "-i", str(net.onnx), "-o", str(out), *extra]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=_quiet_env())
        result[f"{precision}_seconds"] = time.perf_counter() - start
        if done.returncode != 0 or not (net.work / "onnx2tf" / file).exists():
            result[f"{precision}_error"] = (done.stdout + done.stderr)[-2000:]
            continue
        result["files"][precision] = str(net.work / "onnx2tf" / file)
    full = net.work / "onnx2tf" / "int8" / f"{name}_full_integer_quant.tflite"
    result["full_integer_int8_io_bytes"] = full.stat().st_size if full.exists() else None
    return result


def _quiet_env() -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}


# -- measuring under LiteRT -----------------------------------------------------------------------
@dataclass
class Loaded:
    """One .tflite in an interpreter sized for ``batch``: where its input goes and its probabilities come out."""

    interpreter: Any
    entry: int
    output: int

    def __call__(self, X: np.ndarray) -> None:
        self.interpreter.set_tensor(self.entry, X)
        self.interpreter.invoke()


def load(data: bytes, *, threads: int, batch: int, classes: int, xnnpack: bool = True) -> Loaded:
    from ai_edge_litert import interpreter as litert

    resolver = litert.OpResolverType.AUTO if xnnpack else litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interpreter = litert.Interpreter(model_content=data, num_threads=threads, experimental_op_resolver_type=resolver)
    entry = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(entry["index"], [batch, *entry["shape"][1:]])
    interpreter.allocate_tensors()
    outputs = interpreter.get_output_details()
    scores = next(o for o in outputs if o["dtype"] == np.float32 and o["shape"][-1] == classes)
    return Loaded(interpreter, entry["index"], scores["index"])


def batches_of(X: np.ndarray, batch: int) -> list[np.ndarray]:
    return [X[i : i + batch] for i in range(0, len(X) - batch + 1, batch)]


def latencies(files: dict[str, bytes], net: Network, *, threads: int, batch: int, timing: Timing, xnnpack=True):
    """p50 ms of each file at this batch size and thread count, the files' calls interleaved."""
    classes = net.reference.shape[1]
    loaded = {k: load(v, threads=threads, batch=batch, classes=classes, xnnpack=xnnpack) for k, v in files.items()}
    inputs = batches_of(net.nhwc(net.test), batch)
    n = len(inputs)
    calls = {k: (lambda i, run=run: run(inputs[i % n])) for k, run in loaded.items()}
    return {k: p50_us(v) / 1e3 for k, v in interleaved(calls, timing).items()}


def agreement(data: bytes, net: Network) -> float:
    """Top-1 agreement with onnxruntime's float32 on the held-out tensors."""
    X = net.nhwc(net.test)
    run = load(data, threads=1, batch=len(X), classes=net.reference.shape[1])
    run(X)
    got = run.interpreter.get_tensor(run.output)
    return float(np.mean(got.argmax(axis=1) == net.reference.argmax(axis=1)))


def describe(data: bytes) -> dict[str, Any]:
    """What a .tflite is made of: its ops, constant bytes by type, metadata, and how weights are quantized."""
    from ai_edge_litert import schema_py_generated as s

    model = s.ModelT.InitFromPackedBuf(data, 0)
    ops_named = {v: k for k, v in vars(s.BuiltinOperator).items() if not k.startswith("_")}
    typed = {v: k for k, v in vars(s.TensorType).items() if not k.startswith("_")}
    graph = model.subgraphs[0]
    size = [0 if b.data is None else len(b.data) for b in model.buffers]
    constant = Counter()
    for tensor in graph.tensors:
        constant[typed[tensor.type]] += size[tensor.buffer]
    metadata = sum(size[m.buffer] for m in model.metadata or [])
    ops, weighted = Counter(), Counter()
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        kind = ops_named[max(code.builtinCode, code.deprecatedBuiltinCode)]
        ops[kind] += 1
        if kind in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            weighted[_weighted_signature(kind, op, graph.tensors, typed)] += 1
    return {
        "bytes": len(data),
        "unshared_bytes": _unshared_size(model),
        "ops": dict(ops),
        "constant_bytes": dict(constant),
        "metadata_bytes": metadata,
        "other_bytes": len(data) - sum(size),  # tables, tensor names, quantization parameters, alignment
        "tensor_name_bytes": sum(len(t.name or b"") for t in graph.tensors),
        "signatures": len(model.signatureDefs or []),
        "weighted_ops": dict(weighted),
        "io": [typed[graph.tensors[i].type] for i in graph.inputs]
        + [typed[graph.tensors[i].type] for i in graph.outputs],
    }


def _unshared_size(model: Any) -> int:
    """The file's size packed by flatbuffers' own builder, each vector written where it is used (as
    TensorFlow's converter writes them; edgekit's writer shares identical vectors such as zero points)."""
    import flatbuffers

    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return len(builder.Output())


def _weighted_signature(kind: str, op: Any, tensors: list, typed: dict[int, str]) -> str:
    """e.g. ``CONV_2D w INT8 x32 scales, bias INT32``: the weights' type and number of scales, the bias' type."""
    weights = tensors[op.inputs[1]]
    scales = len(weights.quantization.scale) if weights.quantization and weights.quantization.scale is not None else 0
    bias = typed[tensors[op.inputs[2]].type] if len(op.inputs) > 2 and op.inputs[2] >= 0 else "none"
    return f"{kind} w {typed[weights.type]} x{scales} scales, bias {bias}"


# -- one network ----------------------------------------------------------------------------------
def convert_all(net: Network, python: Path | None) -> dict[str, dict[str, Any]]:
    converted = {"edgekit": convert_edgekit(net)}
    if python is None:
        return converted
    for name, convert in (("tensorflow", convert_tensorflow), ("onnx2tf", convert_onnx2tf)):
        try:
            converted[name] = convert(python, net)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            converted[name] = {"error": f"{type(exc).__name__}: {exc}", "files": {}}
    return converted


def bench_network(net: Network, python: Path | None, plan: Plan) -> dict[str, Any]:
    converted = convert_all(net, python)
    files = {
        f"{converter} {precision}": Path(path).read_bytes()
        for converter, result in converted.items()
        for precision, path in result.get("files", {}).items()
    }
    timed = files | ({CONTROL: files["tensorflow int8"]} if "tensorflow int8" in files else {})
    timings = {
        f"b{batch} t{threads}": latencies(timed, net, threads=threads, batch=batch, timing=plan.timing(batch))
        for batch in plan.batches
        for threads in plan.threads
    }
    pair = {k: files[k] for k in ("edgekit int8", "tensorflow int8") if k in files}
    without_xnnpack = {
        f"b{batch} t1": latencies(pair, net, threads=1, batch=batch, timing=plan.no_xnnpack, xnnpack=False)
        for batch in plan.batches
    }
    return {
        "network": net.name,
        "test_rows": len(net.test),
        "calibration_rows": len(net.calibration),
        "converted": {k: {n: v for n, v in r.items() if n != "files"} for k, r in converted.items()},
        "files": {name: {"agreement": agreement(data, net), **describe(data)} for name, data in files.items()},
        "p50_ms": timings,
        "p50_ms_without_xnnpack": without_xnnpack,
    }


def convert_seconds(result: dict[str, Any], name: str) -> float | None:
    converter, precision = name.split()
    return result["converted"].get(converter, {}).get(f"{precision}_seconds")


# -- the report -----------------------------------------------------------------------------------
def print_table(results: list[dict[str, Any]]) -> None:
    """One row per (network, converter, precision): size, p50 ms per setting, agreement, convert seconds."""
    settings = list(results[0]["p50_ms"])
    head = f"{'network':<12} {'file':<17} {'KiB':>7} " + " ".join(f"{s:>9}" for s in settings)
    print(head + f" {'top-1 agr':>9} {'convert s':>9}")
    for result in results:
        for converter, precision in FILES:
            name = f"{converter} {precision}"
            if name not in result["files"]:
                print(f"{result['network']:<12} {name:<17} {'(failed: see converted.' + converter + ')':>30}")
                continue
            file = result["files"][name]
            times = " ".join(f"{result['p50_ms'][s][name]:9.3f}" for s in settings)
            seconds = convert_seconds(result, name)
            shown = "n/a" if seconds is None else f"{seconds:.1f}"
            size = f"{file['bytes'] / 1024:7.1f}"
            print(f"{result['network']:<12} {name:<17} {size} {times} {file['agreement']:9.3f} {shown:>9}")
    print("(p50 ms under LiteRT with XNNPACK, b = batch, t = threads; agreement: top-1 with onnxruntime float32)")


def network_checks(result: dict[str, Any]) -> list[Check]:
    net, files = result["network"], result["files"]
    ours, theirs = files.get("edgekit int8"), files.get("tensorflow int8")
    checks: list[Check] = []
    if ours is None or theirs is None:
        return [(f"{net}: int8 edgekit / TensorFlow", None, "both files", False)]
    size = ours["bytes"] / theirs["bytes"]
    checks.append((f"{net}: int8 file size, edgekit / TensorFlow", size, "≤ 1", size <= TARGETS["int8_size_ratio_max"]))
    limit = TARGETS["int8_latency_ratio_max"]
    for setting, times in result["p50_ms"].items():
        ratio = times["edgekit int8"] / times["tensorflow int8"]
        checks.append((f"{net}: int8 p50 {setting}, edgekit / TensorFlow", ratio, f"≤ {limit:g}", ratio <= limit))
    for setting, times in result["p50_ms"].items():
        ratio = times[CONTROL] / times["tensorflow int8"]
        checks.append((f"{net}:   noise floor: TensorFlow's int8 file / itself, {setting}", ratio, "info", True))
    for setting, times in result["p50_ms_without_xnnpack"].items():
        ratio = times["edgekit int8"] / times["tensorflow int8"]
        checks.append((f"{net}:   same without XNNPACK (LiteRT's kernels), {setting}", ratio, "info", True))
    drop = theirs["agreement"] - ours["agreement"]
    checks.append(
        (f"{net}: int8 top-1 agreement, TensorFlow - edgekit", drop, "≤ 0", drop <= TARGETS["agreement_drop_max"])
    )
    seconds = result["converted"]["edgekit"]["int8_seconds"]
    limit = TARGETS["edgekit_convert_seconds_max"]
    checks.append((f"{net}: edgekit int8 convert wall s (no TensorFlow)", seconds, f"≤ {limit:g}", seconds <= limit))
    stages = result["converted"]["edgekit"]["int8_stage_seconds"]
    checks.append((f"{net}:   of which writing both files (calibration included)", stages["write"], "info", True))
    calibration = result["converted"]["edgekit"]["int8_calibration_seconds"]
    checks.append((f"{net}:     the calibration pass alone (LiteRT, no XNNPACK)", calibration, "info", True))
    checks.append((f"{net}:   of which scoring them on the calibration rows", stages["score"], "info", True))
    checks.append((f"{net}:   of which timing them (convert's latency check)", stages["time"], "info", True))
    return checks + _peer_info(result)


def _peer_info(result: dict[str, Any]) -> list[Check]:
    net, files, checks = result["network"], result["files"], []
    if "edgekit float32" in files and "tensorflow float32" in files:
        size = files["edgekit float32"]["bytes"] / files["tensorflow float32"]["bytes"]
        checks.append((f"{net}: float32 file size, edgekit / TensorFlow", size, "info", True))
        for setting, times in result["p50_ms"].items():
            ratio = times["edgekit float32"] / times["tensorflow float32"]
            checks.append((f"{net}: float32 p50 {setting}, edgekit / TensorFlow", ratio, "info", True))
    if "edgekit int8" in files and "onnx2tf int8" in files:
        size = files["edgekit int8"]["bytes"] / files["onnx2tf int8"]["bytes"]
        checks.append((f"{net}: int8 file size, edgekit / onnx2tf", size, "info", True))
        times = result["p50_ms"]["b1 t1"]
        ratio = times["edgekit int8"] / times["onnx2tf int8"]
        checks.append((f"{net}: int8 p50 b1 t1, edgekit / onnx2tf", ratio, "info", True))
    tf = result["converted"].get("tensorflow", {})
    if "keras_max_abs_diff" in tf:
        checks.append((f"{net}: Keras rebuild, max |Δp| against onnxruntime", tf["keras_max_abs_diff"], "info", True))
        checks.append(
            (f"{net}: TensorFlow helper wall s (import, Keras, both converts)", tf["wall_seconds"], "info", True)
        )
    return checks


def file_differences(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    """Where edgekit's int8 file and TensorFlow's differ: bytes by part, ops, how weights are quantized."""
    parts = []
    for key in sorted(set(ours["constant_bytes"]) | set(theirs["constant_bytes"])):
        a, b = ours["constant_bytes"].get(key, 0), theirs["constant_bytes"].get(key, 0)
        if a != b:
            parts.append(f"{key} constants {a - b:+d} B")
    for key in ("metadata_bytes", "other_bytes", "tensor_name_bytes"):
        if ours[key] != theirs[key]:
            parts.append(f"{key.removesuffix('_bytes')} {ours[key] - theirs[key]:+d} B")
    ops = Counter(ours["ops"])
    ops.subtract(theirs["ops"])
    changed = ", ".join(f"{k} {v:+d}" for k, v in sorted(ops.items()) if v)
    weighted = set(ours["weighted_ops"]) ^ set(theirs["weighted_ops"])
    total = ours["bytes"] - theirs["bytes"]
    text = f"edgekit - TensorFlow, int8: {total:+d} B in all ({'; '.join(parts) or 'same parts'})"
    unshared = ours["unshared_bytes"] - theirs["unshared_bytes"]
    text += f"; {unshared:+d} B with every vector written where it is used (flatbuffers' plain packing)"
    text += f"; ops {changed or 'the same'}"
    if weighted:
        text += f"; weighted ops edgekit {ours['weighted_ops']} vs TensorFlow {theirs['weighted_ops']}"
    return text + f"; I/O edgekit {ours['io']} vs TensorFlow {theirs['io']}"


def speed_note(result: dict[str, Any]) -> str:
    def ratios(block: dict[str, dict[str, float]]) -> str:
        return ", ".join(f"{s} {t['edgekit int8'] / t['tensorflow int8']:.2f}x" for s, t in block.items())

    return (
        f"int8 p50 edgekit / TensorFlow with XNNPACK: {ratios(result['p50_ms'])}; "
        f"LiteRT's own kernels (no delegate): {ratios(result['p50_ms_without_xnnpack'])}"
    )


def notes(results: list[dict[str, Any]]) -> list[str]:
    found = []
    for result in results:
        files = result["files"]
        if "edgekit int8" not in files or "tensorflow int8" not in files:
            found.append(f"{result['network']}: no TensorFlow int8 file to compare with")
            continue
        found.append(f"{result['network']}: {file_differences(files['edgekit int8'], files['tensorflow int8'])}")
        found.append(f"{result['network']}: {speed_note(result)}")
    return found


def machine(peer: dict[str, str]) -> dict[str, Any]:
    import ai_edge_litert
    import onnxruntime

    return {
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "ai_edge_litert": getattr(ai_edge_litert, "__version__", "?"),
        "onnxruntime": onnxruntime.__version__,
        "peer": peer,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = QUICK if args.quick else FULL
    python = None if args.no_peers else peer_venv(Path(args.peer_venv).expanduser())
    before = machine(peer_versions(python) if python else {})
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-peers-") as tmp:
        work = Path(tmp)
        made = fixtures(Path(args.data) if args.data else work / "fixtures")
        results = [bench_network(network(name, made[name], work / name), python, plan) for name in NETWORKS]
    return {
        "machine": {**before, "load_average_after": os.getloadavg()},
        "plan": asdict(plan),
        "quick": args.quick,
        "choices": {
            "int8_io": "float32 in and out for every int8 file (QUANTIZE/DEQUANTIZE inside), as edgekit writes it",
            "onnx2tf_int8_file": "*_integer_quant.tflite (float I/O); its int8-I/O file's size is in converted",
            "tensorflow_int8": "from_keras_model, Optimize.DEFAULT, TFLITE_BUILTINS_INT8, a calibration row per step",
        },
        "networks": results,
        "notes": notes(results),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--json", "--out", dest="json", default="/tmp/bench_tflite_peers.json", help="where the JSON goes"
    )
    parser.add_argument("--data", help="reuse the two fixtures in this directory (made there when absent)")
    parser.add_argument(
        "--peer-venv", default=str(DEFAULT_PEER_VENV), help="the TensorFlow/onnx2tf venv (made if missing)"
    )
    parser.add_argument("--no-peers", action="store_true", help="edgekit's files only (no TensorFlow venv)")
    parser.add_argument("--quick", action="store_true", help="few calls: a smoke test, not figures")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = run(args)
    print()
    print_table(results["networks"])
    checks = [c for r in results["networks"] for c in network_checks(r)]
    print()
    print_checks(checks)
    print("\nnotes:\n" + "\n".join(f"- {n}" for n in results["notes"]))
    results["seconds"] = time.perf_counter() - started
    print_run(results, quick=args.quick)
    write_json(args.json, checks, targets=TARGETS, **results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
