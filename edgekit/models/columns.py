"""The typed columns of a scikit-learn pipeline fitted on a DataFrame.

A ``ColumnTransformer`` that selects columns by name is what makes a pipeline take a table rather
than a matrix: skl2onnx then needs one input per column, named and typed, and the agent needs to
know what each column holds. scikit-learn records the names (``feature_names_in_``) and, through the
transformers, most of the rest:

- a column an encoder reads (OneHotEncoder, OrdinalEncoder) is *categorical*, and the encoder's
  ``categories_`` tell its type (strings, integers, floats, flags);
- a column is *nullable* when an imputer reads it first, or when every step on its way, final
  estimator included, takes NaN natively (HistGradientBoosting: its ``allow_nan`` tag);
- a numeric column is fed as float64 to tree ensembles, so thresholds compare as in scikit-learn
  (``build/sklearn_exact.py``), and as float32 otherwise (what int8 quantization works on).

What scikit-learn does not record is whether a numeric column held integers: numeric columns are
``float64`` unless a data file with real types (Parquet, a DataFrame) says ``int64``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from device_agent.columns import Column

ENCODERS = ("OneHotEncoder", "OrdinalEncoder")
IMPUTERS = ("SimpleImputer", "KNNImputer", "IterativeImputer")
# scikit-learn's own trees cast inputs to float32; HistGradientBoosting compares float64 (build/sklearn_exact.py)
SKLEARN_TREES = (
    "DecisionTreeClassifier",
    "DecisionTreeRegressor",
    "RandomForestClassifier",
    "RandomForestRegressor",
    "ExtraTreesClassifier",
    "ExtraTreesRegressor",
    "GradientBoostingClassifier",
    "GradientBoostingRegressor",
)
HIST_TREES = ("HistGradientBoostingClassifier", "HistGradientBoostingRegressor")
BOOSTERS = ("XGBClassifier", "XGBRegressor", "LGBMClassifier", "LGBMRegressor")
TREE_ENSEMBLES = (*SKLEARN_TREES, *HIST_TREES, *BOOSTERS)
# Final estimators whose converted graph routes NaN as the library does. scikit-learn's own trees take
# NaN too (their allow_nan tag), but skl2onnx drops their learned missing_go_to_left: NaN would go
# right in ONNX where scikit-learn sends it left, so for them NaN is refused unless imputed.
NAN_NATIVE = (*HIST_TREES, *BOOSTERS)


def column_transformer(estimator: Any) -> Any | None:
    """The ColumnTransformer that selects columns by name at the head of ``estimator``, if any."""
    head = estimator.steps[0][1] if hasattr(estimator, "steps") else estimator
    if type(head).__name__ != "ColumnTransformer" or not hasattr(head, "feature_names_in_"):
        return None
    return head


def final_estimator(estimator: Any) -> Any:
    return estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator


def has_tree_ensemble(estimator: Any) -> bool:
    return type(final_estimator(estimator)).__name__ in TREE_ENSEMBLES


def typed_columns(estimator: Any, dtypes: Mapping[str, str] | None = None) -> tuple[Column, ...] | None:
    """The pipeline's columns, typed; None for a model that takes a plain numeric matrix.

    ``dtypes`` (column name -> int64, float64, bool or string) refines what the estimator cannot
    tell, from data that carries real types."""
    ct = column_transformer(estimator)
    if ct is None:
        return None
    names = [str(n) for n in ct.feature_names_in_]
    numeric_feed = "float64" if has_tree_ensemble(estimator) else "float32"
    final_allows_nan = type(final_estimator(estimator)).__name__ in NAN_NATIVE
    columns: dict[int, Column] = {}
    for branch, indices in _branches(ct):
        steps = _steps(branch)
        encoder = next((s for s in steps if type(s).__name__ in ENCODERS), None)
        imputed = any(type(s).__name__ in IMPUTERS for s in steps)
        nan_through = final_allows_nan and all(_allows_nan(s) for s in steps)
        for position, index in enumerate(indices):
            name = names[index]
            if branch == "drop":
                columns[index] = unused_column(name)
            elif encoder is not None:
                dtype = _category_dtype(encoder.categories_[position])
                feed = _category_feed(dtype)
                # an integer feed holds no NaN, and skl2onnx's imputer there looks for an integer
                columns[index] = Column(name, dtype, "categorical", imputed and feed != "int64", feed)
            else:
                dtype = (dtypes or {}).get(name, "float64")
                dtype = dtype if dtype in ("int64", "float32", "float64", "bool") else "float64"
                columns[index] = Column(name, dtype, "numeric", imputed or nan_through, numeric_feed)
    for index, name in enumerate(names):  # selected by no branch: the remainder was dropped
        columns.setdefault(index, unused_column(name))
    return tuple(columns[i] for i in range(len(names)))


def unused_column(name: str) -> Column:
    """A column the pipeline drops (often a string id): sent by clients, any scalar, neither fed nor tested."""
    return Column(name, "any", "unused", True, None)


def passes_nan(estimator: Any) -> bool:
    """Whether a matrix pipeline answers rows with NaN as scikit-learn does: an imputer in it, or a
    NaN-native final estimator behind steps that all pass NaN through."""
    steps = (
        [s for _, s in estimator.steps if s not in (None, "passthrough")]
        if hasattr(estimator, "steps")
        else [estimator]
    )
    imputed = any(type(s).__name__ in IMPUTERS for s in steps)
    return all(_allows_nan(s) for s in steps) and (imputed or type(steps[-1]).__name__ in NAN_NATIVE)


def _branches(ct: Any) -> list[tuple[Any, list[int]]]:
    indices = getattr(ct, "_transformer_to_input_indices", None)
    branches = []
    for name, transformer, _ in ct.transformers_:
        if indices is None or name not in indices:
            continue
        branches.append(("drop" if transformer == "drop" else transformer, list(indices[name])))
    return branches


def _steps(transformer: Any) -> list[Any]:
    if isinstance(transformer, str):  # "drop", "passthrough"
        return []
    steps = [step for _, step in transformer.steps] if hasattr(transformer, "steps") else [transformer]
    # a fitted ColumnTransformer holds "passthrough" as an identity FunctionTransformer
    return [s for s in steps if not (type(s).__name__ == "FunctionTransformer" and s.func is None)]


def _allows_nan(estimator: Any) -> bool:
    try:
        from sklearn.utils import get_tags

        return bool(get_tags(estimator).input_tags.allow_nan)
    except (ImportError, AttributeError, TypeError, ValueError):
        return False


def _category_dtype(categories: np.ndarray) -> str:
    values = [c for c in np.asarray(categories).tolist() if c is not None and c == c]  # NaN is not a type
    if categories.dtype.kind in "OUS" and all(isinstance(v, str) for v in values):
        return "string"
    if categories.dtype.kind == "b" or (values and all(isinstance(v, bool) for v in values)):
        return "bool"
    if categories.dtype.kind in "iu":
        return "int64"
    return "float64"


def _category_feed(dtype: str) -> str:
    return {"string": "string", "int64": "int64", "bool": "int64"}.get(dtype, "float64")


def dtypes_of_frame(frame: Any) -> dict[str, str]:
    """Column types from a DataFrame (or anything with ``dtypes``): what a Parquet file or the Python
    API carries and a CSV does not."""
    kinds = {"i": "int64", "u": "int64", "f": "float64", "b": "bool", "O": "string", "U": "string"}
    found = {}
    for name, dtype in frame.dtypes.items():
        kind = getattr(dtype, "kind", "O")
        found[str(name)] = kinds.get(kind, "string")
    return found
