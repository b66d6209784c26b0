"""XGBoost and LightGBM models to ONNX through onnxmltools, deciding exactly as the libraries do.

Two doors. A booster file edgekit loaded (``BoosterModel``) is converted here by onnxmltools'
``convert_xgboost`` / ``convert_lightgbm``. A scikit-learn XGBClassifier, XGBRegressor,
LGBMClassifier or LGBMRegressor, alone or ending a Pipeline, is converted by skl2onnx with the rest
of the pipeline once ``register_converters`` has registered onnxmltools' converters with it.

Through either door the tree node passes ``_PreciseTrees``, which keeps each library's precision:

- XGBoost rounds every input to float32 and compares it with float32 thresholds: the tree reads
  float32 (a float64 input is Cast first, rounding as XGBoost does), and decides as XGBoost does.
- LightGBM compares float64 inputs with float64 thresholds. onnxmltools writes each threshold as the
  nearest float32, which sends a row lying between the two down the other branch (measured: |Δp| up
  to 0.03 on breast cancer, regression values off by 21 on diabetes). With a float64 input the
  thresholds and leaf values stay float64 (ai.onnx.ml opset 3 ``*_as_tensor`` attributes); with a
  float32 input each threshold becomes the largest float32 not above it, which decides every float32
  row exactly as the float64 threshold does.

The choice is written on the tree node (its ``doc_string``), so ``precision_notes`` can report it
from the model itself. Outputs follow edgekit's convention: ``label`` and ``probabilities`` (no
ZipMap) for classifiers, ``variable`` for regressors.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np

from device_agent.outputs import CLASSIFICATION
from edgekit.errors import ConversionError, require
from edgekit.models.boosters import BOOST_EXTRA, BoosterModel, lightgbm_unsupported, xgboost_unsupported
from edgekit.models.targets import RuntimeTarget

TREE_OPS = ("TreeEnsembleClassifier", "TreeEnsembleRegressor")
NOTE_PREFIX = "edgekit precision: "
_DOUBLE_ATTRIBUTES = ("nodes_values", "nodes_hitrates", "class_weights", "target_weights", "base_values")
# onnxmltools' operator aliases for a booster of each library and task
_ALIASES = {
    ("xgboost", True): "XGBClassifier",
    ("xgboost", False): "XGBRegressor",
    ("lightgbm", True): "LgbmClassifier",
    ("lightgbm", False): "LgbmRegressor",
}
CLASSIFIER_OPTIONS = {"nocl": [True, False], "zipmap": [True, False, "columns"]}


def precision_note(library: str, dtype: str) -> str:
    """How the trees of ``library`` compare, fed ``dtype`` rows: one line for the convert report."""
    if library == "xgboost":
        cast = "; float64 rows are cast to float32 first, as XGBoost does" if dtype == "float64" else ""
        return f"XGBoost trees in float32, XGBoost's own precision{cast}"
    if dtype == "float64":
        return "LightGBM thresholds and leaf values kept in float64 (ai.onnx.ml opset 3), LightGBM's own precision"
    return (
        "LightGBM thresholds rounded down to float32 (the largest float32 not above each float64 threshold), "
        "so float32 rows branch exactly as LightGBM's float64 comparisons send them"
    )


def precision_notes(proto: Any) -> list[str]:
    """The precision notes ``_PreciseTrees`` left on the tree nodes of ``proto``, once each."""
    notes = [n.doc_string[len(NOTE_PREFIX) :] for n in proto.graph.node if n.doc_string.startswith(NOTE_PREFIX)]
    return list(dict.fromkeys(notes))


def booster_to_onnx(model: BoosterModel, target: RuntimeTarget) -> Any:
    """The ONNX model of a booster file, by onnxmltools, its outputs named as ``model.output`` says."""
    onnxmltools = require("onnxmltools", BOOST_EXTRA)
    from onnxmltools.convert.common import data_types
    from onnxmltools.convert.common.onnx_ex import get_maximum_opset_supported

    tensor = data_types.DoubleTensorType if model.input.dtype == "float64" else data_types.FloatTensorType
    classifier = model.output.task == CLASSIFICATION
    alias = _ALIASES[(model.library, classifier)]
    shapes = _classifier_shapes if classifier else _regressor_shapes
    options: dict[str, Any] = {"zipmap": False} if model.library == "lightgbm" else {}
    convert = onnxmltools.convert_xgboost if model.library == "xgboost" else onnxmltools.convert_lightgbm
    booster = _unnamed(model.booster) if model.library == "xgboost" else model.booster
    try:
        proto = convert(
            booster,
            initial_types=[(model.input.input_name, tensor([None, model.input.width]))],
            target_opset=min(target.opset, get_maximum_opset_supported()),
            custom_conversion_functions={alias: _precise(model.library, _operator_converter(model.library))},
            custom_shape_calculators={alias: shapes(data_types)},
            **options,
        )
    except Exception as exc:  # onnxmltools raises RuntimeError, ValueError, NotImplementedError... with no base
        raise ConversionError(
            f"onnxmltools cannot convert this {model.description}: {_first_line(exc)}",
            "report this with the model's objective and library versions",
            path=model.path,
        ) from exc
    _check_outputs(proto, model)
    proto.graph.name = "edgekit"  # onnxmltools names graphs randomly; the same model should give the same bytes
    return proto


def register_converters(estimator: Any, *, path: str = "<estimator>") -> None:
    """Register onnxmltools' converters with skl2onnx for the XGBoost/LightGBM estimator ``estimator`` ends in,
    after refusing what they would convert wrongly. Does nothing for other models, which never need onnxmltools."""
    while hasattr(estimator, "steps"):  # a Pipeline's last step, however nested
        estimator = estimator.steps[-1][1]
    library = type(estimator).__module__.split(".")[0]
    if library not in ("xgboost", "lightgbm"):
        return
    _refuse_unsupported(library, estimator, path)
    require("onnxmltools", BOOST_EXTRA)
    from skl2onnx import update_registered_converter
    from skl2onnx.common import data_types

    module = require(library, BOOST_EXTRA)
    prefix, names = ("XGBoost", ("XGBClassifier", "XGBRegressor"))
    if library == "lightgbm":
        prefix, names = ("LightGbm", ("LGBMClassifier", "LGBMRegressor"))
    converter = _precise(library, _operator_converter(library))
    classifier, regressor = (getattr(module, name) for name in names)
    update_registered_converter(
        classifier,
        prefix + names[0],
        _classifier_shapes(data_types, skl2onnx=True),
        converter,
        options=CLASSIFIER_OPTIONS,
    )
    update_registered_converter(regressor, prefix + names[1], _regressor_shapes(data_types, skl2onnx=True), converter)


def _operator_converter(library: str) -> Any:
    if library == "xgboost":
        from onnxmltools.convert.xgboost.operator_converters.XGBoost import convert_xgboost

        return convert_xgboost
    from onnxmltools.convert.lightgbm.operator_converters.LightGbm import convert_lightgbm

    return convert_lightgbm


def _precise(library: str, convert: Any) -> Any:
    """``convert`` (an onnxmltools operator converter) writing its tree node through ``_PreciseTrees``."""

    def converter(scope: Any, operator: Any, container: Any) -> None:
        dtype = "float64" if type(operator.inputs[0].type).__name__ == "DoubleTensorType" else "float32"
        estimator = operator.raw_operator
        if library == "xgboost" and hasattr(estimator, "_Booster"):  # XGBClassifier/XGBRegressor, maybe named
            operator.raw_operator = copy.copy(estimator)
            operator.raw_operator._Booster = _unnamed(estimator.get_booster())
        try:
            convert(scope, operator, _PreciseTrees(container, scope, library, dtype))
        finally:
            operator.raw_operator = estimator

    return converter


def _refuse_unsupported(library: str, estimator: Any, path: str) -> None:
    """What ``BoosterModel`` refuses in a booster file, refused in a scikit-learn wrapper too."""
    if library == "xgboost" and hasattr(estimator, "get_booster"):
        reason = xgboost_unsupported(json.loads(estimator.get_booster().save_config())["learner"])
    elif library == "lightgbm" and hasattr(estimator, "booster_"):
        reason = lightgbm_unsupported(estimator.booster_.model_to_string())
    else:
        return  # not fitted, or not a model onnxmltools converts: skl2onnx says so
    if reason is not None:
        raise ConversionError(f"its {type(estimator).__name__} {reason}", "retrain without that option", path=path)


def _unnamed(booster: Any) -> Any:
    """An XGBoost booster without feature names: onnxmltools reads a split's feature only as f0, f1, ..."""
    if not booster.feature_names:
        return booster
    plain = booster.copy()
    plain.feature_names = None
    return plain


