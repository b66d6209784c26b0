"""Reading one table of a TOML config strictly: each value must already be of the kind its setting takes.

Apart from ``config`` (which knows agent.toml's tables and settings) so that the rules for a value, its
bounds and the one-line message that refuses it live in one place.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError

# what a required path or name looks like, for the message that asks for one
EXAMPLES = {"device_id": "pi-kitchen-01", "state_dir": "/var/lib/edgekit", "public_key": "/etc/edgekit/edgekit.pub"}


def shown(value: Any) -> str:
    """A value as the user wrote it in TOML (true, not True; a table as a table)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "a table"
    return repr(value)


class Reader:
    """One table of agent.toml, read strictly: each value must already be of the kind its setting takes.

    Never ``bool(...)``, ``int(...)`` or ``str(...)`` on what the user wrote: ``bool("false")`` is True,
    ``int(True)`` is 1, ``int(2.5)`` is 2 and ``str(17)`` turns a number into a device id, each a device
    running on something its owner did not write. Each is a ConfigError naming the key and how to write it."""

    def __init__(self, values: dict[str, Any], table: str, source: str) -> None:
        self.values, self.table, self.source = values, table, source
        self.where = f"[{table}] " if table else ""

    def refuse(self, key: str, problem: str, fix: str) -> ConfigError:
        return ConfigError(self.source, f"{self.where}{key} = {shown(self.values[key])} {problem}", fix)

    def text(self, key: str, default: str | None = None, *, required: bool = False) -> Any:
        if key not in self.values:
            if required:
                place = f"under [{self.table}]" if self.table else "above the first [table] header"
                raise ConfigError(self.source, f"missing {self.where}{key}", f'add {key} = "..." {place}')
            return default
        value = self.values[key]
        if isinstance(value, str) and (value or not required):
            return value
        if required and value == "":  # "" would resolve to the config's own directory
            raise self.refuse(key, "is empty", f'give it, e.g. {key} = "{EXAMPLES.get(key, "...")}"')
        example = value if isinstance(value, (int, float)) and not isinstance(value, bool) else "..."
        raise self.refuse(key, "is not a string", f'write it in quotes: {key} = "{example}"')

    def flag(self, key: str, default: bool) -> bool:
        value = self.values.get(key, default)
        if isinstance(value, bool):
            return value
        raise self.refuse(key, "is not true or false", f"write {key} = true or {key} = false, without quotes")

    def number(
        self,
        key: str,
        default: float,
        *,
        whole: bool = False,
        least: float | None = None,
        above: float | None = None,
        most: float | None = None,
        unit: str = "",
        hint: str = "",
    ) -> Any:
        """``key`` as a finite number (an int when ``whole``) within the bounds given; ``default`` when absent."""
        value = self.values.get(key, default)
        example = f"e.g. {key} = {shown(default)}" + (f" ({hint})" if hint else "")
        kind = "a whole number" if whole else "a number"
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not numeric or (whole and not float(value).is_integer()):
            fix = (
                f"write it without quotes: {key} = {value}" if isinstance(value, str) and _is_number(value) else example
            )
            raise self.refuse(key, f"is not {kind}", fix)
        if not (
            math.isfinite(value)
            and (least is None or value >= least)
            and (above is None or value > above)
            and (most is None or value <= most)
        ):
            bounds = _bounds_text(least, above, most) + (f" ({unit})" if unit else "")
            raise self.refuse(key, f"is out of range: {key} must be {bounds}", example)
        return int(value) if whole else float(value)


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _bounds_text(least: float | None, above: float | None, most: float | None) -> str:
    low = "positive" if above == 0 else f"above {above:g}" if above is not None else None
    low = low or (None if least is None else f"{least:g} or more")
    if most is None:
        return low or "finite"
    if least is not None:
        return f"from {least:g} to {most:g}"
    return f"{low} and at most {most:g}" if low else f"at most {most:g}"
