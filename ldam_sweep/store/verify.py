"""Integrity check of every committed block: readable, right shape, finite where committed, and
the checksum recorded at commit time matches what is stored now; and of every manifest row: it
belongs to this store (its spec hash and generation) and to its plan (layer and unit). Repair: a
block that fails the check gets 'corrupt' tombstone rows, so it no longer counts as done and the
next run redoes it. A dead unit (not sampled) must be non-finite in every chain."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc

from ldam_sweep.planning import LayerPlan
from ldam_sweep.store.query import SweepStore, checksum_arrays
from ldam_sweep.store.writer import block_checksum, commit, tombstone_rows


@dataclass(frozen=True)
class BlockProblem:
    layer: str
    block: int
    problem: str

    def __str__(self) -> str:
        return f"layer {self.layer!r} block {self.block}: {self.problem}"


def verify_store(store: SweepStore) -> tuple[int, list[BlockProblem]]:
    """(number of committed blocks checked, problems found)."""
    problems: list[BlockProblem] = row_problems(store)
    checked = 0
    committed = store.units(status=("ok", "dead"))
    plan = store.plan
    for lp in plan.layers:
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
    region = store.read_block(lp.name, block, checksum_arrays(plan, lp, with_exemplars=with_exemplars), verify=False)
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


def block_states(store: SweepStore, problems: list[BlockProblem]) -> list[dict[str, Any]]:
    """Every planned block with its state: ``ok`` (committed, no problem), ``corrupt`` (committed,
    ``verify_store`` found a problem), ``failed`` (recorded as failed, no data committed) or
    ``missing`` (planned, nothing committed yet); for ``verify --json``."""
    rows = store.units(status=None)
    status = {(r["layer"], r["unit"]): r["status"] for r in rows.select(["layer", "unit", "status"]).to_pylist()}
    found: dict[tuple[str, int], list[str]] = {}
    for p in problems:
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


def repair_store(store: SweepStore, problems: list[BlockProblem]) -> int:
    """Mark every block with a problem as corrupt: one tombstone row per committed unit (status
    'corrupt', the problem as its error), published in one atomic commit. The newest row of each
    unit wins, so those blocks stop counting as done and the next ``run`` redoes exactly them.
    Returns the number of units marked."""
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
        commit(store.loc, [{**r, "generation": generation} for r in rows])
        store.refresh()
    return len(rows)
