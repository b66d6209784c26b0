"""skl2onnx, made to compute what scikit-learn computes for typed tabular pipelines.

Trees decide by comparing a feature with a threshold, so an input off by one float32 rounding step
can take the other branch and move a probability by a whole leaf. Measured on a churn-like pipeline
(imputer, scaler and one-hot encoder in front of a 100-tree forest), skl2onnx's default float32 graph
agreed on every label but moved probabilities by up to 0.09. The numeric columns of a tree model are
therefore fed as float64 (``models/columns.py``), and three conversion functions, passed to
``convert_sklearn`` for one conversion only, close the remaining gaps:

- **SimpleImputer**: onnxruntime has no float64 ``Imputer`` kernel, so a float64 imputer becomes
  ``Where(IsNaN(x), statistics, x)``. skl2onnx converts a string imputer only when its missing value
  is a string; scikit-learn's default is NaN, so the graph looks for "" instead, and the agent sends a
  missing string as "" (``device_agent/columns.py``).
- **scikit-learn's own trees** (DecisionTree, RandomForest, ExtraTrees, GradientBoosting) cast their
  input to float32 and compare it with float64 thresholds. The graph does the same: ``Cast`` to float
  and back to double in front of the tree ensemble, whose thresholds skl2onnx writes in double.
- **HistGradientBoosting** compares float64 inputs with float64 thresholds, as the double graph does.

For every tree ensemble fed float64, the thresholds go into ``nodes_values_as_tensor`` in double;
skl2onnx rounds them to float32 (``nodes_values``), which moved HistGradientBoosting probabilities by
up to 0.32 on the churn fixture, so HistGradientBoosting's are taken from the model itself. Two skl2onnx defects are
worked around on the way: numpy booleans in integer attributes, and a double probability output
that onnxruntime's TreeEnsembleClassifier kernel types as float.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np

from device_agent.schema import InputSchema
from edgekit.build.booster_export import NOTE_PREFIX
from edgekit.models.columns import HIST_TREES, SKLEARN_TREES

# skl2onnx's element types by the name edgekit's schema uses
_TENSOR_TYPES = {
    "float32": "FloatTensorType",
    "float64": "DoubleTensorType",
    "int64": "Int64TensorType",
    "bool": "BooleanTensorType",
    "string": "StringTensorType",
}
TREE_OPS = ("TreeEnsembleClassifier", "TreeEnsembleRegressor", "TreeEnsemble")
# what ``convert`` reports (``booster_export.precision_notes`` reads it off the tree node)
SKLEARN_TREE_NOTE = "trees fed float64, rounded to float32 as scikit-learn's trees do, thresholds in float64"
HIST_TREE_NOTE = "HistGradientBoosting fed float64 with its float64 thresholds, as scikit-learn compares"


def initial_types(schema: InputSchema) -> list[tuple[str, Any]]:
    """skl2onnx's ``initial_types``: the matrix, or one ``[None, 1]`` input per fed column."""
    from skl2onnx.common import data_types

    if schema.columns is None:
        return [(schema.input_name or "X", getattr(data_types, _TENSOR_TYPES[schema.dtype])([None, schema.width]))]
    return [
        (c.name, getattr(data_types, _TENSOR_TYPES[c.feed])([None, 1])) for c in schema.columns if c.feed is not None
    ]


def conversion_functions() -> dict[type, Callable[..., Any]]:
    """Estimator type -> conversion function, for ``convert_sklearn(custom_conversion_functions=...)``."""
    from sklearn import ensemble, impute, tree

    functions: dict[type, Callable[..., Any]] = {impute.SimpleImputer: _imputer}
    for name in SKLEARN_TREES:
        cls = getattr(ensemble, name, None) or getattr(tree, name)
        functions[cls] = _wrapped(cls, cast_input=True)
    for name in HIST_TREES:
        cls = getattr(ensemble, name)
        functions[cls] = _wrapped(cls, cast_input=False)
    return functions


def _registered(cls: type) -> Callable[..., Any]:
    from skl2onnx._supported_operators import sklearn_operator_name_map
    from skl2onnx.common._registration import get_converter

    return get_converter(sklearn_operator_name_map[cls])


def _imputer(scope: Any, operator: Any, container: Any) -> None:
    from skl2onnx.common.data_types import DoubleTensorType, Int64TensorType, StringTensorType
    from skl2onnx.operator_converters.imputer_op import convert_sklearn_imputer

    op = operator.raw_operator
    input_type = operator.inputs[0].type
    if isinstance(input_type, StringTensorType) and not isinstance(op.missing_values, str):
        patched = copy.copy(op)
        patched.missing_values = ""
        operator.raw_operator = patched
        try:
            convert_sklearn_imputer(scope, operator, container)
        finally:
            operator.raw_operator = op
    elif isinstance(input_type, DoubleTensorType) and _is_nan(op.missing_values):
        _double_imputer(scope, operator, container, op.statistics_)
    elif isinstance(input_type, Int64TensorType) and _is_nan(op.missing_values):
        # an integer input holds no NaN (the agent refuses a missing value there): nothing to impute,
        # where skl2onnx would cast NaN to an integer and compare with that
        from skl2onnx.operator_converters.common import concatenate_variables

        features = concatenate_variables(scope, operator.inputs, container)
        container.add_node(
            "Identity", [features], [operator.outputs[0].full_name], name=scope.get_unique_operator_name("Identity")
        )
    else:
        convert_sklearn_imputer(scope, operator, container)


