"""ONNX operators that move values without computing: reshapes, transposes, concatenation and padding,
kept channel-last where they can be (see ``graph``). Imports: numpy, ``graph``, ``ops_base``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekit.build.tflite.graph import TO_NCHW, TO_NHWC, Builder
from edgekit.build.tflite.ops_base import _constant, _onnx_shape, _out, converts


@converts("Identity", "Dropout", "Cast")
def identity(b: Builder, node: Any, attrs: dict[str, Any]) -> None:
    if node.op_type == "Cast" and attrs.get("to") != 1:
        raise b.refuse(node, "only casts to float are supported")
    b.values[node.output[0]] = b.values[node.input[0]]


@converts("Flatten", "Reshape", "Squeeze", "Unsqueeze")
def reshape(b: Builder, node: Any, attrs: dict[str, Any]) -> None:
    """A reshape of a channel-last value: free when its spatial size is 1 (both orders agree), a dense layer's
    weight columns permuted when only dense layers read it, else after a TRANSPOSE back to ONNX's order."""
    value, target = b.values[node.input[0]], _onnx_shape(b, node.output[0])
    if value.layout == "nhwc" and _one_row_image(value.onnx_shape, target):
        _out(b, node, value.tensor, "nhwc")  # NCW [N, C, W] <-> NCHW [N, C, 1, W]: both held as [N, 1, W, C]
        return
    if value.layout == "nhwc":
        spatial = int(np.prod(b.shape_of(value.tensor)[1:3]))
        readers = b.uses.get(node.output[0], [])
        dense_only = readers and all(r.op_type in ("Gemm", "MatMul") and r.input[0] == node.output[0] for r in readers)
        if spatial == 1:
            _out(b, node, b.reshape(value.tensor, target), "plain")
            return
        if len(target) == 2 and target[0] == value.onnx_shape[0] and dense_only:  # [N, C*H*W], not Flatten(axis=2)
            n, h, w, c = b.shape_of(value.tensor)
            order = np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).ravel()
            _out(b, node, b.reshape(value.tensor, target), "rows", order)
            return
    if value.layout == "rows":
        raise b.refuse(node, "a reshape of a flattened channel-last value is not supported")
    _out(b, node, b.reshape(b.plain(node.input[0]), target), "plain")


def _one_row_image(source: tuple[int, ...], target: tuple[int, ...]) -> bool:
    ranks = (len(source), len(target))
    if ranks == (3, 4):
        return target == (source[0], source[1], 1, source[2])
    return ranks == (4, 3) and source == (target[0], target[1], 1, target[2])


@converts("Transpose")
def transpose(b: Builder, node: Any, attrs: dict[str, Any]) -> None:
    """NHWC -> NCHW (NWC -> NCW) of a plain value is a channel-last value as it is (and back): the transposes
    cancel, leaving at most a RESHAPE between NWC [N, W, C] and its channel-last hold [N, 1, W, C]."""
    value = b.values[node.input[0]]
    rank = len(value.onnx_shape)
    perm = tuple(attrs.get("perm", reversed(range(rank))))
    if rank in TO_NCHW and value.layout == "plain" and perm == TO_NCHW[rank]:
        n, w, c = b.shape_of(value.tensor) if rank == 3 else (0, 0, 0)
        _out(b, node, b.reshape(value.tensor, (n, 1, w, c)) if rank == 3 else value.tensor, "nhwc")
        return
    if rank in TO_NHWC and value.layout == "nhwc" and perm == TO_NHWC[rank]:
        n, _, w, c = b.shape_of(value.tensor)
        _out(b, node, b.reshape(value.tensor, (n, w, c)) if rank == 3 else value.tensor, "plain")
        return
    x = b.plain(node.input[0])
    permutation = b.constant(f"{node.output[0]}/perm", np.asarray(perm, np.int32))
    _out(b, node, b.emit("TRANSPOSE", [x, permutation], node.output[0], _onnx_shape(b, node.output[0])), "plain")


