"""Integrity check of a whole store, and its repair.

``verify_store`` checks every file the store depends on: the root metadata and its copy, every
group's and array's ``zarr.json`` (against the checksums the root records), the discriminator and
``walk``'s score prior (their records' seals, their bytes' sha256), every manifest part (the sha256 in its name), the lease,
the realism record; then every committed block: readable, right shape, finite where committed,
and the checksum recorded at commit time matches what is stored now; and every manifest row: it
belongs to this store (its spec hash and generation) and to its plan (layer and unit). A dead unit
(not sampled) must be non-finite in every chain.

``repair_store`` fixes what can be fixed without losing good data: the root from its copy (or
the copy from the root), damaged metadata rebuilt from the plan the root records, a damaged
discriminator or score prior, manifest part, lease or realism record set aside or removed (the next ``run``
redoes what they held), and every block with a problem marked corrupt, with 'corrupt' tombstone
rows for all layers published in one atomic commit, so the next run redoes exactly those blocks.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ldam_sweep import failpoints
from ldam_sweep.errors import StoreError
from ldam_sweep.store.schema import LayerPlan, StorePlan, stamp_generation, tombstone_rows
from ldam_sweep.store import manifest
from ldam_sweep.store.integrity import (METADATA_KEY, ROOT_COPY, VERIFY_RECORD, attrs_layout, group_document, read_bytes,
                                        read_verify_record, root_state, sha256, sidecar_path, store_layout,
                                        write_root, write_verify_record)
from ldam_sweep.store.layout import expected_metadata, layer_path, metadata_sums
from ldam_sweep.store.lease import LEASE_FILE, LeaseRecord
from ldam_sweep.store.location import StoreLocation
from ldam_sweep.store.query import SweepStore, checksum_arrays
from ldam_sweep.store.realism import REALISM_RECORD, realism_state
from ldam_sweep.store.writer import block_checksum

QUARANTINE_DIR = "quarantine"  # damaged files repair set aside (outside manifest/: no reader sees them)


@dataclass(frozen=True)
class StoreProblem:
    """A damaged file the store depends on (not a block): what, what is wrong, and what fixes it."""

    kind: str  # root | root-copy | metadata | discriminator | prior | part | lease | realism | verify-record | unrepairable
    path: str  # relative to the store
    problem: str
    fix: str
    layer_name: str | None = None  # a layer's metadata: its blocks are checked once it is rebuilt

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}; {self.fix}"


@dataclass(frozen=True)
class BlockProblem:
    layer: str
    block: int
    problem: str

    def __str__(self) -> str:
        return f"layer {self.layer!r} block {self.block}: {self.problem}"


def verify_store(store: SweepStore | str | StoreLocation) -> tuple[int, list[Any]]:
    """(number of committed blocks checked, problems found: ``StoreProblem`` for damaged files,
    ``BlockProblem`` for blocks and rows). Blocks of a layer whose metadata is damaged, and every
    block when the root is, are not checked (``repair_store`` rebuilds the metadata first)."""
    loc = _location(store)
    problems, attrs = file_problems(loc)
    if attrs is None or any(p.kind in ("root", "unrepairable") for p in problems):
        return 0, problems
    if not isinstance(store, SweepStore):
        store = SweepStore(loc.url, loc.storage_options)
    store.ignoring_parts({loc.join(p.path) for p in problems if p.kind == "part"})
    skip = {p.layer_name for p in problems if p.kind == "metadata" and p.layer_name}
    checked, block_problems = _block_problems(store, skip)
    return checked, problems + block_problems


def _location(store: SweepStore | str | StoreLocation) -> StoreLocation:
    if isinstance(store, SweepStore):
        return store.loc
    return StoreLocation.parse(store)


def _block_problems(store: SweepStore, skip_layers: set[str]) -> tuple[int, list[BlockProblem]]:
    problems: list[BlockProblem] = row_problems(store)
    checked = 0
    committed = store.units(status=("ok", "dead"))
    plan = store.plan
    for lp in plan.layers:
        if lp.name in skip_layers:
            continue
        rows = committed.filter(pc.equal(committed["layer"], lp.name))
        if rows.num_rows == 0:
            continue
        blocks = rows["block"].to_numpy()
        for block in np.unique(blocks):
            checked += 1
            brows = rows.filter(pc.equal(rows["block"], int(block)))
            newest = int(np.argmax(brows["committed_at"].cast("int64").to_numpy()))
            expected = brows["checksum"][newest].as_py()
            with_exemplars = brows["exemplar_max"][newest].as_py() is not None
            units = brows["unit"].to_numpy()
            diverged = brows["diverged_fraction"].to_numpy(zero_copy_only=False)
            diverged = np.where(np.asarray(brows["status"].to_pylist()) == "dead", 1.0, diverged)
            try:
                problems.extend(_check_block(store, lp, int(block), units, expected, with_exemplars, diverged))
            except Exception as err:  # unreadable object, torn shard, missing array
                problems.append(BlockProblem(lp.name, int(block), f"unreadable: {type(err).__name__}: {err}"))
    return checked, problems


def file_problems(loc: StoreLocation) -> tuple[list[StoreProblem], dict[str, Any] | None]:
    """Problems of every file the store depends on besides its blocks, and the root attributes to
    go by (the root's, else its copy's; None when neither can be read)."""
    url = loc.url
    repair = f"`ldam-sweep verify {url} --repair`"
    out: list[StoreProblem] = []
    copy_path = sidecar_path(loc, ROOT_COPY)
    root_bytes, copy_bytes = read_bytes(loc, "zarr.json"), read_bytes(loc, copy_path)
    (root_ok, root), (_, copy) = root_state(root_bytes), root_state(copy_bytes)
    if root is None and copy is None:
        what = "missing" if root_bytes is None else "damaged"
        if copy_bytes is None and root_ok == "missing":
            raise StoreError(f"{url!r} is not an ldam-sweep store: it has no zarr.json")
        out.append(StoreProblem("unrepairable", "zarr.json", f"the root metadata is {what} and so is its copy "
                                f"({copy_path}): the store's plan cannot be recovered",
                                f"start it over: `ldam-sweep run SPEC --store {url} --fresh`"))
        return out, None
    if root is None:
        out.append(StoreProblem("root", "zarr.json", "the root metadata is " + ("missing" if root_bytes is None else
                                "damaged (not valid JSON, or its attributes do not match their checksum)"),
                                f"{repair} restores it from its copy ({copy_path})"))
    elif root_ok == "ok" and (copy is None or copy != root):
        out.append(StoreProblem("root-copy", copy_path, f"the root metadata's copy is {'missing' if copy_bytes is None else 'damaged or stale'}",
                                f"{repair} writes it again from zarr.json"))
    meta = root if root is not None else copy
    assert meta is not None
    attrs = meta["attributes"]
    if attrs.get("format") != "ldam-sweep" or "plan" not in attrs:
        raise StoreError(f"{url!r} is a Zarr group but not an ldam-sweep store (no format='ldam-sweep' attribute)")
    plan = StorePlan.from_json(attrs["plan"])
    out += _metadata_problems(loc, plan, attrs, repair)
    out += _frozen_problems(loc, url)
    out += _part_problems(loc, repair)
    out += _record_problems(loc, url, repair)
    return out, attrs


def _metadata_problems(loc: StoreLocation, plan: StorePlan, attrs: dict[str, Any], repair: str) -> list[StoreProblem]:
    """Every group's and array's zarr.json against the sha256 the root recorded (a store made before
    those checksums: against the metadata its plan gives)."""
    recorded = attrs.get(METADATA_KEY)
    expected = None if recorded else expected_metadata(plan, attrs_layout(attrs))
    owner = {layer_path(lp.name): lp.name for lp in plan.layers}
    out = []
    for path in (recorded or expected or {}):
        data = read_bytes(loc, path)
        if recorded:
            bad = data is None or sha256(data) != recorded[path]
        elif not path.endswith("zarr.json"):  # a coordinate chunk: bytes the plan gives exactly
            bad = data != expected[path]  # type: ignore[index]
        else:
            try:
                bad = data is None or not _same_meaning(json.loads(data), json.loads(expected[path]))  # type: ignore[index]
            except ValueError:
                bad = True
        if bad:
            layer = next((name for prefix, name in owner.items() if path.startswith(prefix + "/")), None)
            out.append(StoreProblem("metadata", path, "missing" if data is None else "damaged (does not match the "
                                    "checksum the root recorded at creation)" if recorded else "damaged",
                                    f"{repair} rebuilds it from the store's plan", layer_name=layer))
    return out


def _same_meaning(stored: Any, expected: dict[str, Any]) -> bool:
    """A zarr.json of a store made before metadata checksums against the one its plan gives: equal in
    every field both have (another zarr version may add or omit a field that changes nothing)."""
    if not isinstance(stored, dict):
        return False
    return all(stored[k] == expected[k] for k in stored.keys() & expected.keys()) and "node_type" in stored


def _frozen_problems(loc: StoreLocation, url: str) -> list[StoreProblem]:
    """The discriminator's and the score prior's bytes and records (``integrity.frozen_state``)."""
    from ldam_sweep.store.integrity import FROZEN, frozen_state

    out = []
    for name in FROZEN:
        state, why = frozen_state(loc, name)
        if state in ("absent", "ok", "legacy"):
            continue
        what, verb = FROZEN[name], "trains" if name == "discriminator" else "makes"
        out.append(StoreProblem(name, name, f"the stored {what} is {state}: {why}",
                                f"`ldam-sweep run SPEC --store {url}` {verb} it again (stage 1; `--repair` first removes "
                                "the damaged one) and checks it is the one the committed blocks used"))
    return out


def _part_problems(loc: StoreLocation, repair: str) -> list[StoreProblem]:
    out = []
    for path in manifest.part_files(loc):
        rel = path[len(loc.root) + 1:]
        try:
            data = loc.fs.cat_file(path)
            problem = manifest.part_problem(path, data)
            if problem is None:
                pq.read_table(pa.BufferReader(data))  # a part from before checksummed names: it must parse
        except Exception as err:
            problem = f"unreadable ({type(err).__name__}: {str(err)[:160]})"
        if problem:
            out.append(StoreProblem("part", rel, f"manifest part: {problem}",
                                    f"{repair} sets it aside; the next run redoes the blocks it committed"))
    return out


def _record_problems(loc: StoreLocation, url: str, repair: str) -> list[StoreProblem]:
    """The lease, the realism record and the verify record."""
    out = []
    lease = read_bytes(loc, LEASE_FILE)
    if lease is not None:
        record = LeaseRecord.from_bytes(lease, None)
        if record.owner == "unknown":
            out.append(StoreProblem("lease", LEASE_FILE, "the lease cannot be read (it counts as held until it goes "
                                    "stale)", f"{repair} removes it once no driver has renewed it for "
                                    f"{record.stale_after:.0f}s; a run takes it over then too"))
    if realism_state(loc)[0] == "corrupt":
        out.append(StoreProblem("realism", sidecar_path(loc, REALISM_RECORD), "the realism record is damaged",
                                f"`ldam-sweep realism {url}` measures it again ({repair} removes the damaged one)"))
    if read_verify_record(loc)[0] == "corrupt":
        out.append(StoreProblem("verify-record", sidecar_path(loc, VERIFY_RECORD), "the last verify's record is damaged",
                                "any `ldam-sweep verify` writes it again"))
    return out


def row_problems(store: SweepStore) -> list[BlockProblem]:
    """Rows of the raw manifest (every published row, superseded ones included) that another store
    or driver wrote: another spec hash, another generation (null is allowed only in a store made
    before generations existed), or a (layer, unit) outside the plan. One problem per block and field."""
    rows = store.manifest().select(["layer", "unit", "block", "spec_hash", "generation"]).to_pylist()
    spec_hash = store.attrs.get("spec_hash")
    generation = str(store.attrs.get("generation", ""))
    planned = {lp.name: set(range(lp.units)) if lp.selected is None else set(lp.selected) for lp in store.plan.layers}
    found: dict[tuple[str, int, str], tuple[list[int], str]] = {}
    for r in rows:
        wrong = []
        if r["spec_hash"] != spec_hash:
            wrong.append(("spec_hash", f"spec_hash {str(r['spec_hash'])[:12]}, the store's is {str(spec_hash)[:12]}"))
        if r["generation"] != generation and not (r["generation"] is None and generation == ""):
            wrong.append(("generation", f"generation {r['generation']}, the store's is {generation or 'none'}"))
        if r["layer"] not in planned:
            wrong.append(("layer", "layer not in the store's plan"))
        elif r["unit"] not in planned[r["layer"]]:
            wrong.append(("unit", "unit not in the store's plan"))
        for field, text in wrong:
            units, _ = found.setdefault((r["layer"], int(r["block"]), field), ([], text))
            units.append(int(r["unit"]))
    return [BlockProblem(layer, block, f"manifest rows of units {sorted(set(units))} were not written for this store: {text}")
            for (layer, block, _field), (units, text) in sorted(found.items())]


def _check_block(store: SweepStore, lp: LayerPlan, block: int, units: np.ndarray, expected: str, with_exemplars: bool,
                 diverged: np.ndarray) -> list[BlockProblem]:
    plan = store.plan
    lo, hi = lp.block_bounds(block)
    region = store.read_block(lp.name, block, checksum_arrays(plan, lp, with_exemplars=with_exemplars), verify=False,
                             decoded=False)
    out = []
    specs = plan.arrays(lp)
    for name in ("samples", "activation"):
        shape = specs[name].block_shape(hi - lo)
        if region[name].shape != shape:
            out.append(BlockProblem(lp.name, block, f"{name} has shape {region[name].shape}, expected {shape}"))
    idx = units - lo
    # a chain may be non-finite only when it was flagged as diverged at commit time (dead units: all chains)
    nonfinite = np.zeros((len(idx), plan.chains), dtype=int)
    for name in ("samples", "activation"):
        data = region[name][idx].reshape(len(idx), plan.chains, -1)
        nonfinite += ~np.isfinite(data).all(axis=2)
    flagged = np.round(np.nan_to_num(np.asarray(diverged, dtype=float)) * plan.chains).astype(int)
    bad = (nonfinite > 0).sum(axis=1) != flagged
    if bad.any():
        out.append(BlockProblem(lp.name, block, f"committed units {units[bad].tolist()} have non-finite chains "
                                f"that were not flagged as diverged (or finite chains in a dead unit)"))
    got = block_checksum(region)
    if got != expected:
        out.append(BlockProblem(lp.name, block, f"checksum mismatch: manifest {expected}, stored data {got}"))
    return out


def block_states(store: SweepStore, problems: list[Any]) -> list[dict[str, Any]]:
    """Every planned block with its state: ``ok`` (committed, no problem), ``corrupt`` (committed,
    ``verify_store`` found a problem), ``failed`` (recorded as failed, no data committed) or
    ``missing`` (planned, nothing committed yet); for ``verify --json``."""
    rows = store.units(status=None)
    status = {(r["layer"], r["unit"]): r["status"] for r in rows.select(["layer", "unit", "status"]).to_pylist()}
    found: dict[tuple[str, int], list[str]] = {}
    for p in problems:
        if isinstance(p, BlockProblem):
            found.setdefault((p.layer, p.block), []).append(p.problem)
    out = []
    for lp in store.plan.layers:
        for block in lp.planned_blocks():
            units = lp.block_units(block)
            states = {status.get((lp.name, u)) for u in units}
            if "ok" in states:
                state = "corrupt" if (lp.name, block) in found else "ok"
            elif "corrupt" in states:  # marked by verify --repair: the next run redoes it
                state = "corrupt"
            else:
                state = "failed" if "failed" in states else "missing"
            out.append({"layer": lp.name, "block": int(block), "units": len(units), "state": state,
                        "problems": found.get((lp.name, block), [])})
    return out


@dataclass
class RepairReport:
    units_marked: int = 0  # units of blocks marked corrupt (tombstones): the next run redoes them
    fixed: list[str] | None = None  # what was repaired, one line each
    left: list[Any] | None = None  # problems repair cannot fix (unrepairable store, a lease still held)
    rerun: bool = False  # the next `run` has work to redo (blocks, the discriminator, parts set aside)


def repair_store(store: SweepStore | str | StoreLocation, problems: list[Any]) -> RepairReport:
    """Repair what ``verify_store`` found, without touching good data: restore the root from its copy
    (or the copy from the root), rebuild damaged metadata from the plan, set aside damaged manifest
    parts (into ``quarantine/``), remove a damaged discriminator, realism record or unreadable stale
    lease; then check the blocks again and mark every block with a problem as corrupt: one tombstone
    row per committed unit, for all layers in one manifest part (one atomic commit). The newest row
    of each unit wins, so those blocks stop counting as done and the next ``run`` redoes exactly them."""
    loc = _location(store)
    report = RepairReport(fixed=[], left=[])
    fs = loc.fs
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    for p in problems:
        if not isinstance(p, StoreProblem):
            continue
        if p.kind == "unrepairable":
            report.left.append(p)
            return report
        if p.kind in ("root", "root-copy"):
            good = read_bytes(loc, sidecar_path(loc, ROOT_COPY) if p.kind == "root" else "zarr.json")
            assert good is not None
            loc.write_atomic(loc.join(p.path), good)
        elif p.kind == "part":
            _set_aside(loc, p.path, stamp)
            report.rerun = True
        elif p.kind in ("discriminator", "prior"):
            fs.rm(loc.join(p.path), recursive=True)
            report.rerun = True
        elif p.kind == "realism":  # layout 2: the record is a group of its own; remove it whole
            whole = p.path.removesuffix("/zarr.json")
            fs.rm(loc.join(whole), recursive=whole != p.path)
        elif p.kind == "lease":
            info = fs.info(loc.join(LEASE_FILE))
            record = LeaseRecord.from_bytes(b"", float(info.get("mtime") or info.get("created") or time.time()))
            if not record.stale():
                report.left.append(p)
                continue
            fs.rm(loc.join(LEASE_FILE))
        elif p.kind != "metadata":
            continue  # the verify record is written again below
        report.fixed.append(f"{p.path}: " + {"root": "restored from its copy", "root-copy": "written again from zarr.json",
                                               "part": f"set aside in {QUARANTINE_DIR}/", "discriminator": "removed", "prior": "removed",
                                               "realism": "removed", "lease": "removed"}.get(p.kind, "rebuilt from the plan"))
    st = SweepStore(loc.url, loc.storage_options)  # the root may have changed
    damaged = [p.path for p in problems if isinstance(p, StoreProblem) and p.kind == "metadata"]
    if damaged:
        _rebuild_metadata(st, damaged)
        st = SweepStore(loc.url, loc.storage_options)
    checked, left = verify_store(st)
    blocks = [p for p in left if isinstance(p, BlockProblem)]
    report.left += [p for p in left if isinstance(p, StoreProblem) and p.kind not in ("verify-record", "lease")]
    failpoints.hit("repair.before-commit")
    report.units_marked = _tombstones(st, blocks)
    report.rerun = report.rerun or report.units_marked > 0
    record_verification(st.refresh(), [] if report.units_marked else blocks, report.left)
    return report


def _set_aside(loc: StoreLocation, rel: str, stamp: str) -> None:
    """Move a damaged file out of the store's live tree into ``quarantine/<stamp>/`` (kept for a post-mortem)."""
    dest = loc.join(QUARANTINE_DIR, stamp, rel)
    if store_layout(loc) >= 2 and read_bytes(loc, f"{QUARANTINE_DIR}/zarr.json") is None:  # a group: the top lists cleanly
        loc.write_atomic(loc.join(QUARANTINE_DIR, "zarr.json"), json.dumps(group_document(
            {"ldam_sweep": "files verify --repair set aside (damaged); nothing reads them"})).encode())
    loc.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
    loc.fs.mv(loc.join(rel), dest)


