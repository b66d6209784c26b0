"""Typed tabular models: DataFrame pipelines with string, int and float columns and missing values,
from convert to the agent's answers (issue 14)."""

from __future__ import annotations

import csv
import json
import math
import urllib.error
import urllib.request

import numpy as np
import pandas
import pytest

from device_agent import Agent
from device_agent.bundle import read_bundle
from device_agent.errors import InputError
from device_agent.signing import load_public_key
from edgekit.build.validate import validate
from tests.agent_helpers import config_of, make_device

ROW = {
    "age": 41,
    "tenure_months": 12,
    "monthly_charges": 70.5,
    "total_charges": 846.0,
    "support_calls": 2,
    "data_gb": 0.0,
    "autopay": 1,
    "country": "DE",
    "plan": "basic",
    "payment": "card",
}


def _pipelines():
    """(name, pipeline) of the final estimators and encoders the issue names, all on the churn table."""
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import ExtraTreesClassifier, GradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import MinMaxScaler, OneHotEncoder, OrdinalEncoder, StandardScaler

    from edgekit.local.churn import CATEGORICAL, NUMERIC

    def pre(scaler, encoder):
        numbers = Pipeline([("impute", SimpleImputer()), ("scale", scaler)])
        strings = Pipeline([("impute", SimpleImputer(strategy="most_frequent")), ("encode", encoder)])
        return ColumnTransformer([("num", numbers, list(NUMERIC)), ("cat", strings, list(CATEGORICAL))])

    onehot = OneHotEncoder(handle_unknown="ignore")
    ordinal = OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1)
    return [
        (
            "extra_trees",
            Pipeline(
                [("pre", pre(StandardScaler(), onehot)), ("m", ExtraTreesClassifier(30, max_depth=8, random_state=0))]
            ),
        ),
        (
            "gradient_boosting",
            Pipeline([("pre", pre(MinMaxScaler(), ordinal)), ("m", GradientBoostingClassifier(n_estimators=30))]),
        ),
        ("logistic", Pipeline([("pre", pre(StandardScaler(), onehot)), ("m", LogisticRegression(max_iter=500))])),
        (
            "mlp",
            Pipeline(
                [("pre", pre(StandardScaler(), onehot)), ("m", MLPClassifier((32,), max_iter=200, random_state=0))]
            ),
        ),
        ("hgb_regressor", Pipeline([("pre", pre(StandardScaler(), ordinal)), ("m", HistGradientBoostingRegressor())])),
        ("linear_regressor", Pipeline([("pre", pre(StandardScaler(), onehot)), ("m", LinearRegression())])),
    ]


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("name", [name for name, _ in _pipelines()])
def test_each_estimator_behind_a_column_transformer_converts_and_agrees(name, tmp_path, churn):
    import joblib

    from edgekit.build.convert import convert_model

    frame = pandas.read_csv(churn.train_csv)
    target = frame.pop("label")
    pipeline = dict(_pipelines())[name]
    if "regressor" in name:
        target = frame["monthly_charges"] * 0.1 + frame["support_calls"]
    joblib.dump(pipeline.fit(frame, target), tmp_path / "model.joblib")
    convert_model(str(tmp_path / "model.joblib"), str(tmp_path / "model.onnx"))
    report = validate(
        str(tmp_path / "model.onnx"),
        reference_path=str(tmp_path / "model.joblib"),
        data_path=str(churn.test_csv),
        latency_budget=0.1,
    )
    assert report["rows"] == 2000
    if "regressor" in name:
        assert report["max_abs_diff"] <= 1e-3 * max(1.0, float(np.abs(target).max())), report["max_abs_diff"]
    else:
        assert report["agreement"] >= 0.999 and report["max_abs_diff"] <= 1e-4, (
            report["agreement"],
            report["max_abs_diff"],
        )


@pytest.mark.parametrize("which", ["rf", "hgb"])
def test_forests_compare_exactly_with_scikit_learn(which, churn):
    report = validate(
        str(getattr(churn, f"{which}_onnx")),
        reference_path=str(getattr(churn, which)),
        data_path=str(churn.test_csv),
        latency_budget=0.1,
    )
    assert report["agreement"] >= 0.999 and report["max_abs_diff"] <= 1e-4, report


