"""Reading an HTTP/1.1 request body: ``Content-Length`` or ``Transfer-Encoding: chunked``.

Shared by the agent's server and the collector's (edgekit imports device_agent, never the other
way round). The size limit is enforced while reading: a chunked body is refused with 413 as soon
as the running total would pass it, before the chunk that would pass it is read.

Errors are raised as :class:`BodyError` carrying the HTTP status; after one the rest of the body
is unread, so the caller must close the connection (``BodyError.close`` is always true).
"""

from __future__ import annotations

from typing import BinaryIO
from email.message import Message

MAX_LINE = 4096  # one chunk-size line (with its extensions) or one trailer field
MAX_TRAILER_BYTES = 64 << 10
_HEX = frozenset(b"0123456789abcdefABCDEF")
_LENGTH_FIX = "send a Content-Length header or Transfer-Encoding: chunked"


class BodyError(Exception):
    """A request body that cannot be read; ``status`` is the HTTP status to answer with."""

    close = True

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def read_body(headers: Message, rfile: BinaryIO, limit: int) -> bytes:
    """The body of the request whose ``headers`` were just read from ``rfile``; at most ``limit`` bytes."""
    codings = [c.strip().lower() for value in headers.get_all("Transfer-Encoding") or () for c in value.split(",") if c.strip()]
    lengths = headers.get_all("Content-Length") or []
    if codings:
        if lengths:
            raise BodyError(400, "the request has both Content-Length and Transfer-Encoding; send only one")
        if codings != ["chunked"]:
            raise BodyError(501, f"Transfer-Encoding {', '.join(codings)!r} is not supported; send the body with Transfer-Encoding: chunked or a Content-Length")
        return read_chunked(rfile, limit)
    if not lengths:
        raise BodyError(411, f"the request has no Content-Length; {_LENGTH_FIX}")
    values = {v.strip() for value in lengths for v in value.split(",")}
    if len(values) != 1 or not next(iter(values)).isdigit() or not next(iter(values)).isascii():
        raise BodyError(400, f"Content-Length {', '.join(lengths)!r} is not one number of bytes")
    length = int(next(iter(values)))
    if length > limit:
        raise BodyError(413, f"the body of {length} bytes is over the {limit}-byte limit")
    data = rfile.read(length) if length else b""
    if len(data) < length:
        raise BodyError(400, f"the body ended after {len(data)} of its {length} bytes")
    return data


def read_chunked(rfile: BinaryIO, limit: int) -> bytes:
    """A chunked body (RFC 9112 section 7.1): sizes in hex, extensions ignored, trailers read and dropped."""
    parts: list[bytes] = []
    total = 0
    while True:
        line = _line(rfile, "chunk size")
        size_text = line.split(b";", 1)[0].strip(b" \t\r\n")
        if not size_text or len(size_text) > 16 or not set(size_text) <= _HEX:
            raise BodyError(400, f"malformed chunk size line {line[:40]!r}")
        size = int(size_text, 16)
        if size == 0:
            break
        if total + size > limit:
            raise BodyError(413, f"the chunked body is over the {limit}-byte limit")
        data = rfile.read(size)
        if len(data) < size:
            raise BodyError(400, f"a chunk ended after {len(data)} of its {size} bytes")
        if _line(rfile, "chunk end") not in (b"\r\n", b"\n"):
            raise BodyError(400, f"a chunk of {size} bytes is not followed by CRLF")
        parts.append(data)
        total += size
    trailer_bytes = 0
    while True:  # trailer fields, then the empty line that ends the body
        line = _line(rfile, "trailer")
        if line in (b"\r\n", b"\n"):
            return b"".join(parts)
        trailer_bytes += len(line)
        if trailer_bytes > MAX_TRAILER_BYTES:
            raise BodyError(400, f"the trailer fields are over {MAX_TRAILER_BYTES} bytes")
        if b":" not in line:
            raise BodyError(400, f"malformed trailer field {line[:40]!r}")


def _line(rfile: BinaryIO, what: str) -> bytes:
    line = rfile.readline(MAX_LINE + 1)
    if not line:
        raise BodyError(400, f"the chunked body ended early (expected a {what} line)")
    if len(line) > MAX_LINE or not line.endswith(b"\n"):
        raise BodyError(400, f"a {what} line is over {MAX_LINE} bytes or unterminated")
    return line