class _PreciseTrees:
    """A converter's container that sees each tree node before it is written (see the module docstring)."""

    def __init__(self, container: Any, scope: Any, library: str, dtype: str) -> None:
        self._container, self._scope, self._library, self._dtype = container, scope, library, dtype

    def __getattr__(self, name: str) -> Any:
        return getattr(self._container, name)

    def add_node(self, op_type: str, inputs: Any, outputs: Any, *args: Any, **attrs: Any) -> Any:
        if op_type in TREE_OPS:
            inputs = [inputs] if isinstance(inputs, str) else list(inputs)
            if self._library == "xgboost" and self._dtype == "float64":
                inputs = [self._cast_to_float(inputs[0])]
            elif self._library == "lightgbm":
                attrs = _float64_trees(attrs) if self._dtype == "float64" else _rounded_down_trees(attrs)
            attrs["doc_string"] = NOTE_PREFIX + precision_note(self._library, self._dtype)
        return self._container.add_node(op_type, inputs, outputs, *args, **attrs)

    def _cast_to_float(self, name: str) -> str:
        from onnx import TensorProto

        cast = self._scope.get_unique_variable_name("float32_input")
        self._container.add_node(
            "Cast", [name], [cast], name=self._scope.get_unique_operator_name("Cast"), to=TensorProto.FLOAT
        )
        return cast


