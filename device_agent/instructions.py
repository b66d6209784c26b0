"""Instructions signed by the fleet's private key, checked on the device: a rollback and a revert.

Both move a device where a bundle's own signature cannot vouch for the move: a rollback goes *down*,
which the version rule forbids, and a revert goes back to the previous slot without downloading
anything. Anyone who can publish to a device's ``desired`` topic could ask for either, so the device
takes them only with the fleet key's signature over an instruction naming this fleet and this bundle,
and never twice:

- rollback (``edgekit.rollback/1``, made by ``edgekit rollout rollback --key``): fresher than the last
  rollback applied (``issued_at``), so an old one replayed after the fleet went up again is refused;
- revert (``edgekit.revert/1``, made by ``edgekit rollout start --key`` and sent by the collector only
  if the rollout is aborted): bound to one rollout id, which the signer chose. The device applies it only
  while it runs what that very rollout installed (``ACTIVE_BY`` in the ledger, written when the rollout's
  swap is committed), and records it as used (``REVERTS_APPLIED``).

The ledger is the updater's ``updates.json`` (``StateDir.ledger``); these keys sit beside its per-rollout
entries. The signing key never reaches the collector, so a compromised collector can withhold a revert
but cannot invent one.
"""

from __future__ import annotations

import base64
from typing import Any

from .canonical import canonical_json
from .errors import SignatureError, UpdateError
from .protocol import LEGACY_DESIRED_SCHEMA, REVERT_SCHEMA, ROLLBACK_SCHEMA
from .signing import verify_signature

LAST_ROLLBACK = "last_rollback_issued"  # issued_at of the newest rollback applied
ACTIVE_BY = "active_by"  # the rollout whose committed swap put the active slot there (None after a revert)
REVERTS_APPLIED = "reverts_applied"  # rollout ids whose signed revert this device applied, newest last
KEEP_REVERTS = 200  # ids kept; an older one is still refused, as its rollout no longer put the active slot there


def check_rollback(doc: dict[str, Any], *, public_key: Any, fleet: str, ledger: dict[str, Any]) -> None:
    """A rollback goes down, so it needs the fleet key's own word, fresh, for exactly this bundle."""
    instruction = _verified(doc, public_key, "rollback")
    expected = {"schema": ROLLBACK_SCHEMA, "name": doc["name"], "version": doc["version"], "sha256": doc["sha256"]}
    if any(instruction.get(k) != v for k, v in expected.items()) or instruction.get("fleet") != fleet:
        raise UpdateError("signature", "the signed rollback instruction is for another bundle or fleet")
    issued = instruction.get("issued_at")
    if not isinstance(issued, (int, float)) or issued <= ledger.get(LAST_ROLLBACK, 0):
        raise UpdateError("downgrade", "the rollback instruction is not newer than the last one applied (a replay)")


def check_revert(doc: dict[str, Any], *, public_key: Any, fleet: str, ledger: dict[str, Any]) -> dict[str, Any]:
    """The signed instruction of a revert this device may apply, or ``UpdateError`` (``signature`` or
    ``replay``) saying why not. Whether the device moved in that rollout is the caller's check."""
    if doc.get("schema") == LEGACY_DESIRED_SCHEMA:
        raise UpdateError(
            "signature",
            "refused an unsigned revert (edgekit.desired/1, from a collector older than this agent): upgrade the "
            "collector, or take the device back with 'edgekit rollout rollback --to VERSION --key KEY'",
        )
    if not isinstance(doc.get("instruction"), dict) or not isinstance(doc.get("instruction_signature"), str):
        raise UpdateError(
            "signature",
            "refused a revert that carries no signed instruction (forged, or a rollout started without "
            "'edgekit rollout start --key'): take the device back with 'edgekit rollout rollback --key' instead",
        )
    instruction = _verified(doc, public_key, "revert")
    expected = {
        "schema": REVERT_SCHEMA,
        "rollout": doc["rollout"],
        "fleet": fleet,
        "name": doc["name"],
        "version": doc["version"],
    }
    wrong = [k for k, v in expected.items() if instruction.get(k) != v]
    if wrong:
        raise UpdateError(
            "signature",
            f"the signed revert instruction is for another {' and '.join(wrong)} "
            f"(it undoes rollout {instruction.get('rollout')!r} of {instruction.get('name')} "
            f"v{instruction.get('version')} in fleet {instruction.get('fleet')!r})",
        )
    if doc["rollout"] in ledger.get(REVERTS_APPLIED, []):
        raise UpdateError("replay", f"the revert of rollout {doc['rollout']} was applied once already (a replay)")
    return instruction


def moved_by(
    doc: dict[str, Any],
    instruction: dict[str, Any],
    *,
    slots: tuple[dict[str, Any] | None, dict[str, Any] | None],
    ledger: dict[str, Any],
) -> bool:
    """Whether the revert has something to undo: the active slot (``slots[0]``'s meta) holds the instruction's
    bundle, put there by a committed swap of its rollout, and the previous slot (``slots[1]``) the version the
    device came from. Otherwise the device never moved in that rollout (or has moved on) and stays."""
    active, before = slots[0] or {}, slots[1] or {}
    return (
        (active.get("name"), active.get("version")) == (doc["name"], doc["version"])
        and active.get("bundle_sha256") == instruction.get("sha256")
        and ledger.get(ACTIVE_BY) == doc["rollout"]
        and before.get("version") == doc["from_version"]
    )


def replayed(doc: dict[str, Any], entry: dict[str, Any], ledger: dict[str, Any]) -> bool:
    """A revert this device applied once (its ledger ``entry`` says so) arriving again after the device moved
    on (a later rollout's swap): a replay, refused, where a redelivery of the retained message before any move
    only repeats the outcome it had."""
    return doc["action"] == "revert" and entry.get("state") == "rolled_back" and ledger.get(ACTIVE_BY) is not None


def applied_revert(ledger: dict[str, Any], rollout: str) -> dict[str, Any]:
    """The ledger's keys after this device applied the revert of ``rollout``."""
    used = [r for r in ledger.get(REVERTS_APPLIED, []) if r != rollout] + [rollout]
    return {ACTIVE_BY: None, REVERTS_APPLIED: used[-KEEP_REVERTS:]}


def _verified(doc: dict[str, Any], public_key: Any, what: str) -> dict[str, Any]:
    instruction = doc["instruction"]
    try:
        verify_signature(
            f"rollout {doc['rollout']}",
            canonical_json(instruction),
            base64.b64decode(doc["instruction_signature"], validate=True),
            public_key,
        )
    except (SignatureError, ValueError) as exc:
        raise UpdateError("signature", f"the {what} instruction is not signed by the trusted key ({exc})") from exc
    return instruction
