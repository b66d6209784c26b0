#!/usr/bin/env python3
"""Measure the tensor-model figures (issue 15); print one table and write JSON.

1. The MobileNet-class 96x96x3 network (``make_mobilenet96``) through the real ``convert_model`` with
   ``--quantize int8 --calibration <train JPEGs> --preprocess <toml> --eval <test npz>``: what the
   search chose and why (forced to static QDQ per-channel only when it chose otherwise), then the
   int8 model against the float32 one convert writes: batch-1 latency, file size, top-1 agreement on
   the held-out crops (and, as info, on fresh crops of the sample photographs).
2. The digits CNN (``make_digits_cnn``) quantized with ``--force`` (int8 is slower on a net this
   small): its accuracy drop in points, and its speed.
3. The tensor sketch: ``TensorSignals.rows`` (with the embedding) and ``Profile.update_inputs`` on the
   baseline ``edgekit package`` built (``tensor_baseline``), per image, against the network's fp32
   inference, at batch 1 and 16.
4. A real agent serving the packaged network over loopback HTTP (127.0.0.1:0): v2 infer with binary
   tensors (``tritonclient.http``, binary in and out) against a bare ``session.run`` of the same model
   file, fp32 and int8; v2 with JSON data; v1 ``{"instances": [{"b64": JPEG}]}`` against a bare
   decode + preprocess + ``session.run``. Then where the v2 round trip's extra time goes: each stage
   timed alone, interleaved with the whole, and a cProfile of the route.
5. Drift on image signals: ``drift_figures`` of ``scripts/bench_tensor_drift.py``.

All timing is in this process with one onnxruntime intra-op thread and one BLAS thread; speed is
reported as ratios to a bare baseline measured in the same run, calls interleaved (``interleaved`` of
``bench_tabular.py``), because the machines this runs on are shared and noisy. ``--quick`` is a smoke
test, not figures: the digits CNN plays the image network's part, one int8 configuration is tried,
few calls and drift windows.

    python scripts/bench_tensor.py [--json bench-results/bench_tensor.json] [--data DIR] [--quick]
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"  # before numpy is imported: one BLAS thread, as onnxruntime gets one

import argparse
import base64
import cProfile
import http.client
import json
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_report import Check, print_checks, write_json
from bench_tabular import Timing, bare_session, interleaved, machine, op_shares, p50_us
from bench_tensor_drift import drift_figures

from device_agent import Agent
from device_agent import v2 as v2_routes
from device_agent import v2_codec
from device_agent.config import load_config
from device_agent.preprocess import Preprocess
from device_agent.server import route as agent_route
from device_agent.signing import load_public_key
from device_agent.state import StateDir
from device_agent.wsgi import Request
from edgekit.build.convert import QuantizeOptions, convert_model
from edgekit.bundle.keys import generate_keypair
from edgekit.bundle.package import build_bundle
from edgekit.local.tensor_fixtures import make_digits_cnn, make_mobilenet96, sample_image_crops

TARGETS = {
    "int8_speedup_min": 2.0,
    "int8_size_ratio_max": 0.27,
    "int8_agreement_min": 0.99,
    "digits_drop_points_max": 0.5,
    "sketch_share_max": 0.10,
    "v2_ratio_max": 1.3,
    "false_alarm_max": 0.01,
    "detection_min": 0.95,
}
PER_CHANNEL = QuantizeOptions(mode="static", per_channel=True, activation_type="int8")


@dataclass(frozen=True)
class Plan:
    """How each comparison is timed, and how much data the side figures use."""

    quant_b1: Timing
    quant_b16: Timing
    sketch_b1: Timing
    sketch_b16: Timing
    http: Timing
    stages: Timing
    profile_calls: int
    fresh_crops: int
    drift: dict[str, int] = field(default_factory=dict)
    full_search: bool = True  # every int8 configuration, as `edgekit convert --quantize int8` tries them


FULL = Plan(
    quant_b1=Timing(rounds=40, block=10),
    quant_b16=Timing(rounds=12, block=3),
    sketch_b1=Timing(rounds=40, block=10),
    sketch_b16=Timing(rounds=12, block=3),
    http=Timing(rounds=30, block=10),
    stages=Timing(rounds=30, block=10),
    profile_calls=300,
    fresh_crops=1000,
    drift={"windows": 200},
)
QUICK = Plan(
    quant_b1=Timing(rounds=2, block=3),
    quant_b16=Timing(rounds=1, block=2),
    sketch_b1=Timing(rounds=2, block=3),
    sketch_b16=Timing(rounds=1, block=2),
    http=Timing(rounds=2, block=3),
    stages=Timing(rounds=2, block=3),
    profile_calls=10,
    fresh_crops=20,
    drift={"windows": 2, "window_images": 40, "baseline_images": 200},
    full_search=False,
)


# -- fixtures and models --------------------------------------------------------------------------
def prepare(directory: Path, quick: bool) -> dict[str, dict[str, Any]]:
    """The two fixtures (reused from ``directory/fixtures.json`` when made there before); in a quick run
    the digits CNN stands in for the 96x96 network (its PNG folder as both image folders)."""
    index = directory / "fixtures.json"
    if index.exists():
        made = json.loads(index.read_text())
    else:
        made = {"digits": make_digits_cnn(directory / "digits")}
        if not quick:
            made["mobilenet96"] = make_mobilenet96(directory / "mobilenet96")
        directory.mkdir(parents=True, exist_ok=True)
        index.write_text(json.dumps(made, indent=1))
    digits = made["digits"]
    image = made.get("mobilenet96") if not quick else None
    if image is None:
        image = {**digits, "train_images": digits["images"], "test_images": digits["images"], "name": "digits_cnn"}
    return {"image": {"name": "mobilenet96", **image}, "digits": digits}


def convert_pair(fixture: dict[str, Any], work: Path, stem: str, options: QuantizeOptions, calibration: str) -> dict:
    """float32 as ``edgekit convert`` writes it, and the int8 model its search chooses."""
    fp32, int8 = work / f"{stem}.fp32.onnx", work / f"{stem}.int8.onnx"
    preprocess = fixture.get("preprocess") if calibration == fixture.get("train_images") else None
    convert_model(fixture["model"], str(fp32), preprocess=preprocess)
    start = time.perf_counter()
    outcome = convert_model(
        fixture["model"],
        str(int8),
        quantize=options,
        calibration=calibration,
        evaluation=fixture["test"],
        preprocess=preprocess,
    )
    return {"fp32": fp32, "int8": int8, "search": search_summary(outcome, time.perf_counter() - start)}


def search_summary(outcome: Any, seconds: float) -> dict[str, Any]:
    doc = outcome.search.to_dict()
    chosen = outcome.search.chosen.config
    return {
        "chosen": doc["chosen"],
        "static_per_channel": bool(chosen and chosen.mode == "static" and chosen.per_channel),
        "verdict": doc["verdict"],
        "passed": doc["passed"],
        "seconds": round(seconds, 1),
        "trials": [
            {k: t[k] for k in ("name", "size_ratio", "accuracy_drop", "agreement", "speedup", "note", "error")}
            for t in doc["trials"]
        ],
    }


def quantize_image_net(fixture: dict[str, Any], work: Path, plan: Plan) -> dict[str, Any]:
    """The search as ``edgekit convert --quantize int8`` runs it; forced to static QDQ per-channel only
    when it chose something else (both verdicts are kept)."""
    options = QuantizeOptions() if plan.full_search else PER_CHANNEL
    models = convert_pair(fixture, work, "image", options, fixture["train_images"])
    models["forced"] = not models["search"]["static_per_channel"]
    if models["forced"]:
        unforced = models["search"]
        forced = QuantizeOptions(mode="static", per_channel=True, force=True)
        models = {**convert_pair(fixture, work, "image", forced, fixture["train_images"]), "forced": True}
        models["search_unforced"] = unforced
    return models


def sessions(models: dict[str, Any]) -> dict[str, Any]:
    return {kind: bare_session(Path(models[kind]).read_bytes()) for kind in ("fp32", "int8")}


def input_name(session: Any) -> str:
    return session.get_inputs()[0].name


def probabilities(session: Any, X: np.ndarray, batch: int = 64) -> np.ndarray:
    names = [o.name for o in session.get_outputs()]
    wanted = ["probabilities" if "probabilities" in names else names[0]]
    name = input_name(session)
    return np.concatenate([session.run(wanted, {name: X[i : i + batch]})[0] for i in range(0, len(X), batch)])


def image_spec(session: Any, X: np.ndarray) -> Any:
    from device_agent.tensors import TensorSpec

    return TensorSpec(input_name(session), "float32", (None, *X.shape[1:]), "NCHW", "image")


# -- 1. int8 against float32 ----------------------------------------------------------------------
def quant_figures(models: dict[str, Any], fixture: dict[str, Any], plan: Plan) -> dict[str, Any]:
    run = sessions(models)
    name, X = input_name(run["fp32"]), np.load(fixture["test"])["X"]
    n, singles = len(X), [X[i : i + 1] for i in range(len(X))]
    b1 = interleaved({k: (lambda i, s=s: s.run(None, {name: singles[i % n]})) for k, s in run.items()}, plan.quant_b1)
    b16_batch = np.ascontiguousarray(np.resize(X, (16, *X.shape[1:])))
    b16 = interleaved({k: (lambda i, s=s: s.run(None, {name: b16_batch})) for k, s in run.items()}, plan.quant_b16)
    us1, us16 = ({k: p50_us(v) for k, v in t.items()} for t in (b1, b16))
    sizes = {k: Path(models[k]).stat().st_size for k in ("fp32", "int8")}
    fresh = fresh_crops(fixture, run["fp32"], X, plan.fresh_crops)
    return {
        "model": fixture["name"],
        "search": models["search"],
        "forced": models["forced"],
        "search_unforced": models.get("search_unforced"),
        **{f"{k}_bytes": v for k, v in sizes.items()},
        "size_ratio": sizes["int8"] / sizes["fp32"],
        "size_breakdown": size_breakdown(Path(models["int8"])),
        **{f"b1_{k}_us": v for k, v in us1.items()},
        **{f"b16_{k}_us": v for k, v in us16.items()},
        "b1_speedup": us1["fp32"] / us1["int8"],
        "b16_speedup": us16["fp32"] / us16["int8"],
        "held_out": n,
        "agreement": agreement(run, X),
        "fresh_crops": len(fresh),
        "fresh_agreement": agreement(run, fresh),
        "op_shares": {k: op_shares(Path(models[k]).read_bytes(), {name: singles[0]}) for k in run},
    }


def agreement(run: dict[str, Any], X: np.ndarray) -> float:
    """Top-1 agreement of int8 with float32."""
    return float(np.mean(probabilities(run["fp32"], X).argmax(1) == probabilities(run["int8"], X).argmax(1)))


def fresh_crops(fixture: dict[str, Any], session: Any, X: np.ndarray, n: int) -> np.ndarray:
    """Crops the fixture never made (another seed, any place in the photographs, so no class is
    centred), through the fixture's preprocessing: top-1 agreement where the margins are small."""
    preprocess = Preprocess.from_toml(fixture["preprocess"], image_spec(session, X))
    raw = sample_image_crops(n, size=128, seed=2025)
    return np.stack([preprocess.from_array(picture) for picture in raw]).astype(np.float32)


