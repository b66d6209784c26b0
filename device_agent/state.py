"""The device state directory: two model slots, an atomically replaced pointer, and state.json.

::

    <state_dir>/slots/a/bundle.edgebundle   one verified bundle per slot
    <state_dir>/slots/b/bundle.edgebundle
    <state_dir>/active                      "a" or "b", replaced with os.replace (never half-written)
    <state_dir>/state.json                  active slot, versions, previous slot
    <state_dir>/spool/                      summaries not yet acknowledged by the broker

Installing writes the new bundle into the *inactive* slot, then flips the pointer: a crash at any
moment leaves either the old model or the new one active, never none. The OTA updater (health
checks, rollback) builds on the same two operations.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bundle import Bundle, read_bundle
from .errors import InstallError
from .fsutil import write_atomic

SLOTS = ("a", "b")
BUNDLE_FILE = "bundle.edgebundle"


@dataclass
class StateDir:
    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @property
    def spool(self) -> Path:
        return self.root / "spool"

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
            raise InstallError(f"{self.root}: no model is installed; install one with 'edge-agent install BUNDLE --config agent.toml'")
        return read_bundle(self.slot(slot) / BUNDLE_FILE, public_key)

    def install(self, bundle_path: str | Path, public_key: Any, *, allow_downgrade: bool = False) -> Bundle:
        """Verify ``bundle_path`` and make it the active model. Refuses versions not above the active one."""
        bundle = read_bundle(bundle_path, public_key)
        state = self.state()
        current = state.get("version")
        if current is not None and state.get("name") == bundle.name and bundle.version <= current and not allow_downgrade:
            raise InstallError(
                f"{bundle_path}: version {bundle.version} of {bundle.name!r} is not newer than the installed version {current}; "
                "versions only go up (package a higher --version)"
            )
        active = self.active_slot()
        target = "b" if active == "a" else "a"
        slot_dir = self.slot(target)
        shutil.rmtree(slot_dir, ignore_errors=True)
        slot_dir.mkdir(parents=True)
        write_atomic(slot_dir / BUNDLE_FILE, Path(bundle_path).read_bytes())
        write_atomic(self.root / "active", target.encode())
        new_state = {"active": target, "name": bundle.name, "version": bundle.version, "previous": active,
                     "previous_version": current if active else None, "sha256": bundle.manifest["files"][bundle.model_file]["sha256"]}
        write_atomic(self.root / "state.json", json.dumps(new_state, indent=1).encode())
        return bundle

