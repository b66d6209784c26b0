"""Ed25519 signature checks over canonical manifest bytes (the device side needs only the public key).

A signature file is JSON: ``{"algorithm": "ed25519", "key_id": ..., "signature": <base64>}``.
The key id (first 16 hex digits of the sha256 of the raw public key) lets a verifier say
"signed by key X, you trust key Y" instead of a bare "bad signature".
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .canonical import sha256_hex
from .errors import KeyFileError, SignatureError

SIGNATURE_ALGORITHM = "ed25519"


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return sha256_hex(raw)[:16]


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(
            path, f"cannot read public key ({exc.strerror})", "give the .pub file written by 'edgekit keygen'"
        ) from exc
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise KeyFileError(
            path, "not a PEM public key", "give the .pub file written by 'edgekit keygen', not the .key"
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(path, f"is a {type(key).__name__}, not an Ed25519 key", "make one with 'edgekit keygen'")
    return key


def encode_signature(signature: bytes, public_key: Ed25519PublicKey) -> bytes:
    doc = {
        "algorithm": SIGNATURE_ALGORITHM,
        "key_id": key_id(public_key),
        "signature": base64.b64encode(signature).decode(),
    }
    return json.dumps(doc, indent=1).encode() + b"\n"


def verify_signature(source: str, manifest_bytes: bytes, signature_file: bytes, public_key: Ed25519PublicKey) -> str:
    """Check ``signature_file`` over ``manifest_bytes``; return the signer's key id."""
    try:
        doc = json.loads(signature_file)
        algorithm, signer, signature = (
            doc["algorithm"],
            doc["key_id"],
            base64.b64decode(doc["signature"], validate=True),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise SignatureError(
            source, "the signature member is malformed", "rebuild the bundle with 'edgekit package'"
        ) from exc
    if algorithm != SIGNATURE_ALGORITHM:
        raise SignatureError(source, f"signature algorithm {algorithm!r} is not supported (only ed25519)")
    trusted = key_id(public_key)
    if signer != trusted:
        raise SignatureError(
            source,
            f"signed by key {signer}, but the trusted key is {trusted}",
            "verify with the public key that matches the signing key, or re-sign the bundle",
        )
    try:
        public_key.verify(signature, manifest_bytes)
    except InvalidSignature as exc:
        raise SignatureError(
            source, "the manifest signature does not verify (tampered manifest)", "rebuild or download the bundle again"
        ) from exc
    return signer
