"""``rollout start --key`` names the culprit: a damaged bundle is the bundle's fault, only another signer the key's.

Before, every failure to read the bundle with the key said "--key cannot sign this rollout's revert ...; pass
the fleet's signing key": a truncated download sent the operator looking for another key.
"""

from __future__ import annotations

import zipfile

import pytest

from device_agent.signing import key_id
from edgekit.bundle.keys import generate_keypair, load_private_key
from edgekit.errors import RolloutError
from edgekit.fleet.signed import sign_revert

UNREACHABLE = "http://127.0.0.1:9"  # the bundle is checked before the collector is asked anything


def start(cli, bundle, key):
    return cli("rollout", "start", bundle, "--fleet", "lab", "--key", key, "--collector", UNREACHABLE)


def one_line_error(result) -> str:
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def rewritten(source, target, change):
    """A copy of bundle ``source`` whose members ``change(name, data)`` returns (None: left out)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            data = change(info.filename, old.read(info))
            if data is not None:
                new.writestr(info, data)
    return target


def test_a_truncated_bundle_is_called_damaged_not_a_key_problem(cli, bundle, keypair, tmp_path):
    trunc = tmp_path / "trunc.edgebundle"
    trunc.write_bytes(bundle.read_bytes()[: bundle.stat().st_size // 2])
    line = one_line_error(start(cli, trunc, keypair[0]))
    assert "trunc.edgebundle" in line and "damaged" in line and "truncated" in line
    assert "re-package" in line and "download it again" in line
    assert "cannot sign" not in line and "signing key" not in line


def test_a_corrupted_member_is_called_damaged(cli, bundle, keypair, tmp_path):
    def flip(name, data):
        return data if name in ("manifest.json", "signature") else data[:-1] + bytes([data[-1] ^ 1])

    corrupted = rewritten(bundle, tmp_path / "corrupted.edgebundle", flip)
    line = one_line_error(start(cli, corrupted, keypair[0]))
    assert "corrupted.edgebundle" in line and "damaged" in line and "re-package" in line
    assert "cannot sign" not in line and "signing key" not in line


def test_an_unsigned_bundle_is_the_bundles_problem(bundle, keypair, tmp_path):
    unsigned = rewritten(bundle, tmp_path / "unsigned.edgebundle", lambda n, d: None if n == "signature" else d)
    with pytest.raises(RolloutError) as caught:
        sign_revert(unsigned, fleet="lab", key=load_private_key(keypair[0]))
    assert "unsigned.edgebundle" in str(caught.value) and "not signed" in str(caught.value)
    assert "cannot sign" not in str(caught.value) and "signing key" not in str(caught.value)


def test_only_another_signer_is_called_a_key_problem(cli, bundle, keypair, tmp_path):
    other, _, _ = generate_keypair(tmp_path / "other")
    line = one_line_error(start(cli, bundle, other))
    assert "--key" in line and "pass the fleet's signing key" in line and "damaged" not in line
    assert key_id(load_private_key(other).public_key()) in line  # the key given, and the bundle's signer
    assert key_id(load_private_key(keypair[0]).public_key()) in line


def test_the_right_key_signs_the_revert(bundle, keypair):
    revert = sign_revert(bundle, fleet="lab", key=load_private_key(keypair[0]), rollout_id="r-test-1")
    assert revert["instruction"]["rollout"] == "r-test-1" and revert["instruction"]["version"] == 3
