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
   decode + preprocess + ``session.run``. Then where a round trip's time goes: real v2 and v1 requests
   with each part stamped where it runs in the server (``Timeline``: the functions the route calls are
   wrapped), each stage of the v2 route timed alone and warm, what JSON data costs, and a cProfile.
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
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_report import Check, print_checks, print_run, write_json
from bench_tabular import Timing, bare_session, interleaved, machine, op_shares, p50_us
from bench_tensor_drift import drift_figures

from device_agent import Agent, v2_codec
from device_agent import v2 as v2_routes
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
    timeline_calls: int
    json: Timing
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
    timeline_calls=400,
    json=Timing(rounds=10, block=3),
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
    timeline_calls=10,
    json=Timing(rounds=1, block=2),
    fresh_crops=20,
    drift={"windows": 2, "window_images": 40, "baseline_images": 200},
    full_search=False,
)


# -- fixtures and models --------------------------------------------------------------------------
def prepare(directory: Path, quick: bool) -> dict[str, dict[str, Any]]:
    """The two fixtures (reused from ``directory/fixtures.json`` when made there before); in a quick run
    the digits CNN stands in for the 96x96 network (its PNG folder as both image folders)."""
    index = directory / "fixtures.json"
    made = json.loads(index.read_text()) if index.exists() else {}
    if "digits" not in made or ("mobilenet96" not in made and not quick):
        made.setdefault("digits", make_digits_cnn(directory / "digits"))
        if not quick:
            made["mobilenet96"] = make_mobilenet96(directory / "mobilenet96")
        index.write_text(json.dumps(made, indent=1))
    digits = made["digits"]
    image = made.get("mobilenet96") if not quick else None
    if image is None:
        image = {**digits, "train_images": digits["images"], "test_images": digits["images"], "name": "digits_cnn"}
    return {"image": {"name": "mobilenet96", **image}, "digits": digits}


def convert_pair(
    fixture: dict[str, Any],
    work: Path,
    stem: str,
    options: QuantizeOptions,
    *,
    calibration: str,
    preprocess: str | None,
) -> dict:
    """float32 as ``edgekit convert`` writes it, and the int8 model its search chooses."""
    fp32, int8 = work / f"{stem}.fp32.onnx", work / f"{stem}.int8.onnx"
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
    data = {"calibration": fixture["train_images"], "preprocess": fixture["preprocess"]}
    models = convert_pair(fixture, work, "image", QuantizeOptions() if plan.full_search else PER_CHANNEL, **data)
    models["forced"] = not models["search"]["static_per_channel"]
    if models["forced"]:
        unforced = models["search"]
        forced = QuantizeOptions(mode="static", per_channel=True, force=True)
        models = {**convert_pair(fixture, work, "image", forced, **data), "forced": True, "search_unforced": unforced}
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
    models = convert_pair(
        fixture, work, "digits", QuantizeOptions(force=True), calibration=fixture["train"], preprocess=None
    )
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
    body, header_length = canned_body(served, x)
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


@dataclass
class Stages:
    """Everything each stage of a v2 request needs, made once from a few real requests."""

    served: Served
    session: Any
    singles: list[np.ndarray]
    cans: list[Canned]
    parsed: list[tuple[dict[str, Any], memoryview]] = field(default_factory=list)
    infers: list[Any] = field(default_factory=list)
    rows: list[Any] = field(default_factory=list)
    checked: list[np.ndarray] = field(default_factory=list)
    feeds: list[Any] = field(default_factory=list)
    raws: list[Any] = field(default_factory=list)
    answers: list[Any] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        agent = self.served.agent
        serving, config = agent.serving, agent.config.server
        self.parsed = [v2_codec.split_body(c.request) for c in self.cans]
        self.infers = [v2_codec.read_request(doc) for doc, _ in self.parsed]
        self.rows = [
            v2_routes._model_rows(serving.schema, config, infer, blob)
            for infer, (_, blob) in zip(self.infers, self.parsed, strict=True)
        ]
        self.checked = [serving.schema.check(r, source="request") for r in self.rows]
        self.feeds = [serving.schema.feed(c) for c in self.checked]
        self.raws = [serving.runtime.predict(f) for f in self.feeds]
        self.answers = [serving.spec.interpret(r) for r in self.raws]
        self.results = [agent.predict(r) for r in self.rows]


