"""Emulated traffic: feed an agent rows from a data file at a steady rate, with drift injected on cue.

Enabled by an ``[emulate]`` table in agent.toml (``edgekit emulate`` writes it)::

    [emulate]
    data = "test.npz"            # .npz or .csv with the model's features
    rows_per_second = 100
    drift_feature = "pixel_2_4"  # optional: shift this feature ...
    drift_shift = 8.0            # ... by this much ...
    drift_after = 500            # ... from this row on
    feedback = 0.25              # optional: this share of the rows gets its true label back (POST /v1/feedback)
    seed = 0

A tensor model (an image, audio or sensor model) is fed the examples of ``data``: an .npz of tensors
or a folder of images, WAV or .npy files read through its preprocessing; its only drift is
``drift_feature = "brightness"``, which scales every element by ``1 + drift_shift`` (for a model fed
pixels / 255, a camera whose exposure went up by that share).

The feeder calls ``Agent.predict`` like any app embedding the agent would, so an emulated device
exercises the real serving, monitoring and reporting paths; with ``feedback``, it also sends the data
file's labels (``y`` of an .npz) for that share of the rows through ``Agent.feedback``, as an app that
learns the truth later would: the delayed labels a window's accuracy and the field samples carry.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError
from .tabular import TableError, read_table

log = logging.getLogger("device_agent.emulation")
CHUNK_SECONDS = 0.05


@dataclass(frozen=True)
class EmulationConfig:
    data: Path
    rows_per_second: float = 100.0
    drift_feature: str | None = None
    drift_shift: float = 0.0
    drift_after: int = 0
    feedback: float = 0.0
    seed: int = 0

    @classmethod
    def from_table(cls, table: dict[str, Any], *, base: Path, source: str) -> EmulationConfig:
        if "data" not in table:
            raise ConfigError(source, "[emulate] needs data", 'add data = "test.npz"')
        data = Path(table["data"]).expanduser()
        try:
            config = cls(
                data=data if data.is_absolute() else base / data,
                rows_per_second=float(table.get("rows_per_second", 100)),
                drift_feature=table.get("drift_feature"),
                drift_shift=float(table.get("drift_shift", 0.0)),
                drift_after=int(table.get("drift_after", 0)),
                feedback=float(table.get("feedback", 0.0)),
                seed=int(table.get("seed", 0)),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(source, f"[emulate] has a value of the wrong type ({exc})") from exc
        if config.rows_per_second <= 0:
            raise ConfigError(source, "[emulate] rows_per_second must be positive")
        if not 0 <= config.feedback <= 1:
            raise ConfigError(source, f"[emulate] feedback {config.feedback} is outside 0..1", "e.g. feedback = 0.25")
        return config


class Feeder:
    def __init__(self, agent: Any, config: EmulationConfig) -> None:
        self.agent, self.config = agent, config
        self.sent = 0
        self.labels: np.ndarray | None = None  # the data file's y, when feedback is asked for and it has one
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgekit-feeder", daemon=True)
        schema = agent.schema
        if schema.tensor is not None:
            self.rows, self.kinds, self.drift_column = _tensor_examples(schema, config), ("numeric",), None
            if config.drift_feature is not None:
                self.drift_column = 0  # the brightness of the whole example
            return
        try:
            X, y, names = read_table(config.data, columns=schema.columns)
        except (TableError, OSError) as exc:
            raise ConfigError(config.data, f"cannot be read as emulation data ({exc})") from exc
        if names is not None and set(names) == set(schema.feature_names):
            X = X[:, [names.index(n) for n in schema.feature_names]]
        if X.shape[1] != schema.width:
            raise ConfigError(
                config.data,
                f"has {X.shape[1]} columns, the model takes {schema.width}",
                "emulate with data for this model's features",
            )
        self.rows = X if schema.columns is not None else np.ascontiguousarray(X, dtype=np.float32)
        if config.feedback > 0 and y is not None and len(y) == len(X):
            self.labels = y
        self.kinds = schema.kinds
        self.drift_column = None
        if config.drift_feature is not None:
            if config.drift_feature not in schema.feature_names:
                raise ConfigError(
                    config.data,
                    f"drift feature {config.drift_feature!r} is not one of the model's features",
                    f"use one of {', '.join(schema.feature_names[:5])}, …",
                )
            self.drift_column = schema.feature_names.index(config.drift_feature)

    def _drift(self, batch: np.ndarray, shifted: np.ndarray, rng: np.random.Generator) -> None:
        """Shift a numeric column by ``drift_shift``; in a categorical column, give that share of the
        rows (``drift_shift`` between 0 and 1) a category the model never saw, "unseen"."""
        column, shift = self.drift_column, self.config.drift_shift
        if batch.ndim > 2:  # a tensor: brighter
            batch[shifted] *= 1.0 + shift
        elif self.kinds[column] == "categorical":
            batch[shifted & (rng.random(len(batch)) < shift), column] = "unseen"
        elif batch.dtype == object:
            batch[shifted, column] = batch[shifted, column].astype(np.float64) + shift
        else:
            batch[shifted, column] += shift

    def start(self) -> Feeder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        rng = np.random.default_rng(self.config.seed)
        labelling = np.random.default_rng([self.config.seed, 1])  # its own stream: the drift's stays as it was
        order = rng.permutation(len(self.rows))
        position, started = 0, time.monotonic()
        while not self._stop.is_set():
            due = int((time.monotonic() - started) * self.config.rows_per_second) - self.sent
            if due <= 0:
                self._stop.wait(CHUNK_SECONDS)
                continue
            index = order[(position + np.arange(due)) % len(order)]
            position = (position + due) % len(order)
            batch = self.rows[index].copy()
            if self.drift_column is not None:
                self._drift(batch, self.sent + np.arange(due) >= self.config.drift_after, rng)
            try:
                result = self.agent.predict(batch)
                if self.labels is not None:
                    self._feedback(result.ids, self.labels[index], labelling)
            except Exception:  # refused rows, a failing model or a bug: logged, and the traffic keeps flowing
                log.exception("emulated request failed")
            self.sent += due

    def _feedback(self, ids: list[str], labels: np.ndarray, rng: np.random.Generator) -> None:
        """The true labels of a ``feedback`` share of the rows just answered (drift moves the inputs, not the
        truth: a shifted digit is still that digit)."""
        for row_id, label in zip(ids, labels.tolist(), strict=True):
            if rng.random() < self.config.feedback:
                self.agent.feedback(row_id, label)


MAX_EMULATED_EXAMPLES = 2000


def _tensor_examples(schema: Any, config: EmulationConfig) -> np.ndarray:
    """Up to ``MAX_EMULATED_EXAMPLES`` examples of a tensor model from ``config.data``, as float32
    (brightness drift multiplies them)."""
    from .errors import AgentError
    from .tensor_files import read_items

    if config.drift_feature not in (None, "brightness"):
        raise ConfigError(
            config.data,
            f"drift feature {config.drift_feature!r} does not apply to a tensor model",
            'use drift_feature = "brightness"',
        )
    parts, total = [], 0
    try:
        for _, batch in read_items(config.data, schema.preprocessor(), schema.tensor):
            parts.append(batch)
            total += len(batch)
            if total >= MAX_EMULATED_EXAMPLES:
                break
    except (AgentError, OSError) as exc:
        raise ConfigError(config.data, f"cannot be read as emulation data ({exc})") from exc
    if not parts:
        raise ConfigError(config.data, "holds no examples", "give a folder of images or an .npz of tensors")
    examples = np.concatenate(parts)[:MAX_EMULATED_EXAMPLES]
    return examples.astype(np.float32) if config.drift_feature else examples