def size_breakdown(path: Path) -> dict[str, int]:
    """Bytes of the model file by what they hold (QDQ: int8 weights and zero points, float32 scales,
    int32 biases), the metadata, and the graph's nodes, names and shapes (the rest)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    parts: dict[str, int] = {}
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        key = f"{array.dtype} initializers"
        parts[key] = parts.get(key, 0) + array.nbytes
    parts["metadata"] = sum(len(p.key) + len(p.value) for p in model.metadata_props)
    parts["graph: nodes, names, shapes"] = path.stat().st_size - sum(parts.values())
    return parts


# -- 2. the digits CNN, forced ----------------------------------------------------------------------
def digits_figures(fixture: dict[str, Any], work: Path, plan: Plan) -> dict[str, Any]:
    models = convert_pair(fixture, work, "digits", QuantizeOptions(force=True), fixture["train"])
    run = sessions(models)
    test = np.load(fixture["test"])
    X, y = test["X"], test["y"]
    accuracy = {k: float(np.mean(probabilities(s, X).argmax(1) == y)) for k, s in run.items()}
    name, n = input_name(run["fp32"]), len(X)
    singles = [X[i : i + 1] for i in range(n)]
    b1 = interleaved({k: (lambda i, s=s: s.run(None, {name: singles[i % n]})) for k, s in run.items()}, plan.quant_b1)
    us = {k: p50_us(v) for k, v in b1.items()}
    return {
        "model": "digits_cnn",
        "search": models["search"],
        "forced": True,
        "held_out": n,
        **{f"accuracy_{k}": v for k, v in accuracy.items()},
        "drop_points": (accuracy["fp32"] - accuracy["int8"]) * 100,
        **{f"b1_{k}_us": v for k, v in us.items()},
        "b1_speedup": us["fp32"] / us["int8"],
        "size_ratio": Path(models["int8"]).stat().st_size / Path(models["fp32"]).stat().st_size,
    }


# -- the packaged network, served -------------------------------------------------------------------
def package(model: Path, fixture: dict[str, Any], private: Path, out: Path, name: str) -> Path:
    """``edgekit package <model> --baseline <train images> --preprocess <toml> --labels <txt>``."""
    build_bundle(
        str(model),
        name=name,
        version=1,
        baseline_path=fixture["train_images"],
        key_path=str(private),
        output=str(out),
        preprocess=fixture["preprocess"],
        labels=fixture["labels"],
    )
    return out


def start_agent(bundle: Path, public: Path, root: Path) -> Agent:
    """A real agent (background thread and all) serving ``bundle`` over HTTP on 127.0.0.1:0, no MQTT;
    its windows never close during the run (closing one is a per-window cost, not a per-request one)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = [
        'device_id = "bench"',
        'fleet = "bench"',
        f'state_dir = "{root / "state"}"',
        "[trust]",
        f'public_key = "{public}"',
        "[monitor]",
        "window_rows = 1000000000",
        "window_seconds = 1000000",
        "[server]",
        'listen = "127.0.0.1:0"',
    ]
    (root / "agent.toml").write_text("\n".join(lines) + "\n")
    StateDir(root / "state").install(bundle, load_public_key(public))
    return Agent(load_config(root / "agent.toml")).start(mqtt=False)