def test_the_schema_names_types_kinds_and_what_is_imputed(churn, keypair):
    bundle = read_bundle(churn.bundle, load_public_key(keypair[1]))
    columns = {c.name: c for c in bundle.input_schema.columns}
    assert columns["country"].dtype == "string" and columns["country"].kind == "categorical"
    assert columns["payment"].nullable and columns["total_charges"].nullable
    assert columns["age"].kind == "numeric" and columns["age"].feed == "float64"  # trees: fed in double
    assert bundle.manifest["schema"] == "edgekit.bundle/3"
    assert bundle.baseline().feature("country").kind == "categorical"


@pytest.fixture
def agent(tmp_path, churn, keypair):
    config = make_device(tmp_path / "dev", churn.bundle, keypair[1], window_rows=100)
    with Agent(config_of(config)).start() as running:
        yield running


def test_every_request_form_gets_the_same_answer(agent):
    names = list(ROW)
    by_objects = agent.predict([ROW, {**ROW, "country": "IN"}]).to_json()
    by_lists = agent.predict([[ROW[n] for n in names], [{**ROW, "country": "IN"}[n] for n in names]]).to_json()
    columnar = {n: [ROW[n], ROW[n] if n != "country" else "IN"] for n in names}
    by_columns = agent.predict(columnar).to_json()
    frame = agent.predict(pandas.DataFrame([ROW, {**ROW, "country": "IN"}])).to_json()
    for answer in (by_lists, by_columns, frame):
        assert answer["predictions"] == by_objects["predictions"]
        assert answer["probabilities"] == by_objects["probabilities"]


def _http(agent, body):
    host, port = agent.server.server_address[:2]
    request = urllib.request.Request(
        f"http://{host}:{port}/v1/models/churn:predict", method="POST", data=json.dumps(body).encode()
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_http_takes_instances_and_the_columnar_inputs_form(agent):
    status, one = _http(agent, {"instances": [ROW]})
    assert status == 200 and one["predictions"][0] in (0, 1)
    status, two = _http(agent, {"inputs": {n: [ROW[n], ROW[n]] for n in ROW}})
    assert status == 200 and two["predictions"] == one["predictions"] * 2
    status, bad = _http(agent, {"instances": [{**ROW, "country": 17}]})
    assert status == 400 and "row 0, column 'country': expected a string, got 17" in bad["error"]


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{**ROW, "country": 17}], "request row 0, column 'country': expected a string, got 17"),
        ([ROW, ROW, ROW, {**ROW, "age": "41"}], "request row 3, column 'age': expected a number, got '41'"),
        ([{k: v for k, v in ROW.items() if k != "plan"}], "request row 0 lacks 'plan'"),
        ([{**ROW, "colour": "red"}], "has keys the model does not know: 'colour'"),
        ({"age": [1, 2], **{n: [ROW[n]] for n in ROW if n != "age"}}, "columns differ in length"),
        ({n: [ROW[n]] for n in ROW if n != "plan"}, "lacks the columns 'plan'"),
        ([{**ROW, "autopay": True}], "column 'autopay': expected a number, got true"),
        ([{**ROW, "monthly_charges": float("inf")}], "column 'monthly_charges': inf is infinite"),
    ],
)
def test_bad_input_is_refused_by_row_and_column(agent, rows, message):
    with pytest.raises(InputError) as raised:
        agent.predict(rows)
    assert message in str(raised.value), str(raised.value)


def test_a_missing_value_is_refused_by_column_where_the_pipeline_does_not_impute(tmp_path, churn):
    import joblib
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    from edgekit.build.convert import convert_model
    from edgekit.models.loading import load_model

    frame = pandas.read_csv(churn.train_csv).dropna()
    target = frame.pop("label")
    pre = ColumnTransformer([("num", StandardScaler(), ["age", "data_gb"]), ("cat", OneHotEncoder(), ["plan"])])
    model = Pipeline([("pre", pre), ("m", LogisticRegression())]).fit(frame[["age", "data_gb", "plan"]], target)
    joblib.dump(model, tmp_path / "plain.joblib")
    convert_model(str(tmp_path / "plain.joblib"), str(tmp_path / "plain.onnx"))
    schema = load_model(tmp_path / "plain.onnx").input
    assert [c.nullable for c in schema.columns] == [False, False, False]
    for row, column in (
        ({"age": 30, "data_gb": None, "plan": "pro"}, "data_gb"),
        ({"age": 30, "data_gb": 1.0, "plan": None}, "plan"),
    ):
        with pytest.raises(
            InputError, match=f"row 0, column '{column}': a missing value, and the model does not impute"
        ):
            schema.check([row], source="request")
    assert schema.check([{"age": 30, "data_gb": 1.0, "plan": "pro"}]).shape == (1, 3)