def client_calls(s: Stages) -> dict[str, Callable[[int], object]]:
    from tritonclient.http import InferResult

    served, k = s.served, len(s.cans)
    stub, names = served.triton._client_stub, [o.name() for o in served.outputs[True]]

    def post(body: bytes, headers: dict[str, str]) -> None:
        stub.post(request_uri="v2/none", body=body, headers=headers).read()

    def parse(i: int) -> None:
        response = s.cans[i % k].response
        length = dict(response.headers).get(v2_codec.HEADER_LENGTH)
        result = InferResult.from_response_body(response.body, False, int(length) if length else None)
        for name in names:
            result.as_numpy(name)

    return {
        "client: InferInput + request body (tritonclient)": lambda i: canned_body(served, s.singles[i % k]),
        "client: response parsed (InferResult, as_numpy)": parse,
        "HTTP: the same body POSTed to a 404 route": lambda i: post(s.cans[i % k].body, s.cans[i % k].headers),
        "HTTP: a 2-byte body POSTed to a 404 route": lambda i: post(b"{}", {}),
    }


def canned_body(served: Served, x: np.ndarray, binary: bool = True) -> Any:
    from tritonclient.http._utils import _get_inference_request  # what InferenceServerClient.infer calls

    return _get_inference_request(
        inputs=served.inputs(x, binary),
        request_id="",
        outputs=served.outputs[binary],
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        custom_parameters=None,
    )


def server_calls(s: Stages) -> dict[str, Callable[[int], object]]:
    agent, k = s.served.agent, len(s.cans)
    serving, config = agent.serving, agent.config.server
    schema, spec, runtime, monitor = serving.schema, serving.spec, serving.runtime, serving.monitor
    offered = v2_routes.model_outputs(spec)

    def encode(i: int) -> Any:
        result, infer = s.results[i % k], s.infers[i % k]
        doc = {"model_name": s.served.name, "model_version": "1", "parameters": {"edgekit_ids": ",".join(result.ids)}}
        return v2_codec.encode_response(doc, v2_routes._outputs(result, offered, infer), infer)

    return {
        "server: v2 route in-process (whole)": lambda i: agent_route(agent, config, s.cans[i % k].request),
        "server: split_body + read_request": lambda i: v2_codec.read_request(
            v2_codec.split_body(s.cans[i % k].request)[0]
        ),
        "server: check declared + decode_inputs": lambda i: v2_routes._model_rows(
            schema, config, s.infers[i % k], s.parsed[i % k][1]
        ),
        "server: schema.check": lambda i: schema.check(s.rows[i % k], source="request"),
        "server: schema.feed": lambda i: schema.feed(s.checked[i % k]),
        "server: runtime.predict": lambda i: runtime.predict(s.feeds[i % k]),
        "server: spec.interpret": lambda i: spec.interpret(s.raws[i % k]),
        "server: monitor.record": lambda i: monitor.record(s.checked[i % k], s.answers[i % k], 3.0),
        "server: log.add": lambda i: agent.log.add(agent.boot, 10**9 + i, s.checked[i % k], s.answers[i % k].primary),
        "server: outputs + encode_response": encode,
    }


def stage_breakdown(s: Stages, plan: Plan) -> dict[str, float]:
    """p50 µs of the whole v2 round trip, the bare run, and each stage timed alone, interleaved."""
    name, k = input_name(s.session), len(s.singles)
    calls = {
        "whole: v2 infer over HTTP (tritonclient, binary)": lambda i: s.served.v2(s.singles[i % k]),
        "bare session.run": lambda i: s.session.run(None, {name: s.singles[i % k]}),
        **client_calls(s),
        **server_calls(s),
    }
    return {key: p50_us(v) for key, v in interleaved(calls, plan.stages).items()}


