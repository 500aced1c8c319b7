"""Checksums of everything a store depends on besides its blocks (whose checksums the manifest
holds), and rebuilding what can be rebuilt.

- **JSON records** (the root's attributes, the discriminator's record, the realism and verify
  records: ``realism/zarr.json``, ``verify/zarr.json``; layout 1: ``realism.json``, ``verify.json``) are *sealed*: they carry the sha256 of their own canonical JSON, so a changed
  value is found even where the JSON still parses.
- **Metadata**: the root's attributes record the sha256 of every group's and array's
  ``zarr.json`` and (layout 2) of the coordinates' chunks (``metadata_sha256``) as written at creation. Those files follow from the plan
  the root records, so ``layout.expected_metadata`` rebuilds them byte for byte.
- **The root** itself has a verbatim copy (``root-copy/zarr.json``; ``root-copy.json`` in stores
  of layout 1), written after it: the one file that cannot be rebuilt from anything else is kept
  twice, and each copy checks itself.

**Layouts.** Since layout 2 (root attribute ``layout``) every entry at a store's top level is a Zarr
node, so zarr-python and xarray list a store without a warning: the sidecar records are groups of
their own (``root-copy/``, ``realism/``, ``verify/``: the record is the group's attributes; the root's
copy is the root's ``zarr.json`` verbatim) and the manifest is a group whose parts lie in
``manifest/parts/``. Stores of layout 1 (made before) keep ``<name>.json`` files and ``manifest/``
parts, and every reader reads both (``sidecar_path``, ``manifest.parts_dir``). The lease stays a
file at the top (``lease.json``): it exists only while a driver runs, and drivers of every version
must find it in one place.
- **The frozen models' records** (the discriminator's, ``discriminator/``; walk's score prior's, ``prior/``)
  name the sha256 of their bytes and of their array's metadata.
- **Manifest parts** carry the sha256 of their bytes in their name (``manifest.py``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import zarr

from ldam_sweep.store.location import StoreLocation

ROOT_COPY = "root-copy"  # the sidecar record holding the root's zarr.json verbatim
LAYOUT_KEY = "layout"  # root attribute: the store's layout (absent: 1)
LAYOUT = 2  # what create_store writes now
SEAL_KEY = "sha256"  # in a sealed record: the sha256 of the record's canonical JSON without this key
ATTRS_SEAL = "attrs_sha256"  # the root's attributes' seal (a name no older root attribute uses)
METADATA_KEY = "metadata_sha256"  # root attribute: {path of a zarr.json below the root: sha256 of its bytes}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical(doc: Any) -> bytes:
    """One byte string per JSON value: sorted keys, no spaces (what a seal hashes)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def seal(doc: dict[str, Any], key: str = SEAL_KEY) -> dict[str, Any]:
    """``doc`` (as JSON reads it back) with its seal under ``key``."""
    body = json.loads(canonical({k: v for k, v in doc.items() if k != key}))
    return {**body, key: sha256(canonical(body))}


def seal_state(doc: Any, key: str = SEAL_KEY) -> str:
    """"ok" (the seal matches), "none" (a record written before seals existed) or "broken"."""
    if not isinstance(doc, dict):
        return "broken"
    if key not in doc:
        return "none"
    return "ok" if doc[key] == sha256(canonical({k: v for k, v in doc.items() if k != key})) else "broken"


def read_bytes(loc: StoreLocation, path: str) -> bytes | None:
    """A store file's bytes (``path`` relative to the store), None when it does not exist."""
    try:
        return loc.fs.cat_file(loc.join(path))
    except FileNotFoundError:
        return None


def parse_json(data: bytes | None) -> tuple[str, Any]:
    """("missing", None) for no file, ("broken", None) for bytes that are not JSON, else ("ok", the value)."""
    if data is None:
        return "missing", None
    try:
        return "ok", json.loads(data)
    except ValueError:
        return "broken", None


