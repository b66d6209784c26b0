"""The bundle format (``*.edgebundle``) and its reader, which trusts nothing it has not checked.

A bundle is one ZIP file with flat member names::

    manifest.json   canonical JSON: what the model is, needs and was checked against
    signature       Ed25519 over the exact bytes of manifest.json (see ``signing``)
    model.onnx      or model.tflite
    baseline.json   the training baseline profile (see ``profile``)
    selftest.npz    optional: inputs and expected outputs for the on-device health check

Reading order, before anything is parsed or loaded: member names are checked (no directories, no
``..``, no absolute paths, no duplicates), the signature is verified over the manifest bytes, the
manifest's file list must equal the members, and every member's size and sha256 must match.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .canonical import sha256_hex
from .errors import BundleFormatError, BundleIntegrityError, SignatureError
from .fsutil import write_atomic
from .outputs import OutputSpec
from .profile import Profile
from .schema import InputSchema
from .signing import verify_signature

# 2: the input schema may be typed columns, selftest.npz may hold one "input:<column>" array per
# column, and the baseline is an edgekit.profile/2. Version-1 bundles (one numeric matrix) still load.
# 3: the input may be a tensor (image, spectrogram, sensor window) with its preprocessing and the signals
# sketched of it, the output may name an embedding, and the baseline is an edgekit.profile/3.
BUNDLE_SCHEMA = "edgekit.bundle/3"
READABLE_BUNDLE_SCHEMAS = ("edgekit.bundle/1", "edgekit.bundle/2", BUNDLE_SCHEMA)
BUNDLE_SUFFIX = ".edgebundle"
MANIFEST = "manifest.json"
SIGNATURE = "signature"
BASELINE = "baseline.json"
SELFTEST = "selftest.npz"
MODEL_FILES = {"onnx": "model.onnx", "tflite": "model.tflite"}
MAX_MANIFEST_BYTES = 4 << 20
MAX_MEMBER_BYTES = 2 << 30


@dataclass
class Bundle:
    """A bundle whose members have all been checked; ``signed_by`` is None if no key was given."""

    path: str
    manifest: dict[str, Any]
    members: dict[str, bytes] = field(repr=False)
    signed_by: str | None = None

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def model_format(self) -> str:
        return self.manifest["runtime"]["format"]

    @property
    def model_file(self) -> str:
        return MODEL_FILES[self.model_format]

    @property
    def model_bytes(self) -> bytes:
        return self.members[self.model_file]

    @property
    def input_schema(self) -> InputSchema:
        return InputSchema.from_dict(self.manifest["input"])

    @property
    def output_spec(self) -> OutputSpec:
        return OutputSpec.from_dict(self.manifest["output"])

    def baseline(self) -> Profile:
        return Profile.from_dict(json.loads(self.members[BASELINE]))

    def selftest(self) -> dict[str, np.ndarray] | None:
        if SELFTEST not in self.members:
            return None
        with np.load(io.BytesIO(self.members[SELFTEST]), allow_pickle=False) as data:
            return {key: data[key] for key in data.files}

    def extract(self, directory: str | Path) -> Path:
        """Write the checked members into ``directory`` (created), each file atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for member, data in self.members.items():
            write_atomic(directory / member, data)
        return directory


def read_bundle(path: str | Path, public_key: Any = None) -> Bundle:
    """Open and check a bundle; with ``public_key`` (an Ed25519 public key) the signature must verify."""
    source = str(path)
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError as exc:
        raise BundleFormatError(source, "no such file", "check the path") from exc
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, RuntimeError) as exc:
        raise BundleFormatError(
            source,
            "is not an edgekit bundle (not a ZIP archive, or truncated)",
            "rebuild it with 'edgekit package' or download it again",
        ) from exc
    with archive:
        infos = _checked_members(source, archive)
        manifest_bytes = _read_member(source, archive, infos[MANIFEST], MAX_MANIFEST_BYTES)
        signed_by = None
        if public_key is not None:
            if SIGNATURE not in infos:
                raise SignatureError(source, "the bundle is not signed", "sign it with 'edgekit package --key'")
            signed_by = verify_signature(
                source, manifest_bytes, _read_member(source, archive, infos[SIGNATURE], 4096), public_key
            )
        manifest = _parse_manifest(source, manifest_bytes)
        members = _read_listed_members(source, archive, infos, manifest)
    return Bundle(path=source, manifest=manifest, members=members, signed_by=signed_by)