@converts("Concat")
def concat(b: Builder, node: Any, attrs: dict[str, Any]) -> None:
    constant = next((n for n in node.input if n in b.constants), None)
    if constant is not None:  # ONNX does not broadcast it: the model then runs at that one batch size only
        batch = b.constants[constant].shape[0] if b.constants[constant].ndim else 1
        raise b.refuse(node, f"its constant input {constant!r} fixes the batch size at {batch}")
    values = [b.values[n] for n in node.input]
    rank = len(values[0].onnx_shape)
    axis = attrs["axis"] % rank
    nhwc = rank in TO_NHWC and any(v.layout == "nhwc" for v in values)
    tensors = [b.nhwc(n) if nhwc else b.plain(n) for n in node.input]
    if nhwc:
        axis = {4: (0, 3, 1, 2), 3: (0, 3, 2)}[rank][axis]
    shape = list(b.shape_of(tensors[0]))
    shape[axis] = sum(b.shape_of(t)[axis] for t in tensors)
    out = b.emit("CONCATENATION", tensors, node.output[0], tuple(shape), axis=axis)
    _out(b, node, out, "nhwc" if nhwc else "plain")


@converts("Pad")
def pad(b: Builder, node: Any, attrs: dict[str, Any]) -> None:
    """Constant padding as PAD (PADV2 with a fill value), reflection as MIRROR_PAD; negative pads crop (SLICE)."""
    mode = attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode not in ("constant", "reflect"):
        raise b.refuse(node, f"{mode} padding is not supported (constant and reflect are)")
    fill = float(_constant(b, node, 2, "value").reshape(-1)[0]) if len(node.input) > 2 and node.input[2] else 0.0
    value = b.values[node.input[0]]
    pairs = _pad_pairs(b, node, attrs, len(value.onnx_shape))
    if value.layout == "nhwc":
        tensor = value.tensor
        pairs = [pairs[i] for i in TO_NHWC[len(pairs)]]
        pairs = [pairs[0], (0, 0), *pairs[1:]] if len(value.onnx_shape) == 3 else pairs
    else:
        tensor = b.plain(node.input[0])
    grow = [(max(p, 0), max(q, 0)) for p, q in pairs]
    crop = [(min(p, 0), min(q, 0)) for p, q in pairs]
    if any(p or q for p, q in grow):
        name = node.output[0] if not any(p or q for p, q in crop) else f"{node.output[0]}/grown"
        tensor = _padded(b, tensor, grow, name, mode, fill)
    if any(p or q for p, q in crop):
        if crop[0] != (0, 0):
            raise b.refuse(node, "cropping the batch (negative pads on axis 0) is not supported")
        tensor = _cropped(b, tensor, crop, node.output[0])
    _out(b, node, tensor, "nhwc" if value.layout == "nhwc" else "plain")


def _pad_pairs(b: Builder, node: Any, attrs: dict[str, Any], rank: int) -> list[tuple[int, int]]:
    """ONNX's (before, after) padding of every axis, from the attribute (before opset 11) or the inputs; the
    ``axes`` input (opset 18) names the axes the pads are for."""
    pads = attrs["pads"] if "pads" in attrs else _constant(b, node, 1, "pads").reshape(-1).tolist()
    axes = list(range(rank))
    if len(node.input) > 3 and node.input[3]:
        axes = [int(a) % rank for a in _constant(b, node, 3, "axes").reshape(-1)]
    if len(pads) != 2 * len(axes):
        raise b.refuse(node, f"{len(pads)} pads for {len(axes)} axes")
    pairs = [(0, 0)] * rank
    for i, axis in enumerate(axes):
        pairs[axis] = (int(pads[i]), int(pads[i + len(axes)]))
    return pairs


def _padded(b: Builder, tensor: str, pairs: list[tuple[int, int]], name: str, mode: str, fill: float) -> str:
    shape = tuple(d + p + q for d, (p, q) in zip(b.shape_of(tensor), pairs, strict=True))
    paddings = b.constant(f"{name}/paddings", np.asarray(pairs, np.int32))
    if mode == "reflect":
        return b.emit("MIRROR_PAD", [tensor, paddings], name, shape, mode="REFLECT")
    if fill:
        fill_name = b.constant(f"{name}/fill", np.asarray(fill, np.float32))
        return b.emit("PADV2", [tensor, paddings, fill_name], name, shape)
    return b.emit("PAD", [tensor, paddings], name, shape)


def _cropped(b: Builder, tensor: str, crop: list[tuple[int, int]], name: str) -> str:
    """SLICE of ``tensor`` without ``crop`` (non-positive (before, after) per axis); any batch size."""
    shape = tuple(d + p + q for d, (p, q) in zip(b.shape_of(tensor), crop, strict=True))
    begin = b.constant(f"{name}/begin", np.asarray([-p for p, _ in crop], np.int32))
    size = b.constant(f"{name}/size", np.asarray([-1, *shape[1:]], np.int32))
    return b.emit("SLICE", [tensor, begin, size], name, shape)