def profile_route(s: Stages, calls: int, top: int = 14) -> list[dict[str, Any]]:
    """cProfile of the v2 route in-process (Request prebuilt): own time per function. cProfile adds a fixed
    cost to every Python call, so read it for shares and call counts, not for µs."""
    agent, k = s.served.agent, len(s.cans)
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(calls):
        agent_route(agent, agent.config.server, s.cans[i % k].request)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    total = sum(tt for _, _, tt, _, _ in stats.values())
    rows = [
        {
            "function": f"{Path(file).parent.name}/{Path(file).name}:{line}({func})" if line else func,
            "calls_per_request": nc / calls,
            "own_share": tt / total,
            "own_us_per_request": tt / calls * 1e6,
        }
        for (file, line, func), (_, nc, tt, _, _) in stats.items()
    ]
    return sorted(rows, key=lambda r: -r["own_share"])[:top]


class Timeline:
    """Stamps of real requests through the real server: the functions a route calls are wrapped, so each
    part is timed where it runs (in waitress's worker thread, after the I/O thread's hand-off, caches as
    the request leaves them) and the parts add up to the whole round trip."""

    def __init__(self, wrapped: list[tuple[Any, str]]) -> None:
        self.stamps: dict[str, float] = {}
        self.saved: list[tuple[Any, str, Any, bool]] = []
        for owner, name in wrapped:
            self._wrap(owner, name)

    def _wrap(self, owner: Any, name: str) -> None:
        original, stamps = getattr(owner, name), self.stamps

        def timed(*args: Any, **kwargs: Any) -> Any:
            stamps[f"{name}.start"] = start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                stamps[f"{name}.end"] = end = time.perf_counter()
                stamps[name] = stamps.get(name, 0.0) + end - start

        module = isinstance(owner, types.ModuleType)
        self.saved.append((owner, name, original, module))
        if module:
            setattr(owner, name, timed)
        else:  # shadow the method on this one object (frozen dataclasses too)
            object.__setattr__(owner, name, timed)

    def restore(self) -> None:
        for owner, name, original, module in reversed(self.saved):
            if module:
                setattr(owner, name, original)
            else:  # the class's method again
                object.__delattr__(owner, name)

    def __call__(self, send: Callable[[], object]) -> dict[str, float]:
        """The stamps of one request, with ``start`` and ``end`` as the client saw them."""
        self.stamps.clear()
        start = time.perf_counter()
        send()
        return {**self.stamps, "start": start, "end": time.perf_counter()}


def predict_parts(t: dict[str, float], first: str) -> dict[str, float]:
    """``Agent.predict`` from ``first`` (the stamp after which the runtime's feed is built) on."""
    return {
        "predict: feed, runtime wrapper": t["_run.start"] - t[first],
        "session.run, in the server": t["_run"],
        "predict: monitor.record": t["record"],
        "predict: after session.run, the rest (interpret, NaN guard, counter, log hand-off)": t["predict.end"]
        - t["_run.end"]
        - t["record"],
    }


def v2_parts(t: dict[str, float]) -> dict[str, float]:
    route = {
        "route: split_body + read_request": t["split_body"] + t["read_request"],
        "route: check declared + decode_inputs": t["_model_rows"],
        "route: outputs + encode_response": t["_outputs"] + t["encode_response"],
    }
    rest = t["route.end"] - t["route.start"] - sum(route.values()) - (t["predict.end"] - t["predict.start"])
    return {
        "client -> route: client encode, send, waitress read, hand-off": t["route.start"] - t["start"],
        **route,
        "route: the rest (routing, metadata lookups, answer dict)": rest,
        "predict: schema.check": t["check.end"] - t["predict.start"],
        **predict_parts(t, "check.end"),
        "route -> client: WSGI, waitress write, hand-off, send, client parse": t["end"] - t["route.end"],
    }


