"""Canonical JSON: the exact bytes a signature covers and a hash is taken of.

Keys sorted, no whitespace, UTF-8, and no NaN or infinity (JSON has none, and a signature over
a value some parsers reject would be a trap).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
