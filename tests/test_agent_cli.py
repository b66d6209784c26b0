"""``edge-agent``, the device CLI: the host CLI's conventions (a sentence or --json, one-line errors with the fix,
exit 2), help that documents agent.toml, rounded output, a quiet end when the reader of stdout goes away."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from device_agent.cli import EXIT_BROKEN_PIPE, main
from device_agent.config import parse_config, tomllib
from tests.agent_helpers import make_device

ROOT = Path(__file__).resolve().parent.parent
IRIS_NAMES = ("sepal_length", "sepal_width", "petal_length", "petal_width")


@pytest.fixture
def device(tmp_path, bundle, keypair):
    return make_device(tmp_path / "dev", bundle, keypair[1], http=False)


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_install_and_verify_print_a_sentence_or_json(
    tmp_path, bundle, v4_bundle, keypair, digits, digits_int8, cli, capsys
):
    config = make_device(tmp_path / "dev", bundle, keypair[1], http=False)
    code, out, _ = run(capsys, "install", v4_bundle, "--config", config)
    assert code == 0 and out.startswith("installed digits v4 in ") and "{" not in out
    newest = tmp_path / "digits-5.edgebundle"
    cli(
        "package",
        digits_int8,
        "--name",
        "digits",
        "--version",
        "5",
        "--baseline",
        digits.train,
        "--key",
        keypair[0],
        "-o",
        newest,
    )
    code, out, _ = run(capsys, "install", newest, "--config", config, "--json")
    assert code == 0 and json.loads(out) == {
        "installed": "digits",
        "version": 5,
        "state_dir": str(tmp_path / "dev" / "state"),
    }
    other = tmp_path / "other-1.edgebundle"  # another model in place of digits: allowed, and said
    cli(
        "package",
        digits_int8,
        "--name",
        "other",
        "--version",
        "1",
        "--baseline",
        digits.train,
        "--key",
        keypair[0],
        "-o",
        other,
    )
    code, out, _ = run(capsys, "install", other, "--config", config)
    assert code == 0 and out.startswith("installed other v1 (in place of digits v5) in "), out
    code, out, _ = run(capsys, "verify", bundle, "--pubkey", keypair[1])
    assert (
        code == 0
        and out.startswith(f"OK: {bundle} is digits v3, signed by key ")
        and "members match their sha256" in out
    )
    code, out, _ = run(capsys, "verify", bundle, "--pubkey", keypair[1], "--json")
    assert code == 0 and json.loads(out)["verified"] is True and json.loads(out)["version"] == 3


def test_help_documents_every_option_and_the_agent_toml_format(capsys, tmp_path):
    import argparse

    from device_agent.cli import _parser

    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        assert "example:\n  edge-agent " + name in command.description
        undocumented = [a.dest for a in command._actions if not a.help]
        assert not undocumented, (name, undocumented)  # --config and --pubkey had no help text
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    toml = text.split("agent.toml (TOML; relative paths are relative to the file):")[1].split("Exit codes")[0]
    config = parse_config(tomllib.loads(toml), base=tmp_path)  # the format shown is one the agent loads
    assert (
        config.device_id == "pi-kitchen-01" and config.monitor.window_rows == 1000 and config.monitor.log_rows == 10000
    )
    assert "[mqtt]" in toml and "[server]" in toml and "[monitor]" in toml and "[trust]" in toml


def test_missing_files_are_one_line_with_the_fix(device, bundle, keypair, tmp_path, capsys):
    code, out, err = run(capsys, "predict", "--config", device, tmp_path / "rows.csv")
    assert code == 2 and out == ""
    assert (
        err == f"edge-agent: no such file: {tmp_path / 'rows.csv'}; "
        "give the path of a .csv with a header row or an .npz with X\n"
    )
    assert "Errno" not in err
    for args in (
        ("install", tmp_path / "x.edgebundle", "--config", device),
        ("verify", bundle, "--pubkey", tmp_path / "nope.pub"),
        ("run", "--config", tmp_path / "agent.toml"),
    ):
        code, _, err = run(capsys, *args)
        assert code == 2 and err.startswith("edge-agent: ") and err.count("\n") == 1 and "Traceback" not in err, err


def test_probabilities_are_rounded_to_6_decimals(device, digits, capsys):
    code, out, _ = run(capsys, "predict", "--config", device, digits.test_csv)
    rows = list(csv.reader(out.splitlines()))
    assert code == 0 and rows[0][:3] == ["prediction", "p_0", "p_1"]
    cells = [cell for row in rows[1:] for cell in row[1:]]
    assert max(len(cell.split(".")[-1]) for cell in cells) <= 6, max(cells, key=len)


def test_a_column_that_looks_like_the_label_is_named_with_the_flag(device, digits, tmp_path, capsys):
    data = np.load(digits.test)
    header = (
        list(data["feature_names"]) if "feature_names" in data.files else [f"pixel_{i // 8}_{i % 8}" for i in range(64)]
    )
    path = tmp_path / "rows.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*header, "digit"])
        writer.writerows([[*row.tolist(), label] for row, label in zip(data["X"][:5], data["y"][:5], strict=True)])
    code, out, err = run(capsys, "predict", "--config", device, path)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "has columns the model does not know: 'digit'" in err and "rerun with --label digit" in err
    code, out, _ = run(capsys, "predict", "--config", device, path, "--label", "digit")
    assert code == 0 and len(out.splitlines()) == 6


def test_predict_into_a_pipe_closed_early_ends_quietly(device, digits):
    """``edge-agent predict … | head -1`` used to end in a BrokenPipeError traceback."""
    big = Path(device).parent / "big.csv"
    lines = Path(digits.test_csv).read_text().splitlines()
    big.write_text("\n".join([lines[0], *(lines[1:] * 40)]) + "\n")  # enough rows to outlast the pipe's buffer
    agent = subprocess.Popen(
        [sys.executable, "-m", "device_agent", "predict", "--config", str(device), str(big)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    first = agent.stdout.readline()
    agent.stdout.close()  # what head does after its line
    _, err = agent.communicate(timeout=60)
    assert first.startswith(b"prediction,p_0")
    assert b"Traceback" not in err and b"BrokenPipe" not in err and err.strip() == b"", err
    assert agent.returncode == EXIT_BROKEN_PIPE


def test_predict_through_a_shell_pipe_to_head(device, digits):
    shell = f"'{sys.executable}' -m device_agent predict --config '{device}' '{digits.test_csv}' | head -1"
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("prediction,") and done.stdout.count("\n") == 1
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


@pytest.fixture(scope="module")
def positional_device(tmp_path_factory, keypair):
    """A device whose model knows its columns only as f0…f3 (fitted on a bare array, converted without names),
    and CSVs with named columns: the order of those cannot be checked against f0…f3."""
    from click.testing import CliRunner

    from edgekit.cli import cli_for_tests

    directory = tmp_path_factory.mktemp("positional")
    X, y = load_iris(return_X_y=True)
    joblib.dump(LogisticRegression(max_iter=500).fit(X, y), directory / "iris.joblib")
    np.savez(directory / "train.npz", X=X.astype(np.float32), y=y)
    np.savez(directory / "rows.npz", X=X[:5].astype(np.float32))
    with open(directory / "shuffled.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([IRIS_NAMES[i] for i in (3, 2, 1, 0)] + ["target"])
        writer.writerows([[*row[[3, 2, 1, 0]].tolist(), label] for row, label in zip(X, y, strict=True)])
    runner, cli = CliRunner(), cli_for_tests()
    for args in (
        ["convert", directory / "iris.joblib", "-o", directory / "iris.onnx"],
        [
            "package",
            directory / "iris.onnx",
            "--name",
            "iris",
            "--version",
            "1",
            "--baseline",
            directory / "train.npz",
            "--key",
            keypair[0],
            "-o",
            directory / "iris-1.edgebundle",
        ],
    ):
        result = runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    config = make_device(directory / "dev", directory / "iris-1.edgebundle", keypair[1], http=False)
    return config, directory


def test_predict_refuses_named_columns_a_positional_model_cannot_check(positional_device, capsys):
    config, directory = positional_device
    from device_agent.bundle import read_bundle

    assert read_bundle(directory / "iris-1.edgebundle", None).input_schema.feature_names == ("f0", "f1", "f2", "f3")
    code, out, err = run(capsys, "predict", "--config", config, directory / "shuffled.csv")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"edge-agent: {directory / 'shuffled.csv'}: names its columns ('petal_width', 'petal_length'")
    assert "only by position" in err and "--names-from" in err
    code, out, _ = run(
        capsys, "predict", "--config", config, directory / "rows.npz"
    )  # unnamed rows, in training order: scored
    assert code == 0 and len(out.splitlines()) == 6


def test_http_answers_round_probabilities_too(device, digits):
    from device_agent import Agent
    from tests.agent_helpers import config_of

    agent = Agent(config_of(device)).start(http=False)
    try:
        doc = agent.predict(np.load(digits.test)["X"][:20]).to_json()
    finally:
        agent.stop()
    numbers = json.dumps(doc["probabilities"]).replace("[", "").replace("]", "").split(", ")
    assert max(len(n.split("e")[0].split(".")[-1]) for n in numbers) <= 6, max(numbers, key=len)
