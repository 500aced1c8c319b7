"""Integrity check of every committed block: readable, right shape, finite where committed, and
the checksum recorded at commit time matches what is stored now. A dead unit (not sampled) must be
non-finite in every chain."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc

from ldam_sweep.planning import LayerPlan
from ldam_sweep.store.query import SweepStore
from ldam_sweep.store.writer import block_checksum


@dataclass(frozen=True)
class BlockProblem:
    layer: str
    block: int
    problem: str

    def __str__(self) -> str:
        return f"layer {self.layer!r} block {self.block}: {self.problem}"


def verify_store(store: SweepStore) -> tuple[int, list[BlockProblem]]:
    """(number of committed blocks checked, problems found)."""
    problems: list[BlockProblem] = []
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


def _check_block(store: SweepStore, lp: LayerPlan, block: int, units: np.ndarray, expected: str, with_exemplars: bool,
                 diverged: np.ndarray) -> list[BlockProblem]:
    plan = store.plan
    lo, hi = lp.block_bounds(block)
    names = ["samples", "activation"] + (["realism"] if plan.realism else [])
    if with_exemplars:
        names += ["exemplars", "exemplar_activation"]
    region = store.read_block(lp.name, block, names)
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
