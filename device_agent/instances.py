"""A v1 request's ``instances`` read straight into an array, without a Python float for every value.

``json.loads`` turns a 15 MB request of numbers into millions of Python floats and lists (about 32
bytes a value, then numpy's copy), which took the agent from 100 MB to over 800 MB. The common request,
``{"instances": [[1.5, 2, ...], ...]}`` with nothing but numbers in the rows, is read here in slices of
``CHUNK_ROWS`` rows: each slice through ``json.loads`` (so every number means exactly what it meant
before, float64 first, then the model's dtype) into its place in one preallocated array. The Python
objects of one slice are all that is alive at a time.

Anything else (objects keyed by name, nulls, strings, columnar ``inputs``, ragged rows, other keys
before ``instances``) returns None and goes the ordinary way, which also says what is wrong with it.
"""

from __future__ import annotations

import json
import re

import numpy as np

CHUNK_ROWS = 2048
# the body's start up to the rows: the instances key first, as json.dumps({"instances": ...}) writes it
_HEAD = re.compile(rb'\A\s*\{\s*"instances"\s*:\s*\[\s*\[')
_NUMBERS_ONLY = re.compile(rb"[^0-9eE+\-.,\[\]\s]")


class TooManyRows(Exception):
    """The request has more rows than allowed; raised before anything is allocated."""

    def __init__(self, rows: int) -> None:
        super().__init__(rows)
        self.rows = rows


def numeric_instances(body: bytes, dtype: np.dtype, max_rows: int) -> np.ndarray | None:
    """The rows of a ``{"instances": [[numbers], ...]}`` body as a ``[rows, width]`` array of ``dtype``, or
    None when the body is not of that plain shape (the caller parses it the ordinary way)."""
    head = _HEAD.match(body)
    if head is None:
        return None
    start = head.end() - 1  # at the first row's "["
    end = body.find(b"]]", start)  # the last row's "]" and the list's: rows hold no brackets
    if end == -1 or not _tail_closes(body, end + 2):
        return None
    segment = memoryview(body)[start : end + 1]
    if _NUMBERS_ONLY.search(segment) is not None or body.count(b"[", start, end + 1) != body.count(
        b"]", start, end + 1
    ):
        return None
    rows = body.count(b"]", start, end + 1)
    if rows > max_rows:
        raise TooManyRows(rows)
    return _parse_rows(body, start, end + 1, rows, np.dtype(dtype))


def _tail_closes(body: bytes, position: int) -> bool:
    """Only ``}`` (and whitespace) after the instances: no other key that the ordinary path would read."""
    return body[position:].strip() == b"}"


def _parse_rows(body: bytes, start: int, stop: int, rows: int, dtype: np.dtype) -> np.ndarray | None:
    out: np.ndarray | None = None
    done, position = 0, start
    while done < rows:
        take = min(CHUNK_ROWS, rows - done)
        cut = position
        for _ in range(take):
            cut = body.find(b"]", cut) + 1
        try:
            part = json.loads(b"[" + body[position:cut].strip().lstrip(b",") + b"]")
            chunk = np.asarray(part, dtype=np.float64)
        except (ValueError, RecursionError):  # ragged or nested rows: the ordinary path says which
            return None
        if chunk.ndim != 2 or len(chunk) != take:
            return None
        if out is None:
            out = np.empty((rows, chunk.shape[1]), dtype=dtype)
        elif chunk.shape[1] != out.shape[1]:
            return None
        out[done : done + take] = chunk
        done, position = done + take, cut
    return out