def v1_parts(t: dict[str, float]) -> dict[str, float]:
    return {
        "client -> route: http.client request, send, waitress read, hand-off": t["route.start"] - t["start"],
        "route: JSON body parsed, instances counted": t["predict.start"] - t["route.start"],
        "predict: base64 decoded, schema checks": t["batch.start"] - t["predict.start"],
        "predict: preprocess.batch (JPEG decode, resize, normalize)": t["batch"],
        **predict_parts(t, "batch.end"),
        "route: the answer as JSON (to_json, json_response)": t["route.end"] - t["predict.end"],
        "route -> client: WSGI, waitress write, hand-off, send, client json.loads": t["end"] - t["route.end"],
    }


def timeline_figures(served: Served, fixture: dict[str, Any], session: Any, calls: int) -> dict[str, dict]:
    """Median µs of each part of ``calls`` real requests (v2 binary tensors; v1 b64 JPEGs), each after its
    bare counterpart in the same loop (session.run; preprocess.batch + session.run)."""
    import device_agent.server as server_module

    agent, name = served.agent, input_name(session)
    X, items = np.load(fixture["test"])["X"], encoded_items(fixture)
    preprocess = Preprocess.from_toml(fixture["preprocess"], image_spec(session, X))
    timeline = Timeline(
        [
            (server_module, "route"),
            *((v2_routes, n) for n in ("split_body", "read_request", "_model_rows", "_outputs", "encode_response")),
            (agent, "predict"),
            (agent.serving.schema, "check"),
            (agent.serving.schema.preprocessor(), "batch"),
            (agent.serving.runtime, "_run"),  # the session's run, as the runtime resolved it at load
            (agent.serving.monitor, "record"),
        ]
    )
    records: dict[str, list[dict[str, float]]] = {"v2": [], "v1": []}
    try:
        for i in range(calls):
            x, item = X[i % len(X) : i % len(X) + 1], items[i % len(items)]
            bare = _seconds(lambda x=x: session.run(None, {name: x}))
            records["v2"].append({"bare session.run": bare, **v2_parts(timeline(lambda x=x: served.v2(x)))})
            bare = _seconds(lambda item=item: session.run(None, {name: preprocess.batch([item])}))
            records["v1"].append(
                {"bare decode + preprocess + run": bare, **v1_parts(timeline(lambda item=item: served.v1_b64(item)))}
            )
    finally:
        timeline.restore()
    return {kind: {k: float(np.median([r[k] for r in rs])) * 1e6 for k in rs[0]} for kind, rs in records.items()}


