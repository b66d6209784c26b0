"""The device side's exception tree. Catch ``AgentError`` to catch them all.

::

    AgentError
    ├── BundleError                 a bundle that cannot be trusted or read
    │   ├── BundleFormatError       not a bundle, truncated, missing or unexpected members, bad paths
    │   ├── BundleIntegrityError    a member whose sha256 differs from the manifest's
    │   └── SignatureError          no signature, a bad signature, or signed by another key
    ├── KeyFileError                a public or private key file that cannot be read
    ├── ProfileError                a profile that is malformed or merged with one of another baseline
    ├── InputError                  rows that do not fit the model's input schema (wrong width, NaN, strings)
    ├── SchemaError                 an input schema or output spec that cannot be served (dtype, names, task)
    ├── RuntimeUnavailableError     the runtime a model needs is not installed
    ├── ModelError                  the runtime refused the model, or failed while running it
    ├── ConfigError                 an agent.toml that is missing, malformed or incomplete
    ├── ServeError                  the HTTP server cannot start (port taken, certificate unreadable, waitress missing)
    ├── ProtocolError               an MQTT payload that is malformed, oversized or of an unknown schema
    ├── InstallError                a bundle that may not be installed (older version, no model installed)
    └── UpdateError                 an over-the-air update that failed a step; ``code`` says which
        └── DownloadError           the bundle could not be fetched (network, HTTP status, size)

Every message names the problem and what to do; the facts it is built from are kept as
attributes so callers can act on them without parsing text.
"""

from __future__ import annotations


class AgentError(Exception):
    """Root of every error the device side raises on purpose.

    A subclass that knows what is wrong, what to do and where calls ``_say``: the one place the
    message "<where>: <problem>; <fix>" is built."""

    def _say(self, problem: str, fix: str = "", where: object = None) -> None:
        self.problem, self.fix = problem, fix
        Exception.__init__(self, (f"{where}: " if where is not None else "") + problem + (f"; {fix}" if fix else ""))


class BundleError(AgentError):
    def __init__(self, path: object, problem: str, fix: str = "") -> None:
        self.path = str(path)
        self._say(problem, fix, self.path)


class BundleFormatError(BundleError):
    pass


class BundleIntegrityError(BundleError):
    def __init__(self, path: object, member: str, expected: str, actual: str) -> None:
        self.member = member
        self.expected = expected
        self.actual = actual
        super().__init__(
            path,
            f"member {member!r} has sha256 {actual[:12]}…, the manifest says {expected[:12]}… (tampered or corrupted)",
            "rebuild the bundle with 'edgekit package' or download it again",
        )


class SignatureError(BundleError):
    pass


class KeyFileError(AgentError):
    def __init__(self, path: object, problem: str, fix: str = "") -> None:
        self.path = str(path)
        self._say(problem, fix, self.path)


class ProfileError(AgentError):
    pass


class InputError(AgentError):
    """Rows that do not fit the model. ``row`` and ``column`` locate the first offender when known."""

    def __init__(self, problem: str, fix: str = "", *, row: int | None = None, column: str | None = None) -> None:
        self.row = row
        self.column = column
        self._say(problem, fix)


class SchemaError(AgentError):
    def __init__(self, problem: str, fix: str = "") -> None:
        self._say(problem, fix)


class RuntimeUnavailableError(AgentError):
    pass


class ModelError(AgentError):
    """The runtime could not load or run a model; ``runtime`` names which one, ``source`` which model."""

    def __init__(self, source: object, runtime: str, problem: str, fix: str = "") -> None:
        self.source = str(source)
        self.runtime = runtime
        self._say(f"{runtime} {problem}", fix, self.source)


class ConfigError(AgentError):
    def __init__(self, path: object, problem: str, fix: str = "") -> None:
        self.path = str(path)
        self._say(problem, fix, self.path)


class ServeError(AgentError):
    def __init__(self, problem: str, fix: str = "") -> None:
        self._say(problem, fix)


class InstallError(AgentError):
    pass


class StateDirBusy(AgentError):
    """Another agent process runs on this state dir: two would write one spool, log and slot pointer."""

    def __init__(self, path: object, holder: str) -> None:
        self._say(
            f"another agent ({holder}) is running on this state dir",
            "stop it first, or give this agent a state_dir of its own",
            path,
        )


class ProtocolError(AgentError):
    def __init__(self, reason: str, problem: str) -> None:
        self.reason = reason  # a short machine-readable cause: "json", "schema", "size", "field"
        super().__init__(problem)


class UpdateError(AgentError):
    """An OTA update step failed. ``code`` is the short cause the device reports and the controller
    counts: download, hash, signature, downgrade, name, load, selftest, shadow, health, aborted, restart."""

    def __init__(self, code: str, problem: str, *, facts: dict | None = None) -> None:
        self.code = code
        self.problem = problem
        self.facts = dict(
            facts or {}
        )  # what was measured before the step failed (shadow metrics, download), for the report
        super().__init__(problem)


class DownloadError(UpdateError):
    def __init__(self, url: str, problem: str) -> None:
        self.url = url
        super().__init__("download", f"{url}: {problem}")
