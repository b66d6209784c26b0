"""ONNX -> TFLite without TensorFlow: float32 and full int8, validated, packaged, served by the agent."""

import json

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert")

from device_agent import Agent  # noqa: E402
from edgekit.models.loading import TfliteModel, load_model  # noqa: E402
from tests.agent_helpers import config_of, make_device  # noqa: E402


@pytest.fixture(scope="module")
def tflite_models(tmp_path_factory, digits):
    from edgekit.build.convert import QuantizeOptions, convert_model

    directory = tmp_path_factory.mktemp("tflite")
    float_path, int8_path = directory / "digits.tflite", directory / "digits.int8.tflite"
    convert_model(str(digits.model), str(float_path), target_format="tflite")
    convert_model(
        str(digits.model),
        str(int8_path),
        target_format="tflite",
        quantize=QuantizeOptions(force=True),
        calibration=str(digits.train),
    )
    return float_path, int8_path


def test_float_tflite_answers_like_scikit_learn(tflite_models, digits):
    model, reference = load_model(tflite_models[0]), load_model(digits.model)
    X = np.load(digits.test)["X"]
    ours, theirs = model.predict(X), reference.predict(X)
    assert isinstance(model, TfliteModel) and model.output.label_output == "label"
    assert np.mean(ours.labels == theirs.labels) >= 0.995
    assert np.abs(ours.probabilities - theirs.probabilities).max() < 1e-4


def test_int8_tflite_is_full_integer_small_and_close(tflite_models, digits):
    from ai_edge_litert.interpreter import Interpreter

    model, reference = load_model(tflite_models[1]), load_model(digits.model)
    X, y = np.load(digits.test)["X"], np.load(digits.test)["y"]
    ours = model.predict(X)
    assert (
        np.mean(ours.labels == reference.predict(X).labels) >= 0.995
    )  # the figure; 0.9949 before input equalization
    assert np.mean(ours.labels == y) >= 0.95
    assert tflite_models[1].stat().st_size <= 0.5 * tflite_models[0].stat().st_size
    details = Interpreter(model_path=str(tflite_models[1])).get_tensor_details()
    fc_weights = [d for d in details if d["name"].endswith("/weights")]
    assert fc_weights and all(
        d["dtype"] == np.int8 and len(d["quantization_parameters"]["scales"]) > 1 for d in fc_weights
    )  # per-channel
    quantization = json.loads(model.metadata["edgekit.quantization"])
    assert quantization["format"] == "tflite full integer" and quantization["input_equalization"] is True


def _ops(path):
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(path.read_bytes(), 0))
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    return [names[model.operatorCodes[op.opcodeIndex].builtinCode] for op in model.subgraphs[0].operators], model


def test_the_scaler_centering_is_folded_and_classes_0_to_9_need_no_gather(tflite_models):
    ops, _ = _ops(tflite_models[0])
    assert ops == ["MUL", "FULLY_CONNECTED", "FULLY_CONNECTED", "SOFTMAX", "ARG_MAX"]
    ops, model = _ops(tflite_models[1])
    assert ops == ["MUL", "QUANTIZE", "FULLY_CONNECTED", "FULLY_CONNECTED", "SOFTMAX", "DEQUANTIZE", "ARG_MAX"]
    graph = model.subgraphs[0]
    for op in (op for op, name in zip(graph.operators, ops, strict=True) if name == "FULLY_CONNECTED"):
        source, weights, bias = (graph.tensors[i] for i in op.inputs)
        np.testing.assert_allclose(
            bias.quantization.scale, source.quantization.scale[0] * weights.quantization.scale, rtol=1e-6
        )


def test_fold_centering_keeps_the_answers_and_other_classes_keep_their_gather(tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    from edgekit.build.tflite.plan import Plan, Step, fold_centering
    from edgekit.build.tflite.writer import write_float

    rng = np.random.default_rng(0)
    weights, bias = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    plan = Plan(
        "X",
        4,
        "probabilities",
        [
            Step("sub", constant=np.float32([1, 2, 3, 4])),
            Step("div", constant=np.float32([2, 4, 8, 16])),
            Step("fc", weights=weights, bias=bias, activation="relu", name="dense"),
            Step("softmax"),
        ],
    )
    folded = fold_centering(plan)
    assert [s.kind for s in folded.steps] == ["div", "fc", "softmax"]
    X = rng.normal(size=(50, 4)).astype(np.float32) * 10
    np.testing.assert_allclose(folded.run(X), plan.run(X), atol=1e-5)
    path = tmp_path / "m.tflite"
    path.write_bytes(write_float(folded, "probabilities", labels=(3, 5, 7)))
    assert _ops(path)[0][-2:] == ["ARG_MAX", "GATHER"]
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], X[:1])
    interpreter.invoke()
    label = next(o for o in interpreter.get_output_details() if o["name"] == "label")
    assert interpreter.get_tensor(label["index"])[0] == (3, 5, 7)[int(np.argmax(plan.run(X[:1])))]