def _rebuild_metadata(st: SweepStore, paths: list[str]) -> None:
    """Write the damaged zarr.json files again as the plan gives them; where this zarr writes them
    differently from the one that created the store, record the new checksums in the root."""
    layout = attrs_layout(st.attrs)
    expected = expected_metadata(st.plan, layout)
    for path in paths:
        st.loc.write_atomic(st.loc.join(path), expected[path])
    recorded = st.attrs.get(METADATA_KEY)
    if recorded:
        now = metadata_sums(st.loc, st.plan, layout)
        if now != recorded:
            write_root(st.loc, {**st.attrs, METADATA_KEY: now})


def _tombstones(store: SweepStore, problems: list[BlockProblem]) -> int:
    """'corrupt' rows for every committed unit of each block with a problem, in one commit."""
    committed = store.units(status=("ok", "dead"))  # every unit that counts as done gets its tombstone
    rows = []
    for block in {(p.layer, p.block): p for p in problems}.values():
        lp = store.layer_plan(block.layer)
        mine = committed.filter(pc.and_(pc.equal(committed["layer"], lp.name), pc.equal(committed["block"], block.block)))
        problem = "; ".join(p.problem for p in problems if (p.layer, p.block) == (block.layer, block.block))
        rows += tombstone_rows(lp, block.block, sorted(mine["unit"].to_pylist()), problem,
                               spec_hash=store.attrs.get("spec_hash", ""))
    if rows:
        generation = store.attrs.get("generation")  # the tombstones belong to this store, like its rows
        manifest.publish(store.loc, stamp_generation(rows, generation), one_part=True)
        store.refresh()
    return len(rows)


def record_verification(store: SweepStore, blocks: list[Any], others: list[Any]) -> bool:
    """Write the verify record (``verify/zarr.json``; layout 1: ``verify.json``): what this verify covered (the manifest up to its newest commit) and
    found, so readers can mark corrupt units and units committed since. False when the store is
    not writable here (the result is only printed then)."""
    raw = store.manifest()
    newest = pc.max(raw["committed_at"]).cast("int64").as_py() if raw.num_rows else -1
    doc = {"verified_at": dt.datetime.now(dt.timezone.utc).isoformat(), "generation": store.attrs.get("generation"),
           "newest_commit_us": newest if newest is not None else -1, "rows": raw.num_rows,
           "ok": not blocks and not others,
           "corrupt_blocks": sorted({(p.layer, int(p.block)) for p in blocks if isinstance(p, BlockProblem)}),
           "problems": [str(p) for p in [*others, *blocks]][:100]}
    try:
        write_verify_record(store.loc, doc)
    except OSError:
        return False
    store.refresh()
    return True
