"""A bundle's signature verifies with the openssl command line alone, by the recipe in docs/bundle.md.

The shell commands are taken from the doc itself (its "Verifying a signature outside Python"
section), so the doc and this test cannot drift apart. The members are extracted with zipfile
instead of the recipe's ``unzip`` line.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from device_agent.bundle import MANIFEST, SIGNATURE

DOC = Path(__file__).resolve().parent.parent / "docs" / "bundle.md"

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command line")


def doc_recipes() -> list[list[str]]:
    """The ```sh blocks of the doc's openssl section, as lists of command lines (comments dropped)."""
    text = DOC.read_text()
    section = text[text.index("### Verifying a signature outside Python") : text.index("## Profile:")]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    return [
        [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")] for block in blocks
    ]


def sh(command: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def extracted(bundle, keypair, tmp_path):
    with zipfile.ZipFile(bundle) as archive:
        for member in (MANIFEST, SIGNATURE):
            (tmp_path / member).write_bytes(archive.read(member))
    shutil.copy(keypair[1], tmp_path / "edgekit.pub")
    return tmp_path


def test_the_doc_recipe_verifies_a_signed_bundle_with_openssl_alone(extracted, bundle):
    verify, key_id = doc_recipes()
    assert verify[0].startswith("unzip ") and verify[-1].startswith("openssl pkeyutl -verify")
    for line in verify[1:-1]:  # decode the signature, name the key .pem
        done = sh(line, extracted)
        assert done.returncode == 0, (line, done.stderr)
    assert len((extracted / "signature.bin").read_bytes()) == 64  # a raw Ed25519 signature
    done = sh(verify[-1], extracted)
    assert done.returncode == 0 and "Signature Verified Successfully" in done.stdout, done.stdout + done.stderr
    # the manifest was verified as stored; it is the very member of the bundle, not a re-serialization
    with zipfile.ZipFile(bundle) as archive:
        assert (extracted / MANIFEST).read_bytes() == archive.read(MANIFEST)
    # the key id command names the key the signature member names
    done = sh(" ".join(key_id), extracted)
    assert done.returncode == 0 and done.stdout.strip() == json.loads((extracted / SIGNATURE).read_bytes())["key_id"]


def test_a_manifest_with_one_byte_changed_fails_openssl_verification(extracted):
    verify, _ = doc_recipes()
    for line in verify[1:-1]:
        assert sh(line, extracted).returncode == 0
    manifest = bytearray((extracted / MANIFEST).read_bytes())
    at = manifest.index(b'"version":') + len(b'"version":')
    manifest[at] = ord("4") if manifest[at] != ord("4") else ord("5")  # version 3 -> 4: still valid JSON, one byte
    (extracted / MANIFEST).write_bytes(bytes(manifest))
    done = sh(verify[-1], extracted)
    assert done.returncode != 0 and "Signature Verified Successfully" not in done.stdout
    assert "Signature Verification Failure" in done.stdout + done.stderr


def test_a_re_serialized_manifest_fails_even_though_it_means_the_same(extracted):
    """Why the doc says never to re-serialize: pretty-printed JSON is the same document, other bytes."""
    verify, _ = doc_recipes()
    for line in verify[1:-1]:
        assert sh(line, extracted).returncode == 0
    manifest = json.loads((extracted / MANIFEST).read_bytes())
    (extracted / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    done = sh(verify[-1], extracted)
    assert done.returncode != 0 and "Signature Verification Failure" in done.stdout + done.stderr