def _checked_members(source: str, archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    infos: dict[str, zipfile.ZipInfo] = {}
    for info in archive.infolist():
        name = info.filename
        if (
            not name
            or "/" in name
            or "\\" in name
            or name in (".", "..")
            or name.startswith(("~", "."))
            or ":" in name
            or os.path.isabs(name)
        ):
            raise BundleFormatError(
                source,
                f"member {name!r} has a path that could escape the bundle",
                "refusing to read it; rebuild the bundle with 'edgekit package'",
            )
        if name in infos:
            raise BundleFormatError(
                source, f"member {name!r} appears twice", "rebuild the bundle with 'edgekit package'"
            )
        infos[name] = info
    if MANIFEST not in infos:
        raise BundleFormatError(source, "has no manifest.json", "rebuild it with 'edgekit package'")
    return infos


def _read_member(source: str, archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    if info.file_size > limit:
        raise BundleFormatError(
            source, f"member {info.filename!r} is {info.file_size} bytes, over the {limit}-byte limit"
        )
    try:
        return archive.read(info)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError, RuntimeError) as exc:
        # zipfile checks each member's CRC; a flipped byte or a cut-off file lands here.
        raise BundleFormatError(
            source, f"member {info.filename!r} is corrupted or truncated ({exc})", "download or rebuild the bundle"
        ) from exc


def _parse_manifest(source: str, manifest_bytes: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(manifest_bytes)
    except ValueError as exc:
        raise BundleFormatError(
            source, "manifest.json is not valid JSON", "rebuild the bundle with 'edgekit package'"
        ) from exc
    if not isinstance(manifest, dict) or manifest.get("schema") not in READABLE_BUNDLE_SCHEMAS:
        found = manifest.get("schema") if isinstance(manifest, dict) else None
        raise BundleFormatError(
            source,
            f"manifest schema is {found!r}, this reader understands {' and '.join(map(repr, READABLE_BUNDLE_SCHEMAS))}",
            "upgrade edgekit on this side, or repackage",
        )
    for key in ("name", "version", "runtime", "input", "output", "files"):
        if key not in manifest:
            raise BundleFormatError(source, f"manifest has no {key!r}", "rebuild the bundle with 'edgekit package'")
    if manifest["runtime"].get("format") not in MODEL_FILES:
        raise BundleFormatError(
            source,
            f"unknown model format {manifest['runtime'].get('format')!r}",
            "this agent runs onnx and tflite models",
        )
    return manifest


def _read_listed_members(
    source: str, archive: zipfile.ZipFile, infos: dict[str, zipfile.ZipInfo], manifest: dict[str, Any]
) -> dict[str, bytes]:
    listed = manifest["files"]
    present = set(infos) - {MANIFEST, SIGNATURE}
    if set(listed) != present:
        missing, unexpected = sorted(set(listed) - present), sorted(present - set(listed))
        problem = "; ".join(
            filter(None, [missing and f"missing members {missing}", unexpected and f"unlisted members {unexpected}"])
        )
        raise BundleFormatError(source, problem, "rebuild the bundle with 'edgekit package'")
    model_file = MODEL_FILES[manifest["runtime"]["format"]]
    for required in (model_file, BASELINE):
        if required not in listed:
            raise BundleFormatError(source, f"has no {required}", "rebuild the bundle with 'edgekit package'")
    members = {}
    for name, entry in listed.items():
        info = infos[name]
        if info.file_size != entry.get("size"):
            raise BundleFormatError(
                source,
                f"member {name!r} is {info.file_size} bytes, "
                f"the manifest says {entry.get('size')} (tampered or corrupted)",
                "rebuild the bundle with 'edgekit package' or download it again",
            )
        data = _read_member(source, archive, info, MAX_MEMBER_BYTES)
        digest = sha256_hex(data)
        if digest != entry.get("sha256"):
            raise BundleIntegrityError(source, name, entry.get("sha256", "?"), digest)
        members[name] = data
    return members