def _float64_trees(attrs: dict[str, Any]) -> dict[str, Any]:
    """The tree's thresholds and leaf values as float64 tensors (ai.onnx.ml opset 3): LightGBM's precision."""
    from onnx import numpy_helper

    attrs = dict(attrs)
    for key in _DOUBLE_ATTRIBUTES:
        if attrs.get(key) is not None and len(attrs[key]):
            values = np.asarray(attrs.pop(key), dtype=np.float64)
            attrs[f"{key}_as_tensor"] = numpy_helper.from_array(values, name=f"{key}_as_tensor")
    attrs["op_version"] = 3
    return attrs


def _rounded_down_trees(attrs: dict[str, Any]) -> dict[str, Any]:
    """Each ``<=`` threshold as the largest float32 not above it: for a float32 x, ``x <= t`` exactly when
    ``x <= round_down(t)``, where the nearest float32 can lie above ``t`` and flip rows equal to it."""
    attrs = dict(attrs)
    modes = [m.decode() if isinstance(m, bytes) else m for m in attrs["nodes_modes"]]
    attrs["nodes_values"] = [
        _round_down(float(v)) if mode == "BRANCH_LEQ" else float(v)
        for v, mode in zip(attrs["nodes_values"], modes, strict=True)
    ]
    return attrs


def _round_down(value: float) -> float:
    with np.errstate(over="ignore"):  # thresholds beyond float32's range become ±inf, then the largest finite
        nearest = np.float32(value)
    if float(nearest) > value:
        nearest = np.nextafter(nearest, np.float32(-np.inf))
    return float(nearest)


def _classifier_shapes(data_types: Any, *, skl2onnx: bool = False) -> Any:
    """A shape calculator: a label [N] and float32 probabilities [N, classes], whatever the input type (the
    tree operators output float32 even when they compare in float64)."""

    def calculate(operator: Any) -> None:
        if skl2onnx:
            from skl2onnx.common.shape_calculator import calculate_linear_classifier_output_shapes

            calculate_linear_classifier_output_shapes(operator)
        else:
            operator.outputs[0].type = data_types.Int64TensorType(shape=[operator.inputs[0].type.shape[0]])
        rows, classes = operator.inputs[0].type.shape[0], len(operator.raw_operator.classes_)
        operator.outputs[1].type = data_types.FloatTensorType(shape=[rows, classes])

    return calculate


def _regressor_shapes(data_types: Any, *, skl2onnx: bool = False) -> Any:
    """A shape calculator: float32 values [N, 1], whatever the input type."""

    def calculate(operator: Any) -> None:
        if skl2onnx:
            from skl2onnx.common.shape_calculator import calculate_linear_regressor_output_shapes

            calculate_linear_regressor_output_shapes(operator)
        operator.outputs[0].type = data_types.FloatTensorType(shape=[operator.inputs[0].type.shape[0], 1])

    return calculate


def _check_outputs(proto: Any, model: BoosterModel) -> None:
    names = [o.name for o in proto.graph.output]
    spec = model.output
    expected = [spec.label_output, spec.probabilities_output] if spec.task == CLASSIFICATION else [spec.value_output]
    if names != expected:
        raise ConversionError(
            f"onnxmltools produced outputs {names}, expected {expected}",
            "report this with the model's objective and library versions",
            path=model.path,
        )


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__