class Served:
    """One agent and its clients: tritonclient for v2 and http.client for v1, each on a kept-alive connection."""

    def __init__(self, agent: Agent) -> None:
        import tritonclient.http as triton

        self.agent, self.triton_module = agent, triton
        self.port = agent.server.server_address[1]
        self.name = agent.model_info["name"]
        self.input = v2_routes.model_inputs(agent.schema)[0].name
        self.triton = triton.InferenceServerClient(url=f"127.0.0.1:{self.port}")
        self.v1 = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        names = [meta.name for meta in v2_routes.model_outputs(agent.spec)]
        self.outputs = {b: [triton.InferRequestedOutput(o, binary_data=b) for o in names] for b in (True, False)}

    def inputs(self, x: np.ndarray, binary: bool = True) -> list[Any]:
        item = self.triton_module.InferInput(self.input, list(x.shape), "FP32")
        item.set_data_from_numpy(x, binary_data=binary)
        return [item]

    def v2(self, x: np.ndarray, binary: bool = True) -> Any:
        return self.triton.infer(self.name, self.inputs(x, binary), outputs=self.outputs[binary])

    def v1_b64(self, encoded: bytes) -> dict[str, Any]:
        body = json.dumps({"instances": [{"b64": base64.b64encode(encoded).decode()}]})
        self.v1.request("POST", f"/v1/models/{self.name}:predict", body, {"Content-Type": "application/json"})
        response = self.v1.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"v1 predict answered {response.status}: {data[:200]!r}")
        return json.loads(data)

    def close(self) -> None:
        self.triton.close()
        self.v1.close()
        self.agent.stop()