@pytest.mark.parametrize("preprocessing", ["mul", "div", "sub", "none"])
def test_input_equalization_keeps_the_function_and_balances_input_and_weight_ranges(preprocessing):
    from edgekit.build.tflite.plan import Plan, Step, equalize_first_layer

    rng = np.random.default_rng(1)
    spread = np.float32([0.1, 1, 10, 100, 1])
    steps = {
        "mul": [Step("mul", constant=spread)],
        "div": [Step("div", constant=1 / spread)],
        "sub": [Step("sub", constant=spread)],
        "none": [],
    }[preprocessing]
    weights = rng.normal(size=(4, 5)).astype(np.float32) * np.float32(
        [1, 3, 0.2, 1, 0]
    )  # an all-zero column is left alone
    plan = Plan(
        "X",
        5,
        "probabilities",
        [
            *steps,
            Step("fc", weights=weights, bias=rng.normal(size=4).astype(np.float32), activation="relu"),
            Step("softmax"),
        ],
    )
    X = rng.normal(size=(200, 5)).astype(np.float32) * spread
    equalized = equalize_first_layer(plan, X)
    np.testing.assert_allclose(equalized.run(X), plan.run(X), rtol=1e-4, atol=1e-6)
    kinds = [s.kind for s in equalized.steps]
    assert kinds == (
        [s.kind for s in steps] if preprocessing in ("mul", "div") else [s.kind for s in steps] + ["mul"]
    ) + ["fc", "softmax"]
    first_fc = kinds.index("fc")
    record = []
    equalized.run(X, record=record)
    input_range, column_range = (
        np.abs(record[first_fc - 1]).max(axis=0),
        np.abs(equalized.steps[first_fc].weights).max(axis=0),
    )
    np.testing.assert_allclose(input_range[:4], column_range[:4], rtol=1e-4)
    assert column_range[4] == 0 and equalize_first_layer(equalized, X) is None  # balanced already: nothing left to do


def test_unsupported_operators_are_named_with_the_alternative(cli, cancer, tmp_path):
    result = cli("convert", cancer.model, "--target", "tflite", "-o", tmp_path / "c.tflite")
    assert result.exit_code == 2 and "LinearClassifier" in result.stderr and "--target onnx" in result.stderr
    assert not (tmp_path / "c.tflite").exists()


def test_int8_tflite_needs_calibration(cli, digits, tmp_path):
    result = cli("convert", digits.model, "--target", "tflite", "--quantize", "int8", "-o", tmp_path / "d.tflite")
    assert result.exit_code == 2 and "needs --calibration" in result.stderr


def test_validate_takes_tflite_as_candidate_and_reference(cli, tflite_models, digits, digits_onnx):
    result = cli("validate", tflite_models[1], "--reference", tflite_models[0], "--data", digits.test, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["candidate"]["kind"] == "tflite"
    result = cli(
        "validate", tflite_models[0], "--reference", digits_onnx, "--data", digits.test, "--min-agreement", "0.995"
    )
    assert result.exit_code == 0


def test_a_tflite_bundle_is_served_by_the_agent_with_litert(cli, tflite_models, digits, keypair, tmp_path):
    bundle = tmp_path / "digits-9.edgebundle"
    assert (
        cli(
            "package",
            tflite_models[1],
            "--name",
            "digits",
            "--version",
            "9",
            "--baseline",
            digits.train,
            "--key",
            keypair[0],
            "-o",
            bundle,
        ).exit_code
        == 0
    )
    inspected = json.loads(cli("inspect", bundle, "--json").stdout)["manifest"]
    assert (
        inspected["runtime"] == {"format": "tflite", "engine": "litert", "min_runtime_version": None}
        and "model.tflite" in inspected["files"]
    )
    config = make_device(tmp_path / "dev", bundle, keypair[1], window_rows=100, http=False)
    X, y = np.load(digits.test)["X"], np.load(digits.test)["y"]
    with Agent(config_of(config)).start(http=False) as agent:
        assert agent.runtime.name in ("ai-edge-litert", "tflite-runtime")
        result = agent.predict(X[:200])
        assert np.mean(np.asarray(result.answers()) == y[:200]) > 0.93
        agent.monitor.process()
        assert agent.last_summary["rows"] == 100


def test_litert_banner_stays_off_the_cli_stderr(tflite_models, digits):
    """LiteRT's C++ logger prints its XNNPACK INFO line to fd 2 once per process: run the CLI as its own process."""
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgekit",
            "validate",
            tflite_models[1],
            "--reference",
            tflite_models[0],
            "--data",
            digits.test,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "XNNPACK" not in result.stderr and "PASSED" in result.stdout


def test_only_the_banner_is_kept_off_stderr(capfd):
    import os

    from edgekit.models.litert_banner import without_banner

    with without_banner():
        os.write(
            2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\nERROR: something LiteRT says that matters\n"
        )
    assert capfd.readouterr().err == "ERROR: something LiteRT says that matters\n"
