"""The retrain sink's steps, in the order ``retrain.Retrainer`` runs them, each recording itself on the alert's
timeline: the champion found, the field samples asked for and exported, the command run, promote's
decision, the bundle stored, the rollout started, or the commands an operator has to run.

Each step takes the retrainer (``r``: its ``sink`` settings, ``store``, ``rollouts``, ``ask_samples``,
``step`` recorder and ``stopping`` event) and the ``Run``, and returns what the next step needs; a step
that ends the pipeline records why and raises ``Stop``. Kept apart from ``retrain.py`` (configuration,
queue and worker) so that each reads in one sitting.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

RETRAIN_SCHEMA = "edgekit.retrain/1"  # the command's stdin: a contract (docs/retrain.md)
STDERR_TAIL = 2000  # characters of the command's stderr kept on the timeline
POLL_SECONDS = 0.25
_ROLLOUT_FLAGS = ("devices", "waves", "wave_wait", "abort_on", "shadow_rows", "health_seconds")  # rollout start's


class Stop(Exception):
    """The pipeline ends here, its last step recorded: ``state`` (failed, kept, awaiting, skipped) and why."""

    def __init__(self, state: str, outcome: str) -> None:
        self.state, self.outcome = state, outcome
        super().__init__(outcome)


@dataclass
class Run:
    """One alert's pass through the pipeline."""

    alert_id: int
    alert: dict[str, Any]
    workdir: Path

    @property
    def evidence(self) -> dict[str, Any]:
        return self.alert.get("evidence") or {}


def fail(r: Any, run: Run, step: str, message: str, detail: dict[str, Any] | None = None) -> Stop:
    r.step(run, step, "bad", message, detail)
    return Stop("failed", message)


# -- the champion ----------------------------------------------------------------------------------------------


def champion(r: Any, run: Run) -> str:
    """The bundle to beat: ``champion`` in the sink's settings, else the one the device runs, as uploaded to
    this collector by an earlier ``rollout start``."""
    if r.sink.champion:
        if not Path(r.sink.champion).is_file():
            raise fail(r, run, "champion", f"the champion bundle {r.sink.champion} is not a file")
        r.step(run, "champion", "ok", f"{r.sink.champion} (from alerts.toml)", {"path": r.sink.champion})
        return r.sink.champion
    name, version = run.evidence.get("model"), run.evidence.get("model_version")
    record = r.rollouts.bundle(name=name, version=version) if r.rollouts is not None and name else None
    path = r.rollouts.bundle_file(record["sha256"]) if record else None
    if path is None:
        raise fail(
            r,
            run,
            "champion",
            f"the device runs {name} v{version}, which was never uploaded to this collector; "
            "set champion = in [sinks.retrain]",
        )
    r.step(run, "champion", "ok", f"{name} v{version}, the bundle the device runs", {"path": str(path)})
    return str(path)


# -- the field samples -----------------------------------------------------------------------------------------


def samples(r: Any, run: Run) -> dict[str, Any]:
    """Ask the device for its kept rows, wait for the upload, and export the labelled ones: the training part
    in ``fleet samples``' CSV (or .npz for tensors) for the command, a holdout part for the gate."""
    device = run.alert["device"]
    upload_id = r.ask_samples(device)
    r.step(run, "samples requested", "ok", f"asked {device} for its field samples (upload {upload_id})")
    upload = _wait_for_upload(r, run, upload_id)
    every = r.store.sample_rows(device=device, upload=upload_id)
    rows = [row for row in every if row["label"] is not None]
    if not rows:
        raise fail(
            r,
            run,
            "samples exported",
            f"upload {upload_id} holds {upload['rows']} rows and none has a label yet; "
            "send delayed labels to the device (POST /v1/feedback) before retraining on them",
        )
    found = _export(r, run, upload, rows)
    if r.sink.baseline == "field":
        found["baseline"] = _field_baseline(r, run, upload, every)
    return found


