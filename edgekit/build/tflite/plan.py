"""What a dense network is, as a list of steps the TFLite writer and a numpy reference both run.

The ONNX graph (after ``lower_for_quantization``) is walked from its input to the output that
matters (probabilities for classifiers: labels are their argmax, which the bundle's output spec
does on the device; values for regressors). Supported: Sub/Mul/Add/Div by constants (scalers and
normalisers), Cast to float, Identity, Flatten/Reshape to rows, Gemm and MatMul(+Add), Relu,
Tanh, Sigmoid, Softmax. Anything else is refused with the op's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekit.errors import ConversionError

ELEMENTWISE = {"Sub": "sub", "Mul": "mul", "Add": "add", "Div": "div"}
ACTIVATIONS = {"Relu": "relu", "Tanh": "tanh", "Sigmoid": "logistic"}


@dataclass
class Step:
    kind: str  # sub | mul | add | div | fc | relu | tanh | logistic | softmax
    constant: np.ndarray | None = None  # elementwise operand
    weights: np.ndarray | None = None  # fc: [out, in]
    bias: np.ndarray | None = None  # fc: [out]
    activation: str | None = None  # fc: fused relu | tanh
    name: str = ""


@dataclass
class Plan:
    input_name: str
    width: int
    output_name: str
    steps: list[Step] = field(default_factory=list)

    def run(self, X: np.ndarray, *, record: list[np.ndarray] | None = None) -> np.ndarray:
        """The float32 reference; ``record`` receives every step's output (calibration ranges)."""
        x = np.asarray(X, dtype=np.float32)
        for step in self.steps:
            if step.kind in ("sub", "mul", "add", "div"):
                x = {"sub": np.subtract, "mul": np.multiply, "add": np.add, "div": np.divide}[step.kind](
                    x, step.constant
                ).astype(np.float32)
            elif step.kind == "fc":
                x = x @ step.weights.T + step.bias
                if step.activation == "relu":
                    x = np.maximum(x, 0)
                elif step.activation == "tanh":
                    x = np.tanh(x)
            elif step.kind == "relu":
                x = np.maximum(x, 0)
            elif step.kind == "tanh":
                x = np.tanh(x)
            elif step.kind == "logistic":
                x = 1 / (1 + np.exp(-x))
            elif step.kind == "softmax":
                e = np.exp(x - x.max(axis=1, keepdims=True))
                x = e / e.sum(axis=1, keepdims=True)
            x = x.astype(np.float32)
            if record is not None:
                record.append(x)
        return x


def plan_from_onnx(proto: Any, output_name: str, *, source: str = "model") -> Plan:
    from onnx import helper, numpy_helper

    from edgekit.build.graph_passes import lower_for_quantization

    graph = lower_for_quantization(proto).graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    inputs = [i for i in graph.input if i.name not in constants]
    input_name = inputs[0].name
    dims = inputs[0].type.tensor_type.shape.dim
    width = dims[-1].dim_value
    chain = []
    tensor = output_name
    while tensor != input_name:
        node = producers.get(tensor)
        if node is None:
            raise ConversionError(
                f"cannot trace {output_name!r} back to the input {input_name!r}",
                "the TFLite target converts sequential dense networks; use --target onnx",
                path=source,
            )
        chain.append(node)
        dynamic = [i for i in node.input if i and i not in constants]
        if len(dynamic) != 1:
            raise ConversionError(
                f"{node.op_type} node {node.name!r} has {len(dynamic)} non-constant inputs; "
                "the TFLite target converts sequential graphs",
                "use --target onnx",
                path=source,
            )
        tensor = dynamic[0]
    plan = Plan(input_name, width, output_name)
    for node in reversed(chain):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        _append(plan, node, attrs, constants, source)
    if not any(step.kind == "fc" for step in plan.steps):
        raise ConversionError("the graph has no dense layer (Gemm/MatMul) to convert", "use --target onnx", path=source)
    return fold_centering(plan)


def fold_centering(plan: Plan) -> Plan:
    """``(x - mean) * scale`` before the first dense layer becomes ``x * scale`` and a bias of ``b - W (mean * scale)``.

    One op fewer at batch 1 (a scaler is SUB + MUL), and 4 bytes a feature less. Only the offset is
    folded: the per-feature scale stays a float MUL, because folding it into the weights would
    wreck their per-channel int8 ranges (measured: int8 accuracy fell to 0.67 on digits)."""
    first_fc = next(i for i, s in enumerate(plan.steps) if s.kind == "fc")
    start = first_fc
    while start > 0 and plan.steps[start - 1].kind in ("mul", "div"):
        start -= 1
    if start == 0 or plan.steps[start - 1].kind not in ("sub", "add"):
        return plan
    offset_step, fc = plan.steps[start - 1], plan.steps[first_fc]
    offset = np.broadcast_to(
        offset_step.constant if offset_step.kind == "sub" else -offset_step.constant, (plan.width,)
    ).astype(np.float64)
    for step in plan.steps[start:first_fc]:
        offset = offset * step.constant if step.kind == "mul" else offset / step.constant
    bias = (fc.bias.astype(np.float64) - fc.weights.astype(np.float64) @ offset).astype(np.float32)
    folded = Step("fc", weights=fc.weights, bias=bias, activation=fc.activation, name=fc.name)
    steps = [*plan.steps[: start - 1], *plan.steps[start:first_fc], folded, *plan.steps[first_fc + 1 :]]
    return Plan(plan.input_name, plan.width, plan.output_name, steps)


