"""``edgekit promote``: the champion/challenger gate.

A weak digits champion (logistic regression on 40 rows) is built once per module; candidates are
fitted here in a second or two. What is checked is what an operator relies on: a better model is
packaged as the next version and loads on a device with its parent and data named in its lineage; an
equal or worse one exits 1 and writes nothing; a gain on fresh data does not excuse a regression on
the data the champion was gated on before; bad input exits 2 in one line; a CNN goes through the
same gate with the champion's preprocessing.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from device_agent.bundle import read_bundle
from device_agent.cli import main as agent_main
from device_agent.runtimes import open_runtime
from device_agent.serving import Serving
from device_agent.signing import load_public_key
from device_agent.updater import run_selftest
from edgekit.build.convert import convert_model
from edgekit.bundle.keys import generate_keypair
from edgekit.bundle.package import build_bundle
from edgekit.bundle.promote import PromoteOptions, promote


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _fit(X, y, rows: int | None = None):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a weak model on 40 rows does not converge; it is meant to be weak
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(X[:rows], y[:rows])


@dataclass(frozen=True)
class Models:
    weak: Path  # fitted on 40 rows: the champion to beat
    good: Path  # fitted on every training row
    inverted: Path  # fitted only on inverted digits (16 - v): wins in the field, forgets the original digits
    five: Path  # fitted on the digits 0-4 only: other classes
    field: Path  # the test digits inverted, labelled: "fresh field data"
    champion: Path  # digits v3 = weak, packaged and signed with the session key


@pytest.fixture(scope="module")
def models(digits, keypair, tmp_path_factory) -> Models:
    import joblib

    directory = tmp_path_factory.mktemp("promote")
    train, test = np.load(digits.train), np.load(digits.test)
    X, y, names = train["X"], train["y"], train["feature_names"]
    fitted = {
        "weak": _fit(X, y, 40),
        "good": _fit(X, y),
        "inverted": _fit(16 - X, y),
        "five": _fit(X[y < 5], y[y < 5]),
    }
    for name, model in fitted.items():
        joblib.dump(model, directory / f"{name}.joblib")
    np.savez(directory / "field.npz", X=16 - test["X"], y=test["y"], feature_names=names)
    convert_model(str(directory / "weak.joblib"), str(directory / "weak.onnx"), names_from=str(digits.train))
    build_bundle(
        str(directory / "weak.onnx"),
        name="digits",
        version=3,
        baseline_path=str(digits.train),
        key_path=str(keypair[0]),
        output=str(directory / "digits-3.edgebundle"),
        drift={"min_psi": 0.2},
    )
    return Models(
        *(directory / f"{name}.joblib" for name in fitted),
        field=directory / "field.npz",
        champion=directory / "digits-3.edgebundle",
    )


@pytest.fixture(scope="module")
def digits_4(models, digits, keypair, tmp_path_factory) -> Path:
    """digits v4: the good model promoted over the weak one, gated on the test CSV (which v4's lineage records)."""
    output = tmp_path_factory.mktemp("digits4") / "digits-4.edgebundle"
    result = promote(
        str(models.good),
        champion=str(models.champion),
        data=[str(digits.test_csv)],
        key_path=str(keypair[0]),
        output=str(output),
        options=PromoteOptions(trained_on=(str(digits.train),), latency_budget=0.1),
    )
    assert result.promoted, result.reasons
    return output


def test_a_better_candidate_is_promoted_and_its_bundle_loads_on_a_device(cli, models, digits, keypair, tmp_path):
    output = tmp_path / "digits-4.edgebundle"
    result = cli(
        "promote", models.good, "--champion", models.champion, "--data", digits.test_csv, "--data", models.field,
        "--trained-on", digits.train, "--min-gain", 0.005, "--max-regression", 1, "--key", keypair[0], "-o", output,
        "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["promoted"] and report["decision"] == "promoted" and report["version"] == 4
    test_score = next(s for s in report["scores"] if s["file"] == "digits_test.csv")
    assert test_score["candidate"] > test_score["champion"] + 0.1  # 40 rows against all of them
    assert report["candidate"]["format"] == "onnx" and report["latency"]["candidate"]["1"]["p50_ms"] > 0

    bundle = read_bundle(output, load_public_key(keypair[1]))
    assert (bundle.name, bundle.version) == ("digits", 4)
    lineage = bundle.manifest["lineage"]
    assert lineage["parent"] == {"name": "digits", "version": 3, "sha256": sha256(models.champion)}
    assert {(d["file"], d["sha256"]) for d in lineage["gated_on"]} == {
        ("digits_test.csv", sha256(digits.test_csv)),
        ("field.npz", sha256(models.field)),
    }
    assert lineage["trained_on"] == [{"file": "digits_train.npz", "sha256": sha256(digits.train)}]
    assert lineage["baseline_sha256"] == sha256(digits.train) and "git_commit" in lineage
    champion = read_bundle(models.champion)
    assert bundle.manifest["drift"] == champion.manifest["drift"] and bundle.manifest["drift"]["min_psi"] == 0.2
    assert bundle.manifest["input"]["feature_names"] == champion.manifest["input"]["feature_names"]
    # what a device does with it: verify, load, run the bundle's own self-test, serve
    assert agent_main(["verify", str(output), "--pubkey", str(keypair[1])]) == 0
    runtime = open_runtime(bundle.model_format, bundle.model_bytes)
    assert run_selftest(bundle, runtime)["rows"] > 0
    serving = Serving(bundle, runtime)
    assert serving.model_info == {"name": "digits", "version": 4}


def test_an_equal_candidate_keeps_the_champion_and_writes_nothing(cli, v4_bundle, digits, keypair, tmp_path):
    """v4_bundle is digits.joblib converted to float32; the same pipeline again answers the same."""
    output = tmp_path / "digits-5.edgebundle"
    result = cli(
        "promote", digits.model, "--champion", v4_bundle, "--data", digits.test, "--trained-on", digits.train,
        "--key", keypair[0], "-o", output,
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "no change in accuracy on the fresh data" in result.stdout
    assert "kept digits v4; nothing written" in result.stdout
    assert not output.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("which", "flags", "said"),
    [
        ("weak", [], "regresses on digits_test.npz (fresh): accuracy drop"),
        ("good", ["--min-gain", 0.5], "the gate needs at least --min-gain 0.5"),
    ],
)
def test_a_worse_or_not_enough_better_candidate_exits_1(cli, models, digits, keypair, tmp_path, which, flags, said):
    champion = models.champion if which == "good" else _v4_of(models, digits, keypair, tmp_path)
    output = tmp_path / "out.edgebundle"
    result = cli(
        "promote", getattr(models, which), "--champion", champion, "--data", digits.test, "--trained-on",
        digits.train, "--key", keypair[0], "-o", output, *flags,
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert said in result.stdout and "NOT PROMOTED" in result.stdout
    assert not output.exists()


def _v4_of(models, digits, keypair, tmp_path) -> Path:
    """The good model packaged as v4, to test a weak candidate against."""
    onnx = tmp_path / "good.onnx"
    convert_model(str(models.good), str(onnx), names_from=str(digits.train))
    path = tmp_path / "digits-4.edgebundle"
    build_bundle(str(onnx), name="digits", version=4, baseline_path=str(digits.train), key_path=str(keypair[0]),
                 output=str(path))  # fmt: skip
    return path


def test_a_gain_on_field_data_does_not_excuse_a_regression_on_the_champions_gate(
    cli, models, digits, digits_4, keypair, tmp_path
):
    """The model fitted on inverted digits wins the field and forgets the digits v4 was gated on."""
    output = tmp_path / "digits-5.edgebundle"
    common = ["--trained-on", digits.train, "--key", keypair[0], "-o", output, "--json"]
    result = cli("promote", models.inverted, "--champion", digits_4, "--data", models.field, *common)
    assert result.exit_code == 2  # the bundle keeps only the hash of digits_test.csv: it must come back
    assert "digits v4 was gated on digits_test.csv (sha256 " in result.stderr
    assert "add --data digits_test.csv" in result.stderr and len(result.stderr.strip().splitlines()) == 1

    result = cli(
        "promote", models.inverted, "--champion", digits_4, "--data", models.field, "--data", digits.test_csv, *common
    )
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["fresh"]["file"] == "field.npz" and report["fresh"]["gain"] > 0.3
    assert [s["role"] for s in report["scores"]] == ["fresh", "gated"]
    assert report["reasons"] == [
        next(r for r in report["reasons"] if r.startswith("regresses on digits_test.csv (data the champion was gated"))
    ]
    assert not output.exists()

    result = cli(  # a regression that large is allowed only when asked for
        "promote", models.inverted, "--champion", digits_4, "--data", models.field, "--data", digits.test_csv,
        "--max-regression", 1, *common,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    gated = read_bundle(output).manifest["lineage"]["gated_on"]
    assert [(g["file"], g["role"]) for g in gated] == [("field.npz", "fresh"), ("digits_test.csv", "gated")]


def test_the_champions_gate_data_must_be_the_same_bytes(cli, models, digits, digits_4, keypair, tmp_path):
    changed = tmp_path / "digits_test.csv"
    lines = Path(digits.test_csv).read_text().splitlines()
    changed.write_text("\n".join(lines[:-1]) + "\n")  # one row less
    result = cli(
        "promote", models.good, "--champion", digits_4, "--data", models.field, "--data", changed,
        "--trained-on", digits.train, "--key", keypair[0], "-o", tmp_path / "x.edgebundle",
    )  # fmt: skip
    assert result.exit_code == 2
    assert "is not the digits_test.csv digits v4 was gated on" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _unlabelled(tmp_path, digits) -> Path:
    test = np.load(digits.test)
    np.savez(tmp_path / "nolabels.npz", X=test["X"], feature_names=test["feature_names"])
    return tmp_path / "nolabels.npz"


def _foreign_key(tmp_path, digits) -> list:
    private, _, _ = generate_keypair(tmp_path / "other")
    return ["--key", private]


@pytest.mark.parametrize(
    ("case", "said"),
    [
        ("cancer", "the candidate takes 30 features, digits v3 takes 64; promote only a retrained digits"),
        ("five", "the candidate has classes [0, 1, 2, 3, 4], digits v3 [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]"),
        ("unlabelled", "has no labels, which the champion/challenger gate needs"),
        ("version", "--version 3 is not above digits v3's"),
        ("no-baseline", "the new bundle needs a drift baseline"),
        ("trained-on-gate", "is also --trained-on data (digits_test.npz)"),
        ("foreign-key", "the champion's signature does not verify: signed by key"),
        ("nothing-fresh", "every --data file is data digits v4 was already gated on"),
    ],
)
def test_bad_input_exits_2_in_one_line(cli, models, cancer, digits, keypair, tmp_path, case, said, request):
    candidate, champion, data = models.good, models.champion, [digits.test]
    extra: list = ["--trained-on", digits.train, "--key", keypair[0]]
    if case == "cancer":
        candidate = cancer.model
    elif case == "five":
        candidate = models.five
    elif case == "unlabelled":
        data = [_unlabelled(tmp_path, digits)]
    elif case == "version":
        extra += ["--version", 3]
    elif case == "no-baseline":
        extra = ["--key", keypair[0]]
    elif case == "trained-on-gate":
        extra += ["--trained-on", digits.test]
    elif case == "foreign-key":
        extra = ["--trained-on", digits.train, *_foreign_key(tmp_path, digits)]
    elif case == "nothing-fresh":
        champion, data = request.getfixturevalue("digits_4"), [digits.test_csv]
    output = tmp_path / "out.edgebundle"
    args = [a for path in data for a in ("--data", path)]
    result = cli("promote", candidate, "--champion", champion, *args, *extra, "-o", output)
    assert result.exit_code == 2, result.output
    assert said in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not output.exists()


@pytest.mark.slow
def test_an_int8_champion_puts_the_candidate_through_converts_int8_search(cli, bundle, digits, keypair, tmp_path):
    """``bundle`` is int8: with --quantize auto the candidate goes through convert's search, scored on the
    fresh data; which configuration wins depends on this host's speed, so only that it ran is checked."""
    result = cli(
        "promote", digits.model, "--champion", bundle, "--data", digits.test, "--trained-on", digits.train,
        "--key", keypair[0], "-o", tmp_path / "out.edgebundle", "--json",
    )  # fmt: skip
    assert result.exit_code in (0, 1), result.output
    report = json.loads(result.stdout)
    search = report["candidate"]["conversion"]["quantization"]
    assert search["trials"] and any(note.startswith("int8 search: ") for note in report["notes"])
    assert report["champion"]["quantization"] != "float32"


# -- a tensor model ---------------------------------------------------------------------------------------


def _worse_cnn(digits_cnn, keypair, directory: Path) -> Path:
    """The digits CNN with noise in every weight (about 74 % accurate against 98 %), converted with its
    preprocessing and packaged as cam v1: a champion the trained network beats."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(digits_cnn.model))
    rng = np.random.default_rng(0)
    for init in proto.graph.initializer:
        weights = numpy_helper.to_array(init)
        if weights.ndim >= 2:
            noisy = weights + rng.normal(0, 0.6 * weights.std(), weights.shape)
            init.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), init.name))
    onnx.save(proto, str(directory / "worse.onnx"))
    convert_model(
        str(directory / "worse.onnx"), str(directory / "worse.conv.onnx"), preprocess=str(digits_cnn.preprocess)
    )
    names = directory / "names.txt"
    names.write_text("".join(f"digit {d}\n" for d in range(10)))
    champion = directory / "cam-1.edgebundle"
    build_bundle(str(directory / "worse.conv.onnx"), name="cam", version=1, baseline_path=str(digits_cnn.images),
                 labels=str(names), key_path=str(keypair[0]), output=str(champion))  # fmt: skip
    return champion


@pytest.mark.slow
def test_a_cnn_candidate_is_gated_with_the_champions_preprocessing(cli, digits_cnn, models, digits, keypair, tmp_path):
    """The network as its trainer exported it carries no preprocessing: it is given the champion's, and
    the new bundle keeps the champion's class names."""
    champion = _worse_cnn(digits_cnn, keypair, tmp_path)
    output = tmp_path / "cam-2.edgebundle"
    common = ["--data", digits_cnn.test, "--trained-on", digits_cnn.train, "--key", keypair[0], "-o", output]
    result = cli("promote", digits_cnn.model, "--champion", champion, *common, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["scores"][0]["candidate"] > report["scores"][0]["champion"] + 0.1
    bundle, old = read_bundle(output, load_public_key(keypair[1])), read_bundle(champion)
    assert bundle.manifest["input"]["preprocess"] == old.manifest["input"]["preprocess"] is not None
    assert bundle.manifest["output"]["labels"] == [f"digit {d}" for d in range(10)]
    assert run_selftest(bundle, open_runtime(bundle.model_format, bundle.model_bytes))["rows"] > 0
    assert bundle.manifest["lineage"]["parent"]["name"] == "cam"

    equal = cli("promote", digits_cnn.model, "--champion", digits_cnn.bundle, *common[:-2], "-o", tmp_path / "e")
    assert equal.exit_code == 1 and "no change in accuracy" in equal.stdout

    table = cli("promote", models.good, "--champion", champion, *common[:-2], "-o", tmp_path / "t")
    assert table.exit_code == 2 and "the candidate takes rows of features, cam v1 takes a tensor" in table.stderr


@pytest.mark.slow
def test_a_typed_table_candidate_is_gated_on_the_champions_columns(cli, churn, keypair, tmp_path):
    """The churn pipelines take typed columns (strings, integers, flags); the HistGradientBoosting one is
    judged against the random forest's bundle on the same CSV, read as the bundle's column types."""
    result = cli(
        "promote", churn.hgb, "--champion", churn.bundle, "--data", churn.test_csv, "--label", "label",
        "--trained-on", churn.train_csv, "--max-regression", 1, "--key", keypair[0], "-o", tmp_path / "c.edgebundle",
        "--json",
    )  # fmt: skip
    assert result.exit_code in (0, 1), result.output  # which forest wins is scikit-learn's business
    report = json.loads(result.stdout)
    assert report["scores"][0]["rows"] > 0 and 0.5 < report["scores"][0]["champion"] <= 1
    assert (tmp_path / "c.edgebundle").exists() == report["promoted"]


def test_a_candidate_that_refuses_missing_values_the_champion_took_is_refused():
    """Accepting more missing values than the champion is harmless; accepting fewer would start refusing
    clients that send them."""
    from types import SimpleNamespace

    from device_agent.schema import InputSchema
    from edgekit.bundle.champion import check_same_input
    from edgekit.errors import PackageError

    def schema(allow_nan: bool) -> InputSchema:
        return InputSchema(input_name="X", feature_names=("a", "b"), allow_nan=allow_nan)

    champion = SimpleNamespace(
        model=SimpleNamespace(input=schema(True)), label="m v1", bundle=SimpleNamespace(name="m")
    )
    check_same_input(SimpleNamespace(input=schema(True)), champion, source="c.joblib")
    with pytest.raises(PackageError, match=r"refuses missing values in \[\"a\", \"b\"\], which m v1 accepts"):
        check_same_input(SimpleNamespace(input=schema(False)), champion, source="c.joblib")
    champion.model.input = schema(False)
    check_same_input(SimpleNamespace(input=schema(True)), champion, source="c.joblib")
