"""The manifest: one Parquet row per committed unit, hive-partitioned by layer. It is the commit log.

A block counts as done only once its rows are published here (status 'ok' or 'dead'; 'failed'
blocks are retried by the next run). Publishing is atomic: locally a
dot-prefixed temp file renamed into place (readers ignore names starting with '.' or '_'); on an
object store a single PUT of the final key. Readers de-duplicate by (layer, unit), keeping the
newest ``committed_at``, so a block committed twice (Ray ran it twice) is harmless. Part files
written before a column existed (``generation``) read back with nulls in it. Temp files
left by a writer killed mid-publish are removed by a later publish once they are STALE_TMP_SECONDS old.
"""

from __future__ import annotations

import datetime as dt
import os
import time
import uuid
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq

from ldam_sweep.errors import StoreError
from ldam_sweep.store.location import StoreLocation, encode_name

MANIFEST_DIR = "manifest"

FILE_SCHEMA = pa.schema([
    ("unit", pa.int32()),
    ("block", pa.int32()),
    ("status", pa.string()),  # "ok" | "dead" (not sampled; the reason in error) | "failed" | "corrupt" (verify --repair)
    ("attempt", pa.int16()),
    ("error", pa.string()),
    ("objective", pa.string()),
    ("method", pa.string()),
    ("lam", pa.float32()),
    ("chains", pa.int16()),
    ("steps", pa.int32()),
    ("act_start_mean", pa.float32()),
    ("act_final_mean", pa.float32()),
    ("act_final_max", pa.float32()),
    ("act_final_min", pa.float32()),
    ("act_final_std", pa.float32()),
    ("realism_final_mean", pa.float32()),
    ("exemplar_max", pa.float32()),
    ("activation_ratio", pa.float32()),
    ("pixel_diversity", pa.float32()),
    ("feature_diversity", pa.float32()),
    ("modes", pa.int16()),
    ("lowpass_diversity", pa.float32()),  # these four came later: older part files lack them (read as null)
    ("lowpass_diversity_ratio", pa.float32()),
    ("feature_diversity_ratio", pa.float32()),
    ("facets", pa.int16()),
    ("nearest_real", pa.float32()),
    ("movement", pa.float32()),
    ("ess", pa.float32()),
    ("rhat", pa.float32()),
    ("diverged_fraction", pa.float32()),
    ("stuck_fraction", pa.float32()),
    ("saturated_fraction", pa.float32()),  # these three came with the realism scores (older parts: null)
    ("frozen_fraction", pa.float32()),
    ("hf_ratio", pa.float32()),
    ("seconds", pa.float32()),
    ("batch_units", pa.int32()),  # live units sampled together with this one (null before it existed; see sample())
    ("worker", pa.string()),
    ("attempt_id", pa.string()),
    ("checksum", pa.string()),
    ("spec_hash", pa.string()),
    ("generation", pa.string()),  # the store's generation at commit; null in rows committed before it existed
    ("code_version", pa.string()),
    ("committed_at", pa.timestamp("us", tz="UTC")),
])
SCHEMA = pa.schema([("layer", pa.string()), *FILE_SCHEMA])
COLUMNS = tuple(SCHEMA.names)
PARTITIONING = pds.partitioning(pa.schema([("layer", pa.string())]), flavor="hive")
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


def publish(loc: StoreLocation, rows: Iterable[dict[str, Any]]) -> list[str]:
    """Publish rows (each with a 'layer' key) atomically, one Parquet file per layer. Returns paths."""
    by_layer: dict[str, list[dict[str, Any]]] = {}
    now = dt.datetime.now(dt.timezone.utc)
    for row in rows:
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise ValueError(f"manifest rows have unknown columns {sorted(unknown)}")
        by_layer.setdefault(row["layer"], []).append({"committed_at": now, **row})
    fs = loc.fs
    written = []
    for layer, layer_rows in by_layer.items():
        table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "layer"} for r in layer_rows], schema=FILE_SCHEMA)
        folder = loc.join(MANIFEST_DIR, f"layer={encode_name(layer)}")
        name = f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
        final = f"{folder}/{name}"
        if loc.is_local:
            os.makedirs(folder, exist_ok=True)
            remove_stale_temp_parts(folder)
            tmp = f"{folder}/.{name}.tmp"
            with open(tmp, "wb") as f:
                pq.write_table(table, f)
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before the name appears
            os.replace(tmp, final)  # atomic within one directory
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # and so is the rename
            finally:
                os.close(dir_fd)
        else:
            with fs.open(final, "wb") as f:  # one PUT: the object appears whole or not at all
                pq.write_table(table, f)
        written.append(final)
    return written


def read(loc: StoreLocation, layer: str | None = None) -> pa.Table:
    """Every published row (not de-duplicated), with the 'layer' column from the partition."""
    fs = loc.fs
    root = loc.join(MANIFEST_DIR)
    fs.invalidate_cache(root)  # object-store listings are cached per process; commits come from others
    if not fs.exists(root):
        return SCHEMA.empty_table()
    ds = pds.dataset(root, format="parquet", partitioning=PARTITIONING, schema=SCHEMA,
                     filesystem=None if loc.is_local else fs)
    flt = (pds.field("layer") == layer) if layer is not None else None
    try:
        return ds.to_table(filter=flt)
    except (pa.ArrowInvalid, OSError) as err:
        raise StoreError(f"the manifest of {loc.url!r} has an unreadable file: {err}. Move that part file "
                         "aside (its blocks will be redone on the next run).") from None


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
