"""The manifest: one Parquet row per committed unit, hive-partitioned by layer. It is the commit log.

A block counts as done only once its rows are published here (status 'ok' or 'dead'; 'failed'
blocks are retried by the next run). Publishing is atomic: locally a
dot-prefixed temp file renamed into place (readers ignore names starting with '.' or '_'); on an
object store a single PUT of the final key. Readers de-duplicate by (layer, unit), keeping the
newest ``committed_at``, so a block committed twice (Ray ran it twice) is harmless. Part files
written before a column existed (``generation``) read back with nulls in it. Temp files
left by a writer killed mid-publish are removed by a later publish once they are STALE_TMP_SECONDS old.

Integrity: a part's name ends in the sha256 of its bytes (``verify`` checks every byte) and its
data pages carry CRCs that every read checks. A part at the top of the parts' folder (not in a
layer folder) holds rows of several layers, published in one rename (``verify --repair``'s tombstones).

Where: ``manifest/parts/`` in stores of layout 2 (``manifest/`` is then a Zarr group, so the store's
top level lists cleanly), ``manifest/`` itself in stores made before (``parts_dir``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import time
import uuid
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq

from ldam_sweep.errors import StoreError
from ldam_sweep.store.location import StoreLocation, encode_name
from ldam_sweep.store.integrity import store_layout
from ldam_sweep.store.schema import COLUMNS, FILE_SCHEMA, SCHEMA

MANIFEST_DIR = "manifest"
PARTS_DIR = "manifest/parts"  # layout 2


def parts_dir(loc: StoreLocation) -> str:
    """The folder of the manifest's parts, relative to the store: ``manifest/parts`` in a layout-2
    store (its root says so, ``store_layout``), else ``manifest`` (stores made before)."""
    return PARTS_DIR if store_layout(loc) >= 2 else MANIFEST_DIR

PARTITIONING = pds.partitioning(pa.schema([("layer", pa.string())]), flavor="hive")
_FORMAT = pds.ParquetFileFormat(
    default_fragment_scan_options=pds.ParquetFragmentScanOptions(page_checksum_verification=True))
STALE_TMP_SECONDS = 3600  # far longer than any publish takes: an older temp part is a dead writer's


def remove_stale_temp_parts(folder: str, older_than: float = STALE_TMP_SECONDS) -> list[str]:
    """Delete the dot-prefixed temp parts (``.part-*.tmp``) in a local manifest folder that are older
    than ``older_than`` seconds: a publish killed before its rename leaves one behind. Returns them."""
    removed = []
    now = time.time()
    with os.scandir(folder) as entries:
        for entry in entries:
            if not (entry.name.startswith(".part-") and entry.name.endswith(".tmp")):
                continue
            try:
                if now - entry.stat().st_mtime > older_than:
                    os.remove(entry.path)
                    removed.append(entry.path)
            except FileNotFoundError:  # another publisher removed it first
                pass
    return removed


PART_NAME = re.compile(r"^part-.*?(?:-h([0-9a-f]{32}))?\.parquet$")  # no -h...: written before checksummed names


def _part_bytes(table: pa.Table) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, write_page_checksum=True)  # readers check each data page's CRC
    return buf.getvalue().to_pybytes()


def publish(loc: StoreLocation, rows: Iterable[dict[str, Any]], *, one_part: bool = False) -> list[str]:
    """Publish rows (each with a 'layer' key) atomically, one Parquet file per layer. Returns paths.

    ``one_part``: every row in one file at the top of the manifest, whatever its layer (the layer
    is then a column of the file): one rename, so the rows of all layers appear together or not
    at all (``verify --repair``). A part's name ends in the sha256 of its bytes (``-h<32 hex>``)."""
    by_layer: dict[str | None, list[dict[str, Any]]] = {}
    now = dt.datetime.now(dt.timezone.utc)
    for row in rows:
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise ValueError(f"manifest rows have unknown columns {sorted(unknown)}")
        by_layer.setdefault(None if one_part else row["layer"], []).append({"committed_at": now, **row})
    written = []
    parts = parts_dir(loc)
    for layer, layer_rows in by_layer.items():
        if layer is None:
            table = pa.Table.from_pylist(layer_rows, schema=SCHEMA)
            folder = loc.join(parts)
        else:
            table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "layer"} for r in layer_rows], schema=FILE_SCHEMA)
            folder = loc.join(parts, f"layer={encode_name(layer)}")
        data = _part_bytes(table)
        name = f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}-h{hashlib.sha256(data).hexdigest()[:32]}.parquet"
        final = f"{folder}/{name}"
        if loc.is_local:
            os.makedirs(folder, exist_ok=True)
            remove_stale_temp_parts(folder)
            tmp = f"{folder}/.{name}.tmp"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())  # the bytes are on disk before the name appears
                os.replace(tmp, final)  # atomic within one directory
            finally:
                if os.path.exists(tmp):  # a failed write (a full disk) leaves nothing behind
                    os.remove(tmp)
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # and so is the rename
            finally:
                os.close(dir_fd)
        else:
            loc.fs.pipe_file(final, data)  # one PUT: the object appears whole or not at all
        written.append(final)
    return written


