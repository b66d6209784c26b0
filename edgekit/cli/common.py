"""What every command shares: the error funnel, output modes, the progress bar."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from device_agent.errors import AgentError
from edgekit.errors import EdgekitError

EXIT_THRESHOLD = 1
EXIT_ERROR = 2


class CommandError(click.ClickException):
    exit_code = EXIT_ERROR


class EdgekitGroup(click.Group):
    """Turns the library's errors into one line on stderr and exit code 2 (unless --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (EdgekitError, AgentError) as exc:
            if (ctx.obj or {}).get("debug"):
                raise
            raise CommandError(str(exc)) from exc


def json_option(function):
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table.")(
        function
    )


def emit_json(document: Any) -> None:
    click.echo(json.dumps(document, indent=2, default=_jsonable))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def exit_with(code: int) -> None:
    if code:
        sys.exit(code)


class BarProgress:
    """click's progress bar on stderr, drawn only when stdout is a terminal and output is not JSON."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stdout.isatty()
        self._bar = None

    def start(self, total: int, label: str) -> None:
        self.finish()
        if self.enabled:
            self._bar = click.progressbar(length=total, label=label, file=sys.stderr)
            self._bar.__enter__()

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


def fmt(value: Any, spec: str = ".4f", none: str = "-") -> str:
    return none if value is None else format(value, spec)