# -- 3. the sketch ----------------------------------------------------------------------------------
def sketch_figures(agent: Agent, session: Any, X: np.ndarray, plan: Plan) -> dict[str, Any]:
    """Per image: ``TensorSignals.rows`` + ``Profile.update_inputs`` on the bundle's baseline (what the
    monitor does per batch, off the request path), against fp32 inference, at batch 1 and 16."""
    serving = agent.serving
    signals, window = serving.schema.tensor_signals(), serving.baseline.empty_like()
    feed, run = serving.schema.feed, serving.runtime.predict
    preds = [serving.spec.interpret(run(feed(X[i : i + 64]))) for i in range(0, len(X), 64)]
    embedding = np.concatenate([p.embedding for p in preds])
    probs = np.concatenate([p.probabilities for p in preds])
    name, n = input_name(session), len(X)

    def sketch(i: int, k: int) -> None:
        part = slice(i * k % (n - k + 1), i * k % (n - k + 1) + k)
        window.update_inputs(signals.rows(X[part], embedding[part]))

    def monitor(i: int, k: int) -> None:  # everything a window takes of an image: its signals, outputs, latency
        sketch(i, k)
        part = slice(i * k % (n - k + 1), i * k % (n - k + 1) + k)
        window.update_outputs(labels=probs[part].argmax(1), probabilities=probs[part])
        window.update_latency(np.full(k, 3.0))

    figures: dict[str, Any] = {"signals": len(signals.names), "signal_columns": signals.width}
    for k, timing in ((1, plan.sketch_b1), (16, plan.sketch_b16)):
        times = interleaved(
            {
                "infer": lambda i, k=k: session.run(None, {name: X[i * k % (n - k + 1) :][:k]}),
                "sketch": lambda i, k=k: sketch(i, k),
                "monitor": lambda i, k=k: monitor(i, k),
            },
            timing,
        )
        us = {key: p50_us(v) / k for key, v in times.items()}  # per image
        figures.update({f"b{k}_{key}_us_per_image": v for key, v in us.items()})
        figures[f"b{k}_share"] = us["sketch"] / us["infer"]
        figures[f"b{k}_monitor_share"] = us["monitor"] / us["infer"]
    figures["b16_sketch_over_b1_infer"] = figures["b16_sketch_us_per_image"] / figures["b1_infer_us_per_image"]
    return figures