def part_files(loc: StoreLocation) -> list[str]:
    """Every published part file (full paths), the layer folders' and the top level's."""
    fs = loc.fs
    root = loc.join(parts_dir(loc))
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return []
    return sorted(p for p in fs.find(root) if not p.rsplit("/", 1)[-1].startswith((".", "_")))


def part_problem(path: str, data: bytes) -> str | None:
    """What is wrong with a part file's bytes: its name's sha256 does not match, or it is no part
    (an unknown name); None when it matches, or when the part predates checksummed names."""
    name = path.rsplit("/", 1)[-1]
    m = PART_NAME.match(name)
    if m is None:
        return f"{name!r} is not a manifest part's name"
    if m.group(1) is not None and hashlib.sha256(data).hexdigest()[:32] != m.group(1):
        return "its bytes do not match the checksum in its name"
    return None


def read(loc: StoreLocation, layer: str | None = None, *, skip: frozenset[str] | set[str] = frozenset()) -> pa.Table:
    """Every published row (not de-duplicated), with the 'layer' column from the partition (or from
    the file, for a part at the top). ``skip``: part files (full paths) to leave out (damaged ones)."""
    fs = loc.fs
    root = loc.join(parts_dir(loc))
    fs.invalidate_cache(root)  # object-store listings are cached per process; commits come from others
    if not fs.exists(root):
        return SCHEMA.empty_table()
    source: Any = root
    if skip:
        source = [p for p in part_files(loc) if p not in skip]
        if not source:
            return SCHEMA.empty_table()
    ds = pds.dataset(source, format=_FORMAT, partitioning=PARTITIONING, schema=SCHEMA,
                     partition_base_dir=None if isinstance(source, str) else root,
                     filesystem=None if loc.is_local else fs)
    flt = (pds.field("layer") == layer) if layer is not None else None
    try:
        return ds.to_table(filter=flt)
    except (pa.ArrowInvalid, OSError) as err:
        raise StoreError(f"the manifest of {loc.url!r} has an unreadable file: {str(err)[:300]}. "
                         f"`ldam-sweep verify {loc.url} --repair` sets it aside (its blocks are redone by the next run).") from None


def latest_per_unit(table: pa.Table) -> pa.Table:
    """One row per (layer, unit): the newest commit. Sorted by layer, then unit."""
    if table.num_rows == 0:
        return table
    t = table.sort_by([("layer", "ascending"), ("unit", "ascending"), ("committed_at", "descending")])
    layer = np.asarray(t["layer"].to_numpy(zero_copy_only=False))
    unit = t["unit"].to_numpy()
    keep = np.ones(t.num_rows, dtype=bool)
    keep[1:] = (layer[1:] != layer[:-1]) | (unit[1:] != unit[:-1])
    return t.filter(pa.array(keep))
