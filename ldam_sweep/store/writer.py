"""Writing one block: the actor's whole job on the storage side.

``BlockWriter.write`` replaces the block's region of every array of its layer (whole objects:
the unit-axis grid equals the block size) and returns the manifest rows that commit it. It never
writes metadata. Before writing, it deletes the block's objects: zarr 3.1 reads an existing shard
even for a full overwrite, so a shard torn by a killed writer would otherwise fail every retry.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import uuid
import warnings
from typing import Any, Protocol, Sequence

import numpy as np
import zarr
from zarr.core.sync import sync

from ldam_sweep.errors import StoreDamagedError, StoreError
from ldam_sweep.planning import ARRAY_NAMES, LayerPlan, StorePlan
from ldam_sweep.store.integrity import ATTRS_SEAL, seal_state
from ldam_sweep.store.layout import layer_path
from ldam_sweep.store.location import StoreLocation
from ldam_sweep.version import __version__

# Test hook: the writer SIGKILLs its own process after writing the named array (fault tests only).
KILL_AFTER_ENV = "LDAM_SWEEP_TEST_KILL_AFTER"


class BlockResult(Protocol):
    """What the writer needs of a sampled block (a ``ChainResult`` fits): plain arrays and the
    sampler settings that go into the manifest. The store needs no sampler (and no torch)."""

    layer: str
    units: Sequence[int]
    samples: np.ndarray  # (unit, chain, snapshot, C, H, W)
    activation: np.ndarray  # (unit, chain, steps + 1)
    realism: np.ndarray | None
    dead: np.ndarray | None  # (unit,) bool: not sampled (its arrays are NaN); None = every unit sampled
    starts: np.ndarray | None  # (unit, chain, C, H, W) each chain's first image (stores whose plan keeps starts)
    dead_reason: str
    objective: str
    method: str
    lam: float
    chains: int
    steps: int

    @property
    def final_activation(self) -> np.ndarray: ...


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

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self.loc = StoreLocation.parse(url, storage_options)
        self.root = self.loc.open_group(mode="r+")
        attrs = dict(self.root.attrs)
        if "plan" not in attrs:
            raise StoreError(f"{self.loc.url!r} is not an ldam-sweep store (no plan in zarr.json)")
        if seal_state(attrs, ATTRS_SEAL) == "broken":  # the plan a worker writes by must be the store's
            raise StoreDamagedError(f"the root metadata (zarr.json) of store {self.loc.url!r} does not match its "
                                    f"checksum: `ldam-sweep verify {self.loc.url} --repair` restores it from its copy")
        self.plan = StorePlan.from_json(attrs["plan"])
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
        values: dict[str, Any] = {"samples": result.samples, "activation": result.activation}
        if plan.realism:
            if result.realism is None:
                raise StoreError(f"the store keeps realism traces but the result for block {block} of {lp.name!r} has none")
            values["realism"] = result.realism
        if plan.exemplars_k and exemplars is not None:
            values["exemplars"], values["exemplar_activation"] = exemplars
        if plan.starts:
            if getattr(result, "starts", None) is None:
                raise StoreError(f"the store keeps chain starts but the result for block {block} of {lp.name!r} has none")
            values["starts"] = result.starts
        out: dict[str, np.ndarray] = {}
        whole = len(units) == hi - lo  # the block's every unit (the grid's last block may be shorter)
        for name, spec in plan.arrays(lp).items():
            if name not in values:
                continue
            value = np.asarray(values[name])
            if whole and value.dtype == spec.dtype and value.shape == spec.block_shape(hi - lo):
                region = value  # the result itself: no copy (~300 MB of samples at 224 px)
            else:
                region = np.full(spec.block_shape(hi - lo), np.nan, dtype=spec.dtype)
                region[idx] = value.astype(spec.dtype)
            out[name] = _canonical_nans(region, copy=region is value)
        return out

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
        kill_after = os.environ.get(KILL_AFTER_ENV)
        specs = self.plan.arrays(lp)
        for name, data in region.items():
            arr = group[name]
            sync(store.delete(f"{arr.path}/{specs[name].block_key(block)}"))
            arr[lo:hi] = data
            if kill_after == name:
                os.kill(os.getpid(), signal.SIGKILL)
        checksum = block_checksum(region)
        rows = block_rows(
            lp, block, result, checksum=checksum, attempt=attempt, seconds=seconds,
            worker=worker or default_worker_id(), spec_hash=self.spec_hash,
            exemplar_max=None if exemplars is None else np.nanmax(exemplars[1], axis=1), unit_columns=unit_columns,
        )
        return [{**r, "generation": self.generation} for r in rows]


def block_rows(
    lp: LayerPlan, block: int, result: BlockResult, *, checksum: str, attempt: int, seconds: float, worker: str,
    spec_hash: str, exemplar_max: np.ndarray | None = None, unit_columns: dict[int, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One manifest row per unit of the block, with its activation and realism statistics: status
    'ok', or 'dead' (with the reason in ``error``) for a unit the sampler found dead and did not sample."""
    attempt_id = uuid.uuid4().hex
    final = result.final_activation
    dead = getattr(result, "dead", None)
    per_unit_seconds = seconds / max(1, len(result.units))
    rows = []
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of a dead unit's all-NaN trace
        for i, unit in enumerate(result.units):
            is_dead = dead is not None and bool(dead[i])
            row = {
                "layer": lp.name, "unit": int(unit), "block": int(block), "status": "dead" if is_dead else "ok",
                "attempt": int(attempt), "error": result.dead_reason if is_dead else None,
                "objective": result.objective, "method": result.method, "lam": result.lam,
                "chains": result.chains, "steps": result.steps,
                "act_start_mean": float(np.nanmean(result.activation[i, :, 0])),
                "act_final_mean": float(np.nanmean(final[i])), "act_final_max": float(np.nanmax(final[i])),
                "act_final_min": float(np.nanmin(final[i])), "act_final_std": float(np.nanstd(final[i])),
                "realism_final_mean": None if result.realism is None else float(np.nanmean(result.realism[i, :, -1])),
                "exemplar_max": None if exemplar_max is None else float(exemplar_max[i]),
                "seconds": per_unit_seconds, "worker": worker, "attempt_id": attempt_id, "checksum": checksum,
                "spec_hash": spec_hash, "code_version": __version__,
            }
            if is_dead:  # not sampled: no statistics (the exemplars are real data and stay)
                row.update(dict.fromkeys(("act_start_mean", "act_final_mean", "act_final_max", "act_final_min",
                                          "act_final_std", "realism_final_mean"), None))
            row.update((unit_columns or {}).get(int(unit), {}))
            rows.append(row)
    return rows