# -- 4. over HTTP -----------------------------------------------------------------------------------
def encoded_items(fixture: dict[str, Any]) -> list[bytes]:
    folder = Path(fixture["test_images"])
    return [p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png")]


def http_figures(served: dict[str, Served], models: dict[str, Any], fixture: dict[str, Any], plan: Plan) -> dict:
    """Round trips over loopback against bare ``session.run`` of the same model files, interleaved."""
    run = sessions(models)
    X, items = np.load(fixture["test"])["X"], encoded_items(fixture)
    name, n, m = input_name(run["fp32"]), len(X), len(items)
    singles = [X[i : i + 1] for i in range(n)]
    preprocess = Preprocess.from_toml(fixture["preprocess"], image_spec(run["fp32"], X))
    fp32 = served["fp32"]
    calls: dict[str, Callable[[int], object]] = {
        "bare fp32": lambda i: run["fp32"].run(None, {name: singles[i % n]}),
        "v2 binary fp32": lambda i: fp32.v2(singles[i % n]),
        "v2 JSON fp32": lambda i: fp32.v2(singles[i % n], binary=False),
        "bare decode+preprocess+run fp32": lambda i: run["fp32"].run(None, {name: preprocess.batch([items[i % m]])}),
        "v1 b64 fp32": lambda i: fp32.v1_b64(items[i % m]),
    }
    if "int8" in served:
        calls["bare int8"] = lambda i: run["int8"].run(None, {name: singles[i % n]})
        calls["v2 binary int8"] = lambda i: served["int8"].v2(singles[i % n])
    us = {k: p50_us(v) for k, v in interleaved(calls, plan.http).items()}
    figures = {f"{k}_us": v for k, v in us.items()}
    figures.update(
        v2_binary_fp32_ratio=us["v2 binary fp32"] / us["bare fp32"],
        v2_json_fp32_ratio=us["v2 JSON fp32"] / us["bare fp32"],
        v1_b64_fp32_ratio=us["v1 b64 fp32"] / us["bare decode+preprocess+run fp32"],
        answers_match=answers_match(fp32, run["fp32"], X[:8]),
        request_bytes={"binary": int(X[0].nbytes), "jpeg_mean": int(np.mean([len(b) for b in items]))},
    )
    if "int8" in served:
        figures["v2_binary_int8_ratio"] = us["v2 binary int8"] / us["bare int8"]
    return figures


def answers_match(served: Served, session: Any, X: np.ndarray) -> bool:
    """The agent's v2 probabilities are the bare session's, binary and JSON (a fast wrong answer is no figure)."""
    expected = probabilities(session, X)
    got = [served.v2(X[i : i + 1], binary=b).as_numpy("probabilities")[0] for b in (True, False) for i in range(len(X))]
    return bool(np.allclose(np.stack(got), np.concatenate([expected, expected]), atol=1e-6))


@dataclass
class Canned:
    """One v2 request as tritonclient encodes it, the agent's Request for it, and the route's answer."""

    body: bytes
    headers: dict[str, str]
    request: Request
    response: Any = None


def canned(served: Served, x: np.ndarray) -> Canned:
    from tritonclient.http._utils import _get_inference_request  # what InferenceServerClient.infer calls

    body, header_length = _get_inference_request(
        inputs=served.inputs(x),
        request_id="",
        outputs=served.outputs[True],
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        custom_parameters=None,
    )
    headers = {"Inference-Header-Content-Length": str(header_length)}
    wire = {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(header_length),
        "content-length": str(len(body)),
    }
    request = Request("POST", f"/v2/models/{served.name}/infer", {}, wire, bytes(body))
    answer = Canned(bytes(body), headers, request)
    answer.response = agent_route(served.agent, served.agent.config.server, request)
    return answer