def _seconds(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def json_breakdown(served: Served, x: np.ndarray, plan: Plan) -> dict[str, Any]:
    """Where v2 with JSON data goes: the client's body (tolist, json.dumps), the server's json.loads and
    the numbers' conversion to a float32 tensor (p50 µs, interleaved)."""
    agent = served.agent
    body, _ = canned_body(served, x, binary=False)
    wire = {"content-type": "application/json", "content-length": str(len(body))}
    request = Request("POST", f"/v2/models/{served.name}/infer", {}, wire, bytes(body))
    doc, blob = v2_codec.split_body(request)
    infer = v2_codec.read_request(doc)
    calls = {
        "client: JSON request body (tritonclient: tolist, json.dumps)": lambda i: canned_body(served, x, False),
        "server: split_body + read_request (json.loads)": lambda i: v2_codec.read_request(
            v2_codec.split_body(request)[0]
        ),
        "server: check declared + decode_inputs (numbers to float32)": lambda i: v2_routes._model_rows(
            agent.schema, agent.config.server, infer, blob
        ),
        "server: v2 route in-process (whole)": lambda i: agent_route(agent, agent.config.server, request),
    }
    return {"request_bytes": len(body), **{k: p50_us(v) for k, v in interleaved(calls, plan.json).items()}}


def serve_figures(models: dict[str, Any], fixture: dict[str, Any], work: Path, plan: Plan) -> dict[str, Any]:
    """Both models packaged (``edgekit package``) and served by real agents: figures 3 and 4."""
    private, public, _ = generate_keypair(work / "keys")
    served: dict[str, Served] = {}
    try:
        for kind in ("fp32", "int8"):
            bundle = package(Path(models[kind]), fixture, private, work / f"{kind}.edgebundle", f"image-{kind}")
            served[kind] = Served(start_agent(bundle, public, work / f"device-{kind}"))
        session = bare_session(Path(models["fp32"]).read_bytes())
        X = np.load(fixture["test"])["X"]
        sketch = sketch_figures(served["fp32"].agent, session, X, plan)
        over_http = http_figures(served, models, fixture, plan)
        singles = [X[i : i + 1] for i in range(min(16, len(X)))]
        stages = Stages(served["fp32"], session, singles, [canned(served["fp32"], x) for x in singles])
        breakdown = stage_breakdown(stages, plan)
        profile = profile_route(stages, plan.profile_calls)
        timeline = timeline_figures(served["fp32"], fixture, session, plan.timeline_calls)
        json_costs = json_breakdown(served["fp32"], X[:1], plan)
    finally:
        for one in served.values():
            one.close()
    return {
        "sketch": sketch,
        "http": over_http,
        "timeline_us": timeline,
        "stages_us": breakdown,
        "json_us": json_costs,
        "profile": profile,
    }


# -- the report -------------------------------------------------------------------------------------
def quant_checks(q: dict[str, Any]) -> list[Check]:
    name, t = q["model"], TARGETS
    return [
        (
            f"{name}: int8 batch-1 speedup over fp32 (onnxruntime, 1 thread)",
            q["b1_speedup"],
            f"≥ {t['int8_speedup_min']:g}",
            q["b1_speedup"] >= t["int8_speedup_min"],
        ),
        (f"{name}:   p50 µs fp32 / int8, batch 1", q["b1_fp32_us"], "info", True),
        (f"{name}:   p50 µs int8, batch 1", q["b1_int8_us"], "info", True),
        (f"{name}:   speedup at batch 16", q["b16_speedup"], "info", True),
        (
            f"{name}: int8 file size / fp32 file size",
            q["size_ratio"],
            f"≤ {t['int8_size_ratio_max']:g}",
            q["size_ratio"] <= t["int8_size_ratio_max"],
        ),
        (
            f"{name}: top-1 agreement int8 vs fp32, {q['held_out']} held-out crops",
            q["agreement"],
            f"≥ {t['int8_agreement_min']:g}",
            q["agreement"] >= t["int8_agreement_min"],
        ),
        (f"{name}:   same, {q['fresh_crops']} fresh crops of the photographs", q["fresh_agreement"], "info", True),
        (f"{name}:   search chose static QDQ per-channel (1 yes, 0 no)", float(not q["forced"]), "info", True),
    ]


def digits_checks(d: dict[str, Any]) -> list[Check]:
    limit = TARGETS["digits_drop_points_max"]
    return [
        (
            f"digits_cnn: int8 accuracy drop (points), --force, {d['held_out']} held-out",
            d["drop_points"],
            f"≤ {limit:g}",
            d["drop_points"] <= limit,
        ),
        ("digits_cnn:   accuracy fp32", d["accuracy_fp32"], "info", True),
        ("digits_cnn:   accuracy int8", d["accuracy_int8"], "info", True),
        ("digits_cnn:   int8 batch-1 speedup over fp32 (< 1: slower; why --force)", d["b1_speedup"], "info", True),
    ]


def sketch_checks(s: dict[str, Any]) -> list[Check]:
    limit = TARGETS["sketch_share_max"]
    checks: list[Check] = []
    for k in (1, 16):
        checks += [
            (
                f"sketch (rows + update_inputs) / fp32 inference, per image, batch {k}",
                s[f"b{k}_share"],
                f"≤ {limit:g}",
                s[f"b{k}_share"] <= limit,
            ),
            (f"  µs per image, sketch at batch {k}", s[f"b{k}_sketch_us_per_image"], "info", True),
            (f"  µs per image, fp32 inference at batch {k}", s[f"b{k}_infer_us_per_image"], "info", True),
            (f"  all a window takes (+ outputs, latency) / inference, b{k}", s[f"b{k}_monitor_share"], "info", True),
        ]
    checks.append(
        ("  sketch per image at batch 16 / fp32 batch-1 inference", s["b16_sketch_over_b1_infer"], "info", True)
    )
    return checks


def http_checks(h: dict[str, Any]) -> list[Check]:
    limit = TARGETS["v2_ratio_max"]
    rows = [
        ("v2 infer, binary, fp32 (tritonclient, loopback) / bare session.run", "v2_binary_fp32_ratio", True),
        ("v2 infer, binary, int8 / bare int8 session.run", "v2_binary_int8_ratio", True),
        ("v2 infer, JSON data, fp32 / bare session.run", "v2_json_fp32_ratio", False),
        ("v1 :predict {b64: JPEG} / bare decode + preprocess + session.run", "v1_b64_fp32_ratio", True),
    ]
    checks: list[Check] = [
        (figure, h[key], f"≤ {limit:g}" if targeted else "info", h[key] <= limit or not targeted)
        for figure, key, targeted in rows
        if key in h
    ]
    checks += [(f"  p50 µs {k[:-3]}", v, "info", True) for k, v in h.items() if k.endswith("_us")]
    checks.append(("  the agent's v2 probabilities = bare session's (1 yes)", float(h["answers_match"]), "info", True))
    return checks


def drift_checks(d: dict[str, Any]) -> list[Check]:
    fa, det = TARGETS["false_alarm_max"], TARGETS["detection_min"]
    n = d["clean"]["windows"]
    return [
        (f"drift: false alarms, clean image windows ({n})", d["clean"]["rate"], f"≤ {fa:g}", d["clean"]["rate"] <= fa),
        ("drift: detected, brightness +10 %", d["brighter"]["rate"], f"≥ {det:g}", d["brighter"]["rate"] >= det),
        ("drift: detected, blur r=1.5", d["blurred"]["rate"], f"≥ {det:g}", d["blurred"]["rate"] >= det),
    ]


def print_search(title: str, search: dict[str, Any]) -> None:
    print(f"\n{title}: {search['verdict']} ({search['seconds']:.0f} s)")
    print(f"  {'configuration':<40} {'size/fp32':>9} {'drop(pts)':>9} {'agree':>7} {'x b1':>6} {'x b16':>6}  note")
    for t in search["trials"]:
        speed = [t["speedup"].get(b) for b in ("1", "16")]
        cells = [
            f"{t['size_ratio']:.3f}" if t["size_ratio"] else "n/a",
            f"{t['accuracy_drop'] * 100:.2f}" if t["accuracy_drop"] is not None else "n/a",
            f"{t['agreement']:.4f}" if t["agreement"] is not None else "n/a",
            *(f"{s:.2f}" if s else "n/a" for s in speed),
        ]
        note = t["error"] or t["note"] or ""
        print(f"  {t['name']:<40} {cells[0]:>9} {cells[1]:>9} {cells[2]:>7} {cells[3]:>6} {cells[4]:>6}  {note}")


def print_quantized(q: dict[str, Any], d: dict[str, Any]) -> None:
    if q["forced"]:
        print_search(f"{q['model']}, the search as convert runs it", q["search_unforced"])
        print_search(f"{q['model']}, forced to static QDQ per-channel", q["search"])
    else:
        print_search(f"{q['model']}, int8 search", q["search"])
    print(f"\n{q['model']} int8 file, {q['int8_bytes']:,} B ({q['size_ratio']:.3f} of fp32's {q['fp32_bytes']:,} B):")
    for part, size in q["size_breakdown"].items():
        print(f"  {part:<34} {size:>10,} B  {size / q['fp32_bytes']:.4f} of fp32")
    for kind, shares in q["op_shares"].items():
        top = ", ".join(f"{op} {share:.0%}" for op, share in list(shares.items())[:5])
        print(f"  onnxruntime kernel time at batch 1, {kind}: {top}")
    print_search("digits_cnn, int8 search with --force", d["search"])


def print_timeline(kind: str, timeline: dict[str, float]) -> None:
    """Each part's median and its share of the round trip's own time: all but what the bare call also does
    (session.run; for v1 also preprocess.batch)."""
    bare_key = next(k for k in timeline if k.startswith("bare"))
    bare = timeline[bare_key]
    parts = {k: v for k, v in timeline.items() if k != bare_key}
    own = {k for k in parts if k.startswith(("session.run", "predict: preprocess.batch"))}
    whole = sum(parts.values())
    extra = whole - sum(parts[k] for k in own)
    print(
        f"\n{kind} round trip through the real server, fp32, batch 1: median µs of each part, stamped where it runs "
        f"(sum {whole:.0f}; {bare_key} {bare:.0f}: ratio {whole / bare:.2f})"
    )
    width = max(len(k) for k in parts)
    for key, value in parts.items():
        share = "" if key in own else f"{value / extra:6.1%} of the round trip's own time"
        print(f"  {key.ljust(width)}  {value:9.1f}  {share}")


def print_breakdown(results: dict[str, Any]) -> None:
    for kind, label in (("v2", "v2 infer (tritonclient, binary)"), ("v1", "v1 :predict {b64: JPEG}")):
        print_timeline(label, results["timeline_us"][kind])
    stages = results["stages_us"]
    print("\neach stage alone, warm (p50 µs of calls in a row, interleaved; in a request each runs once, cold)")
    width = max(len(k) for k in stages)
    for key, value in stages.items():
        print(f"  {key.ljust(width)}  {value:9.1f}")
    data = results["json_us"]
    print(f"\nv2 with JSON data: the request is {data.pop('request_bytes'):,} bytes of JSON (p50 µs)")
    for key, value in data.items():
        print(f"  {key.ljust(width)}  {value:9.1f}")
    print("\ncProfile of the v2 route in-process (own time; per request)")
    for r in results["profile"]:
        print(
            f"  {r['own_share']:6.1%}  {r['own_us_per_request']:8.1f} µs  {r['calls_per_request']:5.1f} calls  "
            f"{r['function']}"
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = QUICK if args.quick else FULL
    before, started, seconds = machine(), time.perf_counter(), {}

    def step(name: str, make: Callable[[], Any]) -> Any:
        begin = time.perf_counter()
        value = make()
        seconds[name] = round(time.perf_counter() - begin, 1)
        return value

    with tempfile.TemporaryDirectory(prefix="edgekit-bench-tensor-") as tmp:
        work = Path(tmp)
        fixtures = step("fixtures", lambda: prepare(Path(args.data) if args.data else work / "fixtures", args.quick))
        image = fixtures["image"]
        models = step("convert", lambda: quantize_image_net(image, work, plan))
        results: dict[str, Any] = {"quantized": step("quantized", lambda: quant_figures(models, image, plan))}
        results["digits"] = step("digits", lambda: digits_figures(fixtures["digits"], work, plan))
        results.update(step("served", lambda: serve_figures(models, image, work, plan)))
    results["drift"] = step("drift", lambda: drift_figures(**plan.drift))
    return {
        "machine": {**before, "load_average_after": machine()["load_average"]},
        "plan": asdict(plan),
        "quick": args.quick,
        **results,
        "seconds": time.perf_counter() - started,
        "seconds_by_step": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--json", "--out", dest="json", default=str(ROOT / "bench-results" / "bench_tensor.json"), help="where it goes"
    )
    parser.add_argument("--data", help="keep the fixtures in this directory and reuse them (fixtures.json)")
    parser.add_argument("--quick", action="store_true", help="the digits CNN, few calls and windows: a smoke test")
    args = parser.parse_args(argv)
    results = run(args)
    checks = [
        *quant_checks(results["quantized"]),
        *digits_checks(results["digits"]),
        *sketch_checks(results["sketch"]),
        *http_checks(results["http"]),
        *drift_checks(results["drift"]),
    ]
    print_checks(checks)
    print_quantized(results["quantized"], results["digits"])
    print_breakdown(results)
    print_run(
        results,
        quick=args.quick,
        steps=results["seconds_by_step"],
        how="p50 of interleaved calls, one thread (intra_op_num_threads=1, one BLAS thread)",
    )
    write_json(args.json, checks, targets=TARGETS, **results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