def failed_rows(lp: LayerPlan, block: int, error: str, *, attempt: int, spec_hash: str, worker: str = "") -> list[dict[str, Any]]:
    """'failed' rows for every unit of a block that ran out of attempts (the sweep goes on)."""
    return [
        {"layer": lp.name, "unit": int(u), "block": int(block), "status": "failed", "attempt": int(attempt),
         "error": error[-2000:], "spec_hash": spec_hash, "worker": worker, "code_version": __version__}
        for u in lp.block_units(block)
    ]


def tombstone_rows(lp: LayerPlan, block: int, units: Sequence[int], problem: str, *, spec_hash: str) -> list[dict[str, Any]]:
    """'corrupt' rows for the given units of a block whose stored data failed ``verify``: newer than
    its 'ok' rows, so the block counts as not done and the next run redoes it."""
    return [
        {"layer": lp.name, "unit": int(u), "block": int(block), "status": "corrupt", "attempt": 0,
         "error": f"corrupt: {problem}"[-2000:], "spec_hash": spec_hash, "worker": "verify --repair",
         "code_version": __version__}
        for u in units
    ]


def write_block(url: str, layer: str, block: int, result: BlockResult, **kwargs: Any) -> list[dict[str, Any]]:
    """One-shot ``BlockWriter(url).write(...)``."""
    return BlockWriter(url).write(layer, block, result, **kwargs)


def commit(url: str | StoreLocation, rows: list[dict[str, Any]], storage_options: dict | None = None) -> list[str]:
    """Publish manifest rows atomically: from now on readers see these units."""
    from ldam_sweep.store import manifest

    loc = url if isinstance(url, StoreLocation) else StoreLocation.parse(url, storage_options)
    return manifest.publish(loc, rows)
