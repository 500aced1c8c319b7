"""The store's realism record: ``<store>/realism.json``, written after a sweep (``ldam-sweep realism``).

One JSON document, replaced whole and atomically (temp file + rename locally, one PUT on an object
store), so a reader sees the old record or the new one. It says for which committed units it was
measured (per layer: the count and the newest commit time), so readers can tell a record that a
later commit made stale. Layout (``ldam_sweep/realism.py`` computes it, docs/scores.md explains it):

    {"format": "ldam-sweep-realism-v1", "measured_at": ISO time, "generation": the store's,
     "settings": {...}, "pooled": {...} or null,
     "layers": {layer: {"c2st": .., "c2st_exemplars": .., "hf_ratio": .., "hf_ratio_exemplars": ..,
                        "samples": n, "units": n, "newest_commit": ISO time,
                        "detected": {unit: fraction of its samples the classifier called generated}}}}
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from ldam_sweep.store.location import StoreLocation

REALISM_FILE = "realism.json"
FORMAT = "ldam-sweep-realism-v1"
# A unit is flagged "low realism" when the layer's two-sample classifier calls every one of its samples
# generated (held out). A pointer, not a verdict: at a layer accuracy p about p^chains of the units are
# flagged by chance (0.75 and 8 chains: 10%; a layer the classifier always sees through: all of them).
LOW_REALISM = 1.0


def read_realism(loc: StoreLocation) -> dict[str, Any] | None:
    """The store's realism record, or None when none was measured (or it cannot be read)."""
    path = loc.join(REALISM_FILE)
    fs = loc.fs
    try:
        if not fs.exists(path):
            return None
        doc = json.loads(fs.cat_file(path))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == FORMAT else None


def write_realism(loc: StoreLocation, doc: dict[str, Any]) -> str:
    """Replace the record atomically; returns its path."""
    doc = {"format": FORMAT, **doc}
    data = json.dumps(doc, indent=1, sort_keys=True, allow_nan=False).encode()
    path = loc.join(REALISM_FILE)
    if loc.is_local:
        tmp = loc.join(f".{REALISM_FILE}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic within one directory
        finally:
            if os.path.exists(tmp):  # a failed write (a full disk) leaves nothing behind
                os.remove(tmp)
    else:
        loc.fs.pipe_file(path, data)  # one PUT: the object appears whole or not at all
    return path


def unit_flags(doc: dict[str, Any] | None, layer: str) -> dict[int, float]:
    """{unit: detected fraction} of one layer, empty without a record."""
    if not doc:
        return {}
    entry = (doc.get("layers") or {}).get(layer) or {}
    return {int(u): float(v) for u, v in (entry.get("detected") or {}).items() if v is not None}
