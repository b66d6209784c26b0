"""``edgekit package``: a model, its baseline and self-test, signed into one ``.edgebundle``.

The format is defined (and read) in ``device_agent.bundle``; this module only writes it. The
manifest is canonical JSON, signed with Ed25519; every other member is listed in it with its size
and sha256, so a reader checks everything before loading anything.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.bundle import BASELINE, BUNDLE_SCHEMA, MANIFEST, MODEL_FILES, SELFTEST, SIGNATURE
from device_agent.canonical import canonical_json, sha256_hex
from device_agent.drift import DEFAULT_DRIFT_THRESHOLDS
from device_agent.profile import Profile, build_baseline
from edgekit import __version__
from edgekit.bundle.calibration import LabelledRows, calibration_of, labelled_rows
from edgekit.bundle.keys import load_private_key, sign
from edgekit.bundle.lineage import git_state
from edgekit.bundle.tensor_baseline import MAX_BASELINE_EXAMPLES, prepared, tensor_baseline
from edgekit.errors import PackageError
from edgekit.fsutil import atomic_path
from edgekit.models.data import adopt_feature_names, load_dataset
from edgekit.models.loading import METADATA_QUANTIZATION, METADATA_SOURCE, OnnxModel, TfliteModel, load_model
from edgekit.models.targets import RuntimeTarget

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SELFTEST_ROWS = 16
SELFTEST_TENSORS = 4  # four images are enough to tell a broken model, and keep the bundle small
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member times: same inputs, same bytes (but for "created")


def build_bundle(
    model_path: str,
    *,
    name: str,
    version: int,
    baseline_path: str,
    key_path: str,
    output: str,
    label: str | None = None,
    report_path: str | None = None,
    drift: dict[str, float] | None = None,
    target: RuntimeTarget = RuntimeTarget(),
    preprocess: str | None = None,
    labels: str | None = None,
    lineage: dict[str, Any] | None = None,
    eval_paths: Sequence[str] = (),
    eval_rows: LabelledRows | None = None,
) -> dict[str, Any]:
    """Write the bundle to ``output`` (atomically) and return its manifest. A tensor model may be given
    its preprocessing (``preprocess``, TOML) and class names (``labels``, one per line) here; ``lineage``
    adds to the manifest's lineage (``edgekit promote``: the parent, the data it was gated on). Labelled held-out
    ``eval_paths`` (or ``eval_rows``: promote's) calibrate the fleet's label-free accuracy estimate."""
    _check_identity(name, version)
    key = load_private_key(key_path)
    model = load_model(model_path)
    if not isinstance(model, (OnnxModel, TfliteModel)):
        raise PackageError(
            f"is a {model.kind} model; bundles carry converted models",
            f"run 'edgekit convert {model_path} -o model.onnx' first",
            path=model_path,
        )
    if model.input.tensor is not None or preprocess or labels:
        prepared(model, preprocess=preprocess, labels=labels)
    baseline_data = load_dataset(
        baseline_path, label=label, columns=model.input.columns, schema=model.input, limit=MAX_BASELINE_EXAMPLES
    )
    model.input = adopt_feature_names(model.input, baseline_data)
    baseline_data = baseline_data.aligned_to(model.input.feature_names)
    rows = model.input.check(baseline_data.X, source=baseline_path)
    profile = tensor_baseline(model, rows) if model.input.tensor is not None else _baseline_profile(model, rows)
    profile.calibration = _calibration(model, profile, eval_paths, eval_rows, label, {"name": name, "version": version})
    members = {
        MODEL_FILES[model.kind]: model.data,
        BASELINE: canonical_json(profile.to_dict()),
        SELFTEST: _selftest(model, rows),
    }
    manifest = _manifest(
        model,
        name=name,
        version=version,
        members=members,
        profile=profile,
        baseline_sha256=baseline_data.sha256,
        report=_read_report(report_path, model),
        drift={**DEFAULT_DRIFT_THRESHOLDS, **(drift or {})},
        target=target,
        lineage=lineage or {},
    )
    _write_signed(output, manifest, members, key)
    return manifest


def _calibration(
    model: Any,
    profile: Profile,
    paths: Sequence[str],
    rows: LabelledRows | None,
    label: str | None,
    identity: dict[str, Any],
) -> dict[str, Any] | None:
    """The baseline's ``calibration`` (``calibration.py``), or None without eval data: no estimate, no alert."""
    if not paths and rows is None:
        return None
    return calibration_of(model, profile, rows or labelled_rows(model, paths, label), identity=identity)


def _baseline_profile(model: Any, rows: Any) -> Any:
    """What the model saw and said on the baseline rows: the profile device windows are compared with."""
    prediction = model.predict(rows)
    spec = model.output
    return build_baseline(
        rows,
        model.input.feature_names,
        kinds=model.input.kinds,
        labels=list(spec.labels) if spec.task == "classification" else None,
        predicted_labels=prediction.labels,
        probabilities=prediction.probabilities,
        predicted_values=prediction.values,
    )


def _write_signed(output: str, manifest: dict[str, Any], members: dict[str, bytes], key: Any) -> None:
    """The zip, atomically: the canonical manifest, its signature, the members (fixed times: reproducible)."""
    manifest_bytes = canonical_json(manifest)
    with atomic_path(output) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for member, data in [
                (MANIFEST, manifest_bytes),
                (SIGNATURE, sign(manifest_bytes, key)),
                *sorted(members.items()),
            ]:
                archive.writestr(zipfile.ZipInfo(member, _ZIP_TIME), data, compress_type=zipfile.ZIP_DEFLATED)


def _check_identity(name: str, version: int) -> None:
    if not NAME_PATTERN.match(name):
        raise PackageError(
            f"bundle name {name!r} is not allowed",
            "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise PackageError(
            f"version {version!r} is not a positive integer", "versions are integers that only go up: 1, 2, 3, …"
        )


def _selftest(model: OnnxModel | TfliteModel, rows: np.ndarray) -> bytes:
    """A few baseline rows and the model's own outputs on them, for the device's health check."""
    most = SELFTEST_TENSORS if model.input.tensor is not None else SELFTEST_ROWS
    take = np.linspace(0, len(rows) - 1, num=min(most, len(rows))).round().astype(int)
    if model.input.columns is None:
        inputs = {"inputs": np.ascontiguousarray(rows[take])}
    else:  # typed columns: the feed itself, strings as unicode arrays (an .npz holds no objects)
        feed = model.input.feed(rows[take])
        inputs = {f"input:{k}": v.astype(str) if v.dtype == object else v for k, v in feed.items()}
    outputs = model.raw(rows[take])
    buffer = io.BytesIO()
    np.savez(buffer, **inputs, **{f"output:{key}": np.asarray(value) for key, value in outputs.items()})
    return buffer.getvalue()


def _read_report(path: str | None, model: OnnxModel) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        report = json.loads(Path(path).read_text())
    except OSError as exc:
        raise PackageError(
            f"cannot read the validation report ({exc.strerror})",
            "write it with 'edgekit validate ... --json > report.json'",
            path=path,
        ) from exc
    except ValueError as exc:
        raise PackageError(
            "is not JSON", "write it with 'edgekit validate ... --json > report.json'", path=path
        ) from exc
    if not isinstance(report, dict) or "passed" not in report:
        raise PackageError(
            "is not an edgekit validation report",
            "write it with 'edgekit validate ... --json > report.json'",
            path=path,
        )
    reported = (report.get("candidate") or {}).get("sha256")
    if reported != model.sha256:
        raise PackageError(
            f"is a validation report of another model "
            f"(candidate sha256 {str(reported)[:12]}…, this model {model.sha256[:12]}…)",
            f"validate this model: 'edgekit validate {model.path} --reference ... --data ... --json > report.json'",
            path=path,
        )
    keep = (
        "passed",
        "failures",
        "task",
        "metric",
        "rows",
        "size_ratio",
        "accuracy_drop",
        "agreement",
        "max_abs_diff",
        "mean_abs_diff",
        "speedup",
        "thresholds",
        "accuracy_drop_meaning",
        "agreement_meaning",
    )
    summary = {k: report.get(k) for k in keep}
    # What size_ratio is relative to: the validation's reference file (a report from before the field has its path).
    reference_path = (report.get("reference") or {}).get("path")
    summary["size_ratio_of"] = report.get("size_ratio_of") or (Path(reference_path).name if reference_path else None)
    summary["reference_metric"] = (report.get("reference") or {}).get("metric")
    summary["candidate_metric"] = (report.get("candidate") or {}).get("metric")
    return summary


def _manifest(
    model: OnnxModel | TfliteModel,
    *,
    name: str,
    version: int,
    members: dict[str, bytes],
    profile: Profile,
    baseline_sha256: str,
    report: dict[str, Any] | None,
    drift: dict[str, float],
    target: RuntimeTarget,
    lineage: dict[str, Any],
) -> dict[str, Any]:
    if isinstance(model, TfliteModel):
        meta = model.metadata
        runtime = {"format": "tflite", "engine": "litert", "min_runtime_version": None}
        detected = {"mode": "none"}
    else:
        proto = model.proto()
        meta = {p.key: p.value for p in proto.metadata_props}
        runtime, detected = target.to_dict(proto), _detect_quantization(proto)
    return {
        "schema": BUNDLE_SCHEMA,
        "name": name,
        "version": version,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "runtime": runtime,
        "input": model.input.to_dict(),
        "output": model.output.to_dict(),
        "files": {member: {"sha256": sha256_hex(data), "size": len(data)} for member, data in sorted(members.items())},
        "baseline_id": profile.baseline_id,
        "quantization": json.loads(meta[METADATA_QUANTIZATION]) if METADATA_QUANTIZATION in meta else detected,
        "validation": report,
        "drift": drift,
        "lineage": {
            **git_state(),
            "baseline_sha256": baseline_sha256,
            "model_sha256": sha256_hex(model.data),
            "model_source": meta.get(METADATA_SOURCE),
            "edgekit_version": __version__,
            **lineage,
        },
    }


def _detect_quantization(proto: Any) -> dict[str, Any]:
    ops = {n.op_type for n in proto.graph.node}
    if "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops:
        return {"mode": "dynamic", "format": "QOperator"}
    if "QuantizeLinear" in ops:
        return {"mode": "static", "format": "QDQ"}
    return {"mode": "none"}
