"""Ed25519 signing keys: ``<name>.key`` (PKCS#8 PEM, mode 0600) and ``<name>.pub`` (PEM).

The private key stays on the build host; devices get only the ``.pub``. Set the environment
variable ``EDGEKIT_KEY_PASSPHRASE`` to encrypt the private key at ``keygen`` and to read it at
``package`` (secrets come from the environment, never from a command line).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.signing import encode_signature, key_id
from edgekit.errors import SigningKeyError
from edgekit.fsutil import write_bytes_atomic

PASSPHRASE_ENV = "EDGEKIT_KEY_PASSPHRASE"


def generate_keypair(directory: str | Path, *, name: str = "edgekit", force: bool = False) -> tuple[Path, Path, str]:
    """Write a new key pair; return (private path, public path, key id). Never overwrites unless ``force``."""
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", name):
        raise SigningKeyError(
            f"key name {name!r} is not allowed",
            "use letters, digits, '.', '_' or '-' (it names files in the -o directory)",
        )
    directory = Path(directory)
    private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
    existing = [str(p) for p in (private_path, public_path) if p.exists()]
    if existing and not force:
        raise SigningKeyError(
            f"{', '.join(existing)} already exist",
            "choose another --name or directory, or pass --force to replace them "
            "(bundles signed with the old key will stop verifying)",
        )
    key = Ed25519PrivateKey.generate()
    passphrase = os.environ.get(PASSPHRASE_ENV)
    encryption = (
        serialization.BestAvailableEncryption(passphrase.encode()) if passphrase else serialization.NoEncryption()
    )
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    write_bytes_atomic(private_path, private_pem, mode=0o600)
    write_bytes_atomic(public_path, public_pem, mode=0o644)
    return private_path, public_path, key_id(key.public_key())


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(
            f"cannot read the signing key ({exc.strerror})", "make one with 'edgekit keygen -o keys/'", path=path
        ) from exc
    passphrase = os.environ.get(PASSPHRASE_ENV)
    try:
        key = serialization.load_pem_private_key(data, password=passphrase.encode() if passphrase else None)
    except TypeError as exc:
        hint = (
            f"set {PASSPHRASE_ENV}"
            if not passphrase
            else f"{PASSPHRASE_ENV} is set but the key is not encrypted; unset it"
        )
        raise SigningKeyError("the key's encryption and the passphrase do not match", hint, path=path) from exc
    except ValueError as exc:
        raise SigningKeyError(
            "is not a PEM private key (or the passphrase is wrong)",
            f"give the .key file from 'edgekit keygen'; check {PASSPHRASE_ENV}",
            path=path,
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(
            f"is a {type(key).__name__}, not an Ed25519 key", "make one with 'edgekit keygen'", path=path
        )
    return key


def sign(manifest_bytes: bytes, key: Ed25519PrivateKey) -> bytes:
    """The ``signature`` member for ``manifest_bytes``."""
    return encode_signature(key.sign(manifest_bytes), key.public_key())
