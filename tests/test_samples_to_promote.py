"""README's field-samples path: ``edgekit fleet samples -o field.csv`` fed as it is to promote, validate and
package --baseline.

The export holds metadata columns (id, device, model, version, seq, ts, drifted, prediction) before the
features and ``label``, which is empty until a delayed label arrives. Every command that reads data reads an
export's features and label only; a file with unlabelled rows counts them all for a baseline, and is refused in
one line (naming the count and ``--labelled-only``) where labels are needed. The rows come from a real capture
run of the agent (shaped as the collector stores them) or, in the network test, from a real upload through the
collector and the ``edgekit fleet samples`` CLI.
"""

from __future__ import annotations

import csv
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from device_agent import Agent
from device_agent.bundle import read_bundle
from device_agent.signing import load_public_key
from edgekit.build.convert import convert_model
from edgekit.bundle.package import build_bundle
from edgekit.fleet.samples import export_samples
from tests.agent_helpers import config_of
from tests.fleet_helpers import wait
from tests.test_field_samples import TOKEN, _online, capture_device, running_collector


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class Field:
    doc: dict  # what collect_samples returns: {"header", "rows"}, the rows as the collector stores them
    labelled: int
    unlabelled: int


@dataclass(frozen=True)
class Models:
    weak: Path  # fitted on 40 rows: the champion to beat
    good: Path  # fitted on every training row
    champion: Path  # the weak model packaged as digits v3


@pytest.fixture(scope="module")
def field(tmp_path_factory, bundle, keypair, digits) -> Field:
    """The rows a real agent kept ([capture], rate 0.5) of 300 test digits, each with the device and, for two
    rows in three, its delayed label, as the collector's store returns them to ``fleet samples``."""
    with np.load(digits.test) as npz:
        X, y = npz["X"], npz["y"]
    root = tmp_path_factory.mktemp("field")
    config = capture_device(root, bundle, keypair, capture={"enabled": True, "rate": 0.5, "drifted_rows": 0})
    with Agent(config_of(config)).start(http=False, mqtt=False) as agent:
        position = {row_id: n for n, row_id in enumerate(agent.predict(X[:300]).ids)}
        wait(lambda: agent.stats["windows"] >= 3, what="three windows")
        kept, models = list(agent.capture.rows()), agent.capture.models()
    rows = []
    for record in kept:
        n = position[record["id"]]
        rows.append({**record, "device": "pi-kitchen-01", "label": int(y[n]) if n % 3 else None})
    labelled = sum(1 for row in rows if row["label"] is not None)
    assert 0 < labelled < len(rows) and set(rows[0]) >= {"id", "seq", "ts", "drifted", "prediction", "input"}
    return Field({"header": {"models": models}, "rows": rows}, labelled, len(rows) - labelled)


def _fit(X, y, rows=None):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a weak model on 40 rows does not converge; it is meant to be weak
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(X[:rows], y[:rows])


@pytest.fixture(scope="module")
def models(tmp_path_factory, digits, keypair) -> Models:
    import joblib

    directory = tmp_path_factory.mktemp("models")
    with np.load(digits.train) as npz:
        X, y = npz["X"], npz["y"]
    joblib.dump(_fit(X, y, 40), directory / "weak.joblib")
    joblib.dump(_fit(X, y), directory / "good.joblib")
    convert_model(str(directory / "weak.joblib"), str(directory / "weak.onnx"), names_from=str(digits.train))
    build_bundle(
        str(directory / "weak.onnx"),
        name="digits",
        version=3,
        baseline_path=str(digits.train),
        key_path=str(keypair[0]),
        output=str(directory / "digits-3.edgebundle"),
    )
    return Models(directory / "weak.joblib", directory / "good.joblib", directory / "digits-3.edgebundle")