def write_root(loc: StoreLocation, attrs: dict[str, Any]) -> None:
    """Replace the root's attributes (sealed) and then its copy, each whole: a reader sees the old
    root or the new one, and a crash between the two leaves one good copy that repair restores."""
    meta = json.loads(loc.fs.cat_file(loc.join("zarr.json")))
    meta["attributes"] = seal(attrs, ATTRS_SEAL)
    data = json.dumps(meta, indent=2).encode()
    loc.write_atomic(loc.join("zarr.json"), data)
    loc.write_atomic(loc.join(sidecar_path(loc, ROOT_COPY, attrs_layout(attrs))), data)


# -- sidecar records: groups of their own (layout 2), or <name>.json files (layout 1) ---------------

def attrs_layout(attrs: dict[str, Any]) -> int:
    """The layout a store's root attributes name (1 when they name none: stores made before layouts)."""
    return int(attrs.get(LAYOUT_KEY, 1))


def store_layout(loc: StoreLocation) -> int:
    """The store's layout: its root's ``layout`` attribute (1 when absent); with a root that cannot be
    read, 2 when the root's copy is a group of its own."""
    state, meta = parse_json(read_bytes(loc, "zarr.json"))
    if state == "ok" and isinstance(meta, dict) and isinstance(meta.get("attributes"), dict):
        return attrs_layout(meta["attributes"])
    return LAYOUT if read_bytes(loc, f"{ROOT_COPY}/zarr.json") is not None else 1


def sidecar_path(loc: StoreLocation, name: str, layout: int | None = None) -> str:
    """Where the sidecar record ``name`` (``root-copy``, ``realism``, ``verify``) lives, relative to the store."""
    layout = store_layout(loc) if layout is None else layout
    return f"{name}/zarr.json" if layout >= 2 else f"{name}.json"


def group_document(attributes: dict[str, Any]) -> dict[str, Any]:
    """A Zarr v3 group's ``zarr.json`` holding ``attributes``."""
    return {"attributes": attributes, "zarr_format": 3, "consolidated_metadata": None, "node_type": "group"}


def read_sidecar(loc: StoreLocation, name: str) -> tuple[str, Any, str]:
    """(state: "missing" | "broken" | "ok", the record's document, its path). A layout-2 record is
    its group's attributes."""
    path = sidecar_path(loc, name)
    state, doc = parse_json(read_bytes(loc, path))
    if state == "ok" and path.endswith("/zarr.json"):
        doc = doc.get("attributes") if isinstance(doc, dict) and doc.get("node_type") == "group" else None
        state = "ok" if isinstance(doc, dict) else "broken"
    return state, doc, path


def write_sidecar(loc: StoreLocation, name: str, doc: dict[str, Any], *, indent: int = 1) -> str:
    """Replace the record ``name`` whole and atomically; its path."""
    path = sidecar_path(loc, name)
    body = group_document(doc) if path.endswith("/zarr.json") else doc
    loc.write_atomic(loc.join(path), json.dumps(body, indent=indent, sort_keys=True, allow_nan=False).encode())
    return path


def root_state(data: bytes | None) -> tuple[str, dict[str, Any] | None]:
    """(state, the root metadata document) of a root zarr.json or its copy: "ok", "none" (made
    before seals existed), "missing" or "broken" (not JSON, or its seal does not match)."""
    state, meta = parse_json(data)
    if state != "ok" or not group_shaped(meta):
        return state if state != "ok" else "broken", None
    state = seal_state(meta["attributes"], ATTRS_SEAL)
    return state, meta if state != "broken" else None


def group_shaped(meta: Any) -> bool:
    """A group's zarr.json as zarr 3 writes it, field for field outside its attributes (which a seal covers)."""
    return (isinstance(meta, dict) and set(meta) <= {"attributes", "zarr_format", "node_type", "consolidated_metadata"}
            and isinstance(meta.get("attributes"), dict) and meta.get("zarr_format") == 3
            and meta.get("node_type") == "group" and meta.get("consolidated_metadata") is None)


# -- the frozen models: the discriminator, the score prior ---------------------------------------

DISCRIMINATOR_SEAL = "record_sha256"  # the seal of a frozen model's record (discriminator/ or prior/)
# the groups that keep a frozen model (its file's bytes and its record), and what messages call each
FROZEN = {"discriminator": "discriminator", "prior": "score prior"}


