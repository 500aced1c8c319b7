"""The store's layout: what the driver creates once, up front, before any block is written.

    <store>/zarr.json                     root attrs: spec as submitted, spec hash, plan, model
                                          fingerprint, package versions, created_at
    <store>/layers/<layer>/samples        (unit, chain, snapshot, C, H, W) float16, NaN fill;
                                          shard = one block of units, inner chunk = one unit
    <store>/layers/<layer>/activation     (unit, chain, step) float32, NaN fill; chunk = one block
    <store>/layers/<layer>/realism        same, when a discriminator is used
    <store>/layers/<layer>/exemplars      (unit, k, C, H, W) float16 + exemplar_activation (unit, k)
    <store>/discriminator/                the frozen discriminator (weights, log, accuracy)
    <store>/manifest/layer=<layer>/part-*.parquet   the commit log (see manifest.py)

Every array's grid on the unit axis equals the layer's block size, so a block is exactly one
storage object per array: writers of different blocks never share an object.
"""

from __future__ import annotations

import datetime as dt
from importlib import metadata as importlib_metadata
from typing import Any

import numpy as np
import zarr

from ldam_sweep.errors import StoreError
from ldam_sweep.planning import LayerPlan, StorePlan, identity_changes, plan_store
from ldam_sweep.store.location import StoreLocation, encode_name

__all__ = ["FORMAT_NAME", "LayerPlan", "SCHEMA_VERSION", "StoreError", "StorePlan", "create_store", "layer_path",
           "plan_store", "write_discriminator"]

SCHEMA_VERSION = 1
FORMAT_NAME = "ldam-sweep"


def package_versions() -> dict[str, str]:
    out = {}
    for pkg in ("ldam-sweep", "torch", "zarr", "pyarrow", "numpy", "ray"):
        try:
            out[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def layer_path(name: str) -> str:
    return f"layers/{encode_name(name)}"


def create_store(url: str, plan: StorePlan, *, fresh: bool = False, storage_options: dict | None = None) -> StoreLocation:
    """Create every group and array with final shapes (driver only; idempotent for the same plan).

    An existing store made from another plan is refused with a message saying how to proceed;
    it is deleted only when ``fresh=True``.
    """
    loc = StoreLocation.parse(url, storage_options)
    fs = loc.fs
    root_meta = loc.join("zarr.json")
    if fs.exists(root_meta):
        attrs = _read_root_attrs(loc)
        same = attrs.get("plan_hash") == plan.plan_hash()
        ours = attrs.get("format") == FORMAT_NAME or "plan_hash" in attrs
        if not ours:
            raise StoreError(f"{loc.url!r} is a Zarr group but not an ldam-sweep store; nothing was changed "
                             "(--fresh only ever deletes ldam-sweep stores). Choose another path.")
        if fresh:
            fs.rm(loc.root, recursive=True)
        elif same and attrs.get("format") == FORMAT_NAME:
            return loc
        elif same:
            pass  # our own creation, interrupted before it finished: nothing was committed, redo it
        else:
            raise StoreError(f"store {loc.url!r} was created from a different spec or model: "
                             f"{'; '.join(_identity_changes(attrs, plan))}. Nothing was changed. Use another store "
                             "path, or pass --fresh to delete it and start over.")
    elif fs.exists(loc.root) and fs.ls(loc.root):
        raise StoreError(f"{loc.url!r} exists and is not empty, but is not an ldam-sweep store; nothing was changed "
                         "(--fresh only ever deletes ldam-sweep stores). Choose another path.")
    # The format marker is written last, in one atomic zarr.json write: a reader that sees it sees
    # every group and array already in place.
    root = zarr.open_group(loc.zarr_store(read_only=False), mode="w", attributes={
        "schema_version": SCHEMA_VERSION,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "spec": plan.spec,
        "spec_hash": plan.spec_hash(),
        "plan": plan.to_json(),
        "plan_hash": plan.plan_hash(),
        "model": {"name": plan.model_name, "fingerprint": plan.model_fingerprint},
        "versions": package_versions(),
    })
    layers = root.create_group("layers")
    for lp in plan.layers:
        g = layers.create_group(encode_name(lp.name), attributes={
            "name": lp.name, "kind": lp.kind, "module_type": lp.module_type, "units": lp.units,
            "output_shape": list(lp.output_shape), "block_size": lp.block_size, "objective": lp.objective,
            "snapshot_steps": list(plan.snapshot_steps), "value_range": list(plan.value_range),
        })
        for a in plan.arrays(lp).values():
            g.create_array(a.name, shape=a.shape, dtype=a.dtype, chunks=a.chunks, shards=a.shards, fill_value=np.nan,
                           dimension_names=list(a.dims))
    root.attrs.update({"format": FORMAT_NAME})
    return loc


def _identity_changes(attrs: dict[str, Any], plan: StorePlan) -> list[str]:
    """What differs between the store's recorded identity and this plan's: spec fields, the model's
    weights (fingerprint), and else the plan itself (e.g. a model whose layers changed)."""
    try:
        old = StorePlan.from_json(attrs["plan"])
    except (KeyError, TypeError):
        return [f"spec hash {str(attrs.get('spec_hash'))[:12]} -> {plan.spec_hash()[:12]}"]
    changes = identity_changes(old.identity_spec(), plan.identity_spec())
    if old.model_fingerprint != plan.model_fingerprint:
        changes.append(f"model weights (fingerprint) {old.model_fingerprint[:12]} -> {plan.model_fingerprint[:12]}")
    return changes or [f"the store plan (layers, shapes) {str(attrs.get('plan_hash'))[:12]} -> {plan.plan_hash()[:12]}"]


def _read_root_attrs(loc: StoreLocation) -> dict[str, Any]:
    try:
        return dict(loc.open_group(mode="r").attrs)
    except Exception as err:
        raise StoreError(f"{loc.url!r} has a zarr.json but cannot be opened as a Zarr group: {err}") from None


def write_discriminator(url: str | StoreLocation, blob: bytes, attrs: dict[str, Any]) -> None:
    """Keep the frozen discriminator in the store (driver only, once): its saved file's bytes as a
    uint8 array ``discriminator/file`` and its training record ``attrs`` (settings, per-update log,
    held-out accuracy) as attrs of ``discriminator/``. Read back with ``SweepStore.discriminator_bytes``."""
    loc = url if isinstance(url, StoreLocation) else StoreLocation.parse(url)
    root = loc.open_group(mode="r+")
    data = np.frombuffer(blob, dtype=np.uint8)
    if "discriminator" in root:
        del root["discriminator"]
    g = root.create_group("discriminator", attributes=attrs)
    arr = g.create_array("file", shape=data.shape, dtype="uint8", chunks=data.shape)
    arr[:] = data
