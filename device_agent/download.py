"""Fetching a bundle over HTTP(S) so that an interrupted download resumes instead of starting over.

Bytes go to ``<name>.part`` next to the destination. Each attempt asks for ``Range: bytes=<have>-``;
a 206 answer is appended, a 200 answer (a server without ranges) starts the file again. Only when
the file has exactly ``size`` bytes and hashes to ``sha256`` is it renamed into place, so a
half-fetched or corrupted file is never mistaken for a bundle. The standard library's urllib is
enough: no extra dependency on the device.

A collector with tokens wants one on bundle downloads (``token``: ``Authorization: Bearer``): its device token
(or, on older setups, its API token).
The header is never carried across a redirect, and a 401 or 403 is not retried: it fails at once as
``UpdateError("auth")``, since asking again without the right token cannot succeed.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import DownloadError, UpdateError

CHUNK = 64 * 1024


@dataclass(frozen=True)
class Downloaded:
    path: Path
    fetched: int  # bytes that crossed the network in this call, over all attempts
    resumed_from: int  # bytes already on disk when the first attempt started


def download(
    url: str,
    destination: Path,
    *,
    sha256: str,
    size: int,
    attempts: int = 5,
    timeout: float = 30.0,
    headers: dict[str, str] | None = None,
    token: str | None = None,
    cancelled: Callable[[], bool] = lambda: False,
    backoff: float = 0.5,
) -> Downloaded:
    """Fetch ``url`` into ``destination`` and check it; raise ``DownloadError`` or ``UpdateError("hash")``."""
    destination = Path(destination)
    if destination.exists() and destination.stat().st_size == size and _sha256_of(destination) == sha256:
        return Downloaded(destination, 0, size)
    part = destination.with_name(destination.name + ".part")
    destination.parent.mkdir(parents=True, exist_ok=True)
    resumed_from = part.stat().st_size if part.exists() else 0
    fetched, last_error = 0, "no attempt made"
    for attempt in range(attempts):
        if cancelled():
            raise UpdateError("aborted", "the download was cancelled")
        have = part.stat().st_size if part.exists() else 0
        if have > size:  # not the file we were fetching: start over
            part.unlink()
            have = 0
        if have < size:
            try:
                fetched += _fetch(url, part, have, timeout, headers or {}, token, cancelled)
            except DownloadError as exc:
                last_error = exc.problem
                time.sleep(min(backoff * 2**attempt, 10.0))
                continue
        if part.stat().st_size != size:
            last_error = f"got {part.stat().st_size} bytes, expected {size}"
            continue
        digest = _sha256_of(part)
        if digest != sha256:
            part.unlink()
            raise UpdateError(
                "hash",
                f"{url}: the download has sha256 {digest[:12]}…, "
                f"the rollout says {sha256[:12]}… (corrupted or tampered)",
            )
        os.replace(part, destination)
        return Downloaded(destination, fetched, resumed_from)
    raise DownloadError(url, f"failed after {attempts} attempts: {last_error}")


def _fetch(
    url: str,
    part: Path,
    have: int,
    timeout: float,
    headers: dict[str, str],
    token: str | None,
    cancelled: Callable[[], bool],
) -> int:
    request = urllib.request.Request(url, headers={**headers, **({"Range": f"bytes={have}-"} if have else {})})
    if token:  # unredirected: a redirect to another host must not take the collector's token along
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - the URL comes from the fleet's desired state
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416:  # we hold at least the whole file: let the size check decide
            return 0
        if exc.code in (401, 403):
            raise UpdateError(
                "auth", f"{url}: HTTP {exc.code}: the collector wants its device token; set [update] token_file"
            ) from exc
        raise DownloadError(url, f"HTTP {exc.code} {exc.reason}") from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise DownloadError(url, f"cannot connect ({getattr(exc, 'reason', exc)})") from exc
    written = 0
    with response:
        mode = "ab" if have and response.status == 206 else "wb"
        try:
            with open(part, mode) as handle:
                while True:
                    if cancelled():
                        raise UpdateError("aborted", "the download was cancelled")
                    chunk = response.read(CHUNK)
                    if not chunk:
                        break
                    handle.write(chunk)
                    written += len(chunk)
                handle.flush()
                os.fsync(handle.fileno())
        except (OSError, http.client.HTTPException) as exc:  # a connection cut mid-body: what arrived is kept
            raise DownloadError(url, f"the connection broke after {written} bytes ({exc})") from exc
    return written


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
