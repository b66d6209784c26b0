"""Careless and hostile inputs found by trying edgekit as a new user: each gets one line and exit 2."""

import os
import random
import stat

import numpy as np

from device_agent.bundle import read_bundle
from device_agent.errors import AgentError
from device_agent.signing import load_public_key


def test_every_kind_of_bit_flip_in_a_bundle_is_a_clean_refusal(bundle, keypair, tmp_path):
    """Flip single bits across the whole file: the reader must refuse with its own error, never crash."""
    data = bytearray(bundle.read_bytes())
    key = load_public_key(keypair[1])
    rng = random.Random(0)
    positions = sorted(rng.sample(range(len(data) * 8), 600))
    target = tmp_path / "flipped.edgebundle"
    accepted = 0
    for bit in positions:
        damaged = bytearray(data)
        damaged[bit // 8] ^= 1 << (bit % 8)
        target.write_bytes(bytes(damaged))
        try:
            read_bundle(target, key)
            accepted += 1  # a flip in ZIP metadata nobody reads (e.g. a timestamp) is harmless
        except AgentError:
            pass
    assert accepted < len(positions) // 4


def test_a_flipped_byte_through_the_cli_exits_2(cli, bundle, keypair, tmp_path):
    data = bytearray(bundle.read_bytes())
    data[100] ^= 0xFF
    target = tmp_path / "b.edgebundle"
    target.write_bytes(bytes(data))
    result = cli("verify", target, "--pubkey", keypair[1])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_output_to_a_device_file_writes_into_it_without_replacing_it(cli, digits):
    result = cli("convert", digits.model, "-o", "/dev/null")
    assert result.exit_code == 0
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_unwritable_output_locations_are_one_line(cli, digits, tmp_path):
    (tmp_path / "afile").write_text("x")
    for out in ("/proc/nope/x.onnx", tmp_path / "afile" / "x.onnx"):
        result = cli("convert", digits.model, "-o", out)
        assert result.exit_code == 2 and "cannot write here" in result.stderr, result.output


def test_outputs_follow_the_umask_not_0600(cli, digits, tmp_path):
    old = os.umask(0o022)
    try:
        cli("convert", digits.model, "-o", tmp_path / "m.onnx")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "m.onnx").st_mode) == 0o644


def test_labels_the_model_does_not_know_are_refused(cli, digits, digits_onnx, tmp_path):
    X = np.load(digits.test)["X"]
    names = [str(n) for n in np.load(digits.train)["feature_names"]]  # digits_onnx records them
    lines = [",".join(names + ["label"])] + [",".join([*map(str, row), "cat"]) for row in X[:20]]
    (tmp_path / "cats.csv").write_text("\n".join(lines) + "\n")
    result = cli("validate", digits_onnx, "--reference", digits.model, "--data", tmp_path / "cats.csv")
    assert result.exit_code == 2 and "has labels the model does not know: 'cat'" in result.stderr


def test_a_report_of_another_model_is_refused(cli, digits, digits_onnx, digits_int8, keypair, tmp_path):
    report = tmp_path / "r.json"
    report.write_text(cli("validate", digits_onnx, "--reference", digits.model, "--data", digits.test, "--json").stdout)
    result = cli(
        "package",
        digits_int8,
        "--name",
        "d",
        "--version",
        "1",
        "--baseline",
        digits.train,
        "--key",
        keypair[0],
        "--report",
        report,
        "-o",
        tmp_path / "b.edgebundle",
    )
    assert result.exit_code == 2 and "is a validation report of another model" in result.stderr


def test_quantizing_an_int8_model_again_is_refused(cli, digits_int8, tmp_path):
    result = cli("convert", digits_int8, "--quantize", "int8", "-o", tmp_path / "again.onnx")
    assert result.exit_code == 2 and "is already quantized" in result.stderr


def test_conversion_is_reproducible(cli, digits, tmp_path):
    cli("convert", digits.model, "-o", tmp_path / "a.onnx")
    cli("convert", digits.model, "-o", tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_options_that_only_apply_with_quantize(cli, digits, tmp_path):
    result = cli("convert", digits.model, "--max-accuracy-drop", "0.01", "-o", tmp_path / "o.onnx")
    assert result.exit_code == 2 and "--max-accuracy-drop only apply with --quantize int8" in result.stderr


def test_key_names_cannot_escape_the_directory(cli, tmp_path):
    result = cli("keygen", "-o", tmp_path / "keys", "--name", "../evil")
    assert result.exit_code == 2 and "key name '../evil' is not allowed" in result.stderr
    assert not (tmp_path / "evil.key").exists()


def test_semicolon_separated_csv_is_named_as_such(cli, digits, digits_onnx, tmp_path):
    (tmp_path / "semi.csv").write_text("a;b;label\n1;2;0\n")
    result = cli("validate", digits_onnx, "--reference", digits.model, "--data", tmp_path / "semi.csv")
    assert result.exit_code == 2 and "looks separated by ';', not commas" in result.stderr
    assert len(result.stderr) < 300


def test_emulating_with_data_of_the_wrong_width_fails_fast(cli, bundle, keypair, cancer, tmp_path):
    result = cli(
        "emulate",
        "--devices",
        "1",
        "--bundle",
        bundle,
        "--pubkey",
        keypair[1],
        "--data",
        cancer.test,
        "--state-dir",
        tmp_path / "f",
        "--duration",
        "5",
    )
    assert result.exit_code == 2 and "has 30 columns, the model takes 64" in result.stderr


def test_flash_and_collect_refuse_bad_arguments_before_any_work(cli, bundle, keypair, tmp_path):
    base = ["flash", bundle, "--target", f"dir:{tmp_path / 'd'}", "--pubkey", keypair[1]]
    for extra, message in [
        (["--device-id", "bad/id", "--broker", "mqtt://127.0.0.1:1883"], "--device-id 'bad/id' is not allowed"),
        (["--device-id", "d1", "--broker", "127.0.0.1:1883"], "is not mqtt://host[:port]"),
        (["--device-id", "d1", "--broker", "mqtt://127.0.0.1:99999"], "has an invalid port"),
    ]:
        result = cli(*base, *extra)
        assert result.exit_code == 2 and message in result.stderr, result.output
    assert not (tmp_path / "d").exists()
    result = cli(
        "fleet",
        "collect",
        "--broker",
        "mqtt://127.0.0.1:99999",
        "--db",
        tmp_path / "f.db",
        "--http",
        "",
        "--duration",
        "1",
    )
    assert result.exit_code == 2 and "has an invalid port" in result.stderr
