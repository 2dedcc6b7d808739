"""Publication data for the load clients: padding, or a realistic JSON document."""

from __future__ import annotations

import random
import time
from typing import Any

import orjson

__all__ = ["PAYLOADS", "json_document", "publication_data"]

#: Publication payloads: ``pad`` is a run of "x" (cheap, but compresses
#: unrealistically well); ``json`` is a realistic JSON document (see
#: :func:`json_document`), for measuring compression.
PAYLOADS = ("pad", "json")
_rng = random.Random(7)
_TEAMS = ("red", "blue", "green", "gold")
_STATUS = ("alive", "alive", "alive", "respawning", "spectating")


def json_document(size: int, t: float) -> dict[str, Any]:
    """A game leaderboard update of about ``size`` bytes of JSON: rows of the same
    keys with varied names and numbers, as dashboards and games push them."""
    doc: dict[str, Any] = {"t": t, "type": "leaderboard", "match": f"m-{_rng.randrange(10000):04d}",
                           "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "entries": []}
    entries = doc["entries"]
    n = len(orjson.dumps(doc))
    while n < size:
        entry = {"rank": len(entries) + 1, "player": f"player_{_rng.randrange(10000):04d}",
                 "team": _rng.choice(_TEAMS), "score": _rng.randrange(100000),
                 "kills": _rng.randrange(41), "deaths": _rng.randrange(41), "status": _rng.choice(_STATUS)}
        entries.append(entry)
        n += len(orjson.dumps(entry)) + 1
    return doc


def publication_data(size: int, payload: str = "pad") -> dict[str, Any]:
    """``{"t": <monotonic now>, ...}`` of about ``size`` bytes of JSON: padded with
    "x" (``pad``), or a realistic document (``json``)."""
    t = time.monotonic()
    if payload == "json":
        return json_document(size, t)
    bare = len(orjson.dumps({"t": t, "pad": ""}))
    return {"t": t, "pad": "x" * max(0, size - bare)}
