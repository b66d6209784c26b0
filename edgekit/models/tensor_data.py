"""Tensor data for the host's tools: ``.npz`` arrays, ``.npy`` files, and folders of images or WAVs.

Calibration, evaluation, validation and the baseline read tensors here (an ``.npz`` may say its examples'
layout in a ``layout`` entry, which a square shape needs for a channel-last model); folders of encoded items go
through the model's own preprocessing (``device_agent.preprocess``, via ``device_agent.tensor_files``),
the code the device runs on a request, so what the host measured is what the device computes.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.errors import AgentError
from device_agent.tensors import check_tensor
from edgekit.errors import DataError

LABEL_KEYS = ("y", "labels", "label")
LAYOUT_KEY = "layout"  # an .npz may say which layout its examples are in (NCHW, NHWC, NCW, NWC)


def with_preprocess(schema: Any, path: str | None) -> Any:
    """``schema`` with the preprocessing of a TOML file (``--preprocess``), checked against its tensor."""
    if path is None:
        return schema
    if schema.tensor is None:
        raise DataError(
            "--preprocess applies to tensor models (images, audio, sensor windows)",
            "drop --preprocess for a model of rows and columns",
            path=path,
        )
    from dataclasses import replace

    from device_agent.preprocess import Preprocess

    try:
        preprocess = Preprocess.from_toml(path, schema.tensor)
    except AgentError as exc:  # its message names the file already
        raise DataError(exc.problem, exc.fix) from exc
    # what the tensor holds is what its preprocessing makes: a [N, 1, 40, 49] input fed [audio] is a spectrogram
    tensor = replace(schema.tensor, kind=preprocess.kind)
    return replace(schema, tensor=tensor, preprocess=preprocess.to_dict(), input_name=tensor.name)


def load_tensor_dataset(
    path: str | Path, schema: Any, *, limit: int | None = None, progress: Any = None
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """``(X, y, sha256)``: ``X`` a ``[N, *example_shape]`` batch of the model's input tensor, ``y`` its
    labels (an .npz may hold them), and a digest of what was read for the bundle's lineage.

    An ``.npz`` gives ``X`` (or an array named after the input) and optionally labels ``y``; any other
    file or a folder is read item by item through the preprocessing, at most ``limit`` examples
    (calibration does not need 10,000 photos), in batches so memory holds one batch of decoded images
    beside the result."""
    path = Path(path)
    if not path.exists():
        raise DataError("no such file or folder", "check the path", path=path)
    if path.suffix.lower() == ".npz":
        X, y, digest = _from_npz(path, schema)
    else:
        X, y, digest = _from_items(path, schema, limit, progress), None, _folder_digest(path)
    if limit is not None and len(X) > limit:
        X, y = X[:limit], None if y is None else y[:limit]
    return X, y, digest


def _from_npz(path: Path, schema: Any) -> tuple[np.ndarray, np.ndarray | None, str]:
    spec = schema.tensor
    raw = path.read_bytes()
    try:
        with np.load(path, allow_pickle=False) as arrays:
            names = list(arrays.files)
            key = next((k for k in (spec.name, "X", "x") if k in names), None)
            if key is None:
                others = [k for k in names if k not in (*LABEL_KEYS, LAYOUT_KEY)]
                if len(others) != 1:
                    raise DataError(
                        f"has arrays {names} and none is named {spec.name!r} or X",
                        f"save the inputs as X (or {spec.name!r}) and the labels as y",
                        path=path,
                    )
                key = others[0]
            X = arrays[key]
            y = next((arrays[k] for k in LABEL_KEYS if k in names), None)
            layout = str(arrays[LAYOUT_KEY]) if LAYOUT_KEY in names else None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"is not a readable .npz ({exc})", "save it with numpy.savez", path=path) from exc
    X = _as_layout_of(X, spec, layout, path)
    try:
        X = check_tensor(spec, X, source=str(path))
    except AgentError as exc:
        raise DataError(exc.problem, exc.fix, path=path) from exc
    if y is not None and len(y) != len(X):
        raise DataError(f"has {len(X)} examples but {len(y)} labels", "give one label per example", path=path)
    return X, y, hashlib.sha256(raw).hexdigest()


# -- layouts (added for the NHWC .tflite of a channels-first ONNX model) --------------------------------------

CHANNELS_LAST = {"NCHW": "NHWC", "NCW": "NWC"}
PERMUTATIONS = {("NCHW", "NHWC"): (0, 2, 3, 1), ("NHWC", "NCHW"): (0, 3, 1, 2), ("NCW", "NWC"): (0, 2, 1)}
PERMUTATIONS[("NWC", "NCW")] = (0, 2, 1)


def in_layout(X: np.ndarray, source: Any, target: Any) -> np.ndarray:
    """Examples held as TensorSpec ``source`` describes them, as ``target`` wants them (NCHW <-> NHWC, NCW <->
    NWC): one data file feeds an ONNX model and its channel-last .tflite."""
    perm = PERMUTATIONS.get((source.layout, target.layout))
    return X if perm is None or X.ndim != len(perm) else np.ascontiguousarray(np.asarray(X).transpose(perm))


def _as_layout_of(X: np.ndarray, spec: Any, layout: str | None, path: Path) -> np.ndarray:
    """An .npz of channels-first examples read for a channel-last model (or back). The file's ``layout`` entry
    says which it holds; without one, the shape does, and a shape that fits both orders (C == H == W, or C == W
    of a signal) is read as the model's own layout only when that is channels-first (the ONNX model's the file
    was made for): a channel-last model refuses it rather than guess."""
    if layout is not None:
        perm = PERMUTATIONS.get((layout, spec.layout))
        if perm is None and layout != spec.layout:
            raise DataError(
                f"says its examples are {layout}, which the model's {spec.layout} input cannot be read from",
                f"save them as {spec.layout} or as {'/'.join(sorted({*CHANNELS_LAST, *CHANNELS_LAST.values()}))}",
                path=path,
            )
        return X if perm is None or X.ndim != len(perm) else np.ascontiguousarray(X.transpose(perm))
    if X.ndim != len(spec.shape):
        return X
    other = next((f for f, last in CHANNELS_LAST.items() if last == spec.layout), None)
    fits = tuple(X.shape[1:]) == spec.example_shape
    if fits and other is not None and _permuted_shape(spec, other) == spec.example_shape:
        raise DataError(
            f"holds examples of shape {list(X.shape[1:])}, which read as {other} and as {spec.layout} alike",
            f"save the layout with them: numpy.savez(path, X=X, layout={other!r})",
            path=path,
        )
    if fits:
        return X
    for first, last in CHANNELS_LAST.items():
        for source, target in ((first, last), (last, first)):
            if spec.layout == target and _permuted_shape(spec, source) == tuple(X.shape[1:]):
                return np.ascontiguousarray(X.transpose(PERMUTATIONS[(source, target)]))
    return X


def _permuted_shape(spec: Any, source: str) -> tuple[int, ...] | None:
    """The example shape of ``spec``'s input held in layout ``source`` (None when the two do not convert)."""
    perm = PERMUTATIONS.get((source, spec.layout))
    if perm is None or len(perm) != len(spec.shape):
        return None
    inverse = tuple(int(i) for i in np.argsort(perm))
    return tuple(spec.shape[i] for i in inverse)[1:]


def _from_items(path: Path, schema: Any, limit: int | None, progress: Any) -> np.ndarray:
    from device_agent.tensor_files import count_items, read_items

    parts, total = [], 0
    if progress is not None:
        progress.start(min(count_items(path, schema.tensor), limit or 1 << 62), f"reading {path.name}")
    try:
        for _, batch in read_items(path, schema.preprocessor(), schema.tensor):
            parts.append(batch)
            total += len(batch)
            if progress is not None:
                progress.advance(len(batch))
            if limit is not None and total >= limit:
                break
    except AgentError as exc:
        raise DataError(exc.problem, exc.fix, path=path) from exc
    finally:
        if progress is not None:
            progress.finish()
    if not parts:
        raise DataError("holds no images, audio or tensors", "give a folder of .jpg/.png/.wav/.npy files", path=path)
    return np.concatenate(parts)


def _folder_digest(path: Path) -> str:
    """A digest of a folder's files (names and bytes, in sorted order), for the bundle's lineage."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode() + b"\0")
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()
