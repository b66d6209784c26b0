import json
import os
import stat
import zipfile

import numpy as np
import pytest

from device_agent.bundle import read_bundle
from device_agent.cli import main as agent_main
from device_agent.errors import BundleFormatError, BundleIntegrityError, SignatureError
from device_agent.signing import load_public_key
from edgekit.bundle.keys import generate_keypair


def rewrite(source, destination, change):
    """Copy a bundle member by member, letting ``change(name, data)`` edit, drop (None) or add members."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(destination, "w") as dst:
        for info in src.infolist():
            data = change(info.filename, src.read(info))
            if data is not None:
                dst.writestr(info.filename, data)
    return destination


def test_keygen_writes_a_private_key_only_its_owner_reads(cli, tmp_path):
    result = cli("keygen", "-o", tmp_path / "keys", "--name", "fleet")
    assert result.exit_code == 0
    assert stat.S_IMODE(os.stat(tmp_path / "keys" / "fleet.key").st_mode) == 0o600
    assert b"PRIVATE KEY" in (tmp_path / "keys" / "fleet.key").read_bytes()
    assert cli("keygen", "-o", tmp_path / "keys", "--name", "fleet").exit_code == 2


def test_passphrase_protected_key(cli, digits_int8, digits, tmp_path):
    env = {"EDGEKIT_KEY_PASSPHRASE": "correct horse"}
    assert cli("keygen", "-o", tmp_path, env=env).exit_code == 0
    args = [
        "package",
        digits_int8,
        "--name",
        "d",
        "--version",
        "1",
        "--baseline",
        digits.train,
        "--key",
        tmp_path / "edgekit.key",
        "-o",
        tmp_path / "b.edgebundle",
    ]
    refused = cli(*args)
    assert refused.exit_code == 2 and "set EDGEKIT_KEY_PASSPHRASE" in refused.stderr
    assert cli(*args, env=env).exit_code == 0


def test_package_inspect_verify(cli, digits, digits_int8, keypair, tmp_path):
    out = tmp_path / "digits-3.edgebundle"
    report = tmp_path / "report.json"
    report.write_text(cli("validate", digits_int8, "--reference", digits.model, "--data", digits.test, "--json").stdout)
    result = cli(
        "package",
        digits_int8,
        "--name",
        "digits",
        "--version",
        "3",
        "--baseline",
        digits.train,
        "--key",
        keypair[0],
        "--report",
        report,
        "--drift",
        "alpha=0.05",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.stderr
    verified = cli("verify", out, "--pubkey", keypair[1])
    assert verified.exit_code == 0 and "digits v3" in verified.stdout
    inspected = json.loads(cli("inspect", out, "--json", "--pubkey", keypair[1]).stdout)
    manifest = inspected["manifest"]
    assert inspected["signature"].startswith("verified")
    assert manifest["name"] == "digits" and manifest["version"] == 3 and manifest["drift"]["alpha"] == 0.05
    assert manifest["input"]["feature_names"][:2] == ["pixel_0_0", "pixel_0_1"]
    assert manifest["runtime"]["engine"] == "onnxruntime" and manifest["runtime"]["ir_version"] <= 13
    assert manifest["quantization"]["mode"] == "static" and manifest["validation"]["passed"] is True
    assert set(manifest["files"]) == {"model.onnx", "baseline.json", "selftest.npz"}
    assert len(manifest["lineage"]["baseline_sha256"]) == 64
    human = cli("inspect", out)
    assert "not checked (give --pubkey)" in human.stdout and "digits v3" in human.stdout
    assert (
        manifest["validation"]["size_ratio_of"] == "digits.joblib" and "x of digits.joblib" in human.stdout
    )  # not float32 ONNX


def test_bundle_contents_are_what_the_device_needs(bundle, keypair, digits):
    opened = read_bundle(bundle, load_public_key(keypair[1]))
    profile = opened.baseline()
    assert profile.rows == np.load(digits.train)["X"].shape[0]
    assert profile.outputs["prediction"].count == profile.rows
    assert profile.feature_names == list(opened.input_schema.feature_names)
    assert profile.baseline_id == opened.manifest["baseline_id"]
    selftest = opened.selftest()
    assert selftest["inputs"].shape[1] == 64 and "output:label" in selftest and "output:probabilities" in selftest


def test_tampered_model_is_refused(bundle, keypair, tmp_path):
    def flip(name, data):
        return data[:-1] + bytes([data[-1] ^ 1]) if name == "model.onnx" else data

    tampered = rewrite(bundle, tmp_path / "t.edgebundle", flip)
    with pytest.raises(BundleIntegrityError, match="member 'model.onnx' has sha256"):
        read_bundle(tampered, load_public_key(keypair[1]))


def test_tampered_manifest_breaks_the_signature(cli, bundle, keypair, tmp_path):
    def bump(name, data):
        if name != "manifest.json":
            return data
        manifest = json.loads(data)
        manifest["version"] = 99
        return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()

    tampered = rewrite(bundle, tmp_path / "t.edgebundle", bump)
    result = cli("verify", tampered, "--pubkey", keypair[1])
    assert result.exit_code == 2 and "manifest signature does not verify" in result.stderr


def test_wrong_key_names_both_key_ids(cli, bundle, tmp_path):
    _, other_pub, other_id = generate_keypair(tmp_path / "other")
    result = cli("verify", bundle, "--pubkey", other_pub)
    assert result.exit_code == 2 and f"but the trusted key is {other_id}" in result.stderr


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda n, d: None if n == "signature" else d, SignatureError, "the bundle is not signed"),
        (lambda n, d: None if n == "baseline.json" else d, BundleFormatError, "missing members \\['baseline.json'\\]"),
        (lambda n, d: None if n == "manifest.json" else d, BundleFormatError, "has no manifest.json"),
    ],
)
def test_missing_members(bundle, keypair, tmp_path, change, error, message):
    with pytest.raises(error, match=message):
        read_bundle(rewrite(bundle, tmp_path / "t.edgebundle", change), load_public_key(keypair[1]))


@pytest.mark.parametrize("evil", ["../escape.txt", "/etc/passwd", "sub/dir.txt", "..", "C:evil"])
def test_paths_that_escape_are_refused_before_anything_is_read(bundle, keypair, tmp_path, evil):
    target = tmp_path / "t.edgebundle"
    rewrite(bundle, target, lambda n, d: d)
    with zipfile.ZipFile(target, "a") as archive:
        archive.writestr(evil, b"x")
    with pytest.raises(BundleFormatError, match="could escape the bundle"):
        read_bundle(target, load_public_key(keypair[1]))


def test_unlisted_member_is_refused(bundle, keypair, tmp_path):
    target = rewrite(bundle, tmp_path / "t.edgebundle", lambda n, d: d)
    with zipfile.ZipFile(target, "a") as archive:
        archive.writestr("extra.bin", b"x")
    with pytest.raises(BundleFormatError, match="unlisted members \\['extra.bin'\\]"):
        read_bundle(target, load_public_key(keypair[1]))


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_truncated_bundle(cli, bundle, keypair, tmp_path, keep):
    data = bundle.read_bytes()
    target = tmp_path / "cut.edgebundle"
    target.write_bytes(data[: int(len(data) * keep)])
    result = cli("verify", target, "--pubkey", keypair[1])
    assert result.exit_code == 2 and ("truncated" in result.stderr or "corrupted" in result.stderr)


def test_not_a_bundle(cli, tmp_path, keypair):
    target = tmp_path / "x.edgebundle"
    target.write_text("hello")
    result = cli("inspect", target)
    assert result.exit_code == 2 and "is not an edgekit bundle" in result.stderr
    assert cli("verify", tmp_path / "none.edgebundle", "--pubkey", keypair[1]).exit_code == 2


def test_public_key_mistakes(cli, bundle, keypair):
    result = cli("verify", bundle, "--pubkey", keypair[0])
    assert result.exit_code == 2 and "not a PEM public key" in result.stderr and "not the .key" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--name", "bad name!", "--version", "1"], "bundle name 'bad name!' is not allowed"),
        (["--name", "d", "--version", "0"], "version 0 is not a positive integer"),
        (["--name", "d", "--version", "1", "--drift", "nope=1"], "unknown drift threshold 'nope'"),
    ],
)
def test_package_refuses_bad_identity(cli, digits, digits_int8, keypair, tmp_path, args, message):
    out = tmp_path / "b.edgebundle"
    result = cli("package", digits_int8, *args, "--baseline", digits.train, "--key", keypair[0], "-o", out)
    assert result.exit_code == 2 and message in result.stderr and not out.exists()


def test_package_needs_a_converted_model_and_matching_baseline(cli, digits, cancer, digits_int8, keypair, tmp_path):
    out = tmp_path / "b.edgebundle"
    result = cli(
        "package",
        digits.model,
        "--name",
        "d",
        "--version",
        "1",
        "--baseline",
        digits.train,
        "--key",
        keypair[0],
        "-o",
        out,
    )
    assert result.exit_code == 2 and "run 'edgekit convert" in result.stderr
    result = cli(
        "package",
        digits_int8,
        "--name",
        "d",
        "--version",
        "1",
        "--baseline",
        cancer.train,
        "--key",
        keypair[0],
        "-o",
        out,
    )
    assert result.exit_code == 2 and "lacks the model's columns 'pixel_0_0'" in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".b.edgebundle*"))


def test_device_side_verifier(bundle, keypair, capsys, tmp_path):
    assert agent_main(["verify", str(bundle), "--pubkey", str(keypair[1]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 3
    target = tmp_path / "x.edgebundle"
    target.write_text("nope")
    assert agent_main(["verify", str(target), "--pubkey", str(keypair[1])]) == 2
    assert "not an edgekit bundle" in capsys.readouterr().err


def test_extract_writes_checked_members(bundle, keypair, tmp_path):
    opened = read_bundle(bundle, load_public_key(keypair[1]))
    directory = opened.extract(tmp_path / "slot")
    assert sorted(p.name for p in directory.iterdir()) == ["baseline.json", "model.onnx", "selftest.npz"]