def _wait_for_upload(r: Any, run: Run, upload_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + r.sink.samples_timeout
    while not r.stopping.is_set():
        upload = r.store.sample_upload(upload_id) or {"state": "missing", "reason": "no such upload"}
        if upload["state"] == "complete":
            return upload
        if upload["state"] in ("failed", "missing"):
            raise fail(r, run, "samples exported", f"upload {upload_id} failed: {upload['reason']}")
        if time.monotonic() > deadline:
            break
        r.stopping.wait(POLL_SECONDS)
    raise fail(
        r,
        run,
        "samples exported",
        f"the device did not upload its field samples within {r.sink.samples_timeout:.0f} s (upload {upload_id}); "
        "check it is online with [capture] enabled and [update] collector and token set",
    )


def _export(r: Any, run: Run, upload: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    from edgekit.fleet.samples import export_samples

    header = upload.get("header") or {}
    held = [row for row in rows if row_in_holdout(row["id"], r.sink.holdout)]
    train = [row for row in rows if not row_in_holdout(row["id"], r.sink.holdout)]
    tensor = any(isinstance(row["input"], dict) for row in rows)
    path = run.workdir / ("field_samples.npz" if tensor else "field_samples.csv")
    export_samples({"header": header, "rows": train}, path)
    plain = _gate_file(header, train, run.workdir / ("field_train.npz" if tensor else "field_train.csv"))
    holdout = _gate_file(header, held, run.workdir / ("field_holdout.npz" if tensor else "field_holdout.csv"))
    found = {"path": str(path), "rows": len(train), "train": plain, "holdout": holdout, "holdout_rows": len(held)}
    r.step(
        run,
        "samples exported",
        "ok",
        f"{len(train)} labelled rows to {path.name} for training, {len(held)} held out for the gate",
        {**found, "upload": upload["id"], "uploaded_rows": upload["rows"]},
    )
    return found


def _field_baseline(r: Any, run: Run, upload: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The new bundle's drift baseline when ``baseline = "field"``: what the device sees now, the rows of its
    latest run of consecutive drifted windows (the change the alert is about; labelled or not) but the run's
    first, which the change may have begun inside of (a baseline with a tenth of its rows from before the change
    flags every window after it); every row when no window was judged drifted (an accuracy alert)."""
    windows: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("drifted") and isinstance(row.get("seq"), int):
            windows.setdefault(row["seq"], []).append(row)
    latest = _latest_drift_run(sorted(windows))
    chosen = [row for seq in latest for row in windows[seq]] or rows
    tensor = any(isinstance(row["input"], dict) for row in chosen)
    path = run.workdir / ("field_baseline.npz" if tensor else "field_baseline.csv")
    _gate_file(upload.get("header") or {}, chosen, path, label=False)
    source = f"{len(latest)} of the device's drifted windows" if windows else "every field row"
    message = f"the new bundle's drift baseline: {len(chosen)} rows from {source}"
    detail = {"path": str(path), "rows": len(chosen), "windows": len(windows), "used": latest}
    r.step(run, "baseline", "ok", message, detail)
    return str(path)


def _latest_drift_run(seqs: list[int]) -> list[int]:
    """Of the drifted windows' seqs (sorted), the latest run of consecutive ones without its first (all of a run
    of one). A drifted window before that run, apart from it by windows not drifted, is an earlier change or a
    false alarm (the family-wise test flags about one clean window in a hundred): excluding the earliest drifted
    window instead kept the run's first, half from before the change, and the alert never closed."""
    if not seqs:
        return []
    start = len(seqs) - 1
    while start > 0 and seqs[start - 1] == seqs[start] - 1:
        start -= 1
    run = seqs[start:]
    return run[1:] if len(run) > 1 else run


def _gate_file(header: dict[str, Any], rows: list[dict[str, Any]], path: Path, *, label: bool = True) -> str | None:
    """The rows as a data file ``promote`` reads: the features and ``label`` (no metadata columns; no label with
    ``label=False``, for a baseline), written by ``fleet samples``' exporter; None when there are no rows."""
    if not rows:
        return None
    from edgekit.fleet.samples import export_samples

    export_samples({"header": header, "rows": rows}, path, metadata=False, label=label)
    return str(path)


def row_in_holdout(row_id: str, share: float) -> bool:
    """Whether a field row is kept out of training for the gate: by a hash of its id, so the same row falls on
    the same side however often it is uploaded."""
    return int(hashlib.sha256(row_id.encode()).hexdigest()[:8], 16) / 0x100000000 < share


# -- the command -----------------------------------------------------------------------------------------------


def command(r: Any, run: Run, champion_path: str, found: dict[str, Any]) -> str:
    """Run the user's command with ``stdin_document`` on stdin; the model file named on its last line."""
    sink = r.sink
    r.step(run, "command started", "ok", shlex.join(sink.command), {"argv": list(sink.command), "cwd": sink.cwd})
    began = time.monotonic()
    code, out, err = run_command(
        sink.command, stdin_document(run, sink, champion_path, found), cwd=sink.cwd, timeout=sink.timeout,
        stop=r.stopping,
    )  # fmt: skip
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    printed = lines[-1] if lines else None
    detail = {
        "exit_code": code,
        "model": printed,
        "stderr_tail": err[-STDERR_TAIL:],
        "seconds": time.monotonic() - began,
    }
    if code is None:
        why = "the collector stopped" if r.stopping.is_set() else f"it ran past the timeout of {sink.timeout:.0f} s"
        raise fail(r, run, "command finished", f"the command was killed: {why}", detail)
    if code != 0:
        raise fail(r, run, "command finished", f"the command exited {code}", detail)
    model = Path(sink.cwd, printed) if printed else None
    if model is None or not model.is_file():
        problem = f"printed {printed!r}, which is no model file" if printed else "printed no model file path"
        raise fail(r, run, "command finished", f"the command {problem} (its last line of output must be one)", detail)
    r.step(run, "command finished", "ok", f"exit 0 in {detail['seconds']:.1f} s: {model}", detail)
    return str(model)


def stdin_document(run: Run, sink: Any, champion_path: str, found: dict[str, Any]) -> bytes:
    """What the command reads on stdin (``RETRAIN_SCHEMA``)."""
    alert = {k: run.alert.get(k) for k in ("rule", "device", "subject", "message", "at")}
    doc = {
        "schema": RETRAIN_SCHEMA,
        "alert": {"id": run.alert_id, **alert},
        "evidence": run.evidence,
        "samples": found["path"],
        "samples_rows": found["rows"],
        "holdout": found["holdout"],
        "trained_on": list(sink.trained_on),
        "champion": champion_path,
        "workdir": str(run.workdir),
    }
    return json.dumps(doc, default=str).encode()


def run_command(
    argv: tuple[str, ...], stdin: bytes, *, cwd: str, timeout: float, stop: threading.Event
) -> tuple[int | None, str, str]:
    """``(exit code, stdout, stderr)``; the exit code is None when it ran past ``timeout`` or ``stop`` was set
    (it is killed then). Polled, so a stopping collector does not wait out a 30-minute training."""
    try:
        process = subprocess.Popen(
            list(argv),
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: a timeout kills what it started too
        )
    except OSError as exc:
        return 127, "", f"cannot run {argv[0]}: {exc.strerror or exc}"
    deadline, given = time.monotonic() + timeout, stdin
    while True:
        try:
            out, err = process.communicate(given, timeout=POLL_SECONDS)
            return process.returncode, out.decode(errors="replace"), err.decode(errors="replace")
        except subprocess.TimeoutExpired:
            given = None  # sent already: communicate goes on writing what is left
            if time.monotonic() > deadline or stop.is_set():
                _kill_group(process)
                out, err = process.communicate()
                return None, out.decode(errors="replace"), err.decode(errors="replace")


def _kill_group(process: subprocess.Popen) -> None:
    """Kill the command and its children: a shell's training child would otherwise hold the pipes open, and
    the sink would wait for it past the timeout."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (OSError, AttributeError):  # gone already, or no process groups here
        process.kill()


# -- promote, store, roll out ------------------------------------------------------------------------------------


@dataclass
class Promoted:
    path: str
    name: str
    version: int


def promote(r: Any, run: Run, champion_path: str, model: str, found: dict[str, Any]) -> Promoted:
    """``edgekit promote`` on the candidate: gated on the configured data plus the field holdout, trained on the
    configured training files plus the field rows; ``Stop("kept")`` when the champion stays."""
    from edgekit.bundle.promote import PromoteOptions
    from edgekit.bundle.promote import promote as gate

    sink, (name, version) = r.sink, _champion_of(champion_path)
    output = run.workdir / f"{name}-{version + 1}.edgebundle"
    options = PromoteOptions(
        min_gain=sink.min_gain,
        max_regression=sink.max_regression,
        quantize=sink.quantize,
        trained_on=(*sink.trained_on, found["train"]),
        baseline=found.get("baseline"),
    )
    data = [*sink.data, *([found["holdout"]] if found["holdout"] else [])]
    result = gate(model, champion=champion_path, data=data, key_path=sink.key, output=str(output), options=options)
    report = result.to_dict()
    if not result.promoted:
        message = f"kept {name} v{version}: " + "; ".join(result.reasons)
        r.step(run, "promote", "muted", message, report)
        raise Stop("kept", message)
    r.step(run, "promote", "ok", f"promoted: {output.name} ({name} v{result.version}, parent v{version})", report)
    return Promoted(str(output), name, int(result.version or version + 1))


def _champion_of(path: str) -> tuple[str, int]:
    from device_agent.bundle import read_bundle

    bundle = read_bundle(path)  # promote verifies its signature; the name and version are all this needs
    return bundle.name, bundle.version


def upload(r: Any, run: Run, promoted: Promoted) -> dict[str, Any]:
    """The new bundle stored on the collector as ``POST /api/bundles`` stores one (verified by the trusted key)."""
    stored = r.rollouts.add_bundle(Path(promoted.path).read_bytes())
    r.step(
        run,
        "bundle stored",
        "ok",
        f"{stored['name']} v{stored['version']} stored (sha256 {stored['sha256'][:12]}…)",
        stored,
    )
    return stored


def rollout(r: Any, run: Run, promoted: Promoted, stored: dict[str, Any]) -> str:
    """Start the rollout with a revert signed by the sink's key, as ``rollout start --key`` does."""
    from edgekit.bundle.keys import load_private_key
    from edgekit.fleet.signed import sign_revert

    settings = r.sink.rollout
    fleet = settings.fleet or str(run.evidence.get("fleet") or "default")
    spec = replace(settings.spec, devices=settings.spec.devices.replace("{device}", str(run.alert["device"])))
    revert = sign_revert(promoted.path, fleet=fleet, key=load_private_key(r.sink.key))
    rollout_id = _start_when_free(r, run, lambda: r.rollouts.start(stored["sha256"], fleet, spec, revert=revert))
    shadow = f", shadow {spec.shadow_rows} rows first" if spec.shadow_rows else ", no shadow phase"
    message = (
        f"rollout {rollout_id}: {promoted.name} v{promoted.version} to "
        f"{'fleet ' + fleet if spec.devices == '*' else spec.devices + ' of fleet ' + fleet} in waves "
        f"{','.join(f'{w:.0%}' for w in spec.waves)}{shadow}"
    )
    r.step(run, "rollout started", "ok", message, {"rollout": rollout_id, "fleet": fleet, "spec": spec.to_json()})
    return rollout_id


def _start_when_free(r: Any, run: Run, start: Callable[[], str]) -> str:
    """``start()``, waiting (up to the sink's ``timeout``) while another rollout holds the fleet: one rollout
    per fleet at a time, and a retrained model that waits its turn is better than one thrown away."""
    from edgekit.errors import RolloutConflict

    deadline, waiting = time.monotonic() + r.sink.timeout, False
    while True:
        try:
            return start()
        except RolloutConflict as exc:
            if time.monotonic() > deadline or r.stopping.is_set():
                raise
            if not waiting:
                r.step(run, "rollout waiting", "muted", f"{exc.problem}: waiting for it to end")
                waiting = True
            r.stopping.wait(POLL_SECONDS * 4)


# -- an operator's turn ------------------------------------------------------------------------------------------


def awaiting(r: Any, run: Run, commands: list[str]) -> tuple[str, str]:
    why = (
        "no signing key in [sinks.retrain] (key =): promote and the rollout need the fleet's private key"
        if not r.sink.key
        else "no [sinks.retrain.rollout]: the rollout is the operator's to start"
    )
    r.step(run, "awaiting an operator", "muted", f"{why}; run: {' && '.join(commands)}", {"commands": commands})
    return "awaiting", why


def operator_commands(r: Any, run: Run, champion_path: str, model: str, found: dict[str, Any]) -> list[str]:
    """``edgekit promote`` and ``edgekit rollout start`` as the sink would have run them."""
    sink, (name, version) = r.sink, _champion_of(champion_path)
    output = str(run.workdir / f"{name}-{version + 1}.edgebundle")
    argv = ["edgekit", "promote", model, "--champion", champion_path]
    for path in [*sink.data, *([found["holdout"]] if found["holdout"] else [])]:
        argv += ["--data", path]
    for path in [*sink.trained_on, found["train"]]:
        argv += ["--trained-on", path]
    if found.get("baseline"):
        argv += ["--baseline", found["baseline"]]
    argv += ["--min-gain", str(sink.min_gain), "--max-regression", str(sink.max_regression)]
    argv += ["--quantize", sink.quantize, "--key", "KEY", "-o", output]
    return [shlex.join(argv), rollout_command(r, run, Promoted(output, name, version + 1))]


def rollout_command(r: Any, run: Run, promoted: Promoted) -> str:
    options = dict(r.sink.rollout.options) if r.sink.rollout else {"shadow_rows": 200}
    fleet = options.pop("fleet", None) or str(run.evidence.get("fleet") or "default")
    if "devices" in options:
        options["devices"] = str(options["devices"]).replace("{device}", str(run.alert["device"]))
    argv = ["edgekit", "rollout", "start", promoted.path, "--collector", r.collector_url(), "--fleet", fleet]
    for name, value in options.items():
        if name in _ROLLOUT_FLAGS:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    return shlex.join([*argv, "--key", r.sink.key or "KEY"])
