"""Instructions the fleet's private key signs on the operator's machine, for the collector to carry to devices.

The collector holds only the fleet's public key (``edgekit fleet collect --trust``), so whatever devices
must not take from the collector alone is signed by the CLI beforehand, and checked by each device itself
(``device_agent.instructions``):

- a rollback (``edgekit rollout rollback --key``): go *down* to an earlier version;
- a revert (``edgekit rollout start --key``): undo this rollout if it is aborted. It is signed when the
  rollout starts, bound to a rollout id the CLI chooses (``new_rollout_id``), and kept in the rollout's
  spec; the controller sends it only to the devices that moved, and only on an abort (an abort rule, or
  ``edgekit rollout abort``). A collector can withhold it, never make one up.

The collector's own checks here turn a wrong key or a mismatched bundle into one clear error when the
rollout starts, rather than a refusal on every device when it is aborted; ``counts`` keeps the devices'
reports on reverts they refused, or were never sent, out of the rollout's record.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from device_agent.bundle import SIGNATURE, read_bundle
from device_agent.canonical import canonical_json, sha256_hex
from device_agent.errors import BundleError
from device_agent.protocol import REVERT_SCHEMA, revert_instruction, rollback_instruction
from device_agent.signing import key_id, verify_signature
from edgekit.errors import RolloutConflict, RolloutError

log = logging.getLogger("edgekit.fleet.rollouts")
ROLLOUT_ID = re.compile(r"^r-[A-Za-z0-9._-]{1,62}$")  # one path segment of /api/rollouts/<id>


def new_rollout_id(now: float | None = None) -> str:
    """``r-<UTC date>-<time>-<6 hex>``: sortable by start, unique enough for one fleet's operators."""
    now = time.time() if now is None else now
    return "r-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + "-" + uuid.uuid4().hex[:6]


def sign_rollback(
    *, fleet: str, name: str, version: int, sha256: str, key: Any, issued_at: float | None = None
) -> tuple[dict[str, Any], str]:
    """The signed instruction ``rollout rollback`` sends: (instruction, base64 of the signature file)."""
    instruction = rollback_instruction(
        fleet=fleet,
        name=name,
        version=version,
        sha256=sha256,
        issued_at=time.time() if issued_at is None else issued_at,
    )
    return instruction, _sign(instruction, key)


def sign_revert(
    bundle_path: str | Path, *, fleet: str, key: Any, rollout_id: str | None = None, issued_at: float | None = None
) -> dict[str, Any]:
    """``{"instruction", "signature"}``: what ``rollout start --key`` sends with the request, so that an abort
    can send the devices that moved back. The bundle is verified against ``key``'s public half first: a key
    that did not sign it would make every device refuse the revert (and the bundle) later."""
    bundle = _bundle_signed_by(bundle_path, key.public_key())
    instruction = revert_instruction(
        rollout=rollout_id or new_rollout_id(),
        fleet=fleet,
        name=bundle.name,
        version=bundle.version,
        sha256=sha256_hex(Path(bundle_path).read_bytes()),
        issued_at=time.time() if issued_at is None else issued_at,
    )
    return {"instruction": instruction, "signature": _sign(instruction, key)}


def _bundle_signed_by(bundle_path: str | Path, public_key: Any) -> Any:
    """The bundle, verified against ``public_key``; the error names the culprit. Only a signature by another
    key is the key's fault: a truncated, corrupted or unsigned bundle is the bundle's, and blaming the key
    would send the operator hunting for another key that cannot help."""
    damaged = "re-package it with 'edgekit package', or download it again"
    if not Path(bundle_path).is_file():
        raise RolloutError("no such bundle file", "check the path", path=bundle_path)
    try:
        read_bundle(bundle_path)  # the archive and every member's hash, before any signature
        signer = _signer_of(bundle_path)
    except BundleError as exc:
        raise RolloutError(f"the bundle is damaged: {exc.problem}", damaged, path=bundle_path) from exc
    if signer is not None and signer != key_id(public_key):
        raise RolloutError(
            f"--key ({key_id(public_key)}) cannot sign this rollout's revert: the bundle was signed by key {signer}",
            "pass the fleet's signing key, the one the bundle was packaged with",
            path=bundle_path,
        )
    try:
        return read_bundle(bundle_path, public_key)
    except BundleError as exc:  # unsigned, or a signature that is malformed or does not match the manifest
        raise RolloutError(
            f"the bundle's signature is unusable: {exc.problem}", exc.fix or damaged, path=bundle_path
        ) from exc