def test_missing_values_are_served_where_imputed_and_unseen_categories_are_served_and_counted(agent):
    rows = [{**ROW, "total_charges": None, "payment": None}, {**ROW, "country": "XX"}, {**ROW, "country": "YY"}]
    answer = agent.predict(rows).to_json()
    assert len(answer["predictions"]) == 3
    agent.predict([ROW] * 97)
    agent.monitor.process()
    summary = agent.last_summary
    from edgekit.fleet.merge import column_quality

    columns = column_quality(agent.baseline.from_compact(summary["profile"]))
    assert columns["country"] == {"null_rate": 0.0, "unseen_rate": 0.02}
    assert columns["payment"] == {"null_rate": 0.01, "unseen_rate": 0.0}
    assert columns["total_charges"] == {"null_rate": 0.01, "out_of_range_rate": 0.0}
    assert summary["quality"]["unseen_rate"] == pytest.approx(0.02)


def test_a_window_summary_of_the_ten_column_model_stays_under_two_kilobytes(agent, churn):
    frame = pandas.read_csv(churn.test_csv, keep_default_na=False, na_values={"total_charges": [""]})
    frame = frame.drop(columns="label").replace({"payment": {"": None}})
    agent.predict(frame.iloc[:100])
    agent.monitor.process()
    size = len(json.dumps(agent.last_summary, separators=(",", ":")))
    assert size < 2048, size


