"""The device state directory: two model slots, an atomically replaced pointer, and state.json.

::

    <state_dir>/slots/a/bundle.edgebundle   one verified bundle per slot
    <state_dir>/slots/b/bundle.edgebundle
    <state_dir>/active                      "a" or "b", replaced with os.replace (never half-written)
    <state_dir>/slots/*/slot.json           name, version and model sha256 of the slot's bundle
    <state_dir>/state.json                  active slot, versions, previous slot, pending health watch
    <state_dir>/updates.json                the OTA ledger: attempts and outcomes per rollout
    <state_dir>/downloads/                  bundles being fetched (``.part``) and fetched
    <state_dir>/spool/                      summaries not yet acknowledged by the broker

Installing writes the new bundle into the *inactive* slot, then flips the pointer: a crash at any
moment leaves either the old model or the new one active, never none. The OTA updater splits the
two (``stage``, then ``activate`` with a pending health watch, then ``commit``) and ``recover``
undoes a swap whose health watch was cut short by a crash.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bundle import Bundle, read_bundle
from .canonical import sha256_hex
from .errors import BundleError, InstallError, StateDirBusy
from .fsutil import write_atomic

SLOTS = ("a", "b")
BUNDLE_FILE = "bundle.edgebundle"
SLOT_META = "slot.json"
LEDGER = "updates.json"
LOCK_FILE = "agent.lock"  # held (flock) by the one agent process running on the state dir


@dataclass
class StateDir:
    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    def hold(self) -> Any:
        """Claim the state dir for this agent process, or raise ``StateDirBusy`` naming the one that has it.

        Two agents on one state dir (a second ``edge-agent run`` with a copied config, a unit started twice)
        would both append to the spool, the prediction log and the field samples and both move the active
        slot: nothing refused it, and the files ended up mixed. An exclusive ``flock`` on ``agent.lock``
        is released by the kernel when the process ends, however it ends, so a crash never leaves the dir
        claimed. The returned file must stay open while the agent runs (``release`` closes it)."""
        try:
            import fcntl
        except ImportError:  # not a POSIX system: nothing to hold it with
            return None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            handle = open(self.root / LOCK_FILE, "a+")  # noqa: SIM115 (held open while the agent runs)
        except OSError as exc:
            raise InstallError(
                f"{self.root}: the state dir cannot be written ({exc.strerror or exc}); "
                "create it, writable by the agent's user, or point state_dir elsewhere"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "its pid unknown"
            handle.close()
            raise StateDirBusy(self.root, holder) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        return handle

    @staticmethod
    def release(handle: Any) -> None:
        if handle is not None:
            handle.close()

    def slot(self, name: str) -> Path:
        return self.root / "slots" / name

    def active_slot(self) -> str | None:
        try:
            name = (self.root / "active").read_text().strip()
        except FileNotFoundError:
            return None
        return name if name in SLOTS else None

    def state(self) -> dict[str, Any]:
        try:
            return json.loads((self.root / "state.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def active_bundle(self, public_key: Any) -> Bundle:
        """The active slot's bundle, verified again (a slot on an SD card can rot)."""
        slot = self.active_slot()
        if slot is None:
            raise InstallError(
                f"{self.root}: no model is installed; install one with 'edge-agent install BUNDLE --config agent.toml'"
            )
        return read_bundle(self.slot(slot) / BUNDLE_FILE, public_key)

    def install(self, bundle_path: str | Path, public_key: Any, *, allow_downgrade: bool = False) -> Bundle:
        """Verify ``bundle_path`` and make it the active model. Refuses versions not above the active one."""
        slot, bundle = self.stage(bundle_path, public_key, allow_downgrade=allow_downgrade)
        self.activate(slot)
        return bundle

    def stage(self, bundle_path: str | Path, public_key: Any, *, allow_downgrade: bool = False) -> tuple[str, Bundle]:
        """Verify a bundle and write it into the inactive slot; the active model is untouched."""
        bundle = read_bundle(bundle_path, public_key)
        return self.stage_verified(bundle, allow_downgrade=allow_downgrade), bundle

    def stage_verified(self, bundle: Bundle, *, allow_downgrade: bool = False) -> str:
        """Write a bundle ``read_bundle`` has verified into the inactive slot (it is not read again);
        the slot's name. Refuses a version not above the active one unless ``allow_downgrade``."""
        self.check_upgrade(bundle.name, bundle.version, allow_downgrade=allow_downgrade, source=str(bundle.path))
        target = "b" if self.active_slot() == "a" else "a"
        slot_dir = self.slot(target)
        shutil.rmtree(slot_dir, ignore_errors=True)
        slot_dir.mkdir(parents=True)
        data = Path(bundle.path).read_bytes()
        write_atomic(slot_dir / BUNDLE_FILE, data)
        meta = {
            "name": bundle.name,
            "version": bundle.version,
            "sha256": bundle.manifest["files"][bundle.model_file]["sha256"],
            "bundle_sha256": sha256_hex(data),
        }
        write_atomic(slot_dir / SLOT_META, json.dumps(meta).encode())
        return target

    def check_upgrade(self, name: str, version: int, *, allow_downgrade: bool = False, source: str = "bundle") -> None:
        state = self.state()
        current = state.get("version")
        if current is not None and state.get("name") == name and version <= current and not allow_downgrade:
            raise InstallError(
                f"{source}: version {version} of {name!r} is not newer than the installed version {current}; "
                "versions only go up (package a higher --version)"
            )

    def slot_meta(self, slot: str | None) -> dict[str, Any] | None:
        if slot is None:
            return None
        try:
            return json.loads((self.slot(slot) / SLOT_META).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def activate(self, slot: str, *, pending: dict[str, Any] | None = None) -> dict[str, Any]:
        """Make ``slot`` the active one. ``pending`` marks it as on probation (an update under health
        watch): state.json is written first, then the pointer is replaced, so after a crash the
        pointer is the truth and ``recover`` can tell a finished swap from an unfinished one."""
        previous = self.active_slot()
        if previous == slot:
            previous = self.state().get("previous")
        meta = self.slot_meta(slot) or {}
        before = self.slot_meta(previous) or {}
        new_state = {
            "active": slot,
            "name": meta.get("name"),
            "version": meta.get("version"),
            "sha256": meta.get("sha256"),
            "previous": previous if before else None,
            "previous_version": before.get("version"),
            "pending": pending,
        }
        write_atomic(self.root / "state.json", json.dumps(new_state, indent=1).encode())
        write_atomic(self.root / "active", slot.encode())
        return new_state

    def commit(self) -> None:
        """The slot on probation passed its health watch: it is simply the active slot now."""
        state = self.state()
        if state.get("pending") is not None:
            state["pending"] = None
            write_atomic(self.root / "state.json", json.dumps(state, indent=1).encode())

    def recover(self) -> dict[str, Any] | None:
        """Put the state dir right after a crash, before a model is loaded.

        - The pointer names a slot on probation: the agent died during the health watch, so the new
          model is not trusted: go back to the previous slot. The pending record is returned, with
          ``reason``, so the updater can report it.
        - state.json disagrees with the pointer (a crash between the two writes): rebuilt from the pointer.
        """
        pointer, state = self.active_slot(), self.state()
        pending = state.get("pending")
        if pointer is None:
            return None
        if pending and pending.get("slot") == pointer and state.get("previous") and self.slot_meta(state["previous"]):
            self.activate(state["previous"])
            return {
                **pending,
                "reason": "the agent restarted during the health watch; rolled back to the previous model",
            }
        if state.get("active") != pointer or pending:
            other = "b" if pointer == "a" else "a"
            meta, before = self.slot_meta(pointer) or {}, self.slot_meta(other) or {}
            fixed = {
                "active": pointer,
                "name": meta.get("name", state.get("name")),
                "version": meta.get("version", state.get("version")),
                "sha256": meta.get("sha256", state.get("sha256")),
                "previous": other if before else None,
                "previous_version": before.get("version"),
                "pending": None,
            }
            write_atomic(self.root / "state.json", json.dumps(fixed, indent=1).encode())
        return None

    def load_usable(self, public_key: Any) -> tuple[Bundle, str | None]:
        """The active bundle; if it no longer verifies (a rotten SD card, a hand edit), the other slot's,
        made active, with a note saying why. Raises only when neither slot holds a good bundle."""
        try:
            return self.active_bundle(public_key), None
        except BundleError as exc:
            other = "b" if self.active_slot() == "a" else "a"
            try:
                bundle = read_bundle(self.slot(other) / BUNDLE_FILE, public_key)
            except BundleError:
                raise exc from None
            self.activate(other)
            return bundle, f"the active slot's bundle failed verification ({exc}); serving slot {other} instead"

    # -- the update ledger: what was tried, so a retained desired state is not retried forever ------
    def ledger(self) -> dict[str, Any]:
        try:
            return json.loads((self.root / LEDGER).read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def write_ledger(self, ledger: dict[str, Any]) -> None:
        write_atomic(self.root / LEDGER, json.dumps(ledger, indent=1).encode())

    @property
    def downloads(self) -> Path:
        return self.root / "downloads"
