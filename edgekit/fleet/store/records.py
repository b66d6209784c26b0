"""What the store keeps of a summary, whatever the database: the record a batch carries and the alert facts.

Imports: nothing of edgekit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

try:  # the collector writes a summary's facts, and an alert pass reads thousands of them, a second: orjson (the
    # host extra's) takes 4-10 µs of the standard library's 10-17 µs a facts document
    from orjson import dumps as _orjson_dumps
    from orjson import loads as _loads_facts

    def _dumps_facts(facts: dict[str, Any]) -> str:
        return _orjson_dumps(facts).decode()

except ImportError:  # a plain install
    _loads_facts = json.loads

    def _dumps_facts(facts: dict[str, Any]) -> str:
        return json.dumps(facts)


@dataclass(frozen=True, slots=True)
class SummaryRecord:
    """What the store keeps of one checked summary: the raw payload and the columns queries use.

    The ingestor turns each parsed summary into one of these at once, so a batch in flight holds a
    few small objects per summary instead of the thousand-odd dicts and lists of the parsed JSON
    (keeping those alive made the cyclic garbage collector, not SQLite, the ingest bottleneck)."""

    device: str
    seq: int
    fleet: str
    model: str
    model_version: int
    window_start: str
    window_end: str
    rows: int
    drifted: bool | None
    worst_feature: str | None
    baseline_id: str
    labelled: int
    facts: str  # JSON of alert_facts
    payload: str
    seq_base: int | None = None  # where the device's install began numbering (None: an agent that does not say)

    @classmethod
    def of(cls, doc: dict[str, Any], payload: str, estimate: dict[str, Any] | None = None) -> SummaryRecord:
        """From a summary that passed ``check_summary``; ``estimate`` is the window's label-free performance
        estimate (``edgekit.fleet.estimate``), kept among its alert facts."""
        drift, accuracy = doc["drift"], doc.get("accuracy") or {}
        return cls(
            doc["device"],
            doc["seq"],
            doc["fleet"],
            doc["model"]["name"],
            doc["model"]["version"],
            doc["window"]["start"],
            doc["window"]["end"],
            doc["rows"],
            drift.get("drifted"),
            drift.get("worst_feature"),
            doc["profile"]["baseline_id"],
            accuracy.get("labelled", 0),
            _dumps_facts({**alert_facts(doc), **(estimate or {})}),
            payload,
            doc.get("seq_base"),
        )


def alert_facts(doc: dict[str, Any]) -> dict[str, Any]:
    """The few fields of a summary that alert rules read, small enough to load by the thousand."""
    drift, accuracy = doc["drift"], doc.get("accuracy") or {}
    return {
        "seq": doc["seq"],
        "window": doc["window"],
        "rows": doc["rows"],
        "model": doc["model"],
        "tested": drift.get("drifted") is not None,
        "drifted": {name: v.get("psi") for name, v in drift["features"].items() if v.get("drifted")},
        "prediction_drifted": bool((drift.get("prediction") or {}).get("drifted")),
        "predictions": doc.get("predictions"),
        "null_rate": doc["quality"].get("null_rate") or 0.0,
        "unseen_rate": doc["quality"].get("unseen_rate") or 0.0,
        "unseen_columns": _unseen_columns(doc),
        "p99_ms": doc["latency"].get("p99_ms"),
        "errors": doc["errors"],
        "accuracy": accuracy.get("accuracy"),
    }


def _read_facts(text: str) -> dict[str, Any]:
    """Stored facts, with what a row older than the rule reading it lacks filled in: ``edgekit.summary/1``
    knew no unseen categories, so its rows count as 0 (read so, not rewritten by a migration)."""
    return {"unseen_rate": 0.0, "unseen_columns": {}, **_loads_facts(text)}


def _unseen_columns(doc: dict[str, Any]) -> dict[str, float]:
    """Per categorical column with any, the share of the window's rows holding a value the baseline never
    saw: the third count of its compact sketch (``[counts, nulls, unseen]``, ``edgekit.summary/2``), named
    by ``drift.features``, which the device lists in the same (schema) order. ``check_summary`` checks
    neither the sketches' shape nor that the two agree, so anything else yields nothing rather than
    failing the batch."""
    names, sketches, rows = list(doc["drift"]["features"]), doc["profile"]["features"], doc["profile"]["rows"]
    if len(names) != len(sketches) or rows <= 0:
        return {}
    found = {}
    # one cheap pass picks the few categorical sketches (a numeric one is longer): the collector does this
    # for every summary, and a loop doing all checks on each of 64 features had cost 46 µs of its ~300
    for i in [i for i, sketch in enumerate(sketches) if type(sketch) is list and len(sketch) == 3]:
        unseen = sketches[i][2]
        if type(unseen) is int and unseen > 0:
            found[names[i]] = round(unseen / rows, 4)
    return found


def _flag(value: Any) -> int | None:
    return None if value is None else int(bool(value))


def selection_clauses(
    alias: str, since_column: str, *, device: Any, model: Any, version: Any, fleet: Any, since: Any
) -> tuple[list[str], list[Any]]:
    """The WHERE clauses and parameters of a selection of windows (``None`` selects all), on table ``alias``:
    the one reading of ``fleet drift``'s options that raw summaries and history buckets share."""
    clauses, params = [], []
    for column, value in (("device", device), ("model", model), ("model_version", version), ("fleet", fleet)):
        if value is not None:
            clauses.append(f"{alias}.{column} = ?")
            params.append(value)
    if since is not None:
        clauses.append(f"{alias}.{since_column} >= ?")
        params.append(since)
    return clauses, params
