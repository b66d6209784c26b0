"""``agent.toml``: the agent's one configuration file (read with the standard library's tomllib).

::

    device_id = "pi-kitchen-01"
    fleet = "default"
    state_dir = "/var/lib/edgekit"
    [mqtt]
    url = "mqtt://127.0.0.1:1883"      # mqtts:// for TLS; username, password or password_file; "" turns MQTT off
    # state_seconds = 300              # the retained state (and its last_seq) again this often, if windows closed
    [server]
    listen = "127.0.0.1:8470"          # token_file = "/etc/edgekit/token" for a bearer token; "" turns HTTP off
    # tls_cert = "cert.pem"            # with tls_key = "key.pem": HTTPS
    # header_timeout = 10              # seconds for a request's head; body_timeout = 60 for its body
    # idle_timeout = 30                # a keep-alive connection between requests
    # max_connections = 100            # past it the longest-idle connection is closed
    # max_body_bytes = 16777216        # 413 past it; max_header_bytes = 65536 (431); max_rows = 100000 a request (413)
    # threads = 4                      # requests served at once
    [monitor]
    window_rows = 1000                 # at least the bundle's drift min_rows (default 100), or no window is tested
    window_seconds = 60
    log_rows = 10000                   # :feedback finds any of the last log_rows predictions of this run
    backlog_rows = 100000              # rows waiting to be sketched at most; the excess is served,
                                       # counted as unmonitored
    max_cpu_fraction = 0.1             # sketching takes at most this share of the inference time; past it
                                       # a deterministic sample of rows is sketched (0: every row)
    # keep_acked_seconds = 3600        # acknowledged summaries kept for the collector's resend requests;
                                       # above the collectors' session expiry (120 s) plus a few gap retries
    [trust]
    public_key = "/etc/edgekit/edgekit.pub"
    [update]                           # bundle downloads and field-sample uploads, when the collector has tokens:
    # token_file = "/etc/edgekit/collector.token"   # its device token; or token = "...", or EDGEKIT_COLLECTOR_TOKEN
    # collector = "http://10.0.0.5:8480"   # the token goes only there (default: the MQTT broker's host)
    [capture]                          # field samples for `edgekit fleet samples` (off unless enabled)
    # enabled = true
    # rate = 0.01                      # share of every window's rows kept (by a hash of the row id)
    # drifted_rows = 200               # rows kept at least from each drifted window
    # max_mb = 50                      # on disk at most; the oldest segments are dropped first

Relative paths are relative to the file. Secrets come from files or the environment
(``EDGEKIT_MQTT_PASSWORD``, ``EDGEKIT_API_TOKEN``, ``EDGEKIT_COLLECTOR_TOKEN``), never from the TOML itself
if avoidable. A key this file does not know, or a value of the wrong kind (``"false"`` for false, a port past
65535), is refused in one line naming the key, its table and the fix (the closest known key, for a typo).
"""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .config_reader import Reader, shown
from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class MqttConfig:
    url: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    keepalive: int = 30
    streaming: bool = False  # score rows published to .../input, answer on .../output
    # The retained state (with last_seq) is published again this often when windows closed since the
    # last one, so a collector learns of windows lost at the end of a run (docs/protocol.md).
    state_seconds: float = 300.0

    @property
    def host(self) -> str:
        return urlparse(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parsed = urlparse(self.url)
        return parsed.port or (8883 if parsed.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return urlparse(self.url).scheme == "mqtts"


@dataclass(frozen=True)
class HttpLimits:
    """What one HTTP server allows its clients: the agent's API and the collector's dashboard alike.

    The defaults suit a Raspberry Pi on a LAN: a slow or hostile client costs a socket for at most
    ``header_timeout`` seconds, never a thread, and no request can take more than ``max_body_bytes``."""

    header_timeout: float = (
        10.0  # seconds from a request's first byte (a new connection's accept) to the end of its head
    )
    body_timeout: float = 60.0  # seconds from the end of the head to the end of the body
    idle_timeout: float = 30.0  # a keep-alive connection between requests is closed after this
    max_connections: int = 100  # beyond it, the connection idle for longest is closed (503 if all are busy)
    max_body_bytes: int = 16 << 20  # 413 past it, while the body is still arriving
    max_header_bytes: int = 64 << 10  # request line and headers; 431 past it
    threads: int = 4  # requests run at once; one more thread does all the socket I/O

    def __post_init__(self) -> None:
        for name, kind in _LIMIT_KINDS.items():
            _limit_value(name, getattr(self, name), kind)

    def with_values(self, values: dict[str, Any]) -> HttpLimits:
        """These limits with some replaced (numbers or their text); ValueError names the limit and what it takes."""
        unknown = sorted(set(values) - set(_LIMIT_KINDS))
        if unknown:
            raise ValueError(f"unknown HTTP limit {unknown[0]!r}; the limits are {', '.join(_LIMIT_KINDS)}")
        return replace(self, **{name: _limit_value(name, value, _LIMIT_KINDS[name]) for name, value in values.items()})


def _limit_value(name: str, value: Any, kind: type) -> float | int:
    """``value`` as a positive finite ``kind``; booleans, fractions of a count and ``inf`` are refused."""
    what = "a positive number of seconds" if kind is float else "a positive whole number"
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if not math.isfinite(number) or number <= 0 or (kind is int and not number.is_integer()):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {what}, not {value!r}") from None
    return kind(number)


_LIMIT_KINDS = {
    "header_timeout": float,
    "body_timeout": float,
    "idle_timeout": float,
    "max_connections": int,
    "max_body_bytes": int,
    "max_header_bytes": int,
    "threads": int,
}


@dataclass(frozen=True)
class ServerConfig:
    listen: str | None = "127.0.0.1:8470"
    token: str | None = field(default=None, repr=False)
    tls_cert: Path | None = None  # with tls_key: serve HTTPS
    tls_key: Path | None = None
    max_rows: int = 100_000  # rows in one predict request; 413 past it
    limits: HttpLimits = HttpLimits()

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = (self.listen or "").rpartition(":")
        return host or "127.0.0.1", int(port)


@dataclass(frozen=True)
class MonitorConfig:
    window_rows: int = 1000
    window_seconds: float = 60.0
    log_rows: int = 10000  # prediction log ring size
    keep_acked_seconds: float = 3600.0  # acknowledged summaries kept for resend requests
    backlog_rows: int = (
        100_000  # rows queued for sketching at most (memory stays bounded); the excess is counted as unmonitored
    )
    max_cpu_fraction: float = 0.1  # sketching's most time as a share of inference time; past it rows are sampled


@dataclass(frozen=True)
class UpdateConfig:
    """``[update]``: the collector's token for bundle downloads and field-sample uploads (its device token,
    ``fleet collect --device-token-file``; or, for a collector without one, its API token), and where it may go.

    The bundle URL comes from the ``desired`` message, which whoever can publish to the device's topic can
    write, so the token goes only to the collector: URLs under ``collector`` when it is set, else URLs on
    the MQTT broker's host (where ``edgekit fleet collect`` usually runs, and what emulated devices use)."""

    token: str | None = field(default=None, repr=False)
    collector: str | None = None  # e.g. "http://10.0.0.5:8480", the collector's --public-url

    def token_for(self, url: str, broker_host: str | None) -> str | None:
        """The token to send with a download from ``url``, or None when it must not go there."""
        return self.token if self.token and self.trusts(url, broker_host) else None

    def trusts(self, url: str, broker_host: str | None) -> bool:
        """Whether ``url`` is on the collector this device knows: ``[update] collector`` if set, else the
        MQTT broker's host. Tokens and field samples go nowhere else, whatever a message names."""
        target = urlparse(url)
        if self.collector:
            base = urlparse(self.collector)
            same = (target.scheme, target.hostname, _port(target)) == (base.scheme, base.hostname, _port(base))
            return same and target.path.startswith(base.path.rstrip("/") + "/")
        return bool(broker_host) and target.hostname == broker_host

    def refusal_fix(self, url: str, *, sent: bool) -> str:
        """What to change when the collector refused a download from ``url`` for want of its token."""
        if sent:
            return "the collector refused [update] token: set it to the collector's device token (--device-token-file)"
        if self.token:
            return (
                f"the token was not sent, as {urlparse(url).hostname} is not the collector the device knows: set "
                f'[update] collector = "{urlparse(url).scheme}://{urlparse(url).netloc}" in agent.toml'
            )
        return "set [update] token_file (or token, or EDGEKIT_COLLECTOR_TOKEN) in agent.toml to the collector's token"


def _port(parsed) -> int | None:
    return parsed.port or {"http": 80, "https": 443}.get(parsed.scheme)


@dataclass(frozen=True)
class CaptureConfig:
    """``[capture]``: raw input rows kept on the device for ``edgekit fleet samples`` (``capture.py``).

    Off by default: field rows are the fleet owner's data, kept and uploaded only when asked for."""

    enabled: bool = False
    rate: float = 0.01  # share of every window's rows kept, chosen by a hash of the row id
    drifted_rows: int = 200  # rows kept at least from a window judged drifted
    max_mb: float = 50.0  # the store's size on disk at most; the oldest segments go first


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    state_dir: Path
    public_key: Path
    fleet: str = "default"
    threads: int = 1
    mqtt: MqttConfig = MqttConfig()
    server: ServerConfig = ServerConfig()
    monitor: MonitorConfig = MonitorConfig()
    update: UpdateConfig = UpdateConfig()
    capture: CaptureConfig = CaptureConfig()
    emulate: Any = None  # an emulation.EmulationConfig when the [emulate] table is present
    source: str = "<config>"


def load_config(path: str | Path) -> AgentConfig:
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            path, "no such file", "write an agent.toml (see 'edge-agent --help') or pass --config"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, f"cannot be read ({exc})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, f"is not valid TOML ({exc})", "fix the syntax") from exc
    return parse_config(doc, base=path.parent, source=str(path))


# Every setting agent.toml may hold, by table ("" is the top level). A key not here is refused with the
# closest known one: a typo would otherwise leave its setting at the default without a word.
_MQTT_KEYS = ("url", "username", "password", "password_file", "keepalive", "streaming", "state_seconds")
_MONITOR_KEYS = tuple(f.name for f in fields(MonitorConfig))  # each a number, read by _monitor_config
_UPDATE_KEYS = ("token", "token_file", "collector")
_CAPTURE_KEYS = tuple(f.name for f in fields(CaptureConfig))
_SERVER_KEYS = ("listen", "token", "token_file", "tls_cert", "tls_key", "max_rows", *_LIMIT_KINDS)
_EMULATE_KEYS = ("data", "rows_per_second", "drift_feature", "drift_shift", "drift_after", "feedback", "seed")
_TABLE_KEYS = {
    "trust": ("public_key",),
    "mqtt": _MQTT_KEYS,
    "server": _SERVER_KEYS,
    "monitor": _MONITOR_KEYS,
    "update": _UPDATE_KEYS,
    "capture": _CAPTURE_KEYS,
    "emulate": _EMULATE_KEYS,
}
_TOP_KEYS = ("device_id", "fleet", "state_dir", "threads")


def parse_config(doc: dict[str, Any], *, base: Path = Path("."), source: str = "<config>") -> AgentConfig:
    def resolve(value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (base / p)

    _check_layout(doc, source)  # unknown or misplaced keys first: they explain a "missing" key below
    top = Reader(doc, "", source)
    device_id, fleet = top.text("device_id", required=True), top.text("fleet", "default")
    for label, value in (("device_id", device_id), ("fleet", fleet)):
        if not ID_PATTERN.match(value):
            raise ConfigError(
                source,
                f"{label} {value!r} is not allowed",
                "use letters, digits, '.', '_' or '-' (it becomes an MQTT topic level)",
            )
    state_dir = top.text("state_dir", required=True)
    public_key = Reader(doc.get("trust", {}), "trust", source).text("public_key", required=True)
    try:
        mqtt_config = _mqtt_config(doc.get("mqtt", {}), source, resolve)
        server_config = _server_config(doc.get("server", {}), source, resolve)
        monitor_config = _monitor_config(doc.get("monitor", {}), source)
        update_config = _update_config(doc.get("update", {}), source, resolve)
        capture_config = _capture_config(doc.get("capture", {}), source)
    except (TypeError, ValueError) as exc:  # a check above missed it: still one line, never a traceback
        raise ConfigError(
            source,
            f"a value is invalid ({exc})",
            "check numbers are numbers, ports are 0-65535 and listen is host:port",
        ) from exc
    emulate = None
    if "emulate" in doc:
        from .emulation import EmulationConfig

        _check_emulate(doc["emulate"], source)
        emulate = EmulationConfig.from_table(doc["emulate"], base=base, source=source)
    return AgentConfig(
        emulate=emulate,
        device_id=device_id,
        fleet=fleet,
        state_dir=resolve(state_dir),
        public_key=resolve(public_key),
        threads=top.number("threads", 1, whole=True, least=0, hint="runtime intra-op threads; 0: its default"),
        mqtt=mqtt_config,
        server=server_config,
        monitor=monitor_config,
        update=update_config,
        capture=capture_config,
        source=source,
    )


def _check_layout(doc: dict[str, Any], source: str) -> None:
    """Every table a table, every key one this file knows, in the table it belongs to."""
    for key, value in doc.items():
        if key in _TABLE_KEYS:
            if not isinstance(value, dict):
                raise ConfigError(
                    source,
                    f"{key} = {shown(value)} is not a table",
                    f"write a [{key}] header with its settings on the lines below it",
                )
            for inner in value:
                if inner not in _TABLE_KEYS[key]:
                    raise ConfigError(source, f"[{key}] has no setting {inner!r}", _fix_for_unknown(inner, key))
        elif key not in _TOP_KEYS:
            if isinstance(value, dict):
                close = difflib.get_close_matches(key, list(_TABLE_KEYS), n=1)
                fix = f"did you mean [{close[0]}]?" if close else "remove it"
                raise ConfigError(source, f"has no table [{key}]", f"{fix} (the tables are {', '.join(_TABLE_KEYS)})")
            raise ConfigError(source, f"has no top-level setting {key!r}", _fix_for_unknown(key, ""))


def _fix_for_unknown(key: str, table: str) -> str:
    """What to do about ``key`` found in ``table`` ("" the top level): move it where it belongs, or the
    known key it is closest to (a typo), or remove it."""
    if table and key in _TOP_KEYS:
        return (
            f"{key} is a top-level setting: move it above the first [table] header "
            "(a key belongs to the table whose header it follows)"
        )
    homes = [name for name, keys in _TABLE_KEYS.items() if key in keys and name != table]
    if homes:
        return f"{key} belongs in [{homes[0]}]: move it under that header"
    known = _TABLE_KEYS[table] if table else _TOP_KEYS
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f"did you mean {close[0]}?"
    return f"remove it; the settings {f'of [{table}]' if table else 'at the top'} are {', '.join(known)}"


def _mqtt_config(mqtt: dict[str, Any], source: str, resolve) -> MqttConfig:
    read = Reader(mqtt, "mqtt", source)
    config = MqttConfig(
        url=read.text("url"),
        username=read.text("username"),
        password=_secret(read, "password", "EDGEKIT_MQTT_PASSWORD", resolve),
        keepalive=read.number("keepalive", 30, whole=True, least=0, most=65535, unit="seconds"),
        streaming=read.flag("streaming", False),
        state_seconds=read.number("state_seconds", 300, above=0, unit="seconds"),
    )
    if config.url:
        _check_broker_url(config.url, source)
    return config


def _monitor_config(monitor: dict[str, Any], source: str) -> MonitorConfig:
    """The [monitor] table."""
    read = Reader(monitor, "monitor", source)
    return MonitorConfig(
        window_rows=read.number(
            "window_rows", 1000, whole=True, least=1, hint="at least the bundle's drift min_rows, default 100"
        ),
        window_seconds=read.number("window_seconds", 60, above=0, unit="seconds"),
        log_rows=read.number("log_rows", 10000, whole=True, least=1),
        keep_acked_seconds=read.number(
            "keep_acked_seconds",
            3600,
            least=0,
            unit="seconds",
            hint="keep it above the collectors' session expiry plus a few gap retries",
        ),
        backlog_rows=read.number("backlog_rows", 100_000, whole=True, least=1),
        max_cpu_fraction=read.number(
            "max_cpu_fraction",
            0.1,
            least=0,
            most=10,
            unit="a share of the inference time",
            hint="0 sketches every row",
        ),
    )


def _update_config(update: dict[str, Any], source: str, resolve) -> UpdateConfig:
    """The [update] table; the token also comes from EDGEKIT_COLLECTOR_TOKEN, as the collector's does."""
    read = Reader(update, "update", source)
    collector = read.text("collector")
    if collector is not None and (
        urlparse(collector).scheme not in ("http", "https") or not urlparse(collector).hostname
    ):
        raise ConfigError(
            source, f"[update] collector {collector!r} is not an http(s) URL", 'e.g. collector = "http://10.0.0.5:8480"'
        )
    return UpdateConfig(token=_secret(read, "token", "EDGEKIT_COLLECTOR_TOKEN", resolve) or None, collector=collector)


def _capture_config(capture: dict[str, Any], source: str) -> CaptureConfig:
    """The [capture] table."""
    read, defaults = Reader(capture, "capture", source), CaptureConfig()
    return CaptureConfig(
        enabled=read.flag("enabled", defaults.enabled),
        rate=read.number("rate", defaults.rate, least=0, most=1, unit="a share of each window's rows"),
        drifted_rows=read.number("drifted_rows", defaults.drifted_rows, whole=True, least=0),
        max_mb=read.number("max_mb", defaults.max_mb, above=0, unit="megabytes on disk"),
    )


def _server_config(server: dict[str, Any], source: str, resolve) -> ServerConfig:
    """The [server] table."""
    read = Reader(server, "server", source)
    try:
        for key in (*_LIMIT_KINDS, "max_rows"):  # numbers, not their text (that form is --http-limit's)
            if isinstance(server.get(key), str):
                what = "a positive number of seconds" if _LIMIT_KINDS.get(key) is float else "a positive whole number"
                raise ValueError(f"{key} must be {what}, not {shown(server[key])}")
        limits = HttpLimits().with_values({key: server[key] for key in _LIMIT_KINDS if key in server})
        max_rows = _limit_value("max_rows", server.get("max_rows", ServerConfig.max_rows), int)
    except ValueError as exc:
        raise ConfigError(source, f"[server] {exc}", "e.g. header_timeout = 10, max_connections = 100") from None
    cert, key = read.text("tls_cert"), read.text("tls_key")
    if bool(cert) != bool(key):
        raise ConfigError(
            source,
            "[server] has tls_cert or tls_key but not both",
            "give both PEM files to serve HTTPS, or neither for HTTP",
        )
    return ServerConfig(
        listen=_listen(read),
        token=_secret(read, "token", "EDGEKIT_API_TOKEN", resolve),
        tls_cert=resolve(cert) if cert else None,
        tls_key=resolve(key) if key else None,
        max_rows=max_rows,
        limits=limits,
    )


def address_port(address: str) -> int | None:
    """The port of ``host:port`` (or of a bare port, which binds 127.0.0.1), if it is one from 0 to 65535."""
    _host, _, port = address.rpartition(":")
    return int(port) if port.isascii() and port.isdigit() and int(port) <= 65535 else None


def _listen(read: Reader) -> str | None:
    """``[server] listen`` as host:port with a port from 0 to 65535 (0: any free one); "" turns HTTP off."""
    listen = read.text("listen", ServerConfig.listen)
    if not listen:
        return None
    if address_port(listen) is None:
        raise read.refuse(
            "listen",
            "is not host:port with a port from 0 to 65535",
            'e.g. listen = "127.0.0.1:8470" (port 0: any free port), or listen = "" to turn HTTP off',
        )
    return listen


def _secret(read: Reader, key: str, env: str, resolve) -> str | None:
    """A secret from ``env``, else the file ``<key>_file`` names, else ``key`` itself."""
    if env in os.environ:
        return os.environ[env]
    file_key = f"{key}_file"
    if key in read.values and file_key in read.values:
        raise ConfigError(
            read.source, f"{read.where}has both {key} and {file_key}", f"keep one ({file_key} keeps it out of the file)"
        )
    name = read.text(file_key)
    if name is None:
        return read.text(key)
    path = resolve(name)
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        problem, fix = "does not exist", f"create it holding the {key}, fix the path, or set {env} instead"
    except IsADirectoryError:
        problem, fix = "is a directory", f"name the file holding the {key}, or set {env} instead"
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        problem, fix = f"cannot be read ({reason})", f"let the agent's user read it (chmod, chown), or set {env}"
    raise ConfigError(read.source, f"{read.where}{file_key} {str(path)!r} {problem}", fix)


def _check_emulate(table: dict[str, Any], source: str) -> None:
    """The kinds of [emulate]'s values (emulation.EmulationConfig checks its ranges): no ``float("1e3")``
    or ``int(True)`` on what the user wrote."""
    read = Reader(table, "emulate", source)
    read.text("data")
    read.text("drift_feature")
    read.number("rows_per_second", 100)
    read.number("drift_shift", 0.0)
    read.number("feedback", 0.0)
    read.number("drift_after", 0, whole=True, least=0, hint="the row from which the feature is shifted")
    read.number("seed", 0, whole=True, least=0)


def _check_broker_url(url: str, source: str) -> None:
    from .errors import ProtocolError
    from .protocol import parse_broker_url

    try:
        parse_broker_url(url)
    except ProtocolError as exc:
        problem, _, fix = str(exc).partition("; ")
        raise ConfigError(source, f"[mqtt] url: {problem}", fix) from None
