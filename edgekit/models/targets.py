"""Which ONNX IR and opsets a device runtime can load, and pinning a model to them.

onnx writes the newest IR version it knows (onnx 1.23 writes IR 14) while runtimes load only up to
theirs, so a model straight from ``make_model`` may not load on the device. Every model edgekit
writes is pinned to the lowest of: what the declared minimum device runtime loads, and what the
installed onnxruntime loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgekit.errors import ConversionError

# onnxruntime release -> (max IR version, max ai.onnx opset, max ai.onnx.ml opset).
# From onnxruntime's published compatibility table.
ORT_SUPPORT: dict[tuple[int, int], tuple[int, int, int]] = {
    (1, 14): (8, 18, 3),
    (1, 15): (9, 19, 3),
    (1, 16): (9, 19, 3),
    (1, 17): (9, 20, 4),
    (1, 18): (10, 21, 5),
    (1, 19): (10, 21, 5),
    (1, 20): (10, 22, 5),
    (1, 21): (10, 22, 5),
    (1, 22): (11, 23, 5),
}
DEFAULT_MIN_RUNTIME = "1.16"
DEFAULT_OPSET = 17  # old enough for every runtime in the table, new enough for per-channel QDQ


@dataclass(frozen=True)
class RuntimeTarget:
    """The oldest onnxruntime the model must load on, and the opsets edgekit will write for it."""

    min_runtime: str = DEFAULT_MIN_RUNTIME
    opset: int = DEFAULT_OPSET

    def limits(self) -> tuple[int, int, int]:
        return min(support_for(self.min_runtime), support_for(installed_onnxruntime()))

    @property
    def max_ir(self) -> int:
        return self.limits()[0]

    @property
    def ml_opset(self) -> int:
        return min(3, self.limits()[2])

    def check(self) -> None:
        if self.opset > self.limits()[1]:
            raise ConversionError(
                f"opset {self.opset} is newer than onnxruntime {self.min_runtime} loads (at most {self.limits()[1]})",
                "pass a lower --opset or a newer --min-runtime",
            )

    def to_dict(self, proto: Any) -> dict[str, Any]:
        return {
            "format": "onnx",
            "engine": "onnxruntime",
            "min_runtime_version": self.min_runtime,
            "ir_version": int(proto.ir_version),
            "opsets": {(o.domain or "ai.onnx"): int(o.version) for o in proto.opset_import},
        }


def _version_key(version: str) -> tuple[int, int]:
    try:
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        raise ConversionError(
            f"{version!r} is not an onnxruntime version", "give it as MAJOR.MINOR, e.g. 1.16"
        ) from None


def support_for(version: str) -> tuple[int, int, int]:
    key = _version_key(version)
    known = sorted(ORT_SUPPORT)
    if key < known[0]:
        raise ConversionError(
            f"onnxruntime {version} is older than edgekit supports",
            f"target onnxruntime {known[0][0]}.{known[0][1]} or newer",
        )
    # Releases newer than the table load at least what the newest listed release loads.
    return ORT_SUPPORT[max(k for k in known if k <= key)]


def installed_onnxruntime() -> str:
    try:
        import onnxruntime
    except ImportError:
        return DEFAULT_MIN_RUNTIME
    return onnxruntime.__version__


def required_ir(proto: Any) -> int:
    """The lowest IR version that can carry the model's ai.onnx opset (from onnx's release table)."""
    from onnx.helper import VERSION_TABLE

    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=1)
    return min(row[1] for row in VERSION_TABLE if row[2] >= opset)


def pin(proto: Any, target: RuntimeTarget, *, source: str = "model") -> Any:
    """Lower ``proto.ir_version`` to what ``target`` loads, or raise if the opsets themselves are too new."""
    max_ir, max_opset, max_ml = target.limits()
    for entry in proto.opset_import:
        limit = max_opset if entry.domain in ("", "ai.onnx") else max_ml if entry.domain == "ai.onnx.ml" else None
        if limit is not None and entry.version > limit:
            raise ConversionError(
                f"{source} uses {entry.domain or 'ai.onnx'} opset {entry.version}, "
                f"newer than onnxruntime {target.min_runtime} loads (at most {limit})",
                "re-export the model with a lower opset, or pass a newer --min-runtime",
            )
    needed = required_ir(proto)
    if needed > max_ir:
        raise ConversionError(
            f"{source} needs IR version {needed}, newer than onnxruntime {target.min_runtime} loads",
            "re-export with a lower opset",
        )
    proto.ir_version = max(needed, min(int(proto.ir_version), max_ir))
    return proto