def _signer_of(bundle_path: str | Path) -> str | None:
    """The key id the bundle's signature names; None when it has no readable one (the full check says why)."""
    try:
        with zipfile.ZipFile(bundle_path) as archive:
            with archive.open(SIGNATURE) as member:
                doc = json.loads(member.read(4096))
    except (KeyError, ValueError, OSError, zipfile.BadZipFile):
        return None
    return doc.get("key_id") if isinstance(doc, dict) and isinstance(doc.get("key_id"), str) else None


def check_signed_revert(
    revert: Any, trusted_key: Any, *, fleet: str, bundle: dict[str, Any], taken: Callable[[str], Any]
) -> dict[str, Any]:
    """A start request's ``revert``, checked as devices will check it: signed by the fleet's key, for this
    fleet and this bundle, with a rollout id that is usable and not ``taken`` (the store's lookup: a rollout
    or None). Returns ``{"instruction", "signature"}``."""
    how = "make it with 'edgekit rollout start --key KEY'"
    if not isinstance(revert, dict) or not isinstance(revert.get("instruction"), dict):
        raise RolloutError("the rollout request's revert is not {instruction, signature}", how)
    instruction, signature = revert["instruction"], revert.get("signature")
    try:
        verify_signature(
            "revert instruction",
            canonical_json(instruction),
            base64.b64decode(str(signature), validate=True),
            trusted_key,
        )
    except (BundleError, ValueError) as exc:
        raise RolloutError(
            f"the revert instruction is not signed by the fleet's trusted key ({exc})",
            "sign it with the key the bundles are signed with (rollout start --key)",
        ) from exc
    expected = {
        "schema": REVERT_SCHEMA,
        "fleet": fleet,
        "name": bundle["name"],
        "version": bundle["version"],
        "sha256": bundle["sha256"],
    }
    wrong = [k for k, v in expected.items() if instruction.get(k) != v]
    if wrong:
        raise RolloutError(f"the signed revert instruction is for another {', '.join(wrong)} than this rollout", how)
    if not isinstance(instruction.get("rollout"), str) or not ROLLOUT_ID.match(instruction["rollout"]):
        raise RolloutError(f"the signed revert names no usable rollout id ({instruction.get('rollout')!r})", how)
    if not isinstance(instruction.get("issued_at"), (int, float)):
        raise RolloutError("the signed revert instruction has no issued_at", how)
    if taken(instruction["rollout"]) is not None:
        raise RolloutConflict(f"rollout {instruction['rollout']} exists already", "run 'rollout start' again")
    return {"instruction": instruction, "signature": signature}


def counts(report: dict[str, Any], found: tuple[dict[str, Any], Any] | None) -> bool:
    """Whether a device's report on a revert belongs in the rollout's record (``found``: the store's rollout
    row and devices). One the device refused (``signature``, ``replay``), or on a revert the controller never
    sent (the rollout is not aborted), changed nothing the rollout did: it is logged, not recorded, so a forged
    or replayed revert published straight to a device cannot mark its update failed and trip an abort rule."""
    if report.get("code") not in ("signature", "replay") and found is not None and found[0]["state"] == "aborted":
        return True
    log.warning(
        "not recorded: device %s on a revert of rollout %s it refused or this collector never sent: %s (%s)",
        report.get("device"),
        report.get("rollout"),
        report.get("state"),
        report.get("reason"),
    )
    return False


def unreverted(rollout: dict[str, Any], moving: int) -> str:
    """The abort's reason, continued, when the rollout has no signed revert to send."""
    return (
        f"{moving} device(s) sent v{rollout['version']} are not sent back: "
        "the rollout has no signed revert (start it with --key)"
    )


def _sign(instruction: dict[str, Any], key: Any) -> str:
    from edgekit.bundle.keys import sign

    return base64.b64encode(sign(canonical_json(instruction), key)).decode()
