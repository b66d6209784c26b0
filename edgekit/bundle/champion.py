"""The champion side of ``edgekit promote``: the signed bundle, the input contract, the gate's data.

The champion is read the way a device reads it (signature and every hash first) and run from its
own bytes with the bundle's schema and class names, so what is compared is what the fleet runs.
Its lineage may name data it was gated on before (``gated_on``, sha256 only: a bundle carries no
data); that data must be given again, so no promotion may forget what an earlier one checked.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.bundle import Bundle, read_bundle
from device_agent.canonical import sha256_hex
from device_agent.errors import SignatureError
from device_agent.outputs import CLASSIFICATION
from device_agent.signing import load_public_key
from edgekit.bundle.keys import load_private_key
from edgekit.errors import DataError, PackageError
from edgekit.models import compare
from edgekit.models.data import Dataset, default_feature_names, load_dataset
from edgekit.models.loading import OnnxModel, TfliteModel

FRESH = "fresh"  # data the champion was never gated on: the candidate must gain on it
GATED = "gated"  # data an earlier promotion gated the champion on: no regression allowed


@dataclass
class Champion:
    """The bundle now in production, its model loaded from its own bytes, and what it was gated on."""

    path: str
    bundle: Bundle
    sha256: str  # of the .edgebundle file: the new bundle's lineage names its parent by it
    model: OnnxModel | TfliteModel

    @property
    def label(self) -> str:
        return f"{self.bundle.name} v{self.bundle.version}"

    @property
    def gated_on(self) -> list[dict[str, Any]]:
        return list(self.bundle.manifest.get("lineage", {}).get("gated_on") or [])

    def describe(self) -> dict[str, Any]:
        manifest = self.bundle.manifest
        return {
            "name": self.bundle.name,
            "version": self.bundle.version,
            "path": self.path,
            "sha256": self.sha256,
            "format": self.bundle.model_format,
            "quantization": quantization_text(manifest.get("quantization")),
            "size_bytes": self.model.size_bytes,
        }


def open_champion(path: str, *, key_path: str, pubkey_path: str | None) -> Champion:
    """The champion bundle, its signature checked with ``pubkey_path`` or the public half of the signing key
    (a promotion that trusts an unsigned or foreign champion would launder it into a signed bundle)."""
    public = load_public_key(pubkey_path) if pubkey_path else load_private_key(key_path).public_key()
    try:
        bundle = read_bundle(path, public)
    except SignatureError as exc:
        raise PackageError(
            f"the champion's signature does not verify: {exc.problem}",
            "pass --pubkey with the key that signed it (after a key rotation), or --key with its private key",
            path=path,
        ) from exc
    source = f"{path}:{bundle.model_file}"
    loader = TfliteModel if bundle.model_format == "tflite" else OnnxModel
    model = loader.from_bytes(bundle.model_bytes, path=source)
    model.input, model.output = bundle.input_schema, bundle.output_spec  # the names and labels the device serves
    return Champion(str(path), bundle, sha256_hex(Path(path).read_bytes()), model)


def quantization_text(quantization: dict[str, Any] | None) -> str:
    if not quantization or quantization.get("mode") in (None, "none"):
        return "float32"
    return quantization.get("label") or f"{quantization.get('mode')} {quantization.get('format', '')}".strip()


def is_quantized(champion: Champion) -> bool:
    return quantization_text(champion.bundle.manifest.get("quantization")) != "float32"


# -- the input contract ------------------------------------------------------------------------------------


def check_candidate_fits(candidate: Any, champion: Champion, *, source: str) -> None:
    """Before any conversion: the candidate takes what the champion takes and answers the same task and
    classes (a different model is a new bundle name, not a new version)."""
    theirs, ours = champion.model.input, candidate.input
    if (theirs.tensor is None) != (ours.tensor is None):
        kinds = {True: "a tensor", False: "rows of features"}
        _refuse(
            source,
            champion,
            f"takes {kinds[ours.tensor is not None]}, {champion.label} takes {kinds[theirs.tensor is not None]}",
        )
    if theirs.tensor is None and ours.width != theirs.width:
        _refuse(source, champion, f"takes {ours.width} features, {champion.label} takes {theirs.width}")
    if ours.tensor is None and candidate.output.task != champion.model.output.task:
        _refuse(
            source, champion, f"is a {candidate.output.task} model, {champion.label} a {champion.model.output.task} one"
        )
    _check_classes(candidate, champion, source)


def _check_classes(candidate: Any, champion: Champion, source: str) -> None:
    spec, theirs = candidate.output, champion.model.output
    if spec.task != CLASSIFICATION or theirs.task != CLASSIFICATION:
        return
    if candidate.input.tensor is not None:  # a network's classes are positions; the bundle names them
        if len(spec.labels) != len(theirs.labels):
            _refuse(source, champion, f"has {len(spec.labels)} classes, {champion.label} {len(theirs.labels)}")
        return
    if [str(c) for c in spec.labels] != [str(c) for c in theirs.labels]:
        _refuse(source, champion, f"has classes {_short(spec.labels)}, {champion.label} {_short(theirs.labels)}")


def check_same_input(candidate: Any, champion: Champion, *, source: str) -> None:
    """After conversion: the converted candidate's input contract (names, types, tensor, preprocessing) is the
    champion's, so every client and device that talks to the champion talks to it unchanged."""
    ours, theirs = contract(candidate.input), contract(champion.model.input)
    for key in sorted(set(ours) | set(theirs)):
        if ours.get(key) != theirs.get(key):
            _refuse(
                source,
                champion,
                f"has input {key} {_short(ours.get(key))}, {champion.label} {_short(theirs.get(key))}",
            )
    missing = sorted(set(may_be_missing(champion.model.input)) - set(may_be_missing(candidate.input)))
    if missing:  # the champion took NaN or null there: clients that send it would start to be refused
        _refuse(source, champion, f"refuses missing values in {_short(missing)}, which {champion.label} accepts")


