"""Joining ChainResults of one layer sampled in several batches (e.g. after an out-of-memory split).

Chains depend only on (seed, layer, unit, chain), so the joined result equals one big batch."""

from __future__ import annotations

import dataclasses

import numpy as np

from ldam_sweep.sampling.chains import ChainResult


def concat_results(parts: list[ChainResult]) -> ChainResult:
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    for p in parts[1:]:
        if (p.layer, p.steps, p.chains, p.method, p.seed, p.lam) != (first.layer, first.steps, first.chains, first.method, first.seed, first.lam):
            raise ValueError("results to join must come from the same layer and sampler settings")
    realism = None if first.realism is None else np.concatenate([p.realism for p in parts])  # type: ignore[misc]
    dead = np.concatenate([np.zeros(len(p.units), dtype=bool) if p.dead is None else p.dead for p in parts])
    return dataclasses.replace(
        first,
        units=np.concatenate([p.units for p in parts]),
        samples=np.concatenate([p.samples for p in parts]),
        activation=np.concatenate([p.activation for p in parts]),
        realism=realism,
        dead=dead,
        starts=None if first.starts is None else np.concatenate([p.starts for p in parts]),  # type: ignore[misc]
    )
