"""Shared test fixtures: reference models and data, and a CLI runner.

The committed fixtures/ are used when they were pickled by the installed scikit-learn; otherwise
they are regenerated once per session into a temporary directory (pickles do not travel across
scikit-learn versions). The weight-heavy 'wide' model is never committed and is made on demand.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgekit.cli import cli_for_tests
from edgekit.local.fixtures import fixtures_usable, make_fixtures

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Fixture:
    model: Path
    train: Path
    test: Path
    test_csv: Path


def _fixture(directory: Path, name: str) -> Fixture:
    return Fixture(
        directory / f"{name}.joblib",
        directory / f"{name}_train.npz",
        directory / f"{name}_test.npz",
        directory / f"{name}_test.csv",
    )


@pytest.fixture(scope="session")
def fixture_dir(tmp_path_factory) -> Path:
    repo = ROOT / "fixtures"
    if fixtures_usable(repo, ("digits", "cancer")):
        return repo
    directory = tmp_path_factory.mktemp("fixtures")
    make_fixtures(directory, ("digits", "cancer"))
    return directory


@pytest.fixture(scope="session")
def digits(fixture_dir) -> Fixture:
    return _fixture(fixture_dir, "digits")


@pytest.fixture(scope="session")
def cancer(fixture_dir) -> Fixture:
    return _fixture(fixture_dir, "cancer")


@pytest.fixture(scope="session")
def wide(tmp_path_factory) -> Fixture:
    repo = ROOT / "fixtures"
    if fixtures_usable(repo, ("wide",)):
        return _fixture(repo, "wide")
    directory = tmp_path_factory.mktemp("wide")
    make_fixtures(directory, ("wide",))
    return _fixture(directory, "wide")


@pytest.fixture(scope="session")
def digits_onnx(digits, tmp_path_factory) -> Path:
    from edgekit.build.convert import convert_model

    path = tmp_path_factory.mktemp("digits_onnx") / "digits.onnx"
    convert_model(str(digits.model), str(path), names_from=str(digits.train))  # the pickle was fitted on a bare array
    return path


@pytest.fixture(scope="session")
def digits_int8(digits, tmp_path_factory) -> Path:
    """A static QDQ int8 digits model, forced so it exists whatever the speed here."""
    from edgekit.build.convert import QuantizeOptions, convert_model

    path = tmp_path_factory.mktemp("digits_int8") / "digits.int8.onnx"
    convert_model(
        str(digits.model),
        str(path),
        quantize=QuantizeOptions(mode="static", per_channel=False, force=True),
        calibration=str(digits.train),
    )
    return path


@pytest.fixture(scope="session")
def keypair(tmp_path_factory) -> tuple[Path, Path]:
    from edgekit.bundle.keys import generate_keypair

    private, public, _ = generate_keypair(tmp_path_factory.mktemp("keys"))
    return private, public


@pytest.fixture(scope="session")
def bundle(digits, digits_int8, keypair, tmp_path_factory) -> Path:
    from edgekit.bundle.package import build_bundle

    path = tmp_path_factory.mktemp("bundle") / "digits-3.edgebundle"
    build_bundle(
        str(digits_int8),
        name="digits",
        version=3,
        baseline_path=str(digits.train),
        key_path=str(keypair[0]),
        output=str(path),
    )
    return path


class Cli:
    """Runs ``edgekit`` in-process; ``result.exit_code``, ``.stdout`` and ``.stderr`` are kept apart."""

    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: object, env: dict[str, str] | None = None):
        return self.runner.invoke(cli_for_tests(), [str(a) for a in args], env=env, catch_exceptions=False)


@pytest.fixture(scope="session")
def v4_bundle(digits, digits_onnx, keypair, tmp_path_factory):
    """digits v4, signed by the test key: a newer bundle than ``bundle`` (v3)."""
    from edgekit.bundle.package import build_bundle

    path = tmp_path_factory.mktemp("v4u") / "digits-4.edgebundle"
    build_bundle(
        str(digits_onnx),
        name="digits",
        version=4,
        baseline_path=str(digits.train),
        key_path=str(keypair[0]),
        output=str(path),
    )
    return path


@dataclass(frozen=True)
class Churn:
    """The typed tabular fixture (edgekit/local/churn.py), converted, and packaged as churn v1."""

    directory: Path
    rf: Path  # the scikit-learn pipelines
    hgb: Path
    rf_onnx: Path
    hgb_onnx: Path
    train_csv: Path
    test_csv: Path
    bundle: Path


@pytest.fixture(scope="session")
def churn(keypair, tmp_path_factory) -> Churn:
    from edgekit.build.convert import convert_model
    from edgekit.bundle.package import build_bundle
    from edgekit.local.churn import make_churn

    directory = tmp_path_factory.mktemp("churn")
    paths = {k: Path(v) for k, v in make_churn(directory).items()}
    for name in ("rf", "hgb"):
        convert_model(str(paths[f"churn_{name}"]), str(directory / f"churn_{name}.onnx"))
    bundle = directory / "churn-1.edgebundle"
    build_bundle(
        str(directory / "churn_rf.onnx"),
        name="churn",
        version=1,
        baseline_path=str(paths["train_csv"]),
        label="label",
        key_path=str(keypair[0]),
        output=str(bundle),
    )
    return Churn(
        directory,
        paths["churn_rf"],
        paths["churn_hgb"],
        directory / "churn_rf.onnx",
        directory / "churn_hgb.onnx",
        paths["train_csv"],
        paths["test_csv"],
        bundle,
    )


@dataclass(frozen=True)
class DigitsCnn:
    """The digits CNN fixture, converted (preprocessing and embedding stored) and packaged."""

    directory: Path
    model: Path  # as the numpy trainer exported it
    onnx: Path  # converted: preprocessing in its metadata, the embedding exposed
    train: Path
    test: Path  # .npz: X [N, 1, 8, 8], y
    images: Path  # PNGs of the test digits
    labels: Path
    preprocess: Path
    bundle: Path


@pytest.fixture(scope="session")
def digits_cnn(keypair, tmp_path_factory) -> DigitsCnn:
    from edgekit.build.convert import convert_model
    from edgekit.bundle.package import build_bundle
    from edgekit.local.tensor_fixtures import make_digits_cnn

    directory = tmp_path_factory.mktemp("digits_cnn")
    paths = {k: Path(v) for k, v in make_digits_cnn(directory).items() if isinstance(v, str)}
    onnx = directory / "cnn.onnx"
    convert_model(str(paths["model"]), str(onnx), preprocess=str(paths["preprocess"]))
    bundle = directory / "cam-1.edgebundle"
    build_bundle(
        str(onnx),
        name="cam",
        version=1,
        baseline_path=str(paths["images"]),
        labels=str(paths["labels"]),
        key_path=str(keypair[0]),
        output=str(bundle),
    )
    return DigitsCnn(
        directory,
        paths["model"],
        onnx,
        paths["train"],
        paths["test"],
        paths["images"],
        paths["labels"],
        paths["preprocess"],
        bundle,
    )


@pytest.fixture
def cli() -> Cli:
    return Cli()


@pytest.fixture
def copy_of(tmp_path):
    def copy(path: Path) -> Path:
        destination = tmp_path / Path(path).name
        shutil.copy(path, destination)
        return destination

    return copy


@pytest.fixture
def broker(tmp_path):
    from tests.mqtt_helpers import Mosquitto

    server = Mosquitto(tmp_path / "broker").start()
    yield server
    server.stop()


@pytest.fixture
def fleet_name(request) -> str:
    """A fleet (topic level) unique to this test, so tests never hear each other."""
    import re
    import uuid

    return re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:40] + "-" + uuid.uuid4().hex[:6]


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server (Debian's postgresql, run by hand in a temporary directory) for this worker."""
    from edgekit.local.postgres import LocalPostgres

    with LocalPostgres() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh database of its own on the worker's PostgreSQL server."""
    return postgres_server.new_database()


@pytest.fixture(params=["sqlite-file", "postgresql"])
def fleet_store(request, tmp_path):
    """The fleet store on a SQLite file, then on a real PostgreSQL server: for tests of behaviour both must share."""
    from edgekit.fleet.store import PostgresStore, SqliteStore

    if request.param == "postgresql":
        opened = PostgresStore(request.getfixturevalue("postgres_url"))
    else:
        opened = SqliteStore(tmp_path / "fleet.db")
    yield opened
    opened.close()
