"""Turning a trained model into an ONNX model the device runtime loads.

scikit-learn estimators and Pipelines go through skl2onnx whole, preprocessing included, with
classifiers exported without ZipMap (a label tensor and a probability tensor). ONNX files are
checked and pinned. Either way the result carries edgekit metadata (input schema, output meaning)
so later steps, on the host or the device, need not guess.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from device_agent.outputs import CLASSIFICATION
from edgekit.errors import ConversionError, require
from edgekit.models.loading import (
    METADATA_INPUT,
    METADATA_OUTPUT,
    METADATA_SOURCE,
    OnnxModel,
    SklearnModel,
    describe_onnx,
)
from edgekit.models.targets import RuntimeTarget, pin


def to_onnx(model: SklearnModel | OnnxModel, *, target: RuntimeTarget = RuntimeTarget()) -> Any:
    """The float32 ONNX model for ``model``, checked, pinned to ``target`` and stamped with metadata."""
    target.check()
    from edgekit.build import booster_export  # XGBoost and LightGBM through onnxmltools: booster_export.py

    if isinstance(model, booster_export.BoosterModel):
        proto = booster_export.booster_to_onnx(model, target)
        schema, spec, source = model.input, model.output, model.description
    elif isinstance(model, SklearnModel):
        proto = _from_sklearn(model, target)
        schema, spec, source = model.input, model.output, f"scikit-learn {_describe_estimator(model.estimator)}"
    else:
        proto = model.proto()
        schema, spec = model.input, model.output
        source = next((p.value for p in proto.metadata_props if p.key == METADATA_SOURCE), "onnx")
    pin(proto, target, source=model.path)
    stamp(proto, schema.to_dict(), spec.to_dict(), source)
    check(proto, source=model.path)
    return proto


def _from_sklearn(model: SklearnModel, target: RuntimeTarget) -> Any:
    skl2onnx = require("skl2onnx")
    from edgekit.build.sklearn_exact import conversion_functions, initial_types

    opset = min(target.opset, skl2onnx.get_latest_tested_opset_version())
    options = {"zipmap": False} if model.output.task == CLASSIFICATION else None
    from edgekit.build.booster_export import register_converters  # a final XGBoost/LightGBM step

    register_converters(model.estimator, path=model.path)
    try:
        proto = skl2onnx.convert_sklearn(
            model.estimator,
            initial_types=initial_types(model.input),
            options=_options_for(model.estimator, options),
            target_opset={"": opset, "ai.onnx.ml": target.ml_opset},
            custom_conversion_functions=conversion_functions(),
        )
    except Exception as exc:  # skl2onnx raises RuntimeError, NameError, MissingShapeCalculator... with no base
        raise ConversionError(
            f"skl2onnx cannot convert {_describe_estimator(model.estimator)}: {_first_line(exc)}",
            "use estimators skl2onnx supports, or register a converter for the custom step",
            path=model.path,
        ) from exc
    _rename_outputs(proto, model)
    proto.graph.name = "edgekit"  # skl2onnx names graphs randomly; the same model should give the same bytes
    return proto


def _options_for(estimator: Any, options: dict[str, Any] | None) -> dict[Any, Any] | None:
    if not options:
        return None
    final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    return {id(final): options}


def _rename_outputs(proto: Any, model: SklearnModel) -> None:
    """skl2onnx names regressor outputs 'variable'; make the names match the output spec we recorded."""
    names = [o.name for o in proto.graph.output]
    if model.output.task == CLASSIFICATION:
        expected = [n for n in (model.output.label_output, model.output.probabilities_output) if n]
        if names[: len(expected)] != expected:
            raise ConversionError(
                f"skl2onnx produced outputs {names}, expected {expected}",
                "report this with the model type",
                path=model.path,
            )
    elif names[0] != model.output.value_output:
        raise ConversionError(
            f"skl2onnx produced outputs {names}, expected {model.output.value_output!r}",
            "report this with the model type",
            path=model.path,
        )


def stamp(proto: Any, schema: dict[str, Any], spec: dict[str, Any], source: str) -> None:
    for key, value in {
        METADATA_INPUT: json.dumps(schema),
        METADATA_OUTPUT: json.dumps(spec),
        METADATA_SOURCE: source,
    }.items():
        stamp_metadata(proto, key, value)


def stamp_metadata(proto: Any, key: str, value: str) -> None:
    """Set one ``metadata_props`` entry, replacing any earlier value."""
    kept = [p for p in proto.metadata_props if p.key != key]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key, entry.value = key, value


def copy_metadata(source: Any, destination: Any) -> None:
    schema, spec = describe_onnx(source)
    origin = next((p.value for p in source.metadata_props if p.key == METADATA_SOURCE), "onnx")
    stamp(destination, schema.to_dict(), spec.to_dict(), origin)


def check(proto: Any, *, source: str = "model") -> None:
    onnx = require("onnx")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ConversionError(
            f"the ONNX model does not pass onnx.checker: {_first_line(exc)}", "re-export the model", path=source
        ) from exc


def serialize(proto: Any) -> bytes:
    return proto.SerializeToString()


def _describe_estimator(estimator: Any) -> str:
    if hasattr(estimator, "steps"):
        return f"Pipeline({', '.join(type(step).__name__ for _, step in estimator.steps)})"
    return type(estimator).__name__


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def sample_rows(model: SklearnModel | OnnxModel, rows: int = 256, seed: int = 0) -> np.ndarray:
    """Synthetic rows of the right shape, for timing a model when no data was given."""
    return np.random.default_rng(seed).standard_normal((rows, model.input.width)).astype(np.dtype(model.input.dtype))
