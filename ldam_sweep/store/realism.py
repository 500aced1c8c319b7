"""The store's realism record: the attributes of the group ``<store>/realism`` (``realism.json`` in
stores of layout 1), written after a sweep (``ldam-sweep realism``).

One JSON document, replaced whole and atomically (temp file + rename locally, one PUT on an object
store), so a reader sees the old record or the new one, and sealed (``sha256``: of its own JSON). It says for which committed units it was
measured (per layer: the count and the newest commit time), so readers can tell a record that a
later commit made stale. Layout (``ldam_sweep/realism.py`` computes it, docs/scores.md explains it):

    {"format": "ldam-sweep-realism-v1", "measured_at": ISO time, "generation": the store's,
     "settings": {...}, "pooled": {...} or null,
     "layers": {layer: {"c2st": .., "c2st_exemplars": .., "hf_ratio": .., "hf_ratio_exemplars": ..,
                        "samples": n, "units": n, "newest_commit": ISO time,
                        "detected": {unit: fraction of its samples the classifier called generated}}}}
"""

from __future__ import annotations

from typing import Any

from ldam_sweep.store.integrity import read_sidecar, seal, seal_state, write_sidecar
from ldam_sweep.store.location import StoreLocation

REALISM_RECORD = "realism"  # the sidecar record's name (integrity.sidecar_path)
FORMAT = "ldam-sweep-realism-v1"
# A unit is flagged "low realism" when the layer's two-sample classifier calls every one of its samples
# generated (held out). A pointer, not a verdict: at a layer accuracy p about p^chains of the units are
# flagged by chance (0.75 and 8 chains: 10%; a layer the classifier always sees through: all of them).
LOW_REALISM = 1.0


def read_realism(loc: StoreLocation) -> dict[str, Any] | None:
    """The store's realism record, or None when none was measured (or it is damaged: ``realism_state``)."""
    state, doc = realism_state(loc)
    return doc if state == "ok" else None


def realism_state(loc: StoreLocation) -> tuple[str, dict[str, Any] | None]:
    """("absent" | "ok" | "corrupt", the record): a record is sealed (it carries the sha256 of its
    own JSON); one written before seals existed (layout 1: ``realism.json``) reads as "ok" when it parses."""
    try:
        state, doc, path = read_sidecar(loc, REALISM_RECORD)
    except OSError:
        return "corrupt", None
    if state == "missing":
        return "absent", None
    # every record of a layout-2 store (a group's zarr.json) was written sealed: one without its seal
    # had the seal's key name damaged, and must not read as an unsealed record of the old layout
    sealed = seal_state(doc) if isinstance(doc, dict) else "broken"
    if (state != "ok" or sealed == "broken" or doc.get("format") != FORMAT
            or (sealed == "none" and path.endswith("/zarr.json"))):
        return "corrupt", None
    return "ok", {k: v for k, v in doc.items() if k != "sha256"}


def write_realism(loc: StoreLocation, doc: dict[str, Any]) -> str:
    """Replace the record atomically; returns its path."""
    return loc.join(write_sidecar(loc, REALISM_RECORD, seal({"format": FORMAT, **doc})))


def unit_flags(doc: dict[str, Any] | None, layer: str) -> dict[int, float]:
    """{unit: detected fraction} of one layer, empty without a record."""
    if not doc:
        return {}
    entry = (doc.get("layers") or {}).get(layer) or {}
    return {int(u): float(v) for u, v in (entry.get("detected") or {}).items() if v is not None}