def _append(plan: Plan, node: Any, attrs: dict[str, Any], constants: dict[str, np.ndarray], source: str) -> None:
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        raise ConversionError(
            f"operator {node.domain}.{op} has no TFLite equivalent here "
            "(tree ensembles and linear ML ops are not converted)",
            "use --target onnx",
            path=source,
        )
    if (
        op in ("Identity", "Flatten")
        or (op == "Cast" and attrs.get("to") == 1)
        or (op == "Reshape" and _to_rows(node, constants))
    ):
        return
    if op in ELEMENTWISE:
        constant = next(constants[i] for i in node.input if i in constants).astype(np.float32)
        if node.input[0] in constants and op in ("Sub", "Div"):
            raise ConversionError(f"{op} with the constant first is not supported", "use --target onnx", path=source)
        plan.steps.append(
            Step(ELEMENTWISE[op], constant=constant.reshape(-1) if constant.ndim > 1 else constant, name=node.name)
        )
        return
    if op in ("Gemm", "MatMul"):
        plan.steps.append(_dense_step(node, attrs, constants, source))
        return
    if op in ACTIVATIONS:
        kind = ACTIVATIONS[op]
        last = plan.steps[-1] if plan.steps else None
        if last is not None and last.kind == "fc" and last.activation is None and kind in ("relu", "tanh"):
            last.activation = kind  # fused into FULLY_CONNECTED: a separate int8 RELU made batches 18x slower
        else:
            plan.steps.append(Step(kind, name=node.name))
        return
    if op == "Softmax":
        if attrs.get("axis", -1) not in (-1, 1):
            raise ConversionError(
                "Softmax over an axis other than the last is not supported", "use --target onnx", path=source
            )
        plan.steps.append(Step("softmax", name=node.name))
        return
    raise ConversionError(
        f"operator {op} is not supported by the TFLite target "
        "(dense networks: Gemm/MatMul, Relu/Tanh/Sigmoid, Softmax, scalers)",
        "use --target onnx",
        path=source,
    )


def _dense_step(node: Any, attrs: dict[str, Any], constants: dict[str, np.ndarray], source: str) -> Step:
    """Gemm or MatMul with constant weights as one fully connected step (weights as output x input)."""
    if node.op_type == "MatMul":
        weights = constants[node.input[1]].astype(np.float32).T
        return Step(
            "fc", weights=np.ascontiguousarray(weights), bias=np.zeros(weights.shape[0], np.float32), name=node.name
        )
    weights = constants[node.input[1]].astype(np.float32) * float(attrs.get("alpha", 1.0))
    weights = weights if attrs.get("transB", 0) else weights.T
    if attrs.get("transA", 0):
        raise ConversionError("Gemm with transA is not supported", "use --target onnx", path=source)
    bias = (
        constants[node.input[2]].astype(np.float32).reshape(-1) * float(attrs.get("beta", 1.0))
        if len(node.input) > 2 and node.input[2]
        else np.zeros(weights.shape[0], np.float32)
    )
    bias = np.broadcast_to(bias, (weights.shape[0],)).copy()
    return Step("fc", weights=np.ascontiguousarray(weights), bias=bias, name=node.name)


def _to_rows(node: Any, constants: dict[str, np.ndarray]) -> bool:
    shape = constants.get(node.input[1]) if len(node.input) > 1 else None
    return shape is not None and shape.size == 2 and shape[0] in (-1, 0)


def equalize_first_layer(plan: Plan, rows: np.ndarray) -> Plan | None:
    """Cross-layer equalization (Nagel et al., 2019) between the float preprocessing and the first dense layer.

    int8 quantizes the first layer's input with one range for all features, so a rare feature with
    a wide standardized range (a digits pixel that is almost always 0) is either clipped or spends
    the range of all the others. Feature j is divided by ``s_j = sqrt(r_j / c_j)`` in float (folded
    into the trailing MUL/DIV of the preprocessing, or one MUL of its own) and weight column j is
    multiplied by it, so the input range ``r_j`` and the column's weight range ``c_j`` both become
    ``sqrt(r_j c_j)``: the float function is unchanged, the int8 error is balanced between the two.
    ``None`` when no feature would change."""
    first_fc = next(i for i, s in enumerate(plan.steps) if s.kind == "fc")
    record: list[np.ndarray] = []
    plan.run(rows, record=record)
    inputs = record[first_fc - 1] if first_fc else np.asarray(rows, dtype=np.float32)
    fc = plan.steps[first_fc]
    input_range = np.abs(inputs).max(axis=0).astype(np.float64)
    column_range = np.abs(fc.weights).max(axis=0).astype(np.float64)
    usable = (input_range > 0) & (column_range > 0) & np.isfinite(input_range)
    factors = np.ones(plan.width)
    factors[usable] = np.sqrt(input_range[usable] / column_range[usable])
    if np.allclose(factors, 1.0):
        return None
    steps = list(plan.steps)
    before = steps[first_fc - 1] if first_fc else None
    constant = None if before is None else np.broadcast_to(before.constant, (plan.width,)).astype(np.float64)
    if before is not None and before.kind == "mul":
        steps[first_fc - 1] = Step("mul", constant=(constant / factors).astype(np.float32), name=before.name)
    elif before is not None and before.kind == "div":
        steps[first_fc - 1] = Step("div", constant=(constant * factors).astype(np.float32), name=before.name)
    else:
        steps.insert(first_fc, Step("mul", constant=(1 / factors).astype(np.float32), name="edgekit_equalize"))
        first_fc += 1
    steps[first_fc] = Step(
        "fc",
        weights=(fc.weights * factors[None, :]).astype(np.float32),
        bias=fc.bias,
        activation=fc.activation,
        name=fc.name,
    )
    return Plan(plan.input_name, plan.width, plan.output_name, steps)
