"""Writing one block: the actor's whole job on the storage side.

``BlockWriter.write`` replaces the block's region of every array of its layer (whole objects:
the unit-axis grid equals the block size) and returns the manifest rows that commit it. It never
writes metadata. Before writing, it deletes the block's objects: zarr 3.1 reads an existing shard
even for a full overwrite, so a shard torn by a killed writer would otherwise fail every retry.
"""

from __future__ import annotations

import hashlib
import os
import socket
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from ldam_sweep import failpoints
from ldam_sweep.errors import StoreDamagedError, StoreError
from ldam_sweep.store.integrity import ATTRS_SEAL, seal_state
from ldam_sweep.store.layout import layer_path
from ldam_sweep.store.schema import (ARRAY_NAMES, BlockResult, LayerPlan, StorePlan, block_rows, encode_pixels, shrink,
                                     stamp_generation)
from ldam_sweep.store.location import StoreLocation


def default_worker_id() -> str:
    """host:pid of this process, the manifest's ``worker`` column (Ray actors add @node)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _canonical_nans(a: np.ndarray, copy: bool) -> np.ndarray:
    """``a`` with every NaN as numpy's one bit pattern (zarr reads every NaN back as that one, and the
    checksum must match what is read). Changed in a copy when ``copy`` (the caller's array) and only
    when some NaN has another pattern (a diverged chain's sign or payload)."""
    nan = np.isnan(a)
    if not nan.any():
        return a
    bits = a.view(f"u{a.dtype.itemsize}")
    odd = nan & (bits != np.array(np.nan, dtype=a.dtype).view(bits.dtype))
    if odd.any():
        a = a.copy() if copy else a
        a[odd] = np.nan
    return a


def block_checksum(region: dict[str, np.ndarray]) -> str:
    """blake2b over the block's arrays as stored (dtype, shape, bytes), in a fixed order."""
    h = hashlib.blake2b(digest_size=16)
    for name in ARRAY_NAMES:
        if name in region:
            arr = np.ascontiguousarray(region[name])
            h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
            h.update(arr.reshape(-1).view(np.uint8))  # the bytes tobytes() gives, without a copy of the block
    return h.hexdigest()


class BlockWriter:
    """Writes blocks into an existing store (created by the driver); keeps its group open."""

    def __init__(self, url: str | StoreLocation, storage_options: dict | None = None, *,
                 plan: StorePlan | None = None) -> None:
        """``plan``: the plan the caller writes by (a sweep's); refused unless it is the store's."""
        self.loc = StoreLocation.parse(url, storage_options)
        self.root = self.loc.open_group(mode="r+")
        attrs = dict(self.root.attrs)
        if "plan" not in attrs:
            raise StoreError(f"{self.loc.url!r} is not an ldam-sweep store (no plan in zarr.json)")
        if seal_state(attrs, ATTRS_SEAL) == "broken":  # the plan a worker writes by must be the store's
            raise StoreDamagedError(f"the root metadata (zarr.json) of store {self.loc.url!r} does not match its "
                                    f"checksum: `ldam-sweep verify {self.loc.url} --repair` restores it from its copy")
        self.plan = StorePlan.from_json(attrs["plan"])
        if plan is not None and plan.plan_hash() != self.plan.plan_hash():
            raise StoreError(f"store {self.loc.url!r} was made from another plan than this sweep's (plan hash "
                             f"{self.plan.plan_hash()[:12]}, the sweep's {plan.plan_hash()[:12]}): rerun the sweep, "
                             "which checks the store before any worker starts")
        self.spec_hash = attrs["spec_hash"]
        self.generation = attrs.get("generation")  # stamped into the rows; None in stores made before it
        self._groups: dict[str, zarr.Group] = {}

    def group(self, layer: str) -> zarr.Group:
        if layer not in self._groups:
            self._groups[layer] = self.root[layer_path(layer)]  # type: ignore[assignment]
        return self._groups[layer]

    def region(self, lp: LayerPlan, block: int, result: BlockResult,
               exemplars: tuple[np.ndarray, np.ndarray] | None) -> dict[str, np.ndarray]:
        """The block's full region of every array, NaN where a unit is not sampled."""
        plan = self.plan
        lo, hi = lp.block_bounds(block)
        units = lp.block_units(block)
        if result.layer != lp.name or list(result.units) != units:
            raise StoreError(
                f"result for layer {result.layer!r} units {list(result.units)[:8]} does not match block {block} "
                f"of layer {lp.name!r}, which holds units {units[:8]}"
            )
        expect = (len(units), plan.chains, len(plan.snapshot_steps), *plan.image_shape)
        if result.samples.shape != expect or result.activation.shape != (len(units), plan.chains, plan.steps + 1):
            raise StoreError(f"result shapes {result.samples.shape}, {result.activation.shape} do not fit the store plan {expect}")
        idx = np.asarray(units) - lo
        values = self.encoded(result, exemplars)
        out: dict[str, np.ndarray] = {}
        whole = len(units) == hi - lo  # the block's every unit (the grid's last block may be shorter)
        for name, spec in plan.arrays(lp).items():
            if name not in values:
                continue
            value = np.asarray(values[name])
            if whole and value.dtype == spec.dtype and value.shape == spec.block_shape(hi - lo):
                region = value  # the result itself: no copy (~300 MB of samples at 224 px)
            else:
                region = np.full(spec.block_shape(hi - lo), spec.fill_value, dtype=spec.dtype)
                region[idx] = value.astype(spec.dtype)
            out[name] = _canonical_nans(region, copy=region is value) if region.dtype.kind == "f" else region
        return out

    def encoded(self, result: BlockResult, exemplars: tuple[np.ndarray, np.ndarray] | None) -> dict[str, np.ndarray]:
        """The block's arrays (its sampled units only) in the store's format: images in its pixel type,
        snapshots and starts shrunk (``thumbnail``) with the full-size finals beside them."""
        plan, lp_name = self.plan, result.layer
        px, vr = plan.pixels, plan.value_range
        values: dict[str, Any] = {"activation": result.activation}
        if plan.thumbnail > 1:
            values["finals"] = encode_pixels(result.samples[:, :, -1], px, vr)
        values["samples"] = encode_pixels(shrink(result.samples, plan.thumbnail), px, vr)
        if plan.realism:
            if result.realism is None:
                raise StoreError(f"the store keeps realism traces but the result for {lp_name!r} has none")
            values["realism"] = result.realism
        if plan.exemplars_k and exemplars is not None:
            values["exemplars"] = encode_pixels(exemplars[0], px, vr)
            values["exemplar_activation"] = exemplars[1]
        if plan.starts:
            if getattr(result, "starts", None) is None:
                raise StoreError(f"the store keeps chain starts but the result for {lp_name!r} has none")
            values["starts"] = encode_pixels(shrink(result.starts, plan.thumbnail), px, vr)
        if plan.ladder:
            got = getattr(result, "ladder", None)
            if getattr(result, "rung_samples", None) is None or got is None or tuple(map(float, got)) != plan.ladder:
                raise StoreError(f"the store keeps the activation ladder {list(plan.ladder)} but the result for "
                                 f"{lp_name!r} has {'none' if got is None else list(map(float, got))}")
            values["rungs"] = encode_pixels(shrink(result.rung_samples, plan.thumbnail), px, vr)
            values["rung_activation"] = result.rung_activation
            if plan.realism:
                values["rung_realism"] = result.rung_realism
        return values

    def write(
        self,
        layer: str,
        block: int,
        result: BlockResult,
        *,
        attempt: int = 1,
        seconds: float = float("nan"),
        worker: str | None = None,
        exemplars: tuple[np.ndarray, np.ndarray] | None = None,
        unit_columns: dict[int, dict[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        """Write the block's region of every array (delete, then write whole objects) and return
        its manifest rows. Safe to repeat: the same result writes the same bytes."""
        lp = self.plan.layer(layer)
        region = self.region(lp, block, result, exemplars)
        lo, hi = lp.block_bounds(block)
        group = self.group(layer)
        store = group.store_path.store
        specs = self.plan.arrays(lp)
        for name, data in region.items():
            arr = group[name]
            sync(store.delete(f"{arr.path}/{specs[name].block_key(block)}"))
            arr[lo:hi] = data
            failpoints.after_array_written(name)
        checksum = block_checksum(region)
        rows = block_rows(
            lp, block, result, checksum=checksum, attempt=attempt, seconds=seconds,
            worker=worker or default_worker_id(), spec_hash=self.spec_hash,
            exemplar_max=None if exemplars is None else np.nanmax(exemplars[1], axis=1), unit_columns=unit_columns,
        )
        return stamp_generation(rows, self.generation)


def write_block(url: str, layer: str, block: int, result: BlockResult, **kwargs: Any) -> list[dict[str, Any]]:
    """One-shot ``BlockWriter(url).write(...)``."""
    return BlockWriter(url).write(layer, block, result, **kwargs)


def commit(url: str | StoreLocation, rows: list[dict[str, Any]], storage_options: dict | None = None) -> list[str]:
    """Publish manifest rows atomically: from now on readers see these units."""
    from ldam_sweep.store import manifest

    loc = StoreLocation.parse(url, storage_options)
    return manifest.publish(loc, rows)