def contract(schema: Any) -> dict[str, Any]:
    """What a client sends and a device checks: not the ONNX input's name, nor the signals a bundle adds."""
    if schema.tensor is not None:
        return {"tensor": schema.tensor.to_dict(), "preprocessing": schema.preprocess}
    if schema.columns is not None:
        return {"columns": [(c.name, c.dtype, c.kind) for c in schema.columns]}
    return {"features": list(schema.feature_names)}


def may_be_missing(schema: Any) -> list[str]:
    """The inputs that may be NaN or null: accepting more is harmless, accepting fewer breaks clients."""
    if schema.tensor is not None:
        return []
    if schema.columns is not None:
        return [c.name for c in schema.columns if c.nullable]
    return list(schema.feature_names) if schema.allow_nan else []


def with_champion_names(candidate: Any, champion: Champion) -> None:
    """A candidate that knows no feature names (fitted on a bare array) takes the champion's, as ``edgekit
    package`` gave them to the champion from its baseline; one with names of its own keeps them (and is
    compared). A network's class names come from the bundle."""
    schema = candidate.input
    if schema.tensor is None and schema.columns is None and schema.feature_names == default_feature_names(schema.width):
        candidate.input = replace(schema, feature_names=champion.model.input.feature_names)
    spec = candidate.output
    if schema.tensor is not None and spec.task == CLASSIFICATION:
        candidate.output = replace(spec, labels=champion.model.output.labels)


def _refuse(source: str, champion: Champion, problem: str) -> None:
    raise PackageError(
        f"the candidate {problem}",
        f"promote only a retrained {champion.bundle.name} with the same inputs and outputs; "
        "a model with other inputs is a new bundle: 'edgekit package --name NEW ...'",
        path=source,
    )


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "…"


# -- the gate's data ---------------------------------------------------------------------------------------