def _double_imputer(scope: Any, operator: Any, container: Any, statistics: np.ndarray) -> None:
    from onnx import TensorProto
    from skl2onnx.operator_converters.common import concatenate_variables

    features = concatenate_variables(scope, operator.inputs, container)
    fill, isnan = scope.get_unique_variable_name("fill"), scope.get_unique_variable_name("isnan")
    container.add_initializer(fill, TensorProto.DOUBLE, [1, statistics.size], statistics.astype(np.float64).tolist())
    container.add_node("IsNaN", [features], [isnan], name=scope.get_unique_operator_name("IsNaN"))
    container.add_node(
        "Where", [isnan, fill, features], [operator.outputs[0].full_name], name=scope.get_unique_operator_name("Where")
    )


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and value != value


def _wrapped(cls: type, *, cast_input: bool) -> Callable[..., Any]:
    def convert(scope: Any, operator: Any, container: Any) -> None:
        from skl2onnx.common.data_types import DoubleTensorType

        double = isinstance(operator.inputs[0].type, DoubleTensorType)
        exact = None if cast_input or not double else _hist_thresholds(operator.raw_operator)
        outputs = operator.outputs
        # the classifier kernel answers float scores; some converters declare the graph's double
        typed = {i for i, output in enumerate(outputs) if isinstance(output.type, DoubleTensorType)}
        container = _TreeContainer(container, scope, double=double, cast_input=cast_input, thresholds=exact)
        container.double_scores = typed
        _registered(cls)(scope, operator, container)

    return convert


class _TreeContainer:
    """The converter's container, with tree-ensemble nodes adjusted as they are added."""

    def __init__(
        self, container: Any, scope: Any, *, double: bool, cast_input: bool, thresholds: np.ndarray | None = None
    ) -> None:
        self._container, self._scope = container, scope
        self._double, self._cast_input, self._thresholds = double, cast_input, thresholds
        self.double_scores: set[int] = set()  # the operator's outputs declared double

    def __getattr__(self, name: str) -> Any:
        return getattr(self._container, name)

    def add_node(self, op_type: str, inputs: Any, outputs: Any, **attrs: Any) -> Any:
        from onnx import TensorProto

        attrs = {k: _plain(v) for k, v in attrs.items()}
        if op_type not in TREE_OPS or not self._double:
            return self._container.add_node(op_type, inputs, outputs, **attrs)
        attrs["doc_string"] = NOTE_PREFIX + (SKLEARN_TREE_NOTE if self._cast_input else HIST_TREE_NOTE)
        if "nodes_values" in attrs:  # a float attribute would round the thresholds to float32
            from onnx import numpy_helper

            thresholds = np.asarray(attrs.pop("nodes_values"), dtype=np.float64)
            exact = self._thresholds
            # skl2onnx has rounded them to float32 already: the model's own float64 values replace
            # them when they are the same nodes in the same order (each rounds to what skl2onnx wrote)
            if (
                exact is not None
                and exact.shape == thresholds.shape
                and np.array_equal(exact.astype(np.float32), thresholds.astype(np.float32))
            ):
                thresholds = exact
            attrs["nodes_values_as_tensor"] = numpy_helper.from_array(thresholds)
            attrs["op_version"] = max(3, attrs.get("op_version") or 1)  # where ai.onnx.ml has the attribute
        inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        if self._cast_input:  # float32(x), compared in double: what scikit-learn's trees do
            rounded, back = self._name("rounded"), self._name("rounded_double")
            self._container.add_node("Cast", [inputs[0]], [rounded], to=TensorProto.FLOAT, name=self._op("Cast"))
            self._container.add_node("Cast", [rounded], [back], to=TensorProto.DOUBLE, name=self._op("Cast"))
            inputs[0] = back
        position = 1 if op_type == "TreeEnsembleClassifier" else 0  # the scores (classifier) or values
        if position in self.double_scores and len(outputs) > position:
            scores, typed = self._name("scores_float"), outputs[position]
            outputs[position] = scores
            result = self._container.add_node(op_type, inputs, outputs, **attrs)
            self._container.add_node("Cast", [scores], [typed], to=TensorProto.DOUBLE, name=self._op("Cast"))
            return result
        return self._container.add_node(op_type, inputs, outputs, **attrs)

    def _name(self, hint: str) -> str:
        return self._scope.get_unique_variable_name(hint)

    def _op(self, hint: str) -> str:
        return self._scope.get_unique_operator_name(hint)


def _hist_thresholds(model: Any) -> np.ndarray | None:
    """A HistGradientBoosting model's float64 thresholds, node by node in skl2onnx's order (0 for leaves)."""
    predictors = getattr(model, "_predictors", None)
    if not predictors:
        return None
    parts = [
        np.where(tree.nodes["is_leaf"].astype(bool), 0.0, tree.nodes["num_threshold"])
        for iteration in predictors
        for tree in iteration
    ]
    return np.concatenate(parts).astype(np.float64)


def _plain(value: Any) -> Any:
    """numpy booleans in a list attribute as ints: onnx refuses them in an ``ints`` field."""
    if isinstance(value, list) and any(isinstance(v, (bool, np.bool_)) for v in value):
        return [int(v) for v in value]
    return value
