"""The rollout controller: a signed bundle reaches a fleet in waves, gated on what devices report.

It lives in the collector, keeps all of its state in the fleet store (so a collector restart picks
running rollouts up where they were) and speaks to devices only through their retained ``desired``
topic; devices answer on ``reported`` (see ``device_agent.updater``). Of collectors sharing a database
only the leader ticks (``leader.py``); a device is marked sent, fenced by the lease's token, before its
message goes out, so a new leader carries a rollout on from the store without sending a wave twice.

- ``start``: the bundle must verify against the fleet's trusted key before anything is sent; the
  target devices (a fleet, optionally a glob) are fixed and split into cumulative waves.
- ``tick`` (every fraction of a second): send the current wave's desired states, check the abort
  rules, and move to the next wave once every *online* device of the wave has finished and the
  wave's soak time (``wave_wait``) has passed. A device offline during its wave keeps its retained
  desired state and updates when it returns; its report still lands. A device marked sent that has not
  answered is sent the same message again (``resend_seconds``): delivery is at least once. Each rollout
  steps apart from the others: one that raises says so in its reason and, if it goes on failing, ends failed.
  Pauses and aborts wait for a running tick, which acts on the states it loaded; its timeout mark
  applies only to a device still in the state it loaded, so a report stored meanwhile wins.
- Abort rules: ``failed>20%`` (share of sent devices that failed or rolled back), ``agreement<0.98``
  (row-weighted mean shadow agreement), ``p99_ms>50`` (median candidate p99 in shadow),
  ``drift>30%`` (share of moved devices whose latest window on the new version drifted). An abort
  sends every moved device a ``revert`` to the version it came from: the instruction the operator's
  CLI signed with the fleet key when the rollout started (``signed.sign_revert``), kept in the
  rollout's spec. A rollout started without one (no ``--key``) leaves moved devices where they are.
- A/B split (``--ab 50%``, ``ab.py``): after the split's wave the rollout holds until delayed labels show a
  significant winner; a candidate that wins goes on with the waves, a loss or the time limit aborts.
- ``rollback``: going *down* needs an instruction signed by the fleet's private key (made by the
  CLI, never held by the collector); devices check that signature themselves.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_agent.bundle import BUNDLE_SUFFIX, read_bundle
from device_agent.canonical import canonical_json, sha256_hex
from device_agent.errors import BundleError
from device_agent.protocol import ROLLBACK_SCHEMA, TERMINAL_UPDATE_STATES, Topics, desired_payload, encode
from device_agent.signing import verify_signature
from edgekit.errors import EdgekitError, RolloutConflict, RolloutError, RolloutNotFound, StoreUnavailable
from edgekit.fleet import ab
from edgekit.fleet.bundle_files import bundle_file
from edgekit.fleet.rollout_request import start_from_request as start_from_request  # where callers found it
from edgekit.fleet.rollout_rules import FAILED_DEVICE_STATES, abort_rule_tripped, rule_value
from edgekit.fleet.rollout_spec import RolloutSpec, _assign_waves
from edgekit.fleet.signed import check_signed_revert, counts, new_rollout_id, unreverted
from edgekit.fleet.signed import sign_rollback as sign_rollback  # where callers found it first
from edgekit.fleet.store import LeaseLost, RolloutStore

TERMINAL = ("aborted", "succeeded", "failed")  # a rollout in one of these is finished
FAIL_AFTER_TICKS = 5  # a rollout whose step raises this many ticks in a row ...
FAIL_AFTER_SECONDS = 60.0  # ... over at least this long is marked failed (``_advance_apart``)
CANNOT_ADVANCE = "the controller cannot advance it"  # a failing rollout's reason starts so
RESEND_SECONDS = 60.0  # desired sent again to a device that has not answered (``_resend_unanswered``)
log = logging.getLogger("edgekit.fleet.rollouts")


@dataclass
class RolloutController:
    store: RolloutStore
    publish: Callable[[str, bytes, bool], bool]  # (topic, payload, retain) -> sent
    bundle_dir: Path
    public_url: Callable[[], str]
    trusted_key: Any = None
    clock: Callable[[], float] = time.time
    leader: Any = None  # leader.Leadership: ticks, and their writes, only while it leads (None: alone)
    tick_errors: int = 0  # rollout steps that raised (``_advance_apart``), since start
    resend_seconds: float = RESEND_SECONDS  # a sent device that has not answered is sent its desired again
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _failing: dict[str, tuple[float, int]] = field(default_factory=dict)  # rollout -> (first failure, ticks)
    _resent: dict[tuple[str, str], float] = field(default_factory=dict)  # (rollout, device) -> last resent at

    def __post_init__(self) -> None:
        self.bundle_dir = Path(self.bundle_dir)

    # -- bundles -------------------------------------------------------------------------------------
    def add_bundle(self, data: bytes) -> dict[str, Any]:
        """Verify a bundle against the trusted key and keep it for serving; idempotent by sha256."""
        self._need_key()
        sha256 = sha256_hex(data)
        self.bundle_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.bundle_dir, suffix=".upload")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            try:
                bundle = read_bundle(tmp, self.trusted_key)
            except BundleError as exc:
                raise RolloutError(
                    f"the bundle was refused: {exc.problem}",
                    exc.fix or "package and sign it with 'edgekit package --key'",
                ) from exc
            path = self.bundle_dir / f"{sha256}{BUNDLE_SUFFIX}"
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        signature = base64.b64encode(_signature_of(path)).decode()
        record = {
            "sha256": sha256,
            "name": bundle.name,
            "version": bundle.version,
            "size": len(data),
            "path": str(path),
            "signature": signature,
            "added_at": self.clock(),
        }
        other = self.store.store_bundle(record, data)  # the bytes too: any collector serves it
        if other is not None:
            raise RolloutConflict(
                f"{bundle.name} v{bundle.version} is already known with other content (sha256 {other[:12]}…)",
                "versions are immutable: package the change as a new --version",
            )
        return {"sha256": sha256, "name": bundle.name, "version": bundle.version, "size": len(data)}

    def bundle(
        self, *, sha256: str | None = None, name: str | None = None, version: int | None = None
    ) -> dict[str, Any] | None:
        return self.store.bundle(sha256=sha256, name=name, version=version)

    def bundles(self) -> list[dict[str, Any]]:
        return self.store.bundles()

    def bundle_file(self, sha256: str) -> Path | None:
        """The bundle's file on this collector, written from the fleet database on first use (``bundle_files``)."""
        return bundle_file(self.store, self.bundle_dir, sha256)

    # -- starting --------------------------------------------------------------------------------------
    def start(self, sha256: str, fleet: str, spec: RolloutSpec, revert: dict[str, Any] | None = None) -> str:
        """Start a rollout; ``revert`` (``signed.sign_revert``) is what an abort sends the devices that moved,
        and its instruction names the rollout's id."""
        bundle = self.bundle(sha256=sha256)
        if bundle is None:
            raise RolloutError(
                f"no bundle with sha256 {sha256[:12]}… was uploaded to this collector",
                "upload it first (rollout start does)",
            )
        self._need_key()
        try:
            read_bundle(self.bundle_file(sha256), self.trusted_key)  # again: the file is what devices get
        except BundleError as exc:
            raise RolloutError(f"the stored bundle no longer verifies: {exc}", "upload it again") from exc
        targets = self._targets(fleet, spec.devices)
        newer = [d for d in targets if d["model"] == bundle["name"] and (d["model_version"] or 0) > bundle["version"]]
        if newer:
            raise RolloutError(
                f"{len(newer)} target device(s) run a newer {bundle['name']} "
                f"(e.g. {newer[0]['device']} on v{newer[0]['model_version']})",
                "devices only go up; use 'edgekit rollout rollback --to VERSION' with the signing key to go down",
            )
        if revert is None:
            return self._create(fleet, "install", bundle, spec, targets)
        revert = check_signed_revert(revert, self.trusted_key, fleet=fleet, bundle=bundle, taken=self.store.rollout)
        rollout_id = revert["instruction"]["rollout"]
        return self._create(fleet, "install", bundle, spec, targets, extra={"revert": revert}, rollout_id=rollout_id)

    def rollback(self, instruction: dict[str, Any], signature: str, devices: str = "*") -> str:
        """A signed instruction to go down to an earlier version (made by ``sign_rollback``)."""
        self._need_key()
        try:
            verify_signature(
                "rollback instruction", canonical_json(instruction), base64.b64decode(signature), self.trusted_key
            )
        except (BundleError, ValueError) as exc:
            raise RolloutError(
                f"the rollback instruction is not signed by the fleet's trusted key ({exc})",
                "sign it with the key the bundles are signed with",
            ) from exc
        if instruction.get("schema") != ROLLBACK_SCHEMA or not isinstance(instruction.get("issued_at"), (int, float)):
            raise RolloutError("the rollback instruction is malformed", "make it with 'edgekit rollout rollback'")
        bundle = self.bundle(sha256=instruction.get("sha256"))
        if bundle is None or (bundle["name"], bundle["version"]) != (
            instruction.get("name"),
            instruction.get("version"),
        ):
            raise RolloutError(
                f"{instruction.get('name')} v{instruction.get('version')} is not stored on this collector",
                "pass --bundle to upload it",
            )
        spec = RolloutSpec(waves=(1.0,), devices=devices)
        targets = self._targets(instruction["fleet"], devices)
        return self._create(
            instruction["fleet"],
            "rollback",
            bundle,
            spec,
            targets,
            extra={"instruction": instruction, "instruction_signature": signature},
        )

    def _targets(self, fleet: str, pattern: str) -> list[dict[str, Any]]:
        devices = [d for d in self.store.status() if d["fleet"] == fleet and fnmatch.fnmatchcase(d["device"], pattern)]
        if not devices:
            known = sorted({d["fleet"] for d in self.store.status()})
            raise RolloutError(
                f"no known device of fleet {fleet!r} matches {pattern!r}",
                f"fleets known to this collector: {', '.join(known) or 'none yet (devices appear once they connect)'}",
            )
        return devices

    def _create(
        self,
        fleet: str,
        kind: str,
        bundle: dict[str, Any],
        spec: RolloutSpec,
        targets: list[dict[str, Any]],
        extra: dict[str, Any] | None = None,
        rollout_id: str | None = None,
    ) -> str:
        now = self.clock()
        rollout_id = rollout_id or new_rollout_id(now)
        waves = _assign_waves(len(targets), spec.waves)
        ordered = sorted(targets, key=lambda d: d["device"])
        spec_doc = json.loads(spec.to_json())
        spec_doc.update({**(extra or {}), **ab.begin(self.store, spec, bundle["name"], ordered, waves)})
        rollout = {
            "id": rollout_id,
            "fleet": fleet,
            "kind": kind,
            "name": bundle["name"],
            "version": bundle["version"],
            "sha256": bundle["sha256"],
            "spec": json.dumps(spec_doc),
            "wave_started_at": now,
            "created_at": now,
        }
        rows = [(d["device"], wave, d["model_version"]) for d, wave in zip(ordered, waves, strict=True)]
        busy = self.store.create_rollout(rollout, rows)
        if busy is not None:
            raise RolloutConflict(
                f"rollout {busy} is still in progress on fleet {fleet!r}",
                f"wait for it, or 'edgekit rollout abort {busy}'",
            )
        self.tick()
        return rollout_id

    # -- operator actions ------------------------------------------------------------------------------
    def pause(self, rollout_id: str) -> dict[str, Any]:
        return self._transition(rollout_id, {"running": "paused"}, "paused by the operator")

    def resume(self, rollout_id: str) -> dict[str, Any]:
        return self._transition(rollout_id, {"paused": "running"}, "")

    def abort(self, rollout_id: str, reason: str = "aborted by the operator") -> dict[str, Any]:
        allowed = {"running": "aborted", "paused": "aborted", "pending": "aborted"}
        with self._lock:
            rollout, devices = self._load(rollout_id)
            if rollout["state"] in allowed:  # first, so no reader sees an aborted rollout with devices pending
                self._abort_unstarted(rollout_id, devices)
            self._transition(rollout_id, allowed, reason)
            self._revert_moved(rollout_id)
        return self.status(rollout_id)

    def _transition(self, rollout_id: str, allowed: dict[str, str], reason: str) -> dict[str, Any]:
        with self._lock:  # a tick that loaded the rollout as running must not send on after a pause's answer
            was = self.store.transition_rollout(rollout_id, allowed, reason, self.clock(), terminal=TERMINAL)
        if was is None:
            raise RolloutNotFound(f"no rollout {rollout_id!r}", "list them with 'edgekit rollout status'")
        if was not in allowed:
            raise RolloutConflict(
                f"rollout {rollout_id} is {was}", f"only a rollout that is {' or '.join(allowed)} can do that"
            )
        return self.status(rollout_id)

    # -- reports from devices ------------------------------------------------------------------------
    def record_report(self, doc: dict[str, Any], now: float) -> None:
        """A device's step or result; not one on a revert it refused or was never sent (``signed.counts``)."""
        if doc.get("action") == "revert" and not counts(doc, self.store.rollout(str(doc.get("rollout")))):
            return
        facts = {k: doc[k] for k in ("shadow", "download", "health", "selftest") if isinstance(doc.get(k), dict)}
        self.store.record_rollout_report(doc, facts, now)  # a tick's timeout mark yields to it (``only_from``)

    # -- the loop ------------------------------------------------------------------------------------
    def tick(self) -> None:
        if self.leader is not None and not self.leader.leading():
            return  # another collector leads: it runs the rollouts
        with self._lock, contextlib.suppress(LeaseLost):  # lost mid-tick: the new leader carries on from the store
            running = self.store.running_rollouts()
            self._resent = {key: at for key, at in self._resent.items() if key[0] in running}  # finished: forget
            self._failing = {key: v for key, v in self._failing.items() if key in running}  # paused: counts anew
            for rollout_id in running:
                self._advance_apart(rollout_id)

    def _advance_apart(self, rollout_id: str) -> None:
        """One rollout's step, apart from the others': one that raises is logged, counted and said in its reason,
        and marked failed after ``FAIL_AFTER_TICKS`` failing ticks in a row over ``FAIL_AFTER_SECONDS`` at least
        (devices stay put). A lost lease or an unreachable database is no rollout's fault: it ends the tick."""
        try:
            self._advance(rollout_id)
        except (LeaseLost, StoreUnavailable):
            raise
        except Exception as exc:  # a bug or bad data in one rollout must not stop the fleet's others
            self.tick_errors += 1
            self._failing_tick(rollout_id, exc)
            return
        if self._failing.pop(rollout_id, None) is not None:
            log.info("rollout %s advances again", rollout_id)
            with contextlib.suppress(EdgekitError):
                if self._load(rollout_id)[0]["reason"].startswith(CANNOT_ADVANCE):  # not a reason set since
                    self._update(rollout_id, reason="")

    def _failing_tick(self, rollout_id: str, exc: Exception) -> None:
        now = self.clock()
        first, ticks = self._failing.get(rollout_id, (now, 0))
        self._failing[rollout_id] = (first, ticks + 1)
        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        if ticks == 0:
            log.exception("rollout %s cannot advance (%s); the other rollouts go on", rollout_id, error)
        give_up = ticks + 1 >= FAIL_AFTER_TICKS and now - first >= FAIL_AFTER_SECONDS
        with contextlib.suppress(EdgekitError):  # the store may be what fails: then the reason waits
            if not give_up:
                self._update(rollout_id, reason=f"{CANNOT_ADVANCE} ({error}); {ticks + 1} tick(s)")
                return
            why = f"the controller could not advance it for {now - first:.0f} s ({error}); devices stay as they are"
            with self._fenced():
                self.store.transition_rollout(rollout_id, {"running": "failed"}, why, now, terminal=TERMINAL)
            log.error("rollout %s marked failed: %s", rollout_id, why)
            self._failing.pop(rollout_id, None)

    def _advance(self, rollout_id: str) -> None:
        rollout, devices = self._load(rollout_id)
        spec = RolloutSpec.from_json(_spec_only(rollout["spec"]))
        now = self.clock()
        current = [d for d in devices if d["wave"] <= rollout["wave"]]
        for device in current:
            if device["state"] == "pending" and self._claim_and_send(rollout, device, now):
                device["state"] = "sent"
        self._resend_unanswered(rollout, current, spec, now)
        for device in current:
            if (
                device["state"] not in TERMINAL_UPDATE_STATES
                and device["state"] != "pending"
                and device["sent_at"]
                and now - device["sent_at"] > spec.device_timeout
            ):
                why = "offline since" if not device["online"] else "no result within"
                if self._set_device(  # only from the state loaded: a report stored since this tick began wins
                    rollout_id,
                    device["device"],
                    "failed",
                    f"{why} {spec.device_timeout:.0f} s after the update was sent",
                    code="timeout",
                    only_from=device["state"],
                ):
                    device["state"] = "failed"
        tripped = abort_rule_tripped(rollout, spec, devices)
        if tripped:
            self.abort(rollout_id, f"abort rule {tripped}")
            return
        waiting = [d for d in current if d["state"] not in TERMINAL_UPDATE_STATES and d["online"]]
        if waiting:
            return
        if rollout["wave_done_at"] is None:
            self._update(rollout_id, wave_done_at=now)
            rollout["wave_done_at"] = now
        if now - rollout["wave_done_at"] < spec.wave_wait:
            return
        if rollout["wave"] == spec.ab_wave and self._ab_holds(rollout, spec, devices, now):
            return
        if rollout["wave"] + 1 < len(spec.waves):
            with self._fenced():
                self._update(rollout_id, wave=rollout["wave"] + 1, wave_started_at=now, wave_done_at=None)
            self._advance(rollout_id)
            return
        self._finish(rollout_id, devices)

    def _claim_and_send(self, rollout: dict[str, Any], device: dict[str, Any], now: float) -> bool:
        """Mark the device sent, committed (and fenced: only the leader's mark counts) before its desired
        message goes out, so a leader killed in between leaves its successor a device marked sent, never
        one to send a second time; a publish that fails (no broker) puts it back to pending."""
        with self._fenced():
            self._set_device(rollout["id"], device["device"], "sent", "desired state published", sent_at=now)
        if self._send(rollout, device):
            return True
        with self._fenced():
            self._set_device(rollout["id"], device["device"], "pending", "not sent yet: the broker is unreachable")
        return False

    def _resend_unanswered(
        self, rollout: dict[str, Any], devices: list[dict[str, Any]], spec: RolloutSpec, now: float
    ) -> None:
        """Delivery at least once: a device marked sent that has not answered gets its desired message again
        every ``resend_seconds`` (at most a third of ``device_timeout``), since the publish after the mark may
        have been lost (a leader killed between the two, a broker restarted without persistence). It is the
        same retained message, and a device ignores a desired state it is applying or has finished
        (``device_agent.updater``: one job per rollout and action, its outcome kept in the ledger)."""
        every, due = min(self.resend_seconds, spec.device_timeout / 3), []
        for device in devices:
            key = (rollout["id"], device["device"])
            if device["state"] != "sent" or not device["sent_at"]:
                self._resent.pop(key, None)
            elif now - max(device["sent_at"], self._resent.get(key, 0.0)) >= every:
                due.append(device)
        if not due:
            return
        with self._fenced():  # LeaseLost when deposed: its stale resend would replace a successor's revert
            pass
        for device in due:
            if self._send(rollout, device):
                self._resent[(rollout["id"], device["device"])] = now

    def _ab_holds(self, rollout: dict[str, Any], spec: RolloutSpec, devices: list[dict[str, Any]], now: float) -> bool:
        """At an A/B split (``ab.py``): whether it still holds. A look's comparison is stored (fenced) before it
        is acted on, so a new leader acts on the same decision; a lost or undecided split aborts (the revert)."""
        doc = json.loads(rollout["spec"])
        comparison = ab.look(self.store, rollout, spec, devices, doc.get(ab.KEY), now)
        if comparison is not None:
            with self._fenced():
                self._update(rollout["id"], spec=json.dumps({**doc, ab.KEY: comparison}))
        decided = comparison or doc.get(ab.KEY) or {}
        if decided.get("decision") == "revert":
            self.abort(rollout["id"], f"A/B: {decided['why']}")
        return decided.get("decision") != "promote"

    def _fenced(self) -> Any:
        return contextlib.nullcontext() if self.leader is None else self.leader.fenced()

    def _finish(self, rollout_id: str, devices: list[dict[str, Any]]) -> None:
        """After the last wave: done when every device has a result. Devices that are offline keep
        their retained desired state and the rollout waits for them (``device_timeout`` after it was
        sent, a device that never answered is marked failed, and still updates if it returns)."""
        done = [d for d in devices if d["state"] == "succeeded"]
        failed = [d for d in devices if d["state"] in FAILED_DEVICE_STATES]
        waiting = [d for d in devices if d["state"] not in TERMINAL_UPDATE_STATES]
        if waiting:
            self._update(
                rollout_id, reason=f"waiting for {len(waiting)} offline device(s); they update when they return"
            )
            return
        parts = [f"{len(done)} of {len(devices)} device(s) updated"] + ([f"{len(failed)} failed"] if failed else [])
        self._update(
            rollout_id,
            state="failed" if failed and not done else "succeeded",
            reason="; ".join(parts),
            finished_at=self.clock(),
        )

    def _send(self, rollout: dict[str, Any], device: dict[str, Any]) -> bool:
        spec = json.loads(rollout["spec"])
        bundle = self.bundle(sha256=rollout["sha256"])
        doc = desired_payload(
            rollout=rollout["id"],
            action=rollout["kind"],
            name=rollout["name"],
            version=rollout["version"],
            url=f"{self.public_url().rstrip('/')}/bundles/{rollout['sha256']}",
            sha256=rollout["sha256"],
            size=bundle["size"],
            signature=bundle["signature"],
            health={"seconds": spec["health_seconds"]},
        )
        agreement, p99 = rule_value(spec, "agreement"), rule_value(spec, "p99_ms")
        if spec["shadow_rows"]:
            doc["shadow"] = {
                "rows": spec["shadow_rows"],
                "min_agreement": agreement or 0.0,
                "timeout_seconds": spec["shadow_timeout"],
            }
        if p99:
            doc["health"]["max_p99_ms"] = p99
        if rollout["kind"] == "rollback":
            doc["instruction"], doc["instruction_signature"] = spec["instruction"], spec["instruction_signature"]
        return self.publish(_desired_topic(rollout["fleet"], device["device"]), encode(doc), True)

    def _revert_moved(self, rollout_id: str) -> None:
        """Every device that moved, or may be moving, is told to undo it with the revert the operator signed
        at the start (devices whose wave never came are marked aborted by ``_abort_unstarted``). Without one
        (an older CLI, or ``--no-revert``) devices refuse any revert, so none is sent and the reason says so."""
        rollout, devices = self._load(rollout_id)
        self._abort_unstarted(rollout_id, devices)
        moving = [d for d in devices if d["state"] not in ("pending", "failed", "rolled_back", "aborted")]
        revert = json.loads(rollout["spec"]).get("revert")
        if revert is None:
            if moving and rollout["kind"] == "install":
                self._update(rollout_id, reason=f"{rollout['reason']}; {unreverted(rollout, len(moving))}")
            return
        for device in moving:
            doc = desired_payload(
                rollout=rollout_id,
                action="revert",
                name=rollout["name"],
                version=rollout["version"],
                from_version=device["from_version"] or 0,
                instruction=revert["instruction"],
                instruction_signature=revert["signature"],
            )
            self.publish(_desired_topic(rollout["fleet"], device["device"]), encode(doc), True)

    # -- reads -----------------------------------------------------------------------------------------
    def _abort_unstarted(self, rollout_id: str, devices: list[dict[str, Any]]) -> None:
        for device in devices:
            if device["state"] == "pending":
                self._set_device(
                    rollout_id, device["device"], "aborted", "the rollout was aborted before this device's wave"
                )
                device["state"] = "aborted"

    def _load(self, rollout_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        found = self.store.rollout(rollout_id)
        if found is None:
            raise RolloutNotFound(f"no rollout {rollout_id!r}", "list them with 'edgekit rollout status'")
        row, devices = found
        parsed = []
        for d in devices:
            item = d
            item["facts"] = json.loads(item["facts"]) if item["facts"] else {}
            item["online"] = item["online"] is None or bool(item["online"])  # unknown counts as online: wait for it
            parsed.append(item)
        return dict(row), parsed

    def status(self, rollout_id: str) -> dict[str, Any]:
        rollout, devices = self._load(rollout_id)
        spec = json.loads(rollout["spec"])
        counts: dict[str, int] = {}
        for d in devices:
            counts[d["state"]] = counts.get(d["state"], 0) + 1
        return {
            "id": rollout["id"],
            "state": rollout["state"],
            "kind": rollout["kind"],
            "fleet": rollout["fleet"],
            "name": rollout["name"],
            "version": rollout["version"],
            "sha256": rollout["sha256"],
            "reason": rollout["reason"],
            "created_at": rollout["created_at"],
            "updated_at": rollout["updated_at"],
            "finished_at": rollout["finished_at"],
            "wave": rollout["wave"] + 1,
            "waves": [f"{w:.0%}" for w in spec["waves"]],
            "abort_on": spec["abort_on"],
            "signed_revert": "revert" in spec,  # whether an abort can send the devices that moved back
            "ab": ab.summary(spec),
            "counts": counts,
            "devices": [
                {
                    "device": d["device"],
                    "wave": d["wave"] + 1,
                    "state": d["state"],
                    "version": d["version"],
                    "from_version": d["from_version"],
                    "reason": d["reason"],
                    "code": d["code"],
                    "online": d["online"],
                    **d["facts"],
                }
                for d in devices
            ],
        }

    def list(self, limit: int = 50) -> list[dict[str, Any]]:
        return [self.status(i) for i in self.store.rollout_ids(limit)]

    # -- small helpers -------------------------------------------------------------------------------
    def _set_device(self, rollout_id: str, device: str, state: str, reason: str, **marks: Any) -> bool:
        # marks: code=, sent_at=, only_from= (set only if still in that state); whether it was set
        return self.store.set_rollout_device(rollout_id, device, state, reason, self.clock(), **marks)

    def _update(self, rollout_id: str, **columns: Any) -> None:
        self.store.update_rollout(rollout_id, self.clock(), **columns)

    def _need_key(self) -> None:
        if self.trusted_key is None:
            raise RolloutError(
                "this collector has no trusted key, so it cannot check bundles",
                "restart it with 'edgekit fleet collect --trust edgekit.pub'",
            )


def _spec_only(text: str) -> str:
    doc = json.loads(text)
    kept = {k: v for k, v in doc.items() if k not in ("instruction", "instruction_signature", "revert", ab.KEY)}
    return json.dumps(kept)


def _signature_of(path: Path) -> bytes:
    import zipfile

    with zipfile.ZipFile(path) as archive:
        return archive.read("signature")


def _desired_topic(fleet: str, device: str) -> str:
    return Topics(fleet, device).desired