def _promote(cli, candidate, models, digits, keypair, output, *data):
    gate = [arg for path in data for arg in ("--data", path)]
    return cli(
        "promote", candidate, "--champion", models.champion, *gate, "--data", digits.test_csv,
        "--trained-on", digits.train, "--min-gain", 0.005, "--key", keypair[0], "-o", output, "--json",
    )  # fmt: skip


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_labelled_only_export_is_gated_on_as_it_is(cli, field, models, digits, keypair, tmp_path, suffix):
    """Failed before: promote read the metadata columns as features ('id' holds 'f80b99ec-4', not a number)."""
    path = tmp_path / f"field{suffix}"
    written = export_samples(field.doc, path, labelled_only=True)
    assert written["rows"] == written["labelled"] == field.labelled and written["left_out"] == field.unlabelled
    output = tmp_path / "digits-4.edgebundle"
    result = _promote(cli, models.good, models, digits, keypair, output, path)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["promoted"] and report["version"] == 4
    scored = next(s for s in report["scores"] if s["file"] == path.name)
    assert scored["rows"] == field.labelled and scored["candidate"] > scored["champion"]
    lineage = read_bundle(output, load_public_key(keypair[1])).manifest["lineage"]
    assert (path.name, _sha256(path)) in {(d["file"], d["sha256"]) for d in lineage["gated_on"]}

    kept = tmp_path / "kept.edgebundle"  # the champion against itself: no gain, kept on the merits
    result = _promote(cli, models.weak, models, digits, keypair, kept, path)
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout)["decision"] != "promoted" and not kept.exists()


@pytest.mark.parametrize("suffix", [".csv", ".npz"])
def test_unlabelled_rows_are_refused_in_one_line_where_labels_are_needed(
    cli, field, models, digits, keypair, tmp_path, suffix
):
    """Failed before: "has labels the model does not know: ''" (or the metadata error first); an .npz export's
    unlabelled rows (a placeholder in y, False in ``labelled``) were scored as labels."""
    path = tmp_path / f"field{suffix}"
    assert export_samples(field.doc, path)["labelled"] == field.labelled
    said = f"{field.unlabelled} of its {len(field.doc['rows'])} field rows have no label yet"
    result = _promote(cli, models.good, models, digits, keypair, tmp_path / "out.edgebundle", path)
    assert result.exit_code == 2 and said in result.output and "--labelled-only" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out.edgebundle").exists()
    validate = cli(
        "validate", models.weak.with_suffix(".onnx"), "--reference", models.weak, "--data", path,
        "--max-accuracy-drop", 0.01,
    )  # fmt: skip
    assert validate.exit_code == 2 and said in validate.output, validate.output


