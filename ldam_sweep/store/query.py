"""Reading a store: ``ls.open_store(path)`` (read-only). Everything goes through the manifest, so
a block that is written but not committed (a crashed attempt) is never visible."""

from __future__ import annotations

import collections
import os
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ldam_sweep.notebook import mark, register as register_notebook_display
from ldam_sweep.errors import CorruptBlockError, StoreDamagedError, StoreError, did_you_mean, repair_hint
from ldam_sweep.store.schema import OBSERVER_COLUMNS, PIXEL_ARRAYS, LayerPlan, StorePlan, decode_pixels
from ldam_sweep.store import manifest
from ldam_sweep.store.integrity import (ATTRS_SEAL, FROZEN, ROOT_COPY, frozen_record, frozen_state, read_verify_record,
                                        sidecar_path,
                                        seal_state)
from ldam_sweep.store.layout import FORMAT_NAME, layer_path
from ldam_sweep.store.location import StoreLocation
from ldam_sweep.store.realism import read_realism, unit_flags
from ldam_sweep.store.unitview import UnitView
from ldam_sweep.store.writer import block_checksum

if TYPE_CHECKING:
    from ldam_sweep.spec import ModelSpec

TRACE_KINDS = ("activation", "realism")
# columns of ``units()`` that the reader adds from the store's realism and verify records, not the manifest
READER_COLUMNS = ("detected_fraction", "integrity")


def checksum_arrays(plan: StorePlan, lp: LayerPlan, *, with_exemplars: bool) -> list[str]:
    """The arrays a block's checksum covers: every array of the layer (``StorePlan.arrays``), the
    exemplars only when the block has them."""
    return [name for name in plan.arrays(lp) if with_exemplars or name not in ("exemplars", "exemplar_activation")]


def decode_block(plan: StorePlan, stored: dict[str, np.ndarray], want: Iterable[str]) -> dict[str, np.ndarray]:
    """A region of stored arrays (unit axis first) as readers use them, whatever the store's format:
    images as float32 in the model's range; ``finals`` (each chain's last snapshot at full size) in
    every store. In 8-bit stores a missing image reads as NaN as in float ones: a chain's snapshot where its activation trace is
    not finite (a diverged chain, a dead unit), an exemplar without an activation (fewer real images
    than k). (Units a sweep did not select read as 0 there, NaN in float stores: read committed units.)"""
    vr = plan.value_range
    out: dict[str, np.ndarray] = {}
    eight = plan.pixels == "uint8"
    for name in want:
        if name == "finals" and "finals" not in stored:
            x = decode_pixels(stored["samples"][:, :, -1], vr)
        elif name in PIXEL_ARRAYS:
            x = decode_pixels(stored[name], vr)
        else:
            out[name] = stored[name]
            continue
        if eight and name in ("samples", "finals") and "activation" in stored:
            act = stored["activation"]
            steps = list(plan.snapshot_steps) if name == "samples" else [plan.snapshot_steps[-1]]
            bad = ~np.isfinite(act[:, :, steps])  # (unit, chain, snapshot)
            x[bad if name == "samples" else bad[:, :, 0]] = np.nan
        if eight and name == "exemplars" and "exemplar_activation" in stored:
            x[~np.isfinite(stored["exemplar_activation"])] = np.nan
        if eight and name == "rungs" and "rung_activation" in stored:  # a diverged chain's rung, a dead unit's
            x[~np.isfinite(stored["rung_activation"])] = np.nan
        out[name] = x
    return out