@dataclass
class GateData:
    """One labelled data file, read as the champion reads its input, and its role in the gate."""

    path: str
    role: str
    dataset: Dataset
    X: np.ndarray
    y: np.ndarray

    @property
    def name(self) -> str:
        return Path(self.path).name

    def describe(self) -> dict[str, Any]:
        return {"file": self.name, "sha256": self.dataset.sha256, "rows": len(self.y), "role": self.role}


def load_gate_data(
    paths: Sequence[str], champion: Champion, *, label: str | None, trained_on: dict[str, str]
) -> list[GateData]:
    """Every ``--data`` file, labelled, with its role: data the champion was gated on before (matched by
    sha256), or fresh. Refuses a missing earlier gate file, training data used as gate data, and a gate
    with no fresh data."""
    if not paths:
        raise DataError("promote needs labelled data to compare the models on", "add --data field.csv")
    earlier = {entry.get("sha256"): entry for entry in champion.gated_on}
    gate = [_read(path, champion, label, earlier) for path in paths]
    _refuse_duplicates(gate)
    for item in gate:
        if item.dataset.sha256 in trained_on:
            raise DataError(
                f"is also --trained-on data ({trained_on[item.dataset.sha256]}): a gate on data the candidate "
                "learned from measures memory, not skill",
                "gate on labelled data the candidate never saw",
                path=item.path,
            )
    _require_earlier_gates(gate, champion)
    if not any(item.role == FRESH for item in gate):
        raise DataError(
            f"every --data file is data {champion.label} was already gated on",
            "add fresh labelled data the champion has not been judged on (e.g. the field rows with their labels)",
        )
    return gate


def _read(path: str, champion: Champion, label: str | None, earlier: dict[str, Any]) -> GateData:
    schema = champion.model.input
    dataset = load_dataset(path, label=label, columns=schema.columns, schema=schema).aligned_to(schema.feature_names)
    y = _as_class_names(dataset.require_labels("the champion/challenger gate"), champion)
    compare.check_labels(champion.model.output, y, source=path)
    X = schema.check(dataset.X, source=path)
    return GateData(path, GATED if dataset.sha256 in earlier else FRESH, dataset, X, y)


def _as_class_names(y: np.ndarray, champion: Champion) -> np.ndarray:
    """A network's labels as its trainer saved them (class positions 0..K-1), read as the names the bundle
    gives its outputs; labels that are names already, or a table's classes, stay as they are."""
    spec = champion.model.output
    names = [str(c) for c in spec.labels] if spec.task == CLASSIFICATION else []
    if champion.model.input.tensor is None or not names or y.dtype.kind not in "iu" or set(map(str, y)) <= set(names):
        return y
    if y.size and (y.min() < 0 or y.max() >= len(names)):
        return y  # check_labels names what does not fit
    return np.asarray(names, dtype=object)[y]


def _refuse_duplicates(gate: list[GateData]) -> None:
    seen: dict[str, str] = {}
    for item in gate:
        if item.dataset.sha256 in seen:
            raise DataError(
                f"holds the same bytes as {seen[item.dataset.sha256]}", "give each data file once", path=item.path
            )
        seen[item.dataset.sha256] = item.path


def _require_earlier_gates(gate: list[GateData], champion: Champion) -> None:
    """The champion's lineage keeps only hashes of what it was gated on: each must come back as ``--data``."""
    given = {item.dataset.sha256: item for item in gate}
    by_name = {item.name: item for item in gate}
    for entry in champion.gated_on:
        digest, name = entry.get("sha256"), entry.get("file")
        if digest in given:
            continue
        recorded = f"sha256 {str(digest)[:12]}…"
        if name in by_name:
            raise DataError(
                f"is not the {name} {champion.label} was gated on (sha256 {by_name[name].dataset.sha256[:12]}… "
                f"here, {recorded} in its lineage)",
                "give the same bytes again: bundles keep only a hash of the data they were judged on",
                path=by_name[name].path,
            )
        raise DataError(
            f"{champion.label} was gated on {name} ({recorded}), which no --data file matches",
            f"add --data {name} (the same bytes): the bundle keeps only its hash, "
            "and a new version must not regress on it",
        )
