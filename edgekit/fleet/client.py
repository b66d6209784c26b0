"""Talking to a running collector's HTTP API (what ``edgekit rollout`` does), with urllib only.

Connection failures and the API's JSON errors become ``RolloutError``s whose message is the
collector's own one-line reason.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from edgekit.errors import RolloutError

DEFAULT_COLLECTOR = "http://127.0.0.1:8480"
TOKEN_ENV = "EDGEKIT_COLLECTOR_TOKEN"


class CollectorClient:
    def __init__(self, url: str = DEFAULT_COLLECTOR, *, token: str | None = None, timeout: float = 60.0) -> None:
        self.url, self.timeout = url.rstrip("/"), timeout
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)

    def upload_bundle(self, path: str | Path) -> dict[str, Any]:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise RolloutError(f"cannot read the bundle ({exc.strerror})", "check the path", path=path) from exc
        return self._call("POST", "/api/bundles", data, "application/octet-stream")

    def start(self, bundle: str | Path, **settings: Any) -> dict[str, Any]:
        uploaded = self.upload_bundle(bundle)
        return {**self._post("/api/rollouts", {"sha256": uploaded["sha256"], **settings}), "bundle": uploaded}

    def status(self, rollout_id: str | None = None) -> Any:
        return self._call("GET", f"/api/rollouts/{rollout_id}" if rollout_id else "/api/rollouts")

    def act(self, rollout_id: str, verb: str) -> dict[str, Any]:
        return self._post(f"/api/rollouts/{rollout_id}/{verb}", {})

    def bundles(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/bundles")

    def rollback(self, instruction: dict[str, Any], signature: str, devices: str = "*") -> dict[str, Any]:
        return self._post("/api/rollbacks", {"instruction": instruction, "signature": signature, "devices": devices})

    def request_samples(self, device: str, *, since: str | None = None, drifted_only: bool = False) -> dict[str, Any]:
        """Have the collector ask ``device`` for its field samples (``cmd: upload``); the upload it issued."""
        return self._post("/api/samples/requests", {"device": device, "since": since, "drifted_only": drifted_only})

    def sample_upload(self, upload_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/samples/requests/{quote(upload_id)}")

    def sample_rows(self, device: str, *, upload: str | None = None) -> dict[str, Any]:
        query = f"?{urlencode({'upload': upload})}" if upload else ""
        return self._call("GET", f"/api/samples/{quote(device)}{query}")

    def _post(self, path: str, doc: dict[str, Any]) -> Any:
        return self._call("POST", path, json.dumps(doc).encode(), "application/json")

    def _call(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None) -> Any:
        headers = {"Content-Type": content_type} if content_type else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 - the operator's own collector URL
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error") or exc.reason
            except ValueError:
                message = exc.reason
            finally:
                exc.close()
            raise RolloutError(f"the collector refused: {message}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise RolloutError(
                f"cannot reach the collector at {self.url} ({getattr(exc, 'reason', exc)})",
                "start it with 'edgekit fleet collect --trust KEY.pub' or pass --collector URL",
            ) from exc
        except ValueError as exc:
            raise RolloutError(
                f"the collector at {self.url} answered something that is not JSON",
                "check --collector points at 'edgekit fleet collect'",
            ) from exc
