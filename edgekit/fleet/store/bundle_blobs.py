"""Uploaded bundles' bytes in the database, so that any collector sharing it serves any bundle.

A bundle reaches one collector (``POST /api/bundles``) but devices download it from whichever one
the rollout's leader names, so the bytes live in ``bundle_blobs``, in chunks of ``CHUNK_BYTES`` (no
database wants a 1 GiB value in one row, nor a reader to hold it whole); each collector writes them
to its own bundle directory on the first request (``edgekit.fleet.bundle_files``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

CHUNK_BYTES = 1 << 20


class BundleBlobs:
    """Mixed into a store that has ``atomic()``, ``reading()`` and ``add_bundle`` (``rollout_records.py``)."""

    def store_bundle(self, record: dict[str, Any], data: bytes) -> str | None:
        """The bundle's record and its bytes in one transaction; as ``add_bundle``, the sha256 stored under the
        same name and version when that is other content (then nothing is written), else None."""
        with self.atomic() as db:
            other = self.add_bundle(record)  # joins this transaction
            if other is not None:
                return other
            db.executemany(
                "INSERT INTO bundle_blobs (sha256, n, data) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                [
                    (record["sha256"], n, data[start : start + CHUNK_BYTES])
                    for n, start in enumerate(range(0, len(data), CHUNK_BYTES))
                ],
            )
        return None

    def bundle_chunks(self, sha256: str) -> Iterator[bytes]:
        """The stored bytes of bundle ``sha256``, chunk by chunk, each read on its own (nothing when a bundle
        was uploaded before its bytes were kept in the database)."""
        n = 0
        while True:
            with self.reading() as db:
                row = db.execute("SELECT data FROM bundle_blobs WHERE sha256 = ? AND n = ?", (sha256, n)).fetchone()
            if row is None:
                return
            yield bytes(row[0])
            n += 1