def test_validate_scores_an_export_on_its_features(cli, field, models, tmp_path):
    """Failed before: the 'id' column was read as a feature and refused."""
    labelled = tmp_path / "field.csv"
    export_samples(field.doc, labelled, labelled_only=True)
    onnx = models.weak.with_suffix(".onnx")
    result = cli(
        "validate", onnx, "--reference", models.weak, "--data", labelled, "--max-accuracy-drop", 0.01, "--json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["rows"] == field.labelled and report["labelled"] and report["accuracy_drop"] <= 0.01
    every = tmp_path / "every.csv"
    export_samples(field.doc, every)
    result = cli("validate", onnx, "--reference", models.weak, "--data", every, "--json")  # agreement needs no labels
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"] == len(field.doc["rows"])


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_baseline_counts_every_field_row_labelled_or_not(cli, field, models, keypair, tmp_path, suffix):
    """Failed before: the metadata columns were read as features."""
    path = tmp_path / f"field{suffix}"
    export_samples(field.doc, path)
    output = tmp_path / "digits-5.edgebundle"
    result = cli(
        "package", models.weak.with_suffix(".onnx"), "--name", "digits", "--version", 5, "--baseline", path,
        "--key", keypair[0], "-o", output,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    bundle = read_bundle(output, load_public_key(keypair[1]))
    assert bundle.manifest["lineage"]["baseline_sha256"] == _sha256(path)
    assert bundle.baseline().rows == len(field.doc["rows"])
    assert bundle.manifest["input"]["feature_names"][0] == "pixel_0_0"


def test_convert_calibrates_on_every_field_row_and_evaluates_on_labelled_ones(cli, field, digits, tmp_path):
    """Failed before: the metadata columns were read as features, for --calibration and --eval alike."""
    import joblib
    from sklearn.neural_network import MLPClassifier

    with np.load(digits.train) as npz, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few epochs: quantizable, not converged
        joblib.dump(MLPClassifier((32,), max_iter=60, random_state=0).fit(npz["X"], npz["y"]), tmp_path / "mlp.joblib")
    every, labelled = tmp_path / "every.csv", tmp_path / "labelled.csv"
    export_samples(field.doc, every)
    export_samples(field.doc, labelled, labelled_only=True)
    output = tmp_path / "int8.onnx"
    quantize = ("--quantize", "int8", "--calibration", every)
    mlp = tmp_path / "mlp.joblib"
    result = cli("convert", mlp, *quantize, "--eval", labelled, "--max-accuracy-drop", 0.05, "-o", output)
    assert result.exit_code == 0, result.output
    assert output.is_file()
    refused = cli("convert", mlp, *quantize, "--eval", every, "-o", tmp_path / "no.onnx")
    said = f"{field.unlabelled} of its {len(field.doc['rows'])} field rows have no label yet, which --eval needs"
    assert refused.exit_code == 2 and said in refused.output, refused.output


def test_a_plain_csv_with_an_id_column_says_to_drop_it(cli, models, digits, tmp_path):
    """The refusal stays; its fix fits the column (failed before: 'encode categories as numbers')."""
    with open(digits.test_csv, newline="") as handle:
        table = list(csv.reader(handle))
    onnx = models.weak.with_suffix(".onnx")
    for column, value, fix in (
        ("id", "f80b99ec-4", "drop the column 'id'"),
        ("sample_id", "s-1", "drop the column 'sample_id'"),
        ("device", "pi-kitchen-01", "drop the column 'device' (field-samples metadata"),
        ("city", "Lyon", "encode categories as numbers"),
    ):
        path = tmp_path / f"{column}.csv"
        with open(path, "w", newline="") as handle:
            csv.writer(handle).writerows([[column, *table[0]], *([value, *row] for row in table[1:])])
        result = cli("validate", onnx, "--reference", models.weak, "--data", path)
        assert result.exit_code == 2, result.output
        assert f"line 2 column '{column}' holds '{value}', not a number" in result.output and fix in result.output
        assert ("encode categories" in result.output) == (column == "city")


@pytest.mark.network
def test_fleet_samples_labelled_only_then_promote_through_a_real_upload(
    tmp_path, bundle, keypair, digits, broker, fleet_name, cli, models
):
    """The README's two lines, run: the device's rows reach the file through the collector, then the gate."""
    with np.load(digits.test) as npz:
        X, y = npz["X"], npz["y"]
    with running_collector(tmp_path, broker, fleet_name, api_token=TOKEN) as collector:
        config = capture_device(
            tmp_path, bundle, keypair, capture={"enabled": True, "rate": 0.5}, broker=broker.url, fleet=fleet_name,
            collector=collector.url,
        )  # fmt: skip
        with Agent(config_of(config)).start(http=False) as agent:
            wait(lambda: collector.drain() >= 0 and _online(collector, "dev1"), what="the device online")
            ids = agent.predict(X[:300]).ids
            for n in range(0, 300, 3):  # delayed labels for a third of them
                assert agent.feedback(ids[n], int(y[n])) == "accepted"
            wait(lambda: agent.stats["windows"] >= 3, what="three windows")
            out = tmp_path / "field.csv"
            env = {"EDGEKIT_COLLECTOR_TOKEN": TOKEN}
            result = cli(
                "fleet", "samples", "--device", "dev1", "--collector", collector.url, "--labelled-only", "-o", out,
                env=env,
            )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "without one left out" in result.stdout
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all(row["label"] != "" for row in rows) and list(rows[0])[:2] == ["id", "device"]
    output = tmp_path / "digits-4.edgebundle"
    promoted = _promote(cli, models.good, models, digits, keypair, output, out)
    assert promoted.exit_code == 0, promoted.output
    scored = next(s for s in json.loads(promoted.stdout)["scores"] if s["file"] == "field.csv")
    assert scored["rows"] == len(rows)