def test_batch_scoring_reads_string_columns_by_the_models_types(tmp_path, churn, keypair, capsys):
    from device_agent.cli import main as agent_main

    config = make_device(tmp_path / "dev", churn.bundle, keypair[1], http=False)
    assert agent_main(["predict", "--config", str(config), str(churn.test_csv), "--label", "label"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("prediction,") and len(lines) == 2001
    bad = tmp_path / "bad.csv"
    text = churn.test_csv.read_text().splitlines()
    bad.write_text("\n".join([text[0], text[1].replace(",", ",x", 1), *text[2:5]]) + "\n")
    assert agent_main(["predict", "--config", str(config), str(bad), "--label", "label"]) != 0
    assert "line 2 column 'tenure_months' holds" in capsys.readouterr().err


def test_a_csv_cell_is_read_as_its_columns_type_never_guessed(tmp_path):
    from device_agent.columns import Column
    from device_agent.tabular import read_table

    path = tmp_path / "rows.csv"
    path.write_text("code,n,flag\n007,3,true\nNA,,false\n,4,1\n")
    columns = [
        Column("code", "string", "categorical", True, "string"),
        Column("n", "int64", "numeric", True, "float64"),
        Column("flag", "bool", "numeric", False, "float64"),
    ]
    X, _, names = read_table(path, columns=columns)
    assert names == ("code", "n", "flag")
    assert X[0].tolist() == ["007", 3, True] and X[1, 0] == "NA" and math.isnan(X[1, 1]) and X[2, 0] is None


def test_parquet_keeps_its_types(tmp_path, churn):
    frame = pandas.read_csv(churn.test_csv)
    frame.to_parquet(tmp_path / "test.parquet")
    report = validate(
        str(churn.rf_onnx), reference_path=str(churn.rf), data_path=str(tmp_path / "test.parquet"), latency_budget=0.1
    )
    assert report["rows"] == 2000 and report["agreement"] == 1.0


def test_a_version_1_bundle_still_serves(tmp_path):
    from pathlib import Path

    formats = Path(__file__).resolve().parent.parent / "fixtures" / "formats"
    bundle = read_bundle(formats / "digits-1.edgebundle", load_public_key(formats / "edgekit.pub"))
    assert bundle.manifest["schema"] == "edgekit.bundle/1" and bundle.input_schema.columns is None
    config = make_device(tmp_path / "old", formats / "digits-1.edgebundle", formats / "edgekit.pub", http=False)
    with Agent(config_of(config)).start() as agent:
        assert len(agent.predict([[0.0] * 64]).to_json()["predictions"]) == 1


def _int8(cli, churn, model, out, *more):
    """``edgekit convert MODEL --quantize int8`` calibrated on the churn training rows."""
    return cli(
        "convert", model, "--quantize", "int8", "--calibration", churn.train_csv, "--label", "label", "-o", out, *more
    )


def test_tree_ensembles_refuse_int8_and_say_why(tmp_path, churn, cli):
    result = _int8(cli, churn, churn.rf, tmp_path / "x.onnx")
    assert result.exit_code != 0 and "tree ensemble" in result.stderr


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_the_mlp_of_a_mixed_pipeline_is_still_quantized(tmp_path, churn, cli):
    import joblib
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    from edgekit.local.churn import CATEGORICAL, NUMERIC

    frame = pandas.read_csv(churn.train_csv).iloc[:2000]
    target = frame.pop("label")
    numbers = Pipeline([("impute", SimpleImputer()), ("scale", StandardScaler())])
    strings = Pipeline([("impute", SimpleImputer(strategy="most_frequent")), ("onehot", OneHotEncoder())])
    pre = ColumnTransformer([("num", numbers, list(NUMERIC)), ("cat", strings, list(CATEGORICAL))])
    model = Pipeline([("pre", pre), ("m", MLPClassifier((128, 128), max_iter=20, random_state=0))]).fit(frame, target)
    joblib.dump(model, tmp_path / "mlp.joblib")
    out = tmp_path / "mlp8.onnx"
    result = _int8(cli, churn, tmp_path / "mlp.joblib", out, "--force", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["quantization"]["chosen"] != "float32", result.stdout
    assert out.stat().st_size < (tmp_path / "mlp.joblib").stat().st_size


def test_rows_from_a_csv_agree_with_scikit_learn_reading_the_same_file(churn):
    """The agent's CSV reading (types from the schema) and pandas' (types guessed) give the same answers."""
    import joblib

    from device_agent.tabular import read_table

    pipeline = joblib.load(churn.rf)
    frame = pandas.read_csv(churn.test_csv).drop(columns="label")
    from edgekit.models.loading import load_model

    model = load_model(churn.rf_onnx)
    X, _, names = read_table(churn.test_csv, "label", columns=model.input.columns)
    assert list(names) == list(frame.columns)
    ours = model.predict(model.input.check(X)).labels
    assert (ours == pipeline.predict(frame)).mean() == 1.0
    with open(churn.test_csv) as handle:
        assert next(csv.reader(handle))[-1] == "label"


def test_a_parquet_file_types_the_integer_columns_scikit_learn_does_not_record(tmp_path, churn, cli):
    from edgekit.models.loading import load_model

    pandas.read_csv(churn.train_csv).to_parquet(tmp_path / "train.parquet")
    result = cli("convert", churn.hgb, "--names-from", tmp_path / "train.parquet", "-o", tmp_path / "typed.onnx")
    assert result.exit_code == 0, result.stderr
    schema = load_model(tmp_path / "typed.onnx").input
    types = {c.name: c.dtype for c in schema.columns}
    assert types["age"] == "int64" and types["monthly_charges"] == "float64" and types["country"] == "string"
    with pytest.raises(InputError, match="row 0, column 'age': expected a whole number, got 41.5"):
        schema.check([{**ROW, "age": 41.5}], source="request")
    assert schema.check([{**ROW, "age": 41.0}])[0, 0] == 41  # a whole float is the integer it names


def _small_frame(rows=400):
    rng = np.random.default_rng(0)
    frame = pandas.DataFrame(
        {
            "id": [f"c{i}" for i in range(rows)],
            "age": rng.integers(18, 80, rows).astype(float),
            "rooms": rng.integers(1, 5, rows),
            "income": rng.normal(5e4, 1e4, rows),
        }
    )
    return frame, (frame["age"] > 40).astype(int)


def _converted(tmp_path, pipeline, name):
    import joblib

    from edgekit.build.convert import convert_model
    from edgekit.models.loading import load_model

    joblib.dump(pipeline, tmp_path / f"{name}.joblib")
    convert_model(str(tmp_path / f"{name}.joblib"), str(tmp_path / f"{name}.onnx"))
    return load_model(tmp_path / f"{name}.onnx")


def test_scikit_learns_own_trees_refuse_nan_their_onnx_would_route_otherwise(tmp_path):
    """skl2onnx drops a forest's learned NaN routing, so NaN is refused unless the pipeline imputes it."""
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import Pipeline

    frame, target = _small_frame()
    pre = ColumnTransformer([("num", "passthrough", ["age", "income"])])
    model = _converted(tmp_path, Pipeline([("pre", pre), ("m", RandomForestClassifier(10))]).fit(frame, target), "rf")
    assert not model.input.allow_nan
    with pytest.raises(InputError, match="column 'age': a missing value, and the model does not impute"):
        model.input.check([{"id": "x", "age": None, "rooms": 1, "income": 1.0}])


def test_a_dropped_string_id_is_accepted_as_sent_and_never_drifts(tmp_path, keypair):
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline, make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    from edgekit.bundle.package import build_bundle

    frame, target = _small_frame()
    rooms = make_pipeline(SimpleImputer(strategy="most_frequent"), OneHotEncoder())
    pre = ColumnTransformer([("cat", rooms, ["rooms"]), ("num", StandardScaler(), ["age"])])
    model = _converted(tmp_path, Pipeline([("pre", pre), ("m", LogisticRegression())]).fit(frame, target), "lr")
    kinds = {c.name: (c.kind, c.nullable, c.feed) for c in model.input.columns}
    assert kinds["id"] == ("unused", True, None) and kinds["income"] == ("unused", True, None)
    assert kinds["rooms"] == ("categorical", False, "int64")  # an integer feed holds no missing value
    frame.assign(label=target).to_csv(tmp_path / "train.csv", index=False)
    report = validate(
        str(tmp_path / "lr.onnx"), reference_path=str(tmp_path / "lr.joblib"), data_path=str(tmp_path / "train.csv")
    )
    assert report["agreement"] == 1.0
    bundle = tmp_path / "lr.edgebundle"
    build_bundle(
        str(tmp_path / "lr.onnx"),
        name="lr",
        version=1,
        baseline_path=str(tmp_path / "train.csv"),
        label="label",
        key_path=str(keypair[0]),
        output=str(bundle),
    )
    config = make_device(tmp_path / "dev", bundle, keypair[1], window_rows=100, http=False)
    with Agent(config_of(config)).start(http=False) as agent:
        rows = [{"id": f"new{i}", "age": 30.0, "rooms": 2, "income": None} for i in range(100)]
        agent.predict(rows)
        agent.monitor.process()
        summary = agent.last_summary
    assert summary["quality"]["unseen_rate"] == 0 and not summary["drift"]["features"]["id"].get("drifted")


@pytest.mark.parametrize(
    "cell, message",
    [
        (1e300, "too large for the model's float32 input"),
        (10**400, "does not fit the model's inputs"),
        (np.float32("nan"), "a missing value"),
    ],
)
def test_values_no_feed_can_hold_are_refused_not_answered(tmp_path, cell, message):
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    frame, target = _small_frame()
    pre = ColumnTransformer([("num", StandardScaler(), ["age", "income"])])
    model = _converted(tmp_path, Pipeline([("pre", pre), ("m", LogisticRegression())]).fit(frame, target), "lr")
    with pytest.raises(InputError, match=message):
        model.input.feed(model.input.check([["x", 30.0, 1, cell]]))


def test_a_column_of_more_values_than_remembered_counts_no_unseen():
    from device_agent.categories import MAX_KNOWN, CategoricalSketch

    values = [f"zip{i}" for i in np.random.default_rng(0).integers(0, MAX_KNOWN + 1000, 30_000)]
    baseline = CategoricalSketch.from_values("zip", values)
    window = baseline.empty_like()
    window.update(values[:500])
    assert window.unseen == 0 and len(baseline.categories) == 20
