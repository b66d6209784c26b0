"""edgekit's exception tree. Catch ``EdgekitError`` to catch them all.

::

    EdgekitError
    ├── MissingDependencyError   an optional part is not installed (the message has the pip line)
    ├── DataError                a data file that cannot be read, or does not fit the model
    ├── ModelLoadError           a model file that is missing, corrupt, or not a model
    ├── ConversionError          a model skl2onnx or onnx cannot convert or check
    ├── QuantizationError        onnxruntime.quantization failed
    │   └── NotQuantizableError  nothing in the graph can be quantized (tree ensembles, linear ML ops)
    ├── SigningKeyError          a signing key that cannot be read or written
    ├── PackageError             bundle inputs that do not make a valid bundle
    ├── OutputError              an output path that cannot be written
    ├── FlashError               a device that cannot be flashed (local/flash.py: unreachable, a step failed)
    ├── StoreError               a fleet database that cannot be opened or migrated (fleet/store/)
    │   ├── StoreUnavailable     the database is unreachable, busy or full: retry the batch later
    │   └── StoreDataError       the database refuses one record (a constraint, a value out of range)
    └── RolloutError             a rollout that cannot start or change (fleet/rollouts.py)
        ├── RolloutNotFound      no rollout with that id
        └── RolloutConflict      another rollout is in progress, or the rollout is not in a state that allows it

Errors from the device side's shared formats (``device_agent.errors.AgentError``: bundle, profile,
schema) pass through unchanged; the CLI reports both trees the same way.
Each message reads "<what is wrong>; <what to do>"; the facts are kept as attributes.
"""

from __future__ import annotations


class EdgekitError(Exception):
    """Root of every error edgekit raises on purpose."""

    def __init__(self, problem: str, fix: str = "", *, path: object = None) -> None:
        self.problem = problem
        self.fix = fix
        self.path = None if path is None else str(path)
        message = f"{self.path}: {problem}" if self.path else problem
        if fix:
            message += f"; {fix}"
        super().__init__(message)


class MissingDependencyError(EdgekitError):
    def __init__(self, module: str, extra: str) -> None:
        self.module = module
        self.extra = extra
        super().__init__(f"{module} is not installed", f"pip install 'edgekit-ml[{extra}]'")


class DataError(EdgekitError):
    pass


class ModelLoadError(EdgekitError):
    pass


class ConversionError(EdgekitError):
    pass


class QuantizationError(EdgekitError):
    pass


class NotQuantizableError(QuantizationError):
    def __init__(self, problem: str, fix: str = "", *, path: object = None, operators: tuple[str, ...] = ()) -> None:
        self.operators = operators
        super().__init__(problem, fix, path=path)


class SigningKeyError(EdgekitError):
    pass


class PackageError(EdgekitError):
    pass


class OutputError(EdgekitError):
    pass


def require(module: str, extra: str = "host"):
    """Import an optional dependency, or raise ``MissingDependencyError`` with the install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(module.split(".")[0], extra) from exc


class RolloutError(EdgekitError):
    http_status = 400


class RolloutNotFound(RolloutError):
    http_status = 404


class RolloutConflict(RolloutError):
    http_status = 409


class FlashError(EdgekitError):
    pass


class StoreError(EdgekitError):
    pass


class StoreUnavailable(StoreError):
    """Transient: the connection was lost or the database is busy; nothing was committed."""


class StoreDataError(StoreError):
    """Permanent for this record: storing it again will fail again."""
