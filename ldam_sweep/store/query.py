"""Reading a store: ``ls.open_store(path)`` (read-only). Everything goes through the manifest, so
a block that is written but not committed (a crashed attempt) is never visible."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ldam_sweep.errors import StoreError, did_you_mean
from ldam_sweep.planning import LayerPlan, StorePlan
from ldam_sweep.store import manifest
from ldam_sweep.store.layout import FORMAT_NAME, layer_path
from ldam_sweep.store.location import StoreLocation

TRACE_KINDS = ("activation", "realism")


class SweepStore:
    """A read-only view of a sweep store."""

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self.loc = StoreLocation.parse(url, storage_options)
        fs = self.loc.fs
        if not fs.exists(self.loc.join("zarr.json")):
            what = "does not exist" if not fs.exists(self.loc.root) else "has no zarr.json"
            raise StoreError(f"{self.loc.url!r} is not an ldam-sweep store: it {what}")
        try:
            self.root = self.loc.open_group(mode="r")
        except Exception as err:
            raise StoreError(f"{self.loc.url!r} is not a readable Zarr group: {err}") from None
        self.attrs: dict[str, Any] = dict(self.root.attrs)
        if self.attrs.get("format") != FORMAT_NAME:
            raise StoreError(f"{self.loc.url!r} is a Zarr group but not an ldam-sweep store (no format={FORMAT_NAME!r} attribute)")
        self.plan = StorePlan.from_json(self.attrs["plan"])
        self._latest: pa.Table | None = None

    def refresh(self) -> "SweepStore":
        """Forget the cached manifest: the next query sees commits made since it was read."""
        self._latest = None
        return self

    def _latest_rows(self) -> pa.Table:
        """The de-duplicated manifest, read once and cached (``refresh()`` re-reads it)."""
        if self._latest is None:
            self._latest = manifest.latest_per_unit(manifest.read(self.loc))
        return self._latest

    # -- metadata ----------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        """The job spec as submitted."""
        return dict(self.attrs["spec"])

    def layer_plan(self, layer: str) -> LayerPlan:
        try:
            return self.plan.layer(layer)
        except StoreError:
            names = [lp.name for lp in self.plan.layers]
            raise StoreError(
                f"layer {layer!r} is not in store {self.loc.url!r}; layers: {', '.join(names)}.{did_you_mean(layer, names)}"
            ) from None

    def layers(self) -> list[dict[str, Any]]:
        """Per layer: kind, units, planned units and blocks, and how many units are done (ok or
        dead), dead (found dead, not sampled) and failed."""
        table = self.units(status=None)
        out = []
        for lp in self.plan.layers:
            rows = table.filter(pc.equal(table["layer"], lp.name))
            status = rows["status"].to_pylist()
            dead, failed = status.count("dead"), status.count("failed")
            done = status.count("ok") + dead
            out.append({
                "name": lp.name, "kind": lp.kind, "module_type": lp.module_type, "units": lp.units,
                "planned": lp.planned_units(), "blocks": len(lp.planned_blocks()), "block_size": lp.block_size,
                "objective": lp.objective, "output_shape": list(lp.output_shape),
                "done": done, "dead": dead, "failed": failed, "pending": lp.planned_units() - done - failed,
            })
        return out

    # -- the manifest ------------------------------------------------------------------------
    def manifest(self, layer: str | None = None) -> pa.Table:
        """Every published row, duplicates included (the raw commit log)."""
        if layer is not None:
            self.layer_plan(layer)
        return manifest.read(self.loc, layer)

    def units(
        self,
        layer: str | None = None,
        *,
        unit: int | None = None,
        status: str | Sequence[str] | None = "ok",
        where: pc.Expression | None = None,
        sort: str | None = None,
        descending: bool = True,
        limit: int | None = None,
    ) -> pa.Table:
        """One row per committed unit (the newest commit of each), filtered and sorted.

        The manifest is read once per ``SweepStore`` and cached; call ``refresh()`` to see commits
        made after that (a sweep still running).

        ``status``: "ok" (default), "dead" (found dead, not sampled), "failed", several of them as a
        list, or None for every row. ``where``: any pyarrow compute
        expression over manifest columns, e.g. ``pc.field("act_final_mean") > 10``. ``sort``: any
        column (descending by default). ``limit``: top-k after sorting.
        """
        table = self._latest_rows()
        if layer is not None:
            self.layer_plan(layer)
            table = table.filter(pc.equal(table["layer"], layer))
        if unit is not None:
            table = table.filter(pc.equal(table["unit"], unit))
        if status is not None:
            table = table.filter(pc.is_in(table["status"], pa.array([status] if isinstance(status, str) else list(status))))
        if where is not None:
            table = table.filter(where)
        if sort is not None:
            if sort not in table.column_names:
                raise StoreError(f"cannot sort by {sort!r}: not a manifest column; columns: {', '.join(table.column_names)}")
            table = table.sort_by([(sort, "descending" if descending else "ascending")])
        if limit is not None:
            table = table.slice(0, limit)
        return table

    def sql(self, query: str) -> pa.Table:
        """Run DuckDB SQL over the view ``units`` (de-duplicated, all statuses) and ``manifest`` (raw)."""
        try:
            import duckdb
        except ImportError:
            raise StoreError("SQL queries need DuckDB: pip install 'ldam-sweep[sql]'") from None
        con = duckdb.connect()
        con.register("manifest", self.manifest())
        con.register("units", self.units(status=None))
        rel = con.sql(query)
        return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()  # duckdb 2.x / 1.x

    # -- tensors -----------------------------------------------------------------------------
    def _committed(self, layer: str, unit: int, allow_dead: bool = False) -> LayerPlan:
        lp = self.layer_plan(layer)
        if not 0 <= unit < lp.units:
            raise StoreError(f"unit {unit} is out of range for layer {layer!r}: valid units are 0..{lp.units - 1}")
        rows = self.units(layer, unit=unit, status=None)
        if rows.num_rows == 0:
            raise StoreError(f"unit {unit} of layer {layer!r} is not committed yet (pending)")
        status = rows["status"][0].as_py()
        if status == "dead" and not allow_dead:
            raise StoreError(f"unit {unit} of layer {layer!r} is dead ({rows['error'][0].as_py()}): it was not sampled")
        if status not in ("ok", "dead"):
            raise StoreError(f"unit {unit} of layer {layer!r} failed: {rows['error'][0].as_py()}")
        return lp

    def _array(self, layer: str, name: str):
        try:
            return self.root[f"{layer_path(layer)}/{name}"]
        except KeyError:
            raise StoreError(f"store {self.loc.url!r} has no {name!r} array for layer {layer!r}") from None

    def read_block(self, layer: str, block: int, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """The block's region (units ``block_bounds(block)``) of each named array as stored, every
        array of the layer by default. Reads committed or not: check the manifest first."""
        lp = self.layer_plan(layer)
        lo, hi = lp.block_bounds(block)
        names = list(self.plan.arrays(lp)) if names is None else list(names)
        return {name: np.asarray(self._array(lp.name, name)[lo:hi]) for name in names}

    def samples(self, layer: str, unit: int) -> np.ndarray:
        """(chain, snapshot, C, H, W) float32 samples of a committed unit."""
        self._committed(layer, unit)
        return np.asarray(self._array(layer, "samples")[unit], dtype=np.float32)

    def trace(self, layer: str, unit: int, kind: str = "activation") -> np.ndarray:
        """(chain, steps + 1) activation or realism trace of a committed unit."""
        if kind not in TRACE_KINDS:
            raise StoreError(f"trace kind {kind!r} is not one of {', '.join(TRACE_KINDS)}")
        if kind == "realism" and not self.plan.realism:
            raise StoreError(f"store {self.loc.url!r} has no realism traces (the sweep ran without a discriminator)")
        self._committed(layer, unit)
        return np.asarray(self._array(layer, kind)[unit])

    def exemplars(self, layer: str, unit: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k real images (k, C, H, W) and their activations (k,) of a committed unit (dead ones too)."""
        if not self.plan.exemplars_k:
            raise StoreError(f"store {self.loc.url!r} has no dataset exemplars (the sweep ran without data)")
        self._committed(layer, unit, allow_dead=True)
        images = np.asarray(self._array(layer, "exemplars")[unit], dtype=np.float32)
        return images, np.asarray(self._array(layer, "exemplar_activation")[unit])

    def discriminator_info(self) -> dict[str, Any] | None:
        """The stored discriminator's training record (accuracy, settings, log), or None."""
        if "discriminator" not in self.root:
            return None
        return dict(self.root["discriminator"].attrs)

    def discriminator_bytes(self) -> bytes | None:
        """The frozen discriminator the sweep used, as its saved file's bytes, or None. Load it with
        ``ldam_sweep.sampling.discriminator.load_discriminator(blob, model)``."""
        if "discriminator" not in self.root:
            return None
        return bytes(np.asarray(self.root["discriminator/file"][:]))

    def snapshot_steps(self) -> np.ndarray:
        return np.asarray(self.plan.snapshot_steps)

    def __repr__(self) -> str:
        return f"SweepStore({self.loc.url!r}, layers={len(self.plan.layers)})"


def open_store(url: str, storage_options: dict | None = None) -> SweepStore:
    """Open a sweep store read-only; StoreError when the path is not one."""
    return SweepStore(url, storage_options)