def frozen_state(loc: StoreLocation, name: str, blob: bytes | None = None) -> tuple[str, str]:
    """(state, what is wrong) of the frozen model kept in group ``name`` (one of FROZEN). States:
    "absent"; "ok" (its sealed record names the sha256 of its bytes and of its array's metadata, and
    both match); "legacy" (a record from before those checksums: its bytes are not checked);
    "incomplete" (a group without a record: a stage 1 that stopped before its commit); "corrupt".
    ``blob``: the bytes, when read already."""
    meta_bytes = read_bytes(loc, f"{name}/zarr.json")
    if meta_bytes is None:
        return ("absent", "") if not loc.fs.exists(loc.join(name)) else ("incomplete", "its group has no metadata")
    state, meta = parse_json(meta_bytes)
    if state != "ok":
        return "corrupt", f"its record ({name}/zarr.json) is not valid JSON"
    if not group_shaped(meta):
        return "corrupt", f"its record ({name}/zarr.json) is not a Zarr group's metadata"
    record = meta["attributes"]
    if not record:
        return "incomplete", "it has no record: stage 1 stopped before it finished writing it"
    seal_ok = seal_state(record, DISCRIMINATOR_SEAL)
    if seal_ok == "broken":
        return "corrupt", f"its record ({name}/zarr.json) does not match its checksum"
    if seal_ok == "none" or "file_sha256" not in record:
        # only the discriminator predates the checksums; a score prior's record always has them
        return ("legacy", "") if name == "discriminator" else ("corrupt", f"its record ({name}/zarr.json) has no checksum")
    array_meta = read_bytes(loc, f"{name}/file/zarr.json")
    if array_meta is None or sha256(array_meta) != record["file_meta_sha256"]:
        return "corrupt", f"its array's metadata ({name}/file/zarr.json) is missing or does not match its record"
    if blob is None:
        try:
            blob = bytes(zarr.open_array(loc.zarr_store(read_only=True), path=f"{name}/file", mode="r")[:])
        except Exception as err:
            return "corrupt", f"its bytes cannot be read ({type(err).__name__}: {str(err)[:200]})"
    if len(blob) != record["file_bytes"] or sha256(blob) != record["file_sha256"]:
        return "corrupt", "its bytes do not match the sha256 its record names"
    return "ok", ""


def frozen_record(loc: StoreLocation, name: str) -> dict[str, Any] | None:
    """The record of the frozen model in group ``name``, without its checksums (None when there is none)."""
    data = read_bytes(loc, f"{name}/zarr.json")
    if data is None:
        return None
    try:
        attrs = json.loads(data).get("attributes") or None
    except (ValueError, AttributeError):
        return None
    hidden = (DISCRIMINATOR_SEAL, "file_sha256", "file_bytes", "file_meta_sha256")
    return None if attrs is None else {k: v for k, v in attrs.items() if k not in hidden}


def discriminator_state(loc: StoreLocation, blob: bytes | None = None) -> tuple[str, str]:
    """``frozen_state`` of the discriminator."""
    return frozen_state(loc, "discriminator", blob)


def discriminator_record(loc: StoreLocation) -> dict[str, Any] | None:
    """``frozen_record`` of the discriminator."""
    return frozen_record(loc, "discriminator")


# -- what verify found, for readers ----------------------------------------------------------------

VERIFY_RECORD = "verify"  # the sidecar record of what the last verify found
VERIFY_FORMAT = "ldam-sweep-verify-v1"


def write_verify_record(loc: StoreLocation, doc: dict[str, Any]) -> None:
    write_sidecar(loc, VERIFY_RECORD, seal({"format": VERIFY_FORMAT, **doc}))


def read_verify_record(loc: StoreLocation) -> tuple[str, dict[str, Any] | None]:
    """("absent" | "ok" | "corrupt", the record): what the last ``verify`` found."""
    state, doc, _ = read_sidecar(loc, VERIFY_RECORD)
    if state == "missing":
        return "absent", None
    if state != "ok" or seal_state(doc) != "ok" or doc.get("format") != VERIFY_FORMAT:
        return "corrupt", None
    return "ok", doc