def stored_names(plan: StorePlan, lp: LayerPlan, want: Iterable[str]) -> list[str]:
    """The stored arrays ``decode_block`` needs for the arrays ``want``."""
    have = plan.arrays(lp)
    need: list[str] = []
    for name in want:
        deps = {"finals": ["finals"] if "finals" in have else ["samples"]}.get(name, [name])
        if plan.pixels == "uint8":
            deps = deps + {"samples": ["activation"], "finals": ["activation"],
                           "exemplars": ["exemplar_activation"], "rungs": ["rung_activation"]}.get(name, [])
        need += [d for d in deps if d in have and d not in need]
    return need


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
            if fs.exists(self.loc.join(sidecar_path(self.loc, ROOT_COPY))):  # ours, with a damaged root
                raise StoreDamagedError(f"the root metadata (zarr.json) of store {self.loc.url!r} is damaged ({type(err).__name__}): "
                                        f"`ldam-sweep verify {self.loc.url} --repair` restores it from its copy") from None
            raise StoreError(f"{self.loc.url!r} is not a readable Zarr group: {err}") from None
        self.attrs: dict[str, Any] = dict(self.root.attrs)
        if seal_state(self.attrs, ATTRS_SEAL) == "broken":
            raise StoreDamagedError(f"the root metadata (zarr.json) of store {self.loc.url!r} does not match its checksum: "
                                    f"`ldam-sweep verify {self.loc.url} --repair` restores it from its copy")
        if self.attrs.get("format") != FORMAT_NAME:
            raise StoreError(f"{self.loc.url!r} is a Zarr group but not an ldam-sweep store (no format={FORMAT_NAME!r} attribute)")
        self.plan = StorePlan.from_json(self.attrs["plan"])
        self._latest: pa.Table | None = None
        self._verified: set[tuple[str, int, str]] = set()  # (layer, block, checksum) whose data matched
        self._found_corrupt: set[tuple[str, int]] = set()  # (layer, block) whose data did not, when read here
        self._skip_parts: frozenset[str] = frozenset()
        self._frozen: dict[str, tuple[str, str, bytes | None]] = {}  # _frozen_check's results, per group

    def ignoring_parts(self, paths: set[str]) -> "SweepStore":
        """Read the manifest without these part files (damaged ones ``verify`` found); re-reads it."""
        self._skip_parts = frozenset(paths)
        return self.refresh()

    def refresh(self) -> "SweepStore":
        """Forget the cached manifest (and the frozen models' checks): the next query sees commits made since."""
        self._frozen = {}
        self._latest = None
        return self

    def _latest_rows(self) -> pa.Table:
        """The de-duplicated manifest, read once and cached (``refresh()`` re-reads it), with the
        realism record's per-unit ``detected_fraction`` (null where it was not measured)."""
        if self._latest is None:
            table = manifest.latest_per_unit(manifest.read(self.loc, skip=self._skip_parts))
            self._realism = read_realism(self.loc)  # cached with the manifest it describes
            detected = np.full(table.num_rows, np.nan, dtype=np.float32)
            if self._realism and table.num_rows:
                layers, units = table["layer"].to_numpy(zero_copy_only=False), table["unit"].to_numpy()
                for name in self._realism.get("layers") or {}:
                    flags = unit_flags(self._realism, name)
                    if not flags:
                        continue
                    lut = np.full(max(max(flags), int(units.max())) + 1, np.nan, dtype=np.float32)  # unit -> value
                    lut[list(flags)] = list(flags.values())
                    rows = np.flatnonzero(layers == name)
                    detected[rows] = lut[units[rows]]
            table = table.append_column(pa.field("detected_fraction", pa.float32()),
                                        pa.array(detected, type=pa.float32(), mask=np.isnan(detected)))
            self._verify_state, self._verify_doc = read_verify_record(self.loc)
            self._latest = table.append_column(pa.field("integrity", pa.string()), self._integrity(table))
        return self._latest

    def _integrity(self, table: pa.Table) -> pa.Array:
        """Per row: "verified" (committed before the last ``verify``, which found its block intact),
        "corrupt" (its block failed the last ``verify``, or a read by this object), "unverified"
        (committed after the last verify, or never verified); null for rows that are not ok or dead."""
        doc = self._verify_doc or {}
        newest = doc.get("newest_commit_us", -1)
        n = table.num_rows
        at = table["committed_at"].cast("int64").to_numpy(zero_copy_only=False)  # float with NaN where null
        verified = np.nan_to_num(at, nan=np.inf) <= newest
        status = table["status"].to_numpy(zero_copy_only=False)
        live = (status == "ok") | (status == "dead")
        corrupt = np.zeros(n, dtype=bool)
        suspects = {(layer, int(block)) for layer, block in doc.get("corrupt_blocks", [])}
        if suspects or self._found_corrupt:  # rare: a Python look at the rows of those layers only
            layers = table["layer"].to_numpy(zero_copy_only=False)
            blocks = table["block"].to_numpy(zero_copy_only=False)
            for layer in {lyr for lyr, _ in suspects | self._found_corrupt}:
                for i in np.flatnonzero(layers == layer):
                    key = (layer, int(blocks[i]))
                    corrupt[i] = key in self._found_corrupt or (key in suspects and verified[i])
        out = np.where(corrupt, "corrupt", np.where(verified, "verified", "unverified")).astype(object)
        out[~live] = None
        return pa.array(out, type=pa.string())

    def verification(self) -> dict[str, Any]:
        """What the last ``ldam-sweep verify`` found, as readers show it: ``state`` "never" (not
        verified), "current" (nothing committed since), "stale" (units committed since) or
        "damaged" (its record cannot be read), when, and the units per ``integrity`` value."""
        table = self.units(status=("ok", "dead"))
        counts = {k: 0 for k in ("verified", "unverified", "corrupt")}
        for v in table["integrity"].to_pylist():
            counts[v] += 1
        doc = self._verify_doc
        if self._verify_state == "corrupt":
            state = "damaged"
        elif doc is None:
            state = "never"
        else:
            state = "stale" if counts["unverified"] else "current"
        return {"state": state, "verified_at": (doc or {}).get("verified_at"), "ok": (doc or {}).get("ok"), **counts}

    def realism(self) -> dict[str, Any] | None:
        """The realism record (``ldam-sweep realism``; docs/scores.md), with ``current`` per layer:
        False where units were committed to the layer after it was measured. None if never measured.
        Read with the manifest (``refresh()`` re-reads both)."""
        self._latest_rows()
        doc = self._realism
        if doc is None:
            return None
        marks = doc.get("commits") or {}
        now = self.commit_marks(list(marks))
        return {**doc, "current": {name: now[name] == mark for name, mark in marks.items()}}

    def commit_marks(self, layers: list[str]) -> dict[str, dict[str, Any]]:
        """Per layer: its committed rows and the newest commit time (what a realism record was measured from)."""
        table = self.units(status=None)
        marks = {}
        for name in layers:
            rows = table.filter(pc.equal(table["layer"], name))
            newest = pc.max(rows["committed_at"]).as_py() if rows.num_rows else None
            marks[name] = {"rows": rows.num_rows, "newest_commit": None if newest is None else newest.isoformat()}
        return marks

    def label_agreement(self, min_purity: float = 0.5) -> dict[str, dict[str, Any]]:
        """Per layer: of the units whose ``label_purity`` is at least ``min_purity`` and whose samples
        the network read, the share whose ``sample_label`` is their ``label`` ("samples and exemplars
        tell the same story"), and chance: the share expected if the two were drawn independently
        from their own distributions over those units (sum over classes of the product of shares)."""
        table = self.units(status="ok")
        out: dict[str, dict[str, Any]] = {}
        for lp in self.plan.layers:
            rows = [r for r in table.filter(pc.equal(table["layer"], lp.name)).select(
                ["label", "label_purity", "sample_label"]).to_pylist()
                if r["label"] is not None and r["sample_label"] is not None and (r["label_purity"] or 0) >= min_purity]
            if not rows:
                continue
            n = len(rows)
            labels = collections.Counter(r["label"] for r in rows)
            readings = collections.Counter(r["sample_label"] for r in rows)
            out[lp.name] = {"units": n, "agree": sum(r["label"] == r["sample_label"] for r in rows) / n,
                            "chance": sum(labels[c] * readings[c] for c in labels) / n ** 2}
        return out

    # -- metadata ----------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        """The job spec as submitted."""
        return dict(self.attrs["spec"])

    def model_spec(self) -> "ModelSpec":
        """The spec of the model the store was swept with (``model:``, else the plan's model name).
        Parsing it runs nothing; ``.runs_code()`` says whether loading it would (a factory,
        TorchScript), which readers that rebuild the model refuse without the user's word."""
        from ldam_sweep.spec import parse_model_spec

        return parse_model_spec(self.spec().get("model") or self.plan.model_name)

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
            dead, failed, corrupt = status.count("dead"), status.count("failed"), status.count("corrupt")
            done = status.count("ok") + dead
            out.append({
                "name": lp.name, "kind": lp.kind, "module_type": lp.module_type, "units": lp.units,
                "planned": lp.planned_units(), "blocks": len(lp.planned_blocks()), "block_size": lp.block_size,
                "objective": lp.objective, "output_shape": list(lp.output_shape),
                "done": done, "dead": dead, "failed": failed, "corrupt": corrupt,
                "pending": lp.planned_units() - done - failed - corrupt,
            })
        return out

    def informativeness(self) -> dict[str, dict[str, Any]]:
        """Per layer with scored units: the mean of each informativeness score (``observer_samples``,
        ``observer_starts``, ``observer_exemplars``: the 2-AFC observer's fraction correct, docs/scores.md)
        over the units whose samples have one, and how many; None for a score none of them has
        (starts of a sampler that starts from noise). Empty for stores swept without data or before
        the score existed."""
        table = self.units(status="ok")
        table = table.filter(pc.is_valid(table["observer_samples"]))  # the means are over the same units
        if table.num_rows == 0:
            return {}
        grouped = table.group_by("layer").aggregate([(c, "mean") for c in OBSERVER_COLUMNS] + [("observer_samples", "count")])
        by_layer = {r["layer"]: r for r in grouped.to_pylist()}
        return {lp.name: {c.removeprefix("observer_"): by_layer[lp.name][f"{c}_mean"] for c in OBSERVER_COLUMNS}
                | {"units": by_layer[lp.name]["observer_samples_count"]}
                for lp in self.plan.layers if by_layer.get(lp.name, {}).get("observer_samples_count")}

    def storage(self) -> dict[str, Any]:
        """How the store keeps images (``format``) and what it takes on disk: per layer the bytes of
        each array's block objects and, over the units done, ``bytes_per_unit`` in all and
        per array; ``bytes_per_unit`` over every layer at the top; ``bytes``: the arrays' objects and the
        manifest (an object store: every object). One listing of the store, or a stat per object."""
        p = self.plan
        fmt = {"pixels": p.pixels, "snapshot_shape": list(p.snapshot_shape), "image_shape": list(p.image_shape),
               "thumbnail_factor": p.thumbnail, "zstd_level": p.zstd_level}
        total, by_array = 0, collections.Counter()  # (layer folder, array) -> bytes
        for rel, size in self._file_sizes():
            total += size
            parts = rel.split("/", 3)
            if len(parts) >= 3 and parts[0] == "layers":
                by_array[parts[1], parts[2]] += size
        layers, total_bytes, total_units = {}, 0, 0
        done = {r["name"]: r["done"] for r in self.layers()}
        for lp in p.layers:
            folder = layer_path(lp.name).split("/", 1)[1]
            arrays = {name: by_array[folder, name] for name in p.arrays(lp)}
            n = done[lp.name]
            layers[lp.name] = {"bytes": sum(arrays.values()), "units_done": n, "arrays": arrays,
                               "bytes_per_unit": sum(arrays.values()) / n if n else None,
                               "per_unit": {k: v / n for k, v in arrays.items()} if n else None}
            total_bytes += sum(arrays.values())
            total_units += n
        return {"format": fmt, "bytes": total, "layers": layers,
                "bytes_per_unit": total_bytes / total_units if total_units else None}

    def _file_sizes(self) -> Iterator[tuple[str, int]]:
        """(path relative to the store, bytes) of every array object and manifest part. A local store:
        a stat of each block's object (the plan names them; a walk would visit ~6 folders per object);
        an object store: one paginated listing (sizes come with it: no request per object)."""
        root = self.loc.root.rstrip("/")
        if not self.loc.is_local:
            for path, info in self.loc.fs.find(root, detail=True).items():
                yield str(path)[len(root) + 1:] if str(path).startswith(root + "/") else str(path), int(info.get("size") or 0)
            return
        for lp in self.plan.layers:
            for name, spec in self.plan.arrays(lp).items():
                for block in range(lp.n_blocks):
                    rel = f"{layer_path(lp.name)}/{name}/{spec.block_key(block)}"
                    try:
                        yield rel, os.stat(os.path.join(root, rel)).st_size
                    except FileNotFoundError:  # not written yet
                        continue
        for path in manifest.part_files(self.loc):
            yield os.path.relpath(path, root), os.stat(path).st_size

    # -- the manifest ------------------------------------------------------------------------
    def manifest(self, layer: str | None = None) -> pa.Table:
        """Every published row, duplicates included (the raw commit log)."""
        if layer is not None:
            self.layer_plan(layer)
        return manifest.read(self.loc, layer, skip=self._skip_parts)

    def units(
        self,
        layer: str | None = None,
        *,
        unit: int | None = None,
        label: str | None = None,
        status: str | Sequence[str] | None = "ok",
        where: pc.Expression | None = None,
        sort: str | None = None,
        descending: bool = True,
        limit: int | None = None,
    ) -> pa.Table:
        """One row per committed unit (the newest commit of each), filtered and sorted.

        The manifest is read once per ``SweepStore`` and cached; call ``refresh()`` to see commits
        made after that (a sweep still running).

        ``label``: units whose label is this text, case-insensitively (``display_label``: the class of
        their top exemplars, else the network's reading of their samples; the atlas search's rule).
        ``status``: "ok" (default), "dead" (found dead, not sampled), "failed", "corrupt" (marked by
        ``verify --repair``), several of them as a list, or None for every row. ``where``: any pyarrow compute
        expression over manifest columns, e.g. ``pc.field("act_final_mean") > 10``. ``sort``: any
        column (descending by default). ``limit``: top-k after sorting.
        """
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise StoreError(f"limit must be a whole number >= 0 (rows to keep after sorting), got {limit!r}")
        table = self._latest_rows()
        if layer is not None:
            self.layer_plan(layer)
            table = table.filter(pc.equal(table["layer"], layer))
        if unit is not None:
            table = table.filter(pc.equal(table["unit"], unit))
        if label is not None:
            shown = pc.utf8_lower(pc.coalesce(table["label"], table["sample_label"]))
            table = table.filter(pc.fill_null(pc.equal(shown, str(label).lower()), False))
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
        return mark(table)  # a short HTML table in a notebook (ldam_sweep/notebook.py); a plain pa.Table elsewhere

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
        """The unit's layer plan, once its block's stored data matched the recorded checksum."""
        lp = self.layer_plan(layer)
        if not 0 <= unit < lp.units:
            raise StoreError(f"unit {unit} is out of range for layer {layer!r}: valid units are 0..{lp.units - 1}")
        rows = self.units(layer, unit=unit, status=None)
        if rows.num_rows == 0:
            raise StoreError(f"unit {unit} of layer {layer!r} is not committed yet (pending)")
        status = rows["status"][0].as_py()
        if status == "corrupt":
            raise CorruptBlockError(f"unit {unit} of layer {layer!r} is in block {rows['block'][0].as_py()}, marked corrupt "
                                    f"({rows['error'][0].as_py()}); {self.repair_hint()}")
        if status == "dead" and not allow_dead:
            raise StoreError(f"unit {unit} of layer {layer!r} is dead ({rows['error'][0].as_py()}): it was not sampled")
        if status not in ("ok", "dead"):
            raise StoreError(f"unit {unit} of layer {layer!r} failed: {rows['error'][0].as_py()}")
        self._verify_block(lp, int(rows["block"][0].as_py()), rows)
        return lp

    def repair_hint(self) -> str:
        return repair_hint(self.loc.url)

    def _verify_block(self, lp: LayerPlan, block: int, rows: pa.Table | None = None) -> None:
        """Check a committed block's stored data against its recorded checksum, once per instance:
        CorruptBlockError (naming layer, block and the repair command) on a mismatch or a read error.
        ``rows``: the block's committed rows when the caller has them (saves a manifest filter)."""
        if rows is None:
            rows = self.units(lp.name, status="ok")
            rows = rows.filter(pc.equal(rows["block"], block))
        if rows.num_rows == 0:
            return  # not committed: nothing recorded to check against
        newest = int(np.argmax(rows["committed_at"].cast("int64").to_numpy()))
        expected = rows["checksum"][newest].as_py()
        key = (lp.name, block, expected)
        if key in self._verified:
            return
        names = checksum_arrays(self.plan, lp, with_exemplars=rows["exemplar_max"][newest].as_py() is not None)
        lo, hi = lp.block_bounds(block)
        try:
            got = block_checksum({name: np.asarray(self._array(lp.name, name)[lo:hi]) for name in names})
        except Exception as err:  # a torn or garbled object: zarr or the codec cannot decode it
            self._mark_corrupt(lp.name, block)
            raise CorruptBlockError(f"layer {lp.name!r} block {block} cannot be read ({type(err).__name__}: "
                                    f"{str(err)[:200]}); {self.repair_hint()}") from None
        if got != expected:
            self._mark_corrupt(lp.name, block)
            raise CorruptBlockError(f"layer {lp.name!r} block {block} is corrupt: its stored data does not match the "
                                    f"checksum recorded at commit; {self.repair_hint()}")
        self._verified.add(key)

    def _mark_corrupt(self, layer: str, block: int) -> None:
        """From now on this object's ``units()`` shows the block's units with integrity "corrupt"."""
        self._found_corrupt.add((layer, block))
        if self._latest is not None:
            i = self._latest.column_names.index("integrity")
            self._latest = self._latest.set_column(i, "integrity", self._integrity(self._latest))

    def _array(self, layer: str, name: str):
        try:
            return self.root[f"{layer_path(layer)}/{name}"]
        except KeyError:
            raise StoreError(f"store {self.loc.url!r} has no {name!r} array for layer {layer!r}") from None

    def read_block(self, layer: str, block: int, names: Iterable[str] | None = None, *,
                   verify: bool = True, decoded: bool = True) -> dict[str, np.ndarray]:
        """The block's region (units ``block_bounds(block)``) of each named array, every array of the
        layer by default. Reads committed or not: check the manifest first. A committed block is
        checked against its recorded checksum first (``verify``; once per instance), so corrupt data
        is never returned: CorruptBlockError instead. ``decoded`` (default): as ``decode_block`` gives
        them (float32 images, ``finals`` in every store and among the default names); else the arrays
        exactly as stored."""
        lp = self.layer_plan(layer)
        lo, hi = lp.block_bounds(block)
        if verify:
            self._verify_block(lp, block)
        if names is None:
            names = list(self.plan.arrays(lp)) + (["finals"] if decoded and "finals" not in self.plan.arrays(lp) else [])
        names = list(names)
        if not decoded:
            return {name: np.asarray(self._array(lp.name, name)[lo:hi]) for name in names}
        stored = {name: np.asarray(self._array(lp.name, name)[lo:hi]) for name in stored_names(self.plan, lp, names)}
        return decode_block(self.plan, stored, names)

    def _unit_arrays(self, layer: str, unit: int, names: list[str], allow_dead: bool = False) -> dict[str, np.ndarray]:
        """One committed unit's arrays, decoded (``decode_block``), without the unit axis."""
        lp = self._committed(layer, unit, allow_dead=allow_dead)
        stored = {name: np.asarray(self._array(lp.name, name)[unit : unit + 1]) for name in stored_names(self.plan, lp, names)}
        return {name: value[0] for name, value in decode_block(self.plan, stored, names).items()}

    def samples(self, layer: str, unit: int) -> np.ndarray:
        """(chain, snapshot, C, h, w) float32 snapshots of a committed unit, at the size the store
        keeps them (thumbnails in a store with ``store.snapshot_size``: ``finals`` for full size)."""
        return self._unit_arrays(layer, unit, ["samples"])["samples"]

    def finals(self, layer: str, unit: int) -> np.ndarray:
        """(chain, C, H, W) float32: each chain's final sample at full size."""
        return self._unit_arrays(layer, unit, ["finals"])["finals"]

    def starts(self, layer: str, unit: int) -> np.ndarray:
        """(chain, C, h, w) float32: each chain's starting image (stores that keep starts), at the size
        of the stored snapshots."""
        if not self.plan.starts:
            raise StoreError(f"store {self.loc.url!r} keeps no chain starts (made before they were stored)")
        return self._unit_arrays(layer, unit, ["starts"])["starts"]

    def ladder(self, layer: str, unit: int) -> dict[str, np.ndarray]:
        """A committed unit's activation ladder (stores swept with ``sampler.ladder``): ``factors``
        (R,), ``images`` (chain, R, C, h, w) float32 each chain at the end of each rung (at the size of
        the stored snapshots), ``activation`` (chain, R), ``distance`` (chain, R) each one's RMS distance
        from the chain's start as a share of the pixel range (at the stored size), and, with a
        discriminator, ``realism`` (chain, R) log D."""
        if not self.plan.ladder:
            raise StoreError(f"store {self.loc.url!r} has no activation ladder (sampler.ladder was not set)")
        names = (["rungs", "rung_activation"] + (["starts"] if self.plan.starts else [])
                 + (["rung_realism"] if self.plan.realism else []))
        got = self._unit_arrays(layer, unit, names)
        out = {"factors": np.asarray(self.plan.ladder), "images": got["rungs"], "activation": got["rung_activation"]}
        if "starts" in got:
            lo, hi = self.plan.value_range
            diff = (got["rungs"] - got["starts"][:, None]) / (hi - lo)
            out["distance"] = np.sqrt((diff**2).reshape(*diff.shape[:2], -1).mean(-1))
        if "rung_realism" in got:
            out["realism"] = got["rung_realism"]
        return out

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
        got = self._unit_arrays(layer, unit, ["exemplars", "exemplar_activation"], allow_dead=True)
        return got["exemplars"], got["exemplar_activation"]

    def discriminator_info(self) -> dict[str, Any] | None:
        """The stored discriminator's training record (accuracy, settings, log), or None (none
        stored, or one whose record is incomplete or damaged: ``discriminator_state``)."""
        return self._frozen_info("discriminator")

    def discriminator_state(self) -> tuple[str, str]:
        """(state, what is wrong): "absent", "ok", "legacy" (stored before its bytes had a
        checksum), "incomplete" or "corrupt" (see ``integrity.frozen_state``)."""
        return self._frozen_check("discriminator")[:2]

    def discriminator_bytes(self) -> bytes | None:
        """The frozen discriminator the sweep used, as its saved file's bytes, or None. Checked
        against the sha256 its record names (once per object; the bytes returned are the ones
        checked): StoreDamagedError when they differ. Load it with
        ``ldam_sweep.sampling.discriminator.load_discriminator(blob, model)``."""
        return self._frozen_bytes("discriminator")

    def prior_info(self) -> dict[str, Any] | None:
        """The stored score prior's record (``method: walk``: its digest, size, training), or None."""
        return self._frozen_info("prior")

    def prior_state(self) -> tuple[str, str]:
        """(state, what is wrong) of the stored score prior: "absent", "ok", "incomplete" or "corrupt"."""
        return self._frozen_check("prior")[:2]

    def prior_bytes(self) -> bytes | None:
        """The score prior a ``walk`` sweep used, as its saved file's bytes (checked like
        ``discriminator_bytes``), or None. Load it with ``ls.load_score_prior(blob)``."""
        return self._frozen_bytes("prior")

    def _frozen_info(self, name: str) -> dict[str, Any] | None:
        return frozen_record(self.loc, name) if self._frozen_check(name)[0] in ("ok", "legacy") else None

    def _frozen_check(self, name: str) -> tuple[str, str, bytes | None]:
        """(state, what is wrong, its bytes) of the frozen model in group ``name``: read and checked
        once per object (``refresh()`` forgets it), so the state, the record and the bytes a caller
        gets are of one read."""
        if name not in self._frozen:
            blob = None
            if name in self.root:
                try:
                    blob = bytes(np.asarray(self.root[f"{name}/file"][:]))
                except Exception:  # frozen_state reads it again and says why
                    pass
            self._frozen[name] = (*frozen_state(self.loc, name, blob), blob)
        return self._frozen[name]

    def _frozen_bytes(self, name: str) -> bytes | None:
        state, why, blob = self._frozen_check(name)
        if state == "absent":
            return None
        if state not in ("ok", "legacy") or blob is None:
            raise StoreDamagedError(f"the {FROZEN[name]} stored in {self.loc.url!r} is {state}: {why or 'its bytes cannot be read'}; "
                                    f"`ldam-sweep run SPEC --store {self.loc.url}` makes it again (stage 1) and checks it "
                                    "is the one the committed blocks used")
        return blob

    def snapshot_steps(self) -> np.ndarray:
        return np.asarray(self.plan.snapshot_steps)

    def unit(self, layer: str, unit: int) -> UnitView:
        """One committed unit as an object that shows itself in a notebook (a PNG grid of chains x
        snapshots): samples, activation and realism traces, exemplars and its manifest row's scores."""
        lp = self._committed(layer, unit)
        row = self.units(layer, unit=unit).to_pylist()[0]
        has = set(self.plan.arrays(lp))
        with_exemplars = "exemplars" in has and row.get("exemplar_max") is not None
        ex = self.exemplars(layer, unit) if with_exemplars else (None, None)
        return UnitView(
            layer=lp.name, unit=int(unit), samples=self.samples(layer, unit), activation=self.trace(layer, unit),
            realism=self.trace(layer, unit, "realism") if "realism" in has else None,
            exemplars=ex[0], exemplar_activation=ex[1], scores=row,
            snapshot_steps=self.snapshot_steps(), value_range=tuple(self.plan.value_range),  # type: ignore[arg-type]
        )

    def __repr__(self) -> str:
        return f"SweepStore({self.loc.url!r}, layers={len(self.plan.layers)})"


def open_store(url: str, storage_options: dict | None = None) -> SweepStore:
    """Open a sweep store read-only; StoreError when the path is not one."""
    return SweepStore(url, storage_options)


register_notebook_display()  # in IPython/Jupyter only: units tables and units as HTML
